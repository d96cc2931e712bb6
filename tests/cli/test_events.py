"""``GET /v1/events`` and ``edgefleet events KIND/NAME``: the audit log of clusters,
nodes, model versions and rollouts, for a viewer."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Connection

from controller.api.app import create_app
from controller.settings import Settings
from tests.cli.test_rollouts import cli
from tests.conftest import bearer
from tests.live import serve
from tests.rollouts.helpers import apply, cluster_doc, push_versions


@pytest.fixture
def fleet(client: TestClient, sim_fleet: None) -> TestClient:
    assert apply(client, cluster_doc("berlin", 2)).status_code == 200
    push_versions(client, "1.0.0")
    return client


def test_events_of_a_cluster_node_and_model_version(fleet: TestClient) -> None:
    viewer = bearer("viewer")
    cluster = fleet.get("/v1/events", params={"kind": "Cluster", "name": "berlin"}, headers=viewer)
    assert cluster.status_code == 200, cluster.text
    assert "Applied" in [e["reason"] for e in cluster.json()]
    version = fleet.get(
        "/v1/events", params={"kind": "ModelVersion", "name": "detector:1.0.0"}, headers=viewer
    )
    assert version.status_code == 200
    assert version.json()[0]["reason"] in ("Validated", "ValidationFailed")  # the newest
    nobody = fleet.get("/v1/events", params={"kind": "Cluster", "name": "nowhere"})
    assert nobody.json() == []


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"kind": "ApiToken", "name": "x"}, "kind"),
        ({"kind": "cluster", "name": "berlin"}, "kind"),
        ({"kind": "Cluster", "name": ""}, "name"),
        ({"kind": "Cluster", "name": "x" * 254}, "name"),
        ({"kind": "Cluster", "name": "berlin", "limit": 0}, "limit"),
        ({"kind": "Cluster"}, "name"),
    ],
)
def test_bad_queries_are_422_naming_the_parameter(
    client: TestClient, params: dict[str, object], field: str
) -> None:
    resp = client.get("/v1/events", params=params)
    assert resp.status_code == 422, resp.text
    assert field in json.dumps(resp.json())


@pytest.fixture
def api_url(
    settings: Settings, connection: Connection, redis_available: None, fleet: TestClient
) -> Iterator[str]:
    with serve(create_app(settings)) as url:
        yield url


def test_cli_shows_the_events_oldest_first(api_url: str) -> None:
    result = cli(api_url, "events", "cluster/berlin")
    assert result.exit_code == 0, result.output
    assert "Applied" in result.stdout
    data = json.loads(cli(api_url, "events", "model/detector:1.0.0", "-o", "json").stdout)
    assert data
    assert [e["id"] for e in data] == sorted(e["id"] for e in data)  # oldest first


def test_cli_refuses_a_target_that_is_not_kind_slash_name(api_url: str) -> None:
    result = cli(api_url, "events", "berlin")
    assert result.exit_code == 1
    assert "is not KIND/NAME" in result.output
