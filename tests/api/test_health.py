from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from controller.api.app import create_app
from controller.settings import Settings


@pytest.fixture
def app_with(settings: Settings) -> Iterator[object]:
    clients: list[TestClient] = []

    def make(**changes: object) -> TestClient:
        client = TestClient(create_app(settings.model_copy(update=changes)))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def test_healthz_checks_database_and_redis(client: TestClient) -> None:
    resp = client.get("/healthz")
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "ok"
    assert body["checks"]["database"]["ok"] is True
    assert body["checks"]["redis"]["ok"] is True


def test_healthz_503_when_redis_is_down(app_with: object, settings: Settings) -> None:
    client = app_with(redis_url="redis://127.0.0.1:1/0")  # type: ignore[operator]
    resp = client.get("/healthz")
    assert resp.status_code == 503
    checks = resp.json()["checks"]
    assert checks["database"]["ok"] is True
    assert checks["redis"]["ok"] is False
    assert "Connection" in checks["redis"]["error"]
    # An open route: the kind of failure, never the address it was trying.
    assert "127.0.0.1" not in resp.text


def test_healthz_503_when_database_is_down(app_with: object) -> None:
    client = app_with(database_url="postgresql+psycopg://postgres@127.0.0.1:1/none")  # type: ignore[operator]
    resp = client.get("/healthz")
    assert resp.status_code == 503
    assert resp.json()["checks"]["database"]["ok"] is False
    assert "127.0.0.1" not in resp.text
    assert "postgres" not in resp.text
    assert client.get("/readyz").status_code == 503


def test_readyz_requires_schema_at_head(
    client: TestClient, app_with: object, scratch_database: str
) -> None:
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["schema"]["current"] == ready.json()["checks"]["schema"]["head"]
    unmigrated = app_with(database_url=scratch_database)  # type: ignore[operator]
    resp = unmigrated.get("/readyz")
    assert resp.status_code == 503
    assert resp.json()["checks"]["schema"]["current"] is None


def test_metrics_and_openapi(client: TestClient) -> None:
    client.get("/v1/models")
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert (
        'edgefleet_http_request_duration_seconds_count{method="GET",route="/v1/models",status="2xx"}'
        in metrics.text
    )
    spec = client.get("/openapi.json").json()
    assert "/v1/models/{name}/versions" in spec["paths"]


def test_unknown_route_and_method_use_the_error_shape(client: TestClient) -> None:
    resp = client.get("/v1/nothing-here")
    assert resp.status_code == 404
    assert resp.json() == {"error": "not_found", "detail": "Not Found"}
    resp = client.delete("/v1/models")
    assert resp.status_code == 405
    assert resp.json()["error"] == "method_not_allowed"
