"""Liveness of the dependencies (/healthz) and readiness to serve (/readyz)."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from controller.auth.guard import METRICS
from controller.db.gauges import refresh_state_gauges
from controller.db.migrate import current_revision, head_revision
from controller.db.session import get_engine
from controller.kit.multiprocess import scrape_registry
from controller.settings import Settings

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)


def _failed(what: str, exc: Exception) -> dict[str, Any]:
    """These routes are open to anyone: the answer names the failure's kind, never the
    driver's text (which names hosts, ports, users); the log has the whole of it."""
    log.warning("health check: %s failed", what, exc_info=exc)
    return {"ok": False, "error": f"{what} unavailable ({type(exc).__name__})"}


def _check_database(settings: Settings) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        with get_engine(settings).connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        return _failed("database", exc)
    return {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}


def _check_redis(settings: Settings) -> dict[str, Any]:
    if settings.redis_url is None:
        return {"ok": True, "mode": "embedded (no broker, tasks run in-process)"}
    import redis

    started = time.perf_counter()
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except Exception as exc:
        return _failed("redis", exc)
    finally:
        client.close()
    return {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}


def _schema_revision(settings: Settings) -> dict[str, Any]:
    try:
        current, head = current_revision(settings), head_revision()
    except Exception as exc:
        return _failed("schema revision", exc)
    return {"ok": current == head, "current": current, "head": head}


@router.get("/healthz")
def healthz(request: Request) -> JSONResponse:
    settings: Settings = request.app.state.settings
    checks = {"database": _check_database(settings), "redis": _check_redis(settings)}
    ok = all(c["ok"] for c in checks.values())
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", "checks": checks}, 200 if ok else 503
    )


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    """Ready when the database answers and its schema is at the code's migration head:
    a replica of a newer release waits for ``edgefleet db upgrade`` instead of failing."""
    settings: Settings = request.app.state.settings
    checks = {"database": _check_database(settings)}
    if checks["database"]["ok"]:
        checks["schema"] = _schema_revision(settings)
    ok = all(c["ok"] for c in checks.values())
    return JSONResponse(
        {"status": "ready" if ok else "not ready", "checks": checks}, 200 if ok else 503
    )


@router.get("/metrics", include_in_schema=False, dependencies=[METRICS])
def metrics(request: Request) -> Response:
    try:
        with get_engine(request.app.state.settings).connect() as conn:
            refresh_state_gauges(conn)
    except Exception:  # the scrape still serves the process metrics
        log.warning("could not read fleet state for /metrics", exc_info=True)
    return Response(generate_latest(scrape_registry()), media_type=CONTENT_TYPE_LATEST)
