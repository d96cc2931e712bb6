from __future__ import annotations

from fastapi import APIRouter, status

from controller.agents.deps import AgentDep
from controller.auth.guard import OPERATOR, VIEWER
from controller.benchmarks import repository as repo
from controller.benchmarks import service
from controller.benchmarks.schemas import BenchmarkOut, BenchmarkRequestIn
from controller.registry.service import require_version
from controller.web.deps import API_V1, SessionDep, SettingsDep
from controller.web.params import IdPath
from node_agent.contract import BenchmarkJob, BenchmarkResult

router = APIRouter(prefix=API_V1, tags=["benchmarks"])


@router.post(
    "/models/{name}/versions/{version}/benchmarks",
    response_model=list[BenchmarkOut],
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        409: {"description": "the version is not Ready"},
        422: {"description": "no enrolled Ready node matches the selector"},
    },
    dependencies=[OPERATOR],
)
def request_benchmarks(
    name: str, version: str, body: BenchmarkRequestIn, session: SessionDep, settings: SettingsDep
) -> list[BenchmarkOut]:
    """Measure the version on every node class of the selected nodes (one node each)."""
    mv = require_version(session, name, version)
    rows = service.request(session, mv, name, body, stuck_s=settings.stuck_validation_s)
    return [BenchmarkOut.of(r, name, version) for r in rows]


@router.get(
    "/models/{name}/versions/{version}/benchmarks",
    response_model=list[BenchmarkOut],
    dependencies=[VIEWER],
)
def list_benchmarks(name: str, version: str, session: SessionDep) -> list[BenchmarkOut]:
    mv = require_version(session, name, version)
    return [BenchmarkOut.of(r, name, version) for r in repo.for_version(session, mv.id)]


@router.get("/agents/benchmarks", response_model=list[BenchmarkJob])
def agent_jobs(agent: AgentDep, session: SessionDep, settings: SettingsDep) -> list[BenchmarkJob]:
    """The benchmarks this node's agent is asked to run (they turn Running)."""
    return service.jobs_for(session, settings, agent.node)


@router.post(
    "/agents/benchmarks/{benchmark_id}",
    response_model=BenchmarkOut,
    responses={
        404: {"description": "no such job for this node"},
        409: {"description": "the job was already answered"},
    },
)
def agent_result(
    benchmark_id: IdPath, body: BenchmarkResult, agent: AgentDep, session: SessionDep
) -> BenchmarkOut:
    row, version = service.record(session, agent.node, benchmark_id, body)
    return BenchmarkOut.of(row, version.model.name, version.version)
