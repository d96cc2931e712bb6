"""The model zoo (tests/zoo.py) through the whole pipeline, one model per test: pushed
(registered and inspected), validated and benchmarked at its natural shape, served over
HTTP by edgefleet-serve on realistic inputs, optimized with the methods that apply (or a
lighter build pushed as its variant, compared in LiteRT), and each variant's comparison
report checked against an independent computation and the rollout's default requirement.

``EDGEFLEET_ZOO_REPORT=FILE`` writes the measured table (docs/registry.md has one)."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from controller.optimizations.compare import LATENCY_NOISE
from controller.registry import samples
from controller.registry.tflite_builder import build_tflite_mlp
from controller.settings import Settings
from node_agent.runtimes import open_runner
from tests import zoo
from tests.node_agent.test_serve_helpers import load_npz, npz_bytes, running, settings_for
from tests.registry.test_endpoints import push, pushed
from tests.rollouts.helpers import apply, rollout_doc

NPZ = "application/x-npz"
SAMPLES = 8  # realistic inputs per model: 6 calibrate a static int8 variant, 2 compare


@pytest.fixture(scope="module")
def table() -> Iterator[list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    yield rows
    if target := os.environ.get("EDGEFLEET_ZOO_REPORT"):
        Path(target).write_text(json.dumps(rows, indent=1) + "\n")


def _npz(feeds: list[zoo.Feeds]) -> bytes:
    """Samples along an extra leading axis, one array per input (the calibration form)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.stack([f[k] for f in feeds]) for k in feeds[0]})  # type: ignore[arg-type]
    return buffer.getvalue()


def _artifact(client: TestClient, name: str, version: str) -> bytes:
    resp = client.get(f"/v1/models/{name}/versions/{version}/artifact")
    assert resp.status_code == 200
    return bytes(resp.content)


def _classes(value: Any) -> np.ndarray | None:
    """Rows of class probabilities (softmax along the last axis), computed here apart
    from the optimizer's own reading."""
    array = np.asarray(value)
    if array.ndim < 2 or array.shape[-1] < 2 or array.dtype.kind != "f":
        return None
    rows = array.reshape(-1, array.shape[-1]).astype(np.float64)
    sums = rows.sum(axis=1)
    return rows if (rows >= 0).all() and np.abs(sums - 1).max() <= 1e-3 else None


def _agreement(fmt: str, parent: bytes, variant: bytes, feeds: list[zoo.Feeds]) -> float | None:
    a, b = open_runner(parent, fmt), open_runner(variant, fmt)
    agree = total = 0
    for f in feeds:
        ra, rb = a.run(f), b.run(f)
        for name, value in ra.items():
            rows = _classes(value)
            if rows is None:
                continue
            other = rb[name].reshape(rows.shape)
            agree += int((rows.argmax(axis=1) == other.argmax(axis=1)).sum())
            total += rows.shape[0]
    return round(agree / total, 4) if total else None


def _check_report(
    report: dict[str, Any],
    *,
    fmt: str,
    parent: bytes,
    variant: bytes,
    compared: list[zoo.Feeds],
    settings: Settings,
) -> None:
    """The report's numbers against ones computed here, and its verdict against them."""
    assert report["size_ratio"] == round(len(variant) / len(parent), 4)
    assert report["top1_agreement"] == _agreement(fmt, parent, variant, compared)
    agreement, p50 = report["top1_agreement"], report["latency_ratio"]["p50"]
    agrees = (
        report["allclose"] if agreement is None else agreement >= settings.variant_min_agreement
    )
    recommended = report["size_ratio"] < 1 and p50 <= 1 + LATENCY_NOISE and agrees
    verdict = report["verdict"]
    assert verdict["recommended"] is recommended, verdict
    assert bool(verdict["reasons"]) is not recommended
    assert verdict["bigger"] is (report["size_ratio"] >= 1)
    assert verdict["slower"] is (p50 > 1 + LATENCY_NOISE)


def _check_rollout_default(
    client: TestClient, model: str, version: str, report: dict[str, Any], settings: Settings
) -> None:
    """A rollout of the variant that says nothing of comparison: the default requirement
    (EDGEFLEET_VARIANT_MIN_AGREEMENT) refuses it exactly when the report disagrees."""
    doc = rollout_doc(f"{model}-zoo", version, model={"name": model, "version": version})
    got = apply(client, doc, dry_run=True)
    assert got.status_code == 200, got.text
    codes = {p["code"] for p in got.json()["results"][0]["problems"]}
    agreement = report["top1_agreement"]
    if agreement is None:
        expected = set() if report["allclose"] else {"OutputsDiffer"}
    else:
        expected = {"AgreementTooLow"} if agreement < settings.variant_min_agreement else set()
    assert codes & {"OutputsDiffer", "AgreementTooLow", "NoComparisonReport"} == expected


def _check_int8_goal(report: dict[str, Any], variant: bytes, parent: bytes) -> None:
    """zoo.INT8_GOAL: the variant is small enough and agrees, or it agrees and the report
    explains the size it misses by. The explanation is checked, not just present: its
    parts add up to the variant's bytes, no float weight remains (int8 took every weight
    it could), and what remains beyond the int8 weights is what keeps the size over."""
    max_size, min_agreement = zoo.INT8_GOAL
    agreement = report["top1_agreement"]
    assert agreement is not None
    assert agreement >= min_agreement
    size = report["details"]["size"]
    assert sum(size["bytes"].values()) == len(variant)
    assert size["ratio"]["int8_weights"] <= max_size
    assert size["floor"] == round((len(variant) - size["bytes"]["int8_weights"]) / len(parent), 4)
    if report["size_ratio"] > max_size:
        assert size["bytes"]["float"] <= 0.01 * len(parent), size["float_by_op"]
        assert size["floor"] + size["ratio"]["int8_weights"] > max_size
        assert size["explanation"].startswith(f"size x{report['size_ratio']}: int8 weights x")


def test_at_least_three_cnns_are_held_to_the_int8_goal() -> None:
    held = [m.name for m in zoo.CATALOGUE if any(method.int8_goal for method in m.methods)]
    assert len(held) >= 3, held


def _row(m: zoo.ZooModel, body: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "model": m.name,
        "what": m.what,
        "traits": m.traits,
        "format": m.format,
        "size_bytes": body["size_bytes"],
        "p50_ms": body["benchmark"]["p50_ms"],
        **extra,
    }


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    return {
        "size_ratio": report["size_ratio"],
        "p50_ratio": report["latency_ratio"]["p50"],
        "top1_agreement": report["top1_agreement"],
        "max_abs_error": report["max_abs_error"],
        "recommended": report["verdict"]["recommended"],
        "reasons": report["verdict"]["reasons"],
        "size_explanation": report.get("details", {}).get("size", {}).get("explanation"),
    }


@pytest.mark.parametrize("m", zoo.CATALOGUE, ids=[m.name for m in zoo.CATALOGUE])
def test_zoo_model_through_the_pipeline(
    m: zoo.ZooModel,
    client: TestClient,
    settings: Settings,
    tmp_path: Path,
    table: list[dict[str, Any]],
) -> None:
    data = m.file.read_bytes()
    feeds = [m.feeds(seed) for seed in range(SAMPLES)]
    meta = {"validation": m.hints} if m.hints else None

    # Register, inspect, validate and benchmark.
    body = pushed(client, data, name=m.name, version="1", metadata=meta)
    assert body["status"] == "Ready", body["status_message"]
    assert body["format"] == m.format
    runner = open_runner(data, m.format)
    assert body["signature"]["inputs"] == [s.as_dict() for s in runner.inputs]
    assert [o["name"] for o in body["signature"]["outputs"]] == [s.name for s in runner.outputs]
    natural = {k: list(v.shape) for k, v in feeds[0].items()}
    assert body["validation"]["input_shapes"] == natural
    assert body["benchmark"]["runs"] == settings.benchmark_runs
    assert 0 < body["benchmark"]["p50_ms"] <= body["benchmark"]["p95_ms"]

    # Served over HTTP on a realistic input: the runtime's own answer.
    want = runner.run(feeds[0])
    with (
        running(settings_for(tmp_path, m.file, model_name=m.name, warmup_inputs=m.hints)) as server,
        httpx.Client(base_url=server.url) as http,
    ):
        resp = http.post("/v1/infer", content=npz_bytes(**feeds[0]), headers={"Content-Type": NPZ})
        assert resp.status_code == 200, resp.text
        got = load_npz(resp.content)
    assert got.keys() == want.keys()
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6)
    if m.label is not None:  # the parent understands these inputs: a .py file is python
        assert m.answer is not None
        assert m.label(next(iter(want.values()))) == m.answer(0)

    # Optimized with each method that applies, compared with the parent.
    calibration = _npz(feeds)
    compared = feeds[len(feeds) * 3 // 4 :]
    for method in m.methods:
        version = f"1-{method.name}"
        resp = client.post(
            f"/v1/models/{m.name}/versions/1/variants",
            data={"method": method.name, "version": version, "params": json.dumps(method.params)},
            files={"calibration": ("samples.npz", calibration, "application/octet-stream")},
        )
        assert resp.status_code == 202, resp.text
        job = client.get(f"/v1/models/{m.name}/optimizations/{resp.json()['id']}").json()
        if method.fails is not None:
            assert job["status"] == "Failed"
            assert method.fails in job["message"]
            table.append(_row(m, body, method=method.name, failed=job["message"]))
            continue
        assert job["status"] == "Succeeded", job["message"]
        variant = client.get(f"/v1/models/{m.name}/versions/{version}").json()
        assert variant["status"] == "Ready", variant["status_message"]
        assert variant["parent"] == "1"
        report = job["report"]
        variant_bytes = _artifact(client, m.name, version)
        _check_report(
            report,
            fmt=m.format,
            parent=data,
            variant=variant_bytes,
            compared=compared,
            settings=settings,
        )
        if method.max_size_ratio is not None:
            assert report["size_ratio"] <= method.max_size_ratio
        if method.min_agreement is not None:
            assert report["top1_agreement"] >= method.min_agreement
        if method.int8_goal:
            _check_int8_goal(report, variant_bytes, data)
        _check_rollout_default(client, m.name, version, report, settings)
        table.append(_row(m, body, method=method.name, **_summary(report)))

    # A lighter build pushed as a variant of it: compared in its own runtime.
    if m.variant is not None:
        lite = m.variant_file().read_bytes()
        lite_body = pushed(client, lite, name=m.name, version="1-lite", metadata=meta, parent="1")
        assert lite_body["status"] == "Ready", lite_body["status_message"]
        assert lite_body["parent"] == "1"
        compared_lite = lite_body["lineage"]["report"]
        assert set(compared_lite["outputs"]) == {s.name for s in runner.outputs}
        assert compared_lite["samples"] > 0
        assert compared_lite["size_ratio"] == round(len(lite) / len(data), 4)
        _check_rollout_default(client, m.name, "1-lite", compared_lite, settings)
        table.append(_row(m, body, method="pushed lite build", **_summary(compared_lite)))
    if not m.methods and m.variant is None:
        table.append(_row(m, body, method=None))


def test_a_pushed_variant_must_share_its_parents_format_and_inputs(client: TestClient) -> None:
    assert push(client, samples.build_cnn(), name="cam", version="1").status_code == 201
    cases = [
        (build_tflite_mlp(), "9", "model 'cam' has no version '9'"),
        (build_tflite_mlp(), "1", "the parent 1 is onnx and this artifact tflite"),
        (samples.build_constant_cnn(), "1", "are not its parent 1's"),
    ]
    for data, parent, message in cases:
        resp = push(client, data, name="cam", version="2", parent=parent)
        assert resp.status_code == 422, resp.text
        detail = resp.json()["detail"][0]
        assert detail["loc"] == ["body", "parent"]
        assert message in detail["msg"]
    assert client.get("/v1/models/cam/versions/2").status_code == 404
