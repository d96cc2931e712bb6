"""``edgefleet-serve`` over real HTTP on 127.0.0.1, in-process: real onnxruntime and LiteRT
on models built in code, outputs compared with a direct runtime run."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from ai_edge_litert.interpreter import Interpreter
from prometheus_client.parser import text_string_to_metric_families

from controller.kube.driver import WorkloadSpec
from controller.kube.objects import daemonset
from controller.registry.tflite_builder import reference_mlp
from node_agent import contract
from node_agent.serve import load_settings
from node_agent.server.app import InferenceServer
from node_agent.server.settings import ServeSettings, threads_from_cpu_limit
from tests.node_agent.test_serve_helpers import (
    SENTINEL,
    Hooks,
    Models,
    Origin,
    image,
    load_npz,
    npz_bytes,
    ort_run,
    running,
    settings_for,
    sha256,
    wait_for,
)

NPZ = "application/x-npz"


@pytest.fixture
def client(cnn_server: InferenceServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cnn_server.url, timeout=30) as c:
        yield c


def litert_run(path: Path, x: np.ndarray) -> np.ndarray:
    interp = Interpreter(model_path=str(path))
    detail = interp.get_input_details()[0]
    interp.resize_tensor_input(detail["index"], list(x.shape))
    interp.allocate_tensors()
    interp.set_tensor(detail["index"], x)
    interp.invoke()
    out: np.ndarray = interp.get_tensor(interp.get_output_details()[0]["index"]).copy()
    return out


def scrape(client: httpx.Client) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)], from the real Prometheus text parser."""
    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((dict(s.labels), s.value))
    return samples


def value(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    return sum(v for lab, v in samples.get(name, []) if labels.items() <= lab.items())


# ---------------------------------------------------------------------- probes, signature
def test_health_ready_and_signature(client: httpx.Client, models: Models) -> None:
    assert client.get("/healthz").json()["status"] == "alive"
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "model": "cnn", "version": "1"}
    model = client.get("/v1/model").json()
    assert model["name"] == "cnn"
    assert model["version"] == "1"
    assert model["sha256"] == sha256(models.bytes("cnn"))
    assert model["format"] == "onnx"
    assert model["runtime"].startswith("onnxruntime ")
    assert model["providers"] == ["CPUExecutionProvider"]
    assert model["threads"] == 1
    assert model["warmup_runs"] == 3
    assert model["inputs"] == [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 32, 32]}]
    assert model["outputs"] == [
        {"name": "probabilities", "dtype": "float32", "shape": ["batch", 10]}
    ]
    assert client.get("/nope").status_code == 404
    wrong = client.get("/v1/infer")
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "POST"


# ---------------------------------------------------------------------- inference
def test_infer_json_onnx_matches_onnxruntime(client: httpx.Client, models: Models) -> None:
    x = image(batch=2)
    resp = client.post("/v1/infer", json={"inputs": {"image": x.tolist()}})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["x-model-version"] == "1"
    body = resp.json()
    assert (body["model"], body["version"]) == ("cnn", "1")
    got = np.asarray(body["outputs"]["probabilities"], dtype=np.float32)
    want = ort_run(models.cnn, {"image": x})["probabilities"]
    assert got.shape == (2, 10)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_infer_npz_onnx_matches_onnxruntime(client: httpx.Client, models: Models) -> None:
    x = image(batch=3, seed=5)
    resp = client.post("/v1/infer", content=npz_bytes(image=x), headers={"Content-Type": NPZ})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == NPZ  # answered in kind
    got = load_npz(resp.content)
    assert set(got) == {"probabilities"}
    assert got["probabilities"].dtype == np.float32
    np.testing.assert_allclose(
        got["probabilities"], ort_run(models.cnn, {"image": x})["probabilities"], rtol=1e-6
    )
    # Accept overrides the request's form, both ways.
    as_json = client.post(
        "/v1/infer",
        content=npz_bytes(image=x),
        headers={"Content-Type": NPZ, "Accept": "application/json"},
    )
    assert as_json.headers["content-type"] == "application/json"
    np.testing.assert_allclose(
        np.asarray(as_json.json()["outputs"]["probabilities"], dtype=np.float32),
        got["probabilities"],
    )
    as_npz = client.post(
        "/v1/infer", json={"inputs": {"image": x.tolist()}}, headers={"Accept": NPZ}
    )
    np.testing.assert_allclose(load_npz(as_npz.content)["probabilities"], got["probabilities"])


def test_infer_two_inputs_with_a_named_dim(models: Models, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    tokens = rng.standard_normal((2, 7, 16)).astype(np.float32)
    mask = (rng.random((2, 7)) > 0.3).astype(np.float32)
    want = ort_run(models.scorer, {"tokens": tokens, "mask": mask})["score"]
    with (
        running(settings_for(tmp_path, models.scorer, model_name="scorer")) as server,
        httpx.Client(base_url=server.url) as c,
    ):
        resp = c.post(
            "/v1/infer", json={"inputs": {"tokens": tokens.tolist(), "mask": mask.tolist()}}
        )
        assert resp.status_code == 200, resp.text
        np.testing.assert_allclose(
            np.asarray(resp.json()["outputs"]["score"], dtype=np.float32), want, rtol=1e-5
        )
        # The same named dim "seq" must have one size in every input.
        bad = c.post(
            "/v1/infer",
            content=npz_bytes(tokens=tokens, mask=mask[:, :5]),
            headers={"Content-Type": NPZ},
        )
        assert bad.status_code == 422
        assert bad.json()["input"] == "mask"
        assert "'seq'" in bad.json()["detail"]
        missing = c.post("/v1/infer", json={"inputs": {"tokens": tokens.tolist()}})
        assert missing.status_code == 422
        assert missing.json()["error"] == "missing_input"
        assert missing.json()["input"] == "mask"
        assert "float32 [batch, seq]" in missing.json()["detail"]


def test_infer_tflite_json_and_npz_match_litert(models: Models, tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    direct = litert_run(models.mlp, x)
    np.testing.assert_allclose(
        direct, reference_mlp(x, in_features=8, hidden=16, out_features=4, seed=0), rtol=1e-5
    )
    with (
        running(settings_for(tmp_path, models.mlp, model_name="mlp")) as server,
        httpx.Client(base_url=server.url) as c,
    ):
        model = c.get("/v1/model").json()
        assert model["format"] == "tflite"  # detected from the bytes
        assert model["runtime"].startswith("ai_edge_litert ")
        assert model["inputs"] == [{"name": "input", "dtype": "float32", "shape": [None, 8]}]
        as_json = c.post("/v1/infer", json={"inputs": {"input": x.tolist()}})
        assert as_json.status_code == 200, as_json.text
        np.testing.assert_allclose(
            np.asarray(as_json.json()["outputs"]["probabilities"], dtype=np.float32),
            direct,
            rtol=1e-6,
        )
        # A different batch resizes the interpreter; npz in, npz out.
        one = x[:1]
        as_npz = c.post("/v1/infer", content=npz_bytes(input=one), headers={"Content-Type": NPZ})
        assert as_npz.status_code == 200, as_npz.text
        np.testing.assert_allclose(load_npz(as_npz.content)["probabilities"], direct[:1], rtol=1e-6)
        # Concurrent requests on one interpreter are serialized, never mixed up.
        with ThreadPoolExecutor(8) as pool:
            outs = list(
                pool.map(
                    lambda i: c.post(
                        "/v1/infer", json={"inputs": {"input": x[i % 3 : i % 3 + 1].tolist()}}
                    ).json()["outputs"]["probabilities"],
                    range(48),
                )
            )
        for i, out in enumerate(outs):
            np.testing.assert_allclose(
                np.asarray(out, np.float32), direct[i % 3 : i % 3 + 1], rtol=1e-6
            )
        bad = c.post("/v1/infer", json={"inputs": {"input": [[0.0] * 7]}})
        assert bad.status_code == 422
        assert bad.json()["input"] == "input"
        assert "dim 1 must be 8" in bad.json()["detail"]


# ---------------------------------------------------------------------- client errors
@pytest.mark.parametrize(
    ("request_kwargs", "status", "code", "named", "mentions"),
    [
        ({"json": {"inputs": {"img": [1.0]}}}, 422, "unknown_input", "img", "'image' (float32"),
        ({"json": {"inputs": {}}}, 422, "missing_input", "image", "float32 [batch, 3, 32, 32]"),
        (
            {"json": {"inputs": {"image": np.zeros((3, 32, 32)).tolist()}}},
            422,
            "wrong_shape",
            "image",
            "rank 3, expected 4",
        ),
        (
            {"json": {"inputs": {"image": np.zeros((1, 3, 32, 31)).tolist()}}},
            422,
            "wrong_shape",
            "image",
            "dim 3 must be 32",
        ),
        (
            {"json": {"inputs": {"image": [[["a"]]]}}},
            422,
            "invalid_input",
            "image",
            "numbers",
        ),
        (
            {"json": {"inputs": {"image": [[1.0], [2.0, 3.0]]}}},
            422,
            "invalid_input",
            "image",
            "rectangular",
        ),
        (
            {
                "content": npz_bytes(image=np.zeros((1, 3, 32, 32), np.float64)),
                "headers": {"Content-Type": NPZ},
            },
            422,
            "wrong_dtype",
            "image",
            "expected dtype float32",
        ),
        (
            {"content": b"not a zip", "headers": {"Content-Type": NPZ}},
            400,
            "invalid_npz",
            None,
            ".npz",
        ),
        (
            {"content": b"{oops", "headers": {"Content-Type": "application/json"}},
            400,
            "invalid_json",
            None,
            "JSON",
        ),
        ({"json": [1, 2]}, 400, "invalid_body", None, '"inputs"'),
        (
            {"content": b"x", "headers": {"Content-Type": "text/plain"}},
            415,
            "unsupported_media_type",
            None,
            NPZ,
        ),
    ],
)
def test_bad_requests_are_4xx_naming_the_input(
    client: httpx.Client,
    request_kwargs: dict[str, Any],
    status: int,
    code: str,
    named: str | None,
    mentions: str,
) -> None:
    resp = client.post("/v1/infer", **request_kwargs)
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"] == code
    assert body.get("input") == named
    assert mentions in body["detail"]
    if named is not None:
        assert repr(named) in body["detail"]
    # The connection stays usable and the request counted as rejected, not as inference.
    assert client.get("/healthz").status_code == 200
    samples = scrape(client)
    assert value(samples, "edgefleet_inference_rejected_total", code=str(status)) == 1
    assert value(samples, contract.REQUESTS_TOTAL) == 0


def test_npz_with_pickled_objects_is_refused_unread(client: httpx.Client) -> None:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, image=np.array([{"evil": 1}], dtype=object))
    resp = client.post("/v1/infer", content=buffer.getvalue(), headers={"Content-Type": NPZ})
    assert resp.status_code == 422
    assert resp.json()["input"] == "image"
    assert "allow_pickle" in resp.json()["detail"]


def test_json_values_are_cast_to_the_signature(models: Models, tmp_path: Path) -> None:
    with (
        running(settings_for(tmp_path, models.lookup, model_name="lookup")) as server,
        httpx.Client(base_url=server.url) as c,
    ):
        ok = c.post("/v1/infer", json={"inputs": {"index": [3, 7.0]}})  # 7.0 is an integer
        assert ok.status_code == 200, ok.text
        assert ok.json()["outputs"]["row"] == [[12, 13, 14, 15], [28, 29, 30, 31]]
        frac = c.post("/v1/infer", json={"inputs": {"index": [1.5]}})
        assert frac.status_code == 422
        assert frac.json()["input"] == "index"
        assert "integers" in frac.json()["detail"]
        assert "expected dtype int64" in frac.json()["detail"]
        huge = c.post("/v1/infer", json={"inputs": {"index": [2**70]}})
        assert huge.status_code == 422
        booleans = c.post("/v1/infer", json={"inputs": {"index": [True]}})
        assert booleans.status_code == 422


def test_oversized_body_is_413(models: Models, tmp_path: Path) -> None:
    settings = settings_for(tmp_path, models.cnn, max_body_bytes=4096)
    with running(settings) as server, httpx.Client(base_url=server.url) as c:
        x = image()
        resp = c.post("/v1/infer", content=npz_bytes(image=x), headers={"Content-Type": NPZ})
        assert resp.status_code == 413
        assert resp.json()["error"] == "payload_too_large"
        assert "4096" in resp.json()["detail"]
        # The server closed that connection; the client reconnects and goes on.
        small = c.post("/v1/infer", json={"inputs": {"image": [[[[0.0] * 32] * 32] * 3]}})
        assert small.status_code == 413  # JSON of that image is larger still
        assert c.get("/readyz").status_code == 200
        assert value(scrape(c), "edgefleet_inference_rejected_total", code="413") == 2


# ---------------------------------------------------------------------- failures, metrics
def test_runtime_failure_is_500_and_counted(models: Models, tmp_path: Path) -> None:
    with (
        running(settings_for(tmp_path, models.lookup, model_name="lookup")) as server,
        httpx.Client(base_url=server.url) as c,
    ):
        # Valid for the signature (int64 [batch]); out of the table's bounds in Gather.
        resp = c.post("/v1/infer", json={"inputs": {"index": [50]}})
        assert resp.status_code == 500
        assert resp.json()["error"] == "inference_failed"
        assert "out of data bounds" in resp.json()["detail"]
        assert c.post("/v1/infer", json={"inputs": {"index": [2]}}).status_code == 200
        samples = scrape(c)
        assert value(samples, contract.ERRORS_TOTAL) == 1
        assert value(samples, contract.REQUESTS_TOTAL) == 2
        assert value(samples, contract.INFERENCE_LATENCY + "_count") == 1  # successes only
        assert value(samples, contract.REQUEST_LATENCY + "_count") == 2
        assert c.get("/readyz").status_code == 200  # one bad request is not a dead model


def test_metrics_count_what_was_sent(client: httpx.Client, models: Models) -> None:
    ok_json, ok_npz, rejected = 5, 4, 3
    for i in range(ok_json):
        assert client.post(
            "/v1/infer", json={"inputs": {"image": image(seed=i).tolist()}}
        ).is_success
    for i in range(ok_npz):
        resp = client.post(
            "/v1/infer", content=npz_bytes(image=image(seed=i)), headers={"Content-Type": NPZ}
        )
        assert resp.is_success
    for _ in range(rejected):
        assert client.post("/v1/infer", json={"inputs": {}}).status_code == 422
    samples = scrape(client)
    served = ok_json + ok_npz
    assert value(samples, contract.REQUESTS_TOTAL) == served
    assert value(samples, contract.ERRORS_TOTAL) == 0
    assert value(samples, contract.INFERENCE_LATENCY + "_count") == served
    assert value(samples, contract.REQUEST_LATENCY + "_count") == served
    assert value(samples, "edgefleet_inference_rejected_total", code="422") == rejected
    inference_s = value(samples, contract.INFERENCE_LATENCY + "_sum")
    request_s = value(samples, contract.REQUEST_LATENCY + "_sum")
    assert 0 < inference_s < request_s  # the request includes the inference
    # Cumulative buckets end with +Inf holding every observation.
    buckets = [(lab["le"], v) for lab, v in samples[contract.INFERENCE_LATENCY + "_bucket"]]
    assert buckets[-1] == ("+Inf", served)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    [(info, one)] = samples["edgefleet_model_info"]
    assert one == 1
    assert info == {
        "model": "cnn",
        "version": "1",
        "sha256": sha256(models.bytes("cnn")),
        "runtime": f"onnxruntime {ort.__version__}",
        "provider": "CPUExecutionProvider",
    }
    assert value(samples, "edgefleet_model_ready") == 1


def test_per_server_registries(models: Models, tmp_path: Path) -> None:
    """Two servers in one process keep their own counters (no global registry)."""
    with (
        running(settings_for(tmp_path / "a", models.cnn)) as a,
        running(settings_for(tmp_path / "b", models.mlp, model_name="mlp")) as b,
        httpx.Client(base_url=a.url) as ca,
        httpx.Client(base_url=b.url) as cb,
    ):
        assert ca.post("/v1/infer", json={"inputs": {"image": image().tolist()}}).is_success
        assert value(scrape(ca), contract.REQUESTS_TOTAL) == 1
        assert value(scrape(cb), contract.REQUESTS_TOTAL) == 0
        assert scrape(cb)["edgefleet_model_info"][0][0]["model"] == "mlp"


# ---------------------------------------------------------------------- readiness
def test_not_ready_until_warm_up_completes(models: Models, tmp_path: Path) -> None:
    hooks = Hooks(hold=True)
    settings = settings_for(tmp_path, models.cnn, warmup_runs=5)
    with (
        running(settings, load=False, factory=hooks.factory()) as server,
        httpx.Client(base_url=server.url) as c,
    ):
        assert c.get("/readyz").status_code == 503  # nothing loaded yet
        loader = threading.Thread(target=server.load)
        loader.start()
        assert hooks.entered.wait(10), "warm-up never started"
        # The runtime has the model and is in its first warm-up run: still not ready.
        assert server.current is None
        ready = c.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["state"] == "loading"
        assert c.get("/healthz").status_code == 200  # alive all along
        assert c.get("/v1/model").status_code == 503
        refused = c.post("/v1/infer", json={"inputs": {"image": image().tolist()}})
        assert refused.status_code == 503
        assert refused.json()["error"] == "not_ready"
        assert value(scrape(c), "edgefleet_model_ready") == 0
        hooks.release.set()
        loader.join(10)
        assert c.get("/readyz").status_code == 200
        assert value(scrape(c), "edgefleet_model_ready") == 1
        assert c.post("/v1/infer", json={"inputs": {"image": image().tolist()}}).is_success


def test_model_that_fails_warm_up_never_turns_ready(tmp_path: Path) -> None:
    from controller.registry.samples import build_failing_model
    from node_agent.server.model import ModelLoadError

    path = tmp_path / "broken.onnx"
    path.write_bytes(build_failing_model())
    with (
        running(settings_for(tmp_path, path), load=False) as server,
        httpx.Client(base_url=server.url) as c,
    ):
        with pytest.raises(ModelLoadError, match="warm-up failed"):
            server.load()
        assert c.get("/readyz").json()["state"] == "failed"
        assert c.get("/readyz").status_code == 503


# ---------------------------------------------------------------------- hot swap
ANSWERS = 10  # each client's, before the swap and again after it


def test_hot_swap_under_load_drops_nothing(models: Models, tmp_path: Path) -> None:
    x = image(seed=11)
    v1 = ort_run(models.cnn, {"image": x})["probabilities"]
    v2 = ort_run(models.cnn_v2, {"image": x})["probabilities"]
    assert not np.allclose(v1, v2)
    payload = npz_bytes(image=x)
    with Origin() as origin, running(settings_for(tmp_path, models.cnn)) as server:
        url = origin.add("/v1/models/cnn/versions/2/artifact", models.bytes("cnn_v2"))
        stop = threading.Event()
        swapped_at: list[float] = []
        # What each client has been answered so far (appended by its thread).
        seen: list[list[tuple[float, int, str, np.ndarray | None]]] = [[] for _ in range(6)]

        def hammer(answers: list[tuple[float, int, str, np.ndarray | None]]) -> None:
            with httpx.Client(base_url=server.url, timeout=30) as c:
                while not stop.is_set():
                    sent = time.monotonic()
                    r = c.post("/v1/infer", content=payload, headers={"Content-Type": NPZ})
                    out = load_npz(r.content)["probabilities"] if r.status_code == 200 else None
                    answers.append((sent, r.status_code, r.headers.get("x-model-version", ""), out))

        def each_answered(n: int, after: float = 0.0) -> bool:
            return all(sum(1 for a in answers if a[0] > after) >= n for answers in seen)

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(hammer, answers) for answers in seen]
            # Every client under way on the old version before the swap...
            assert wait_for(lambda: each_answered(ANSWERS), 60), [len(a) for a in seen]
            with httpx.Client(base_url=server.url, timeout=60) as admin:
                resp = admin.post(
                    "/v1/admin/swap",
                    json={
                        "model_url": url,
                        "sha256": sha256(models.bytes("cnn_v2")),
                        "format": "onnx",
                        "model_version": "2",
                    },
                )
            swapped_at.append(time.monotonic())
            assert resp.status_code == 200, resp.text
            assert resp.json()["version"] == "2"
            # ...and answered again after it (sent after the swap returned).
            assert wait_for(lambda: each_answered(ANSWERS, after=swapped_at[0]), 60)
            stop.set()
            for f in futures:
                f.result()
            results = [item for answers in seen for item in answers]

        assert len(results) >= 2 * ANSWERS * len(seen)
        assert [r for r in results if r[1] != 200] == []  # zero failures during the swap
        versions = {r[2] for r in results}
        assert versions == {"1", "2"}
        for sent, _, version, out in results:
            assert out is not None
            np.testing.assert_allclose(out, v1 if version == "1" else v2, rtol=1e-6)
            if sent > swapped_at[0]:
                assert version == "2"  # every request after the swap is on the new model
        with httpx.Client(base_url=server.url) as c:
            model = c.get("/v1/model").json()
            assert (model["version"], model["sha256"]) == ("2", sha256(models.bytes("cnn_v2")))
            samples = scrape(c)
            [(info, _)] = samples["edgefleet_model_info"]
            assert (info["version"], info["sha256"]) == ("2", model["sha256"])
            assert value(samples, "edgefleet_model_swaps_total") == 1
            assert value(samples, contract.REQUESTS_TOTAL) == len(results)
            assert value(samples, contract.ERRORS_TOTAL) == 0
        # The new version went through the node cache.
        cached = tmp_path / "cache" / "sha256" / model["sha256"][:2] / model["sha256"]
        assert cached.read_bytes() == models.bytes("cnn_v2")


def test_request_in_flight_finishes_on_the_old_runner(models: Models, tmp_path: Path) -> None:
    hooks = Hooks()
    x = image(seed=2)
    x[0, 0, 0, 0] = SENTINEL  # this request blocks inside the v1 runner
    v1 = ort_run(models.cnn, {"image": x})["probabilities"]
    v2 = ort_run(models.cnn_v2, {"image": image(seed=3)})["probabilities"]
    with (
        Origin() as origin,
        running(settings_for(tmp_path, models.cnn), factory=hooks.factory()) as server,
        httpx.Client(base_url=server.url, timeout=30) as c,
    ):
        url = origin.add("v2", models.bytes("cnn_v2"))
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(
                c.post, "/v1/infer", content=npz_bytes(image=x), headers={"Content-Type": NPZ}
            )
            assert hooks.sentinel_entered.wait(10)
            with httpx.Client(base_url=server.url, timeout=30) as admin:
                resp = admin.post(
                    "/v1/admin/swap",
                    json={
                        "model_url": url,
                        "sha256": sha256(models.bytes("cnn_v2")),
                        "model_version": "2",
                    },
                )
            assert resp.status_code == 200, resp.text
            with httpx.Client(base_url=server.url, timeout=30) as other:
                fresh = other.post("/v1/infer", json={"inputs": {"image": image(seed=3).tolist()}})
            assert fresh.headers["x-model-version"] == "2"
            np.testing.assert_allclose(fresh.json()["outputs"]["probabilities"], v2, rtol=1e-6)
            assert not slow.done()  # still running on the old version
            hooks.sentinel_release.set()
            old = slow.result(timeout=10)
        assert old.status_code == 200
        assert old.headers["x-model-version"] == "1"
        np.testing.assert_allclose(load_npz(old.content)["probabilities"], v1, rtol=1e-6)
        assert len(hooks.loads) == 2


def test_swap_failures_keep_the_old_version(models: Models, tmp_path: Path) -> None:
    with (
        Origin() as origin,
        running(settings_for(tmp_path, models.cnn)) as server,
        httpx.Client(base_url=server.url, timeout=30) as c,
    ):
        url = origin.add("v2", models.bytes("cnn_v2"))
        wrong = c.post(
            "/v1/admin/swap",
            json={
                "model_url": url,
                "sha256": sha256(b"other"),
                "format": "onnx",
                "model_version": "2",
            },
        )
        assert wrong.status_code == 422
        assert wrong.json()["error"] == "sha256_mismatch"
        missing = c.post(
            "/v1/admin/swap",
            json={
                "model_url": origin.url("gone"),
                "sha256": sha256(b"gone"),
                "format": "onnx",
                "model_version": "3",
            },
        )
        assert missing.status_code == 502
        assert "HTTP 404" in missing.json()["detail"]
        invalid = c.post("/v1/admin/swap", json={"model_url": url, "sha256": "nope"})
        assert invalid.status_code == 422
        assert {tuple(e["loc"]) for e in invalid.json()["detail"]} == {
            ("sha256",),
            ("model_version",),
        }
        assert c.get("/v1/model").json()["version"] == "1"
        assert (
            c.post("/v1/infer", json={"inputs": {"image": image().tolist()}}).headers[
                "x-model-version"
            ]
            == "1"
        )
        # Nothing unverified was kept: no cached file, no partial download.
        cache = tmp_path / "cache"
        assert not (cache / "sha256").exists() or not any((cache / "sha256").rglob("*"))
        assert [p.name for p in (cache / ".partial").iterdir() if p.suffix != ".lock"] == []


def test_concurrent_swap_is_409(models: Models, tmp_path: Path) -> None:
    with (
        Origin() as origin,
        running(settings_for(tmp_path, models.cnn)) as server,
        httpx.Client(base_url=server.url, timeout=30) as c,
    ):
        origin.gate = threading.Event()  # the first swap's download waits here
        url = origin.add("v2", models.bytes("cnn_v2"))
        body = {"model_url": url, "sha256": sha256(models.bytes("cnn_v2")), "model_version": "2"}
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, f"{server.url}/v1/admin/swap", json=body, timeout=30)
            wait_for(lambda: bool(origin.requests))
            second = c.post("/v1/admin/swap", json={**body, "model_version": "2b"})
            assert second.status_code == 409
            assert second.json()["error"] == "swap_in_progress"
            origin.gate.set()
            assert first.result(timeout=30).status_code == 200
        assert c.get("/v1/model").json()["version"] == "2"


def test_admin_needs_loopback_or_the_token(models: Models, tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path, models.cnn, admin_allow_loopback=False, admin_token="s3cret-token"
    )
    same = {
        "model_url": "http://127.0.0.1:9/unused",
        "sha256": sha256(models.bytes("cnn")),  # same bytes: a relabel, no download
        "model_version": "1.0.1",
    }
    with running(settings) as server, httpx.Client(base_url=server.url) as c:
        assert c.post("/v1/admin/swap", json=same).status_code == 403
        wrong = c.post("/v1/admin/swap", json=same, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403
        ok = c.post("/v1/admin/swap", json=same, headers={"Authorization": "Bearer s3cret-token"})
        assert ok.status_code == 200, ok.text
        assert c.get("/v1/model").json()["version"] == "1.0.1"
        assert scrape(c)["edgefleet_model_info"][0][0]["version"] == "1.0.1"
    # Without a token configured, only loopback callers pass.
    server2 = InferenceServer(settings_for(tmp_path, models.cnn))
    assert server2.admin_allowed("127.0.0.1", None)
    assert not server2.admin_allowed("10.0.0.7", "Bearer anything")


# ---------------------------------------------------------------------- shutdown
def test_shutdown_lets_requests_in_flight_finish(models: Models, tmp_path: Path) -> None:
    hooks = Hooks()
    x = image()
    x[0, 0, 0, 0] = SENTINEL
    server = InferenceServer(settings_for(tmp_path, models.cnn), runner_factory=hooks.factory())
    server.start()
    server.load()
    with httpx.Client(base_url=server.url, timeout=30) as c, ThreadPoolExecutor(2) as pool:
        slow = pool.submit(c.post, "/v1/infer", json={"inputs": {"image": x.tolist()}})
        assert hooks.sentinel_entered.wait(10)
        stopping = pool.submit(server.shutdown, 10.0)
        time.sleep(0.3)
        assert not stopping.done()  # waiting for the request in flight
        assert not server.ready
        hooks.sentinel_release.set()
        resp = slow.result(timeout=10)
        stopping.result(timeout=10)
    assert resp.status_code == 200
    assert resp.headers.get("connection") == "close"  # draining: no keep-alive
    assert server.state == "stopped"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/healthz", timeout=2)


# ---------------------------------------------------------------------- settings, CLI
def test_threads_follow_the_cpu_limit(monkeypatch: pytest.MonkeyPatch, models: Models) -> None:
    assert threads_from_cpu_limit(None) == 1
    assert threads_from_cpu_limit("") == 1
    assert threads_from_cpu_limit("250") == 1
    assert threads_from_cpu_limit("1000") == 1
    assert threads_from_cpu_limit("1500") == 2
    assert threads_from_cpu_limit("4000") == 4
    assert threads_from_cpu_limit("lots") == 1
    monkeypatch.setenv("EDGEFLEET_CPU_LIMIT", "2500")
    settings = ServeSettings(model_path=models.cnn)
    assert settings.threads is None
    assert settings.resolved_threads() == 3
    assert ServeSettings(model_path=models.cnn, threads=2).resolved_threads() == 2


def test_daemonset_args_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flags the controller's DaemonSet passes are exactly the flags we take."""
    spec = WorkloadSpec(
        model="detector",
        version="1.2.0",
        sha256="ab" * 32,
        format="tflite",
        artifact_url="http://controller:8080/v1/models/detector/versions/1.2.0/artifact",
        rollout="r1",
    )
    ds = daemonset(spec, namespace="edge", image="img:1", port=8500)
    container = ds["spec"]["template"]["spec"]["containers"][0]
    monkeypatch.setenv("EDGEFLEET_SERVE_WARMUP_RUNS", "7")  # env fills what flags leave
    settings = load_settings(container["args"])
    assert settings.model_url == spec.artifact_url
    assert settings.sha256 == spec.sha256
    assert settings.format == "tflite"
    assert (settings.model_name, settings.model_version) == ("detector", "1.2.0")
    assert str(settings.cache_dir) == "/var/lib/edgefleet/models"
    assert settings.port == 8500
    assert settings.host == "0.0.0.0"
    assert settings.warmup_runs == 7
    probes = {
        container["readinessProbe"]["httpGet"]["path"],
        container["livenessProbe"]["httpGet"]["path"],
    }
    assert probes == {"/readyz", "/healthz"}


def test_cli_rejects_incomplete_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        load_settings(["--model-url", "http://x/a", "--port", "1"])
    assert exc.value.code == 2
    assert "--sha256" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        load_settings(["--model-path", "m.onnx", "--format", "pytorch"])
    assert exc.value.code == 2


def test_json_response_is_plain_json(client: httpx.Client) -> None:
    resp = client.post("/v1/infer", json={"inputs": {"image": image().tolist()}})
    document = json.loads(resp.content)
    probabilities = document["outputs"]["probabilities"][0]
    assert math.isclose(sum(probabilities), 1.0, rel_tol=1e-5)


def test_version_labels_cannot_break_the_headers(models: Models, tmp_path: Path) -> None:
    same_bytes = {"model_url": "http://127.0.0.1:9/unused", "sha256": sha256(models.bytes("cnn"))}
    with (
        running(settings_for(tmp_path, models.cnn)) as server,
        httpx.Client(base_url=server.url) as c,
    ):
        for version in ("2\r\nX-Evil: 1", "v2-ü✓"):
            swapped = c.post("/v1/admin/swap", json={**same_bytes, "model_version": version})
            assert swapped.status_code == 200, swapped.text
            resp = c.post("/v1/infer", json={"inputs": {"image": image().tolist()}})
            assert resp.status_code == 200
            assert "x-evil" not in resp.headers
            assert resp.json()["version"] == version  # the body carries it verbatim
        assert c.get("/v1/model").json()["version"] == "v2-ü✓"
