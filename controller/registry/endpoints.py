from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Header, Request, Response, UploadFile, status
from fastapi.responses import FileResponse

from controller.auth.guard import ARTIFACT_READER, OPERATOR, VIEWER
from controller.auth.service import Principal
from controller.registry import repository as repo
from controller.registry import service
from controller.registry.deps import StoreDep
from controller.registry.schemas import ModelOut, ModelVersionOut
from controller.registry.store import iter_file
from controller.web.deleted import Deleted
from controller.web.deps import API_V1, SessionDep, SettingsDep
from controller.web.pagination import Page, PageDep

router = APIRouter(prefix=f"{API_V1}/models", tags=["models"])


@router.get("", response_model=Page[ModelOut], dependencies=[VIEWER])
def list_models(session: SessionDep, page: PageDep) -> Page[ModelOut]:
    models, total = repo.list_models(session, limit=page.limit, offset=page.offset)
    counts = repo.version_counts(session, [m.id for m in models])
    items = [ModelOut.of(m, counts[m.id]) for m in models]
    return Page(items=items, total=total, limit=page.limit, offset=page.offset)


@router.get("/{name}", response_model=ModelOut, dependencies=[VIEWER])
def get_model(name: str, session: SessionDep) -> ModelOut:
    model = service.require_model(session, name)
    return ModelOut.of(model, repo.version_counts(session, [model.id])[model.id])


@router.post(
    "/{name}/versions",
    response_model=ModelVersionOut,
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"description": "identical bytes were already pushed as this version"},
        409: {"description": "this version exists with different bytes"},
        413: {"description": "artifact larger than EDGEFLEET_MAX_ARTIFACT_BYTES"},
        422: {"description": "not a valid ONNX or TFLite model, or a bad field"},
    },
    dependencies=[OPERATOR],
)
def push_version(
    name: str,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    response: Response,
    file: Annotated[UploadFile, File(description="the model artifact (ONNX or TFLite)")],
    version: Annotated[str, Form(description="immutable version string, e.g. 2.1.0")],
    metadata: Annotated[
        str | None, Form(description="JSON object: labels, description, validation hints")
    ] = None,
    parent: Annotated[
        str | None,
        Form(
            description="a version of this model that the artifact is a variant of (an int8 "
            "or lite build of it, in the same format): linked as its lineage, and compared "
            "with it on the same inputs"
        ),
    ] = None,
) -> ModelVersionOut:
    meta = service.parse_metadata(metadata, settings)
    result = service.push_version(
        session,
        store,
        name=name,
        version=version,
        chunks=iter_file(file.file),
        metadata=meta,
        parent=parent,
    )
    if not result.created:
        response.status_code = status.HTTP_200_OK
    response.headers["Location"] = f"/v1/models/{name}/versions/{version}"
    return ModelVersionOut.of(result.version, name)


@router.get("/{name}/versions", response_model=Page[ModelVersionOut], dependencies=[VIEWER])
def list_versions(name: str, session: SessionDep, page: PageDep) -> Page[ModelVersionOut]:
    model = service.require_model(session, name)
    rows, total = repo.list_versions(session, model.id, limit=page.limit, offset=page.offset)
    items = [ModelVersionOut.of(mv, name) for mv in rows]
    return Page(items=items, total=total, limit=page.limit, offset=page.offset)


@router.get("/{name}/versions/{version}", response_model=ModelVersionOut, dependencies=[VIEWER])
def get_version(name: str, version: str, session: SessionDep) -> ModelVersionOut:
    return ModelVersionOut.of(service.require_version(session, name, version), name)


@router.delete("/{name}/versions/{version}", response_model=Deleted, dependencies=[OPERATOR])
def delete_version(name: str, version: str, session: SessionDep) -> Deleted:
    """Delete a version that no rollout and no node uses (409 naming what does)."""
    service.delete_version(session, name, version)
    return Deleted(kind="ModelVersion", name=f"{name}:{version}")


@router.post(
    "/{name}/versions/{version}/validate",
    response_model=ModelVersionOut,
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[OPERATOR],
)
def revalidate(name: str, version: str, session: SessionDep) -> ModelVersionOut:
    return ModelVersionOut.of(service.revalidate(session, name, version), name)


@router.get(
    "/{name}/versions/{version}/artifact",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        206: {"description": "a byte range (Range: bytes=...)"},
        304: {"description": "If-None-Match matched the sha256 ETag"},
        403: {"description": "a node or cluster credential for a version not meant for it"},
    },
)
def download_artifact(
    name: str,
    version: str,
    request: Request,
    session: SessionDep,
    store: StoreDep,
    principal: Annotated[Principal, ARTIFACT_READER],
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The exact bytes. ``ETag`` is the sha256; ``Range`` requests let an edge node
    resume an interrupted download; the same ETag in ``If-Range`` keeps a resume safe.
    API tokens read any version; a node credential or an inference pod's artifact token
    only what its node or cluster is meant to run or benchmark."""
    mv = service.require_download(session, name, version, principal)
    etag = f'"{mv.sha256}"'
    if if_none_match is not None and etag in {t.strip() for t in if_none_match.split(",")}:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag})
    path = store.require(mv.sha256)
    ext = "tflite" if mv.format == "tflite" else "onnx"
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"{name}-{version}.{ext}",
        headers={
            "ETag": etag,
            "X-Edgefleet-Sha256": mv.sha256,
            # Private: the answer needs a credential, and a shared cache (an ingress, a
            # CDN) must not hand it to callers without one.
            "Cache-Control": "private, max-age=31536000, immutable",
            "Vary": "Authorization",
        },
    )
