from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from controller.db.models import Event, Model, ModelVersion
from controller.registry import samples
from controller.registry.tflite_builder import build_tflite_mlp, build_tflite_two_inputs
from controller.settings import Settings
from tests import models as packaged


def push(
    client: TestClient,
    data: bytes,
    *,
    name: str = "detector",
    version: str = "1.0.0",
    metadata: dict[str, Any] | str | None = None,
    filename: str = "model.bin",
    parent: str | None = None,
) -> Any:
    form: dict[str, str] = {"version": version}
    if metadata is not None:
        form["metadata"] = metadata if isinstance(metadata, str) else json.dumps(metadata)
    if parent is not None:
        form["parent"] = parent
    return client.post(
        f"/v1/models/{name}/versions",
        data=form,
        files={"file": (filename, data, "application/octet-stream")},
    )


def pushed(client: TestClient, data: bytes, **kwargs: Any) -> dict[str, Any]:
    """Push, then read the version back: the push answers with the state at commit
    (Pending); validation runs after the commit (eagerly, in these tests)."""
    resp = push(client, data, **kwargs)
    assert resp.status_code in (200, 201), resp.text
    body = resp.json()
    got = client.get(f"/v1/models/{body['model']}/versions/{body['version']}")
    assert got.status_code == 200
    result: dict[str, Any] = got.json()
    return result


def count(session: Session, entity: type) -> int:
    return session.scalar(select(func.count()).select_from(entity)) or 0


def staged_files(settings: Settings) -> list[Path]:
    staging = settings.artifact_dir / ".staging"
    return list(staging.iterdir()) if staging.exists() else []


def test_push_onnx_cnn_is_inspected_validated_and_benchmarked(client: TestClient) -> None:
    data = samples.build_cnn()
    resp = push(client, data, filename="weights.tflite")  # the name must not matter
    assert resp.status_code == 201, resp.text
    assert resp.json()["status"] == "Pending"
    assert resp.headers["location"] == "/v1/models/detector/versions/1.0.0"
    body = client.get("/v1/models/detector/versions/1.0.0").json()
    assert body["format"] == "onnx"
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["size_bytes"] == len(data)
    sig = body["signature"]
    assert sig["inputs"] == [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 32, 32]}]
    assert sig["outputs"] == [{"name": "probabilities", "dtype": "float32", "shape": ["batch", 10]}]
    assert sig["opset"] == {"ai.onnx": samples.OPSET}
    assert sig["parameter_count"] == samples.cnn_parameter_count()
    assert "Conv" in sig["operators"]
    # Tasks are eager in this fixture: validation and benchmark ran right after commit.
    assert body["status"] == "Ready", body["status_message"]
    assert body["validation"]["passed"] is True
    assert body["validation"]["input_shapes"] == {"image": [1, 3, 32, 32]}
    assert body["validation"]["runtime"].startswith("onnxruntime ")
    bench = body["benchmark"]
    assert bench["runs"] == 20
    assert 0 < bench["p50_ms"] <= bench["p95_ms"] <= bench["max_ms"]
    assert bench["model_peak_bytes"] > 0
    assert bench["peak_rss_bytes"] > bench["model_peak_bytes"]

    again = client.get("/v1/models/detector/versions/1.0.0")
    assert again.status_code == 200
    assert again.json()["benchmark"] == bench


def test_push_tflite_model(client: TestClient) -> None:
    data = build_tflite_mlp(in_features=8, hidden=16, out_features=4)
    body = pushed(client, data, name="mlp", filename="model.onnx")
    assert body["format"] == "tflite"
    assert body["signature"]["inputs"] == [
        {"name": "input", "dtype": "float32", "shape": [None, 8]}
    ]
    assert body["signature"]["outputs"][0]["shape"] == [None, 4]
    assert body["signature"]["schema_version"] == 3
    assert body["signature"]["parameter_count"] == 8 * 16 + 16 + 16 * 4 + 4
    assert body["status"] == "Ready", body["status_message"]
    assert body["validation"]["runtime"].startswith(("ai_edge_litert", "tflite_runtime"))
    assert body["validation"]["input_shapes"] == {"input": [1, 8]}
    assert body["benchmark"]["p95_ms"] > 0


def test_tflite_model_with_two_inputs(client: TestClient) -> None:
    body = pushed(client, build_tflite_two_inputs(), name="adder")
    assert [i["name"] for i in body["signature"]["inputs"]] == ["a", "b"]
    assert body["status"] == "Ready", body["status_message"]


def test_several_inputs_sharing_a_symbolic_dimension(client: TestClient) -> None:
    body = pushed(client, samples.build_sequence_scorer(), name="scorer")
    assert body["signature"]["inputs"] == [
        {"name": "tokens", "dtype": "float32", "shape": ["batch", "seq", 16]},
        {"name": "mask", "dtype": "float32", "shape": ["batch", "seq"]},
    ]
    assert body["status"] == "Ready", body["status_message"]
    # Named dims get one size wherever they appear, so the inputs agree on ``seq``.
    assert body["validation"]["input_shapes"] == {"tokens": [1, 64, 16], "mask": [1, 64]}


def test_user_hints_set_dynamic_dims(client: TestClient) -> None:
    meta = {"validation": {"dims": {"seq": 7, "batch": 2}}, "labels": {"team": "nlp"}}
    body = pushed(client, samples.build_sequence_scorer(), name="scorer", metadata=meta)
    assert body["validation"]["input_shapes"] == {"tokens": [2, 7, 16], "mask": [2, 7]}
    assert body["metadata"] == meta


def test_identical_repush_is_idempotent(client: TestClient, session: Session) -> None:
    data = samples.build_cnn()
    first = push(client, data)
    second = push(client, data)
    assert (first.status_code, second.status_code) == (201, 200)
    assert second.json()["created_at"] == first.json()["created_at"]
    assert second.json()["sha256"] == first.json()["sha256"]
    assert count(session, ModelVersion) == 1


def test_different_bytes_for_existing_version_conflict(
    client: TestClient, session: Session
) -> None:
    original = samples.build_cnn(seed=0)
    assert push(client, original).status_code == 201
    resp = push(client, samples.build_cnn(seed=1))
    assert resp.status_code == 409
    body = resp.json()
    assert body["error"] == "conflict"
    assert "immutable" in body["detail"]
    stored = client.get("/v1/models/detector/versions/1.0.0").json()
    assert stored["sha256"] == hashlib.sha256(original).hexdigest()
    assert count(session, ModelVersion) == 1


@pytest.mark.parametrize(
    ("case", "mutate", "needle"),
    [
        ("truncated onnx", lambda b: b[: len(b) // 2], "truncated or corrupt"),
        ("random bytes", lambda b: bytes(range(256)) * 8, "ONNX"),
        ("text file", lambda b: b"name: not a model\n" * 20, "ONNX"),
        ("empty", lambda b: b"", "empty"),
        ("truncated tflite", lambda b: build_tflite_mlp()[:300], "TFLite"),
        ("tflite header only", lambda b: build_tflite_mlp()[:8], "TFLite"),
    ],
)
def test_corrupt_artifacts_are_rejected_and_leave_nothing(
    client: TestClient,
    session: Session,
    settings: Settings,
    artifact_files: set[Path],
    case: str,
    mutate: Any,
    needle: str,
) -> None:
    resp = push(client, mutate(samples.build_cnn()))
    assert resp.status_code == 422, (case, resp.text)
    body = resp.json()
    assert body["error"] == "validation_error"
    assert body["detail"][0]["loc"] == ["body", "file"]
    assert needle in body["detail"][0]["msg"], body
    assert count(session, Model) == 0
    assert count(session, ModelVersion) == 0
    assert staged_files(settings) == []
    current = set(settings.artifact_dir.rglob("*")) if settings.artifact_dir.exists() else set()
    assert {p for p in current - artifact_files if p.is_file()} == set()


def test_model_that_fails_at_run_time_is_invalid_with_runtime_error(client: TestClient) -> None:
    resp = push(client, samples.build_failing_model(), name="broken")
    assert resp.status_code == 201  # well-formed: stored, then judged by the runtime
    body = client.get("/v1/models/broken/versions/1.0.0").json()
    assert body["status"] == "Invalid"
    assert body["validation"]["passed"] is False
    assert "Reshape" in body["validation"]["error"]
    assert body["benchmark"] is None


def test_size_limit(client: TestClient, settings: Settings, session: Session) -> None:
    old = settings.max_artifact_bytes
    settings.max_artifact_bytes = 1000
    try:
        resp = push(client, samples.build_cnn())
    finally:
        settings.max_artifact_bytes = old
    assert resp.status_code == 413
    assert "EDGEFLEET_MAX_ARTIFACT_BYTES" in resp.json()["detail"]
    assert count(session, ModelVersion) == 0
    assert staged_files(settings) == []


@pytest.mark.parametrize(
    ("name", "version", "metadata", "loc"),
    [
        ("Bad_Name", "1.0.0", None, ["path", "name"]),
        ("-lead", "1.0.0", None, ["path", "name"]),
        ("x" * 64, "1.0.0", None, ["path", "name"]),
        ("ok", "1.0.0+build", None, ["body", "version"]),
        ("ok", "", None, ["body", "version"]),
        ("ok", "1.0", "{not json", ["body", "metadata"]),
        ("ok", "1.0", "[1, 2]", ["body", "metadata"]),
        (
            "ok",
            "1.0",
            '{"validation": {"dims": {"seq": "long"}}}',
            ["body", "metadata", "validation", "dims", "seq"],
        ),
        ("ok", "1.0", '{"validation": {"typo": 1}}', ["body", "metadata", "validation", "typo"]),
    ],
)
def test_bad_fields_name_their_path(
    client: TestClient,
    session: Session,
    name: str,
    version: str,
    metadata: str | None,
    loc: list[str],
) -> None:
    resp = push(client, samples.build_cnn(), name=name, version=version, metadata=metadata)
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["loc"] == loc
    assert count(session, ModelVersion) == 0


def test_missing_file_is_422_with_field_path(client: TestClient) -> None:
    resp = client.post("/v1/models/x/versions", data={"version": "1"})
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["loc"] == ["body", "file"]


def test_artifact_download_etag_and_ranges(client: TestClient) -> None:
    data = samples.build_cnn()
    sha = hashlib.sha256(data).hexdigest()
    push(client, data)
    url = "/v1/models/detector/versions/1.0.0/artifact"

    full = client.get(url)
    assert full.status_code == 200
    assert full.content == data
    assert full.headers["etag"] == f'"{sha}"'
    assert full.headers["accept-ranges"] == "bytes"

    assert client.get(url, headers={"If-None-Match": f'"{sha}"'}).status_code == 304

    # An edge node resuming an interrupted download: first 1000 bytes, then the rest.
    head = client.get(url, headers={"Range": "bytes=0-999"})
    assert head.status_code == 206
    assert head.content == data[:1000]
    assert head.headers["content-range"] == f"bytes 0-999/{len(data)}"
    tail = client.get(url, headers={"Range": "bytes=1000-", "If-Range": f'"{sha}"'})
    assert tail.status_code == 206
    assert hashlib.sha256(head.content + tail.content).hexdigest() == sha

    # A stale If-Range (the file changed) must send the whole entity, not a range.
    stale = client.get(url, headers={"Range": "bytes=1000-", "If-Range": '"other"'})
    assert stale.status_code == 200
    assert stale.content == data

    assert client.get(url, headers={"Range": f"bytes={len(data) + 10}-"}).status_code == 416


def test_listing_and_not_found(client: TestClient) -> None:
    push(client, samples.build_cnn(), name="a", version="1")
    push(client, samples.build_cnn(seed=2), name="a", version="2")
    push(client, build_tflite_mlp(), name="b", version="1")

    models = client.get("/v1/models").json()
    assert models["total"] == 2
    assert [(m["name"], m["version_count"], m["latest_version"]) for m in models["items"]] == [
        ("a", 2, "2"),
        ("b", 1, "1"),
    ]
    page = client.get("/v1/models/a/versions", params={"limit": 1, "offset": 1}).json()
    assert (page["total"], [v["version"] for v in page["items"]]) == (2, ["2"])

    missing = client.get("/v1/models/nope/versions/1")
    assert missing.status_code == 404
    assert missing.json() == {"error": "not_found", "detail": "model 'nope' not found"}
    assert client.get("/v1/models/a/versions/9").json()["detail"] == "model 'a' has no version '9'"
    assert client.get("/v1/models", params={"limit": 0}).json()["detail"][0]["loc"] == [
        "query",
        "limit",
    ]


def test_push_and_validation_are_audited(client: TestClient, session: Session) -> None:
    push(client, samples.build_cnn())
    reasons = session.scalars(
        select(Event.reason).where(Event.object_name == "detector:1.0.0").order_by(Event.id)
    ).all()
    assert reasons == ["Pushed", "Validated"]


def test_revalidate(client: TestClient) -> None:
    push(client, samples.build_cnn())
    resp = client.post("/v1/models/detector/versions/1.0.0/validate")
    assert resp.status_code == 202
    assert client.get("/v1/models/detector/versions/1.0.0").json()["status"] == "Ready"


def test_third_party_recurrent_model_with_state(client: TestClient) -> None:
    """Silero VAD (shipped by the silero-vad wheel): inputs ``input`` [?, ?], ``state``
    [2, ?, 128] and the int64 scalar ``sr``; the user supplies the sizes it needs."""
    data = packaged.silero_vad().read_bytes()
    meta = {
        "validation": {
            "shapes": {"input": [1, 512], "state": [2, 1, 128]},
            "values": {"sr": 16000},
        }
    }
    body = pushed(client, data, name="silero-vad", version="6.2.3", metadata=meta)
    assert body["signature"]["inputs"] == [
        {"name": "input", "dtype": "float32", "shape": [None, None]},
        {"name": "state", "dtype": "float32", "shape": [2, None, 128]},
        {"name": "sr", "dtype": "int64", "shape": []},
    ]
    assert [o["name"] for o in body["signature"]["outputs"]] == ["output", "stateN"]
    assert body["status"] == "Ready", body["status_message"]
    assert body["validation"]["output_shapes"]["stateN"] == [2, 1, 128]


def test_third_party_detector_with_dynamic_height_and_width(client: TestClient) -> None:
    data = packaged.ppocr_detector().read_bytes()
    body = pushed(client, data, name="ppocr-det", version="4.0.0")
    (inp,) = body["signature"]["inputs"]
    assert inp["name"] == "x"
    assert inp["dtype"] == "float32"
    assert inp["shape"] == [
        "p2o.DynamicDimension.0",
        3,
        "p2o.DynamicDimension.1",
        "p2o.DynamicDimension.2",
    ]
    assert body["status"] == "Ready", body["status_message"]
    assert body["validation"]["input_shapes"] == {"x": [1, 3, 64, 64]}
    assert body["validation"]["output_shapes"]["sigmoid_0.tmp_0"] == [1, 1, 64, 64]
    assert body["signature"]["parameter_count"] > 100_000
