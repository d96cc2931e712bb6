"""Bounds on what a request names or carries, through the API: integers past Postgres'
bigint in paths and queries, and JSON form fields nested, sized or keyed beyond the
bounds. Each is a 422 with its field path, and nothing is stored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from controller.api.app import create_app
from controller.db.models import Model, ModelVersion, Optimization
from controller.registry import samples
from controller.settings import Settings
from controller.web.params import BIGINT_MAX
from tests.rollouts.helpers import apply, cluster_doc

PAST_BIGINT = BIGINT_MAX + 1


def count(session: Session, entity: type) -> int:
    return session.scalar(select(func.count()).select_from(entity)) or 0


def new_artifact_files(settings: Settings, before: set[Path]) -> set[Path]:
    root = settings.artifact_dir
    now = set(root.rglob("*")) if root.exists() else set()
    return {p for p in now - before if p.is_file()}


def first_error(resp: Any) -> dict[str, Any]:
    detail: list[dict[str, Any]] = resp.json()["detail"]
    return detail[0]


# --- integer parameters ------------------------------------------------------------


def test_every_integer_parameter_is_bounded_to_bigint(settings: Settings) -> None:
    """Every integer in a path or query string, on every route (a new route too)."""
    doc = create_app(settings).openapi()
    integers = [
        (path, p["name"], p["schema"])
        for path, operations in doc["paths"].items()
        for operation in operations.values()
        for p in operation.get("parameters", [])
        if p["schema"].get("type") == "integer"
    ]
    assert {name for _, name, _ in integers} >= {"offset", "job_id", "benchmark_id"}
    for path, name, schema in integers:
        assert schema.get("minimum", -1) >= 0, (path, name, schema)
        assert schema.get("maximum", BIGINT_MAX + 1) <= BIGINT_MAX, (path, name, schema)


@pytest.mark.parametrize(
    "path", ["/v1/models", "/v1/models/detector/versions", "/v1/rollouts", "/v1/nodes"]
)
def test_offset_past_bigint_is_422(client: TestClient, path: str) -> None:
    resp = client.get(path, params={"offset": PAST_BIGINT})
    assert resp.status_code == 422, resp.text
    error = first_error(resp)
    assert error["loc"] == ["query", "offset"]
    assert str(BIGINT_MAX) in error["msg"]
    assert client.get(path, params={"offset": 10**30}).status_code == 422


def test_offset_at_bigint_is_an_empty_page(client: TestClient) -> None:
    resp = client.get("/v1/models", params={"offset": BIGINT_MAX})
    assert resp.status_code == 200, resp.text
    assert resp.json()["items"] == []


def test_optimization_id_past_bigint_is_422(client: TestClient) -> None:
    resp = client.get(f"/v1/models/detector/optimizations/{PAST_BIGINT}")
    assert resp.status_code == 422, resp.text
    assert first_error(resp)["loc"] == ["path", "job_id"]
    assert client.get("/v1/models/detector/optimizations/0").status_code == 422
    at_max = client.get(f"/v1/models/detector/optimizations/{BIGINT_MAX}")
    assert at_max.status_code == 404, at_max.text


def test_benchmark_id_past_bigint_is_422(
    client: TestClient, sim_fleet: None, join_token: str
) -> None:
    assert apply(client, cluster_doc("site", 1)).status_code == 200
    enrolled = client.post(
        "/v1/agents/enroll", json={"cluster": "site", "node": "site-n0", "join_token": join_token}
    )
    assert enrolled.status_code == 200, enrolled.text
    agent = {"Authorization": f"Bearer {enrolled.json()['credential']}"}
    result = {"ok": True, "runs": 1}
    resp = client.post(f"/v1/agents/benchmarks/{PAST_BIGINT}", json=result, headers=agent)
    assert resp.status_code == 422, resp.text
    assert first_error(resp)["loc"] == ["path", "benchmark_id"]
    at_max = client.post(f"/v1/agents/benchmarks/{BIGINT_MAX}", json=result, headers=agent)
    assert at_max.status_code == 404, at_max.text


# --- JSON form fields --------------------------------------------------------------


def push(client: TestClient, metadata: str, *, version: str = "1.0.0") -> Any:
    return client.post(
        "/v1/models/detector/versions",
        data={"version": version, "metadata": metadata},
        files={"file": ("m.onnx", samples.build_cnn(), "application/octet-stream")},
    )


def nested(levels: int) -> str:
    return '{"labels": {}, "description": "x", "validation": ' + "[" * levels + "]" * levels + "}"


@pytest.mark.parametrize(
    ("metadata", "loc", "words"),
    [
        pytest.param(
            nested(3000),
            ["body", "metadata"],
            "metadata is nested more than 64 levels deep (EDGEFLEET_MAX_NESTING_DEPTH)",
            id="nested-3000",
        ),
        pytest.param(
            nested(70),
            ["body", "metadata", "validation", *[0] * 63],
            "metadata is nested more than 64 levels deep",
            id="nested-70",
        ),
        pytest.param(
            '{"description": "a", "labels": {"team": "x", "team": "y"}}',
            ["body", "metadata", "labels", "team"],
            "metadata repeats the key 'team' in one object",
            id="repeated-key",
        ),
        pytest.param(
            '{"description": ' + "9" * 5000 + "}",
            ["body", "metadata"],
            "metadata is not valid JSON: Exceeds the limit (4300 digits)",
            id="huge-integer",
        ),
    ],
)
def test_model_push_metadata_out_of_bounds(
    client: TestClient,
    session: Session,
    settings: Settings,
    artifact_files: set[Path],
    metadata: str,
    loc: list[str | int],
    words: str,
) -> None:
    resp = push(client, metadata)
    assert resp.status_code == 422, resp.text
    error = first_error(resp)
    assert error["loc"] == loc
    assert words in error["msg"]
    assert count(session, Model) == 0
    assert count(session, ModelVersion) == 0
    assert new_artifact_files(settings, artifact_files) == set()


def test_model_push_metadata_within_the_bounds(client: TestClient) -> None:
    hints = {"validation": {"dims": {"batch": 1}}, "labels": {"team": "x"}}
    resp = push(client, json.dumps(hints))
    assert resp.status_code == 201, resp.text


def test_model_push_metadata_value_budget(
    client: TestClient, session: Session, settings: Settings
) -> None:
    old = settings.max_input_nodes
    settings.max_input_nodes = 100
    try:
        resp = push(client, json.dumps({"labels": {f"k{i}": "v" for i in range(200)}}))
    finally:
        settings.max_input_nodes = old
    assert resp.status_code == 422, resp.text
    assert "more than 100 values (EDGEFLEET_MAX_INPUT_NODES)" in first_error(resp)["msg"]
    assert count(session, ModelVersion) == 0


def test_variant_params_out_of_bounds(client: TestClient, session: Session) -> None:
    assert push(client, "{}").status_code == 201
    for params, loc, words in [
        ("[" * 5000 + "]" * 5000, ["body", "params"], "params is nested more than 64 levels"),
        ('{"sparsity": 0.5, "sparsity": 0.9}', ["body", "params", "sparsity"], "repeats the key"),
    ]:
        resp = client.post(
            "/v1/models/detector/versions/1.0.0/variants",
            data={"method": "prune", "version": "1.0.0-pruned", "params": params},
        )
        assert resp.status_code == 422, resp.text
        error = first_error(resp)
        assert error["loc"] == loc
        assert words in error["msg"]
    assert count(session, Optimization) == 0
    assert count(session, ModelVersion) == 1
