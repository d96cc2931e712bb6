from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from fastapi.responses import JSONResponse

from controller.auth.guard import ADMIN, OPERATOR, VIEWER
from controller.errors import NotFound
from controller.fleet import pull, service
from controller.fleet import repository as repo
from controller.fleet.deps import ClusterAgentDep
from controller.fleet.schemas import ClusterOut, JoinTokenIn, JoinTokenOut, NodeOut
from controller.web.deleted import Deleted
from controller.web.deps import API_V1, SessionDep, SettingsDep
from controller.web.errors import error_body
from controller.web.pagination import Page, PageDep
from node_agent.cluster.contract import (
    ClusterEnrollIn,
    ClusterEnrollOut,
    DesiredState,
    ObservedReport,
    ReportAck,
)

router = APIRouter(prefix=API_V1, tags=["fleet"])


@router.get("/clusters", response_model=list[ClusterOut], dependencies=[VIEWER])
def list_clusters(session: SessionDep) -> list[ClusterOut]:
    counts = repo.node_counts(session)
    return [ClusterOut.of(c, counts.get(c.id, {})) for c in repo.list_clusters(session)]


@router.get("/clusters/{name}", response_model=ClusterOut, dependencies=[VIEWER])
def get_cluster(name: str, session: SessionDep) -> ClusterOut:
    cluster = repo.get_cluster(session, name)
    if cluster is None:
        raise NotFound(f"cluster {name!r} not found")
    return ClusterOut.of(cluster, repo.node_counts(session).get(cluster.id, {}))


@router.delete("/clusters/{name}", response_model=Deleted, dependencies=[ADMIN])
def delete_cluster(
    name: str,
    session: SessionDep,
    settings: SettingsDep,
    cascade: Annotated[
        bool,
        Query(
            description="Remove the cluster's workloads first (through its driver), then "
            "the cluster; without it, a cluster whose nodes run a workload is a 409."
        ),
    ] = False,
) -> Deleted:
    """Delete a cluster whose nodes run no workload (409 while they do), or, with
    ``cascade``, remove its workloads first (409 while a rollout not over holds its
    nodes, or for a pull cluster; 503 if its API refuses, with nothing deleted)."""
    service.delete_cluster(session, name, settings, cascade=cascade)
    return Deleted(kind="Cluster", name=name)


@router.post("/clusters/{name}/sync", response_model=ClusterOut, dependencies=[OPERATOR])
def sync_cluster(name: str, session: SessionDep, settings: SettingsDep) -> ClusterOut:
    """Re-read the cluster's nodes now (beat also does it every 5 minutes)."""
    service.resync_cluster(session, name, settings)
    cluster = repo.get_cluster(session, name)
    assert cluster is not None
    return ClusterOut.of(cluster, repo.node_counts(session).get(cluster.id, {}))


@router.get("/nodes", response_model=Page[NodeOut], dependencies=[VIEWER])
def list_nodes(
    session: SessionDep, page: PageDep, cluster: Annotated[str | None, Query()] = None
) -> Page[NodeOut]:
    rows, total = repo.list_nodes(session, cluster=cluster, limit=page.limit, offset=page.offset)
    return Page(
        items=[NodeOut(**r._asdict()) for r in rows],
        total=total,
        limit=page.limit,
        offset=page.offset,
    )


@router.get("/clusters/{cluster}/nodes/{node}", response_model=NodeOut, dependencies=[VIEWER])
def get_node(cluster: str, node: str, session: SessionDep) -> NodeOut:
    found = repo.get_node(session, cluster, node)
    if found is None:
        raise NotFound(f"node {cluster}/{node} not found")
    return NodeOut.of(found, cluster)


@router.post("/clusters/{cluster}/nodes/{node}/reset", response_model=NodeOut, dependencies=[ADMIN])
def reset_node(cluster: str, node: str, session: SessionDep) -> NodeOut:
    """Revoke the node's agent credential so it may enrol again (a reinstalled node, or a
    credential that leaked). Its agent is refused until it enrols anew."""
    return NodeOut.of(service.reset_node(session, cluster, node), cluster)


# --- pull mode: the cluster agent's routes (controller/fleet/pull.py) -----------------

ClusterName = Annotated[str, Path(max_length=63)]


@router.post(
    "/clusters/{name}/pull/enroll",
    response_model=ClusterEnrollOut,
    tags=["pull"],
    responses={
        401: {
            "description": "not this cluster's join token, used, expired, or no such pull "
            "cluster (one answer for all)"
        },
        409: {"description": "its agent is enrolled (reset it first)"},
    },
)
def enroll_cluster_agent(
    name: ClusterName, body: ClusterEnrollIn, session: SessionDep, settings: SettingsDep
) -> ClusterEnrollOut | JSONResponse:
    """Exchange the cluster's join token (single use, expiring: from
    ``POST .../pull/join-token``) for the cluster's own credential (shown only here).
    The cluster agent enrols once; again only after an admin resets the cluster and
    issues a new join token. Authenticated by the join token in the body, not by a
    bearer credential."""
    got = pull.enroll(session, settings, cluster=name, join_token=body.join_token)
    if not isinstance(got, ClusterEnrollOut):
        return JSONResponse(error_body(got.code, got.detail), status_code=got.status_code)
    return got


@router.post(
    "/clusters/{name}/pull/join-token",
    response_model=JoinTokenOut,
    status_code=201,
    dependencies=[ADMIN],
    tags=["pull"],
    responses={
        404: {"description": "no such cluster"},
        409: {"description": "not in pull mode"},
    },
)
def issue_join_token(name: ClusterName, body: JoinTokenIn, session: SessionDep) -> JoinTokenOut:
    """A join token for this cluster's agent alone: single use, valid for ``expires``
    (default 24h, at most 7d), shown only in this answer; it replaces any unused one."""
    return pull.issue_join_token(session, name, expires=body.expires)


@router.get("/clusters/{name}/pull/desired", response_model=DesiredState, tags=["pull"])
async def desired_state(
    cluster: ClusterAgentDep,
    settings: SettingsDep,
    since: Annotated[int | None, Query(ge=0, description="the revision the agent has")] = None,
    wait: Annotated[
        float | None, Query(ge=0, le=300, description="seconds to wait for a change")
    ] = None,
) -> DesiredState:
    """The cluster's desired state: at once when its revision differs from ``since``
    (or without ``since``), else as soon as it changes, or ``changed: false`` after
    ``wait`` seconds (at most EDGEFLEET_PULL_POLL_TIMEOUT_S)."""
    return await pull.wait_for_desired(settings, cluster, since=since, wait_s=wait)


@router.post("/clusters/{name}/pull/observed", response_model=ReportAck, tags=["pull"])
def report_observed(
    cluster: ClusterAgentDep, body: ObservedReport, session: SessionDep, settings: SettingsDep
) -> ReportAck:
    """The cluster agent's report: the cluster's nodes and the inference pods it sees."""
    return pull.receive_report(session, settings, cluster, body)


@router.post("/clusters/{name}/pull/reset", status_code=204, dependencies=[ADMIN], tags=["pull"])
def reset_cluster_agent(name: ClusterName, session: SessionDep) -> None:
    """Revoke the cluster agent's credential so it may enrol again (a reinstalled agent,
    or a credential that leaked)."""
    pull.reset(session, name)
