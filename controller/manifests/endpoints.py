from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from controller.auth.guard import VIEWER, Operator
from controller.db.models import Role
from controller.errors import InvalidInput, NotFound
from controller.manifests import service
from controller.manifests.schemas import KINDS
from controller.registry.deps import StoreDep
from controller.web.body_limits import read_body
from controller.web.deps import API_V1, SessionDep, SettingsDep

router = APIRouter(prefix=API_V1, tags=["manifests"])

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml", "text/plain")


@router.post(
    "/apply",
    openapi_extra={
        "requestBody": {
            "content": {
                "application/yaml": {"schema": {"type": "string"}},
                "application/json": {"schema": {"type": "array", "items": {"type": "object"}}},
            },
            "required": True,
        }
    },
)
async def apply(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    principal: Operator,
    dry_run: Annotated[bool, Query(alias="dryRun")] = False,
) -> dict[str, Any]:
    """Apply manifests: a YAML stream (several documents with ``---``) or a JSON list.
    All or nothing: any invalid document rejects the whole call and stores nothing.
    ModelVersion and Rollout documents need an operator token; Cluster documents (their
    credentials reach remote API servers) an admin token."""
    raw = await read_body(
        request, limit=settings.max_manifest_bytes, setting="EDGEFLEET_MAX_MANIFEST_BYTES"
    )
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    text = raw.decode("utf-8", errors="replace")
    if ctype == "application/json":
        parse = service.parse_json
    elif ctype in YAML_TYPES or not ctype:
        parse = service.parse_yaml
    else:
        raise InvalidInput(
            f"unsupported content type {ctype!r}: send application/yaml or application/json",
            loc=("header", "content-type"),
        )
    # The body is read asynchronously; parsing it (seconds, for megabytes of YAML) and
    # the database and cluster work run in the thread pool, never on the event loop.
    docs = await run_in_threadpool(parse, text, settings)
    outcomes = await run_in_threadpool(
        service.apply_documents,
        session,
        docs,
        settings,
        store,
        dry_run=dry_run,
        may_apply_clusters=principal.role is not None and principal.role.allows(Role.ADMIN),
    )
    return {"dryRun": dry_run, "results": [o.as_dict() for o in outcomes]}


@router.get("/schemas", dependencies=[VIEWER])
def list_schemas() -> dict[str, str]:
    return {kind: f"{API_V1}/schemas/{kind}" for kind in KINDS}


@router.get("/schemas/{kind}", dependencies=[VIEWER])
def get_schema(kind: str) -> dict[str, Any]:
    """The JSON Schema of a manifest kind, for editors and CI linters."""
    if kind not in KINDS:
        raise NotFound(f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
    return service.json_schema(kind)
