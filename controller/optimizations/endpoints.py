from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile, status

from controller.auth.guard import OPERATOR, VIEWER
from controller.db.models import ModelVersion, Optimization
from controller.optimizations import service
from controller.optimizations.schemas import OptimizationOut
from controller.registry.deps import StoreDep
from controller.web.deps import API_V1, SessionDep, SettingsDep
from controller.web.params import IdPath

# Under the models' prefix and tag: a variant is derived from a model version and
# becomes one.
router = APIRouter(prefix=f"{API_V1}/models", tags=["models"])


def _job_out(session: SessionDep, name: str, job: Optimization) -> OptimizationOut:
    parent = session.get(ModelVersion, job.parent_version_id)
    return OptimizationOut(
        id=job.id,
        model=name,
        parent=parent.version if parent is not None else "",
        version=job.target_version,
        method=job.method,
        params=job.params,
        status=job.status,
        stage=job.stage,
        message=job.message,
        report=job.report,
        created_at=job.created_at,
        updated_at=job.updated_at,
    )


@router.post(
    "/{name}/versions/{version}/variants",
    response_model=OptimizationOut,
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[OPERATOR],
)
def derive_variant(
    name: str,
    version: str,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    method: Annotated[str, Form(description="dynamic-int8, static-int8, fp16 or prune")],
    variant_version: Annotated[str, Form(alias="version", description="the new version")],
    params: Annotated[str | None, Form(description="JSON object of method parameters")] = None,
    calibration: Annotated[
        UploadFile | None, File(description=".npz of sample inputs (leading axis = samples)")
    ] = None,
) -> OptimizationOut:
    """Derive an optimized variant (a new immutable version) and its comparison report."""
    job = service.request_variant(
        session,
        store,
        name=name,
        parent=version,
        version=variant_version,
        method=method,
        params_json=params,
        calibration=calibration.file.read() if calibration is not None else None,
        settings=settings,
    )
    return _job_out(session, name, job)


@router.get("/{name}/optimizations/{job_id}", response_model=OptimizationOut, dependencies=[VIEWER])
def get_optimization(name: str, job_id: IdPath, session: SessionDep) -> OptimizationOut:
    return _job_out(session, name, service.get_job(session, name, job_id))
