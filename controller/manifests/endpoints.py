from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from controller.api.deps import API_V1, SessionDep, SettingsDep, StoreDep
from controller.errors import InvalidInput, NotFound
from controller.manifests import service
from controller.manifests.schemas import KINDS

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
    dry_run: Annotated[bool, Query(alias="dryRun")] = False,
) -> dict[str, Any]:
    """Apply manifests: a YAML stream (several documents with ``---``) or a JSON list.
    All or nothing: any invalid document rejects the whole call and stores nothing."""
    raw = await request.body()
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    text = raw.decode("utf-8", errors="replace")
    if ctype == "application/json":
        try:
            body = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInput(
                f"not valid JSON: {exc.msg} at line {exc.lineno}", loc=("body",)
            ) from exc
        docs = body if isinstance(body, list) else [body]
    elif ctype in YAML_TYPES or not ctype:
        docs = service.parse_yaml(text)
    else:
        raise InvalidInput(
            f"unsupported content type {ctype!r}: send application/yaml or application/json",
            loc=("header", "content-type"),
        )
    # The body is read asynchronously; the database and cluster work runs in the thread
    # pool like every other handler, never on the event loop.
    outcomes = await run_in_threadpool(
        service.apply_documents, session, docs, settings, store, dry_run=dry_run
    )
    return {"dryRun": dry_run, "results": [o.as_dict() for o in outcomes]}


@router.get("/schemas")
def list_schemas() -> dict[str, str]:
    return {kind: f"{API_V1}/schemas/{kind}" for kind in KINDS}


@router.get("/schemas/{kind}")
def get_schema(kind: str) -> dict[str, Any]:
    """The JSON Schema of a manifest kind, for editors and CI linters."""
    if kind not in KINDS:
        raise NotFound(f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
    return service.json_schema(kind)
