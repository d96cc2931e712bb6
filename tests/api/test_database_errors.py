"""A database outage answers 503 in the one error shape, with Retry-After and nothing
of the connection in it; any other database error stays a 500."""

from __future__ import annotations

import psycopg
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, exc

from controller.web.errors import DATABASE_RETRY_AFTER_S, install_error_handlers
from tests.live import free_port

PORT = free_port()
URL = f"postgresql+psycopg://edgefleet:s3cret-pw@127.0.0.1:{PORT}/edgefleet"


def app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/refused")
    def refused() -> None:
        with create_engine(URL).connect():  # nothing listens there
            pass

    @app.get("/shutdown")
    def shutdown() -> None:
        orig = psycopg.errors.AdminShutdown("terminating connection due to administrator command")
        raise exc.OperationalError("UPDATE rollouts SET phase = %(phase)s", {"phase": "x"}, orig)

    @app.get("/duplicate")
    def duplicate() -> None:
        orig = psycopg.errors.UniqueViolation("duplicate key value violates unique constraint")
        raise exc.IntegrityError("INSERT INTO models", {}, orig)

    return app


def test_outage_is_503_with_retry_after() -> None:
    with TestClient(app(), raise_server_exceptions=False) as client:
        for path in ("/refused", "/shutdown"):
            resp = client.get(path)
            assert resp.status_code == 503, resp.text
            assert resp.json() == {
                "error": "service_unavailable",
                "detail": "the database is unavailable; retry later",
            }
            assert resp.headers["Retry-After"] == str(DATABASE_RETRY_AFTER_S)
            for leak in ("s3cret", "edgefleet", str(PORT), "127.0.0.1", "UPDATE", "psycopg"):
                assert leak not in resp.text


def test_other_database_errors_stay_500() -> None:
    with TestClient(app(), raise_server_exceptions=False) as client:
        resp = client.get("/duplicate")
    assert resp.status_code == 500
    assert resp.json()["error"] == "internal_error"
    assert "Retry-After" not in resp.headers
