"""Optimized variants: real onnxruntime quantization, fp16 and pruning; the comparison
report checked against an independent computation; the rollout-side requirement."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from onnx import numpy_helper
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from controller.db.models import ModelVersion
from controller.registry import samples
from controller.settings import Settings
from tests.rollouts.helpers import apply, cluster_doc, rollout_doc

CNN = {"channels": 64, "size": 32}


def push(client: TestClient, name: str, version: str, data: bytes) -> None:
    resp = client.post(
        f"/v1/models/{name}/versions",
        data={"version": version},
        files={"file": ("m.onnx", data, "application/octet-stream")},
    )
    assert resp.status_code == 201, resp.text


def calibration_npz(n: int, shape: tuple[int, ...], name: str = "image", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    arrays: dict[str, Any] = {name: rng.standard_normal((n, *shape)).astype(np.float32)}
    np.savez(buf, **arrays)
    return buf.getvalue()


def derive(
    client: TestClient,
    name: str,
    parent: str,
    version: str,
    method: str,
    params: dict[str, Any] | None = None,
    calibration: bytes | None = None,
) -> Any:
    files = (
        {"calibration": ("cal.npz", calibration, "application/octet-stream")}
        if calibration
        else None
    )
    data = {"method": method, "version": version}
    if params is not None:
        data["params"] = json.dumps(params)
    return client.post(f"/v1/models/{name}/versions/{parent}/variants", data=data, files=files)


def finished(client: TestClient, name: str, resp: Any) -> dict[str, Any]:
    assert resp.status_code == 202, resp.text
    job = client.get(f"/v1/models/{name}/optimizations/{resp.json()['id']}").json()
    assert job["status"] in ("Succeeded", "Failed")
    result: dict[str, Any] = job
    return result


def artifact(client: TestClient, name: str, version: str) -> bytes:
    resp = client.get(f"/v1/models/{name}/versions/{version}/artifact")
    assert resp.status_code == 200
    return bytes(resp.content)


def test_static_int8_variant_with_calibration(client: TestClient) -> None:
    original = samples.build_cnn(**CNN)
    push(client, "cam", "1.0.0", original)
    cal = calibration_npz(32, (1, 3, 32, 32))
    job = finished(
        client, "cam", derive(client, "cam", "1.0.0", "1.0.0-int8", "static-int8", calibration=cal)
    )
    assert job["status"] == "Succeeded", job["message"]
    variant = client.get("/v1/models/cam/versions/1.0.0-int8").json()
    assert variant["parent"] == "1.0.0"
    assert variant["lineage"]["method"] == "static-int8"
    assert variant["status"] == "Ready"  # validated and benchmarked like any version
    report = variant["lineage"]["report"]
    assert report["size_ratio"] <= 0.30
    assert report["warnings"] == []  # real samples were given

    # Independent computation on the held-out samples (the last quarter of the 32).
    quantized = artifact(client, "cam", "1.0.0-int8")
    assert b"QLinearConv" in quantized  # QOperator: the CPU provider's format
    held = np.load(io.BytesIO(cal))["image"][24:]
    a, b = ort.InferenceSession(original), ort.InferenceSession(quantized)
    outs_a = np.concatenate([a.run(None, {"image": x})[0] for x in held])
    outs_b = np.concatenate([b.run(None, {"image": x})[0] for x in held])
    assert report["samples"] == len(held)
    agreement = float(np.mean(outs_a.argmax(axis=1) == outs_b.argmax(axis=1)))
    assert report["top1_agreement"] == pytest.approx(agreement, abs=1e-4)
    assert report["max_abs_error"] == pytest.approx(float(np.abs(outs_a - outs_b).max()), abs=1e-5)
    assert report["size_bytes"] == {"original": len(original), "variant": len(quantized)}
    assert report["latency_ratio"]["p50"] > 0
    # Peak memory of each model, each measured alone in its own child process.
    memory = report["peak_memory"]
    for side in ("original", "variant"):
        assert memory[side]["peak_rss_bytes"] > memory[side]["model_peak_bytes"] > 0
    ratio = memory["variant"]["model_peak_bytes"] / memory["original"]["model_peak_bytes"]
    assert memory["model_peak_ratio"] == pytest.approx(ratio, abs=1e-4)


def test_dynamic_int8_on_matmul_model(client: TestClient) -> None:
    push(client, "scorer", "1", samples.build_sequence_scorer(features=256, hidden=512))
    rng = np.random.default_rng(3)
    tokens = rng.standard_normal((16, 1, 8, 256)).astype(np.float32)
    mask = np.ones((16, 1, 8), dtype=np.float32)
    buf = io.BytesIO()
    np.savez(buf, tokens=tokens, mask=mask)
    resp = derive(client, "scorer", "1", "1-dyn", "dynamic-int8", calibration=buf.getvalue())
    job = finished(client, "scorer", resp)
    assert job["status"] == "Succeeded", job["message"]
    report = job["report"]
    assert report["size_ratio"] < 0.35
    assert report["top1_agreement"] is None  # [batch, 1] scores: not a classifier
    # Independent check of the error on the held-out quarter.
    a = ort.InferenceSession(artifact(client, "scorer", "1"))
    b = ort.InferenceSession(artifact(client, "scorer", "1-dyn"))
    diffs = [
        np.abs(
            a.run(None, {"tokens": t, "mask": m})[0] - b.run(None, {"tokens": t, "mask": m})[0]
        ).max()
        for t, m in zip(tokens[12:], mask[12:], strict=True)
    ]
    assert report["max_abs_error"] == pytest.approx(float(max(diffs)), abs=1e-5)
    scale = float(np.abs(a.run(None, {"tokens": tokens[12], "mask": mask[12]})[0]).max())
    assert report["max_abs_error"] < 0.1 * max(scale, 1.0)


def test_generated_samples_are_flagged(client: TestClient) -> None:
    push(client, "cam", "1", samples.build_cnn())
    job = finished(client, "cam", derive(client, "cam", "1", "1-fp16", "fp16"))
    assert "generated random inputs" in job["report"]["warnings"][0]


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_pruning_reaches_the_requested_sparsity(client: TestClient, scope: str) -> None:
    push(client, "cam", "1", samples.build_cnn(**CNN))
    job = finished(
        client,
        "cam",
        derive(client, "cam", "1", f"1-p-{scope}", "prune", {"sparsity": 0.6, "scope": scope}),
    )
    assert job["status"] == "Succeeded", job["message"]
    model = onnx.load_from_string(artifact(client, "cam", f"1-p-{scope}"))
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer if len(t.dims) >= 2]
    zeros = sum(int(np.count_nonzero(w == 0)) for w in weights)
    total = sum(w.size for w in weights)
    assert abs(zeros / total - 0.6) <= 0.01
    assert job["report"]["details"]["achieved_sparsity"] == pytest.approx(zeros / total, abs=1e-4)
    assert job["report"]["compressed_size_ratio"] < 0.8  # the size won, compressed


def test_fp16(client: TestClient) -> None:
    push(client, "cam", "1", samples.build_cnn(**CNN))
    job = finished(client, "cam", derive(client, "cam", "1", "1-fp16", "fp16"))
    assert job["status"] == "Succeeded", job["message"]
    assert 0.45 < job["report"]["size_ratio"] < 0.6
    assert job["report"]["top1_agreement"] == 1.0


def test_failed_job_leaves_no_version(client: TestClient, session: Session) -> None:
    push(client, "cam", "1", samples.build_cnn())
    bad = calibration_npz(8, (1, 3, 32, 32), name="wrong_input")
    job = finished(
        client, "cam", derive(client, "cam", "1", "1-int8", "static-int8", calibration=bad)
    )
    assert job["status"] == "Failed"
    assert "lacks input(s) ['image']" in job["message"]
    assert client.get("/v1/models/cam/versions/1-int8").status_code == 404
    assert session.scalar(select(func.count()).select_from(ModelVersion)) == 1


@pytest.mark.parametrize(
    ("method", "params", "loc"),
    [
        ("int4", None, ["body", "method"]),
        ("prune", {"sparsity": 1.5}, ["body", "params", "sparsity"]),
        ("prune", {"sparsty": 0.5}, ["body", "params", "sparsty"]),
        ("fp16", "not json", ["body", "params"]),
    ],
)
def test_bad_requests(client: TestClient, method: str, params: Any, loc: list[str]) -> None:
    push(client, "cam", "1", samples.build_cnn())
    data = {"method": method, "version": "2"}
    if params is not None:
        data["params"] = params if isinstance(params, str) else json.dumps(params)
    resp = client.post("/v1/models/cam/versions/1/variants", data=data)
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["loc"] == loc


def test_tflite_parent_and_existing_target(client: TestClient) -> None:
    from controller.registry.tflite_builder import build_tflite_mlp

    push(client, "cam", "1", samples.build_cnn())
    push(client, "mlp", "1", build_tflite_mlp())
    assert "converted" in derive(client, "mlp", "1", "2", "fp16").json()["detail"][0]["msg"]
    assert derive(client, "cam", "1", "1", "fp16").status_code == 409


def test_rollout_refuses_a_variant_that_misses_its_agreement(
    client: TestClient, sim_fleet: None
) -> None:
    push(client, "detector", "1", samples.build_cnn(**CNN))
    cal = calibration_npz(32, (1, 3, 32, 32))
    good = finished(
        client,
        "detector",
        derive(client, "detector", "1", "1-int8", "static-int8", calibration=cal),
    )
    crushed = finished(
        client,
        "detector",
        derive(
            client,
            "detector",
            "1",
            "1-p95",
            "prune",
            {"sparsity": 0.97, "scope": "global"},
            calibration=cal,
        ),
    )
    assert good["status"] == crushed["status"] == "Succeeded"
    agreement = crushed["report"]["top1_agreement"]
    assert agreement < 0.9
    apply(client, cluster_doc("site", 2))
    need = {"comparison": {"minAgreement": 0.9}}

    dry = apply(client, rollout_doc("r", "1-p95", **need), dry_run=True).json()["results"][0]
    assert dry["problems"][0]["code"] == "AgreementTooLow"
    assert str(agreement) in dry["problems"][0]["message"]
    assert dry["plan"]["comparison"]["top1_agreement"] == agreement  # the numbers shown
    refused = apply(client, rollout_doc("r", "1-p95", **need))
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["type"] == "AgreementTooLow"

    ok = apply(client, rollout_doc("r", "1-int8", **need))
    assert ok.status_code == 200, ok.text
    not_variant = apply(
        client,
        rollout_doc("r2", "1", selector={"matchLabels": {"tier": "none"}}, **need),
        dry_run=True,
    )
    assert "NoComparisonReport" in {p["code"] for p in not_variant.json()["results"][0]["problems"]}

    # Without spec.comparison, the settings' default (EDGEFLEET_VARIANT_MIN_AGREEMENT,
    # 0.99) applies to a variant, and not to a version that is none.
    assert Settings().variant_min_agreement == 0.99
    assert good["report"]["top1_agreement"] >= 0.99
    silent = apply(client, rollout_doc("r3", "1-p95"), dry_run=True).json()["results"][0]
    (problem,) = [p for p in silent["problems"] if p["code"] == "AgreementTooLow"]
    assert f"on {agreement} of top-1" in problem["message"]
    assert "EDGEFLEET_VARIANT_MIN_AGREEMENT" in problem["message"]
    for version in ("1-int8", "1"):
        plain = apply(client, rollout_doc("r3", version), dry_run=True).json()["results"][0]
        assert not {p["code"] for p in plain["problems"]} & {
            "AgreementTooLow",
            "NoComparisonReport",
        }
    # A manifest's own requirement overrides the default.
    lenient = {"comparison": {"minAgreement": 0.0}}
    allowed = apply(client, rollout_doc("r3", "1-p95", **lenient), dry_run=True).json()
    assert "AgreementTooLow" not in {p["code"] for p in allowed["results"][0]["problems"]}
