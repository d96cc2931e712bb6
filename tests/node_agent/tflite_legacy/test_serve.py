"""``edgefleet-serve`` on tflite_runtime under numpy<2: the server in this process,
answering every body form from a model that must resize between requests."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np

from node_agent.server.app import InferenceServer
from node_agent.server.settings import ServeSettings
from node_agent.server.tensors import NPZ_TYPE, RAW_TYPE
from tests.node_agent.tflite_legacy import TFLITE_RUNTIME
from tests.node_agent.tflite_legacy.tflite_model import reference_mlp


def test_json_npz_and_raw_answers_match_numpy(mlp_path: Path, tmp_path: Path) -> None:
    settings = ServeSettings(
        host="127.0.0.1",
        port=0,
        cache_dir=tmp_path / "cache",
        threads=1,
        model_path=mlp_path,
        model_name="mlp",
        model_version="1",
        shutdown_grace_s=2.0,
    )
    server = InferenceServer(settings)
    server.start()
    try:
        server.load()
        with httpx.Client(base_url=server.url, timeout=30) as c:
            model = c.get("/v1/model").json()
            assert model["format"] == "tflite"
            assert model["runtime"] == TFLITE_RUNTIME
            rng = np.random.default_rng(4)
            # Three batch sizes in turn: the interpreter resizes for each.
            x = rng.standard_normal((3, 8)).astype(np.float32)
            resp = c.post("/v1/infer", json={"inputs": {"input": x.tolist()}})
            assert resp.status_code == 200, resp.text
            got = np.asarray(resp.json()["outputs"]["probabilities"], dtype=np.float32)
            np.testing.assert_allclose(got, reference_mlp(x), rtol=1e-5, atol=1e-6)

            x = rng.standard_normal((1, 8)).astype(np.float32)
            body = io.BytesIO()
            np.savez(body, input=x)
            resp = c.post("/v1/infer", content=body.getvalue(), headers={"Content-Type": NPZ_TYPE})
            assert resp.status_code == 200, resp.text
            assert resp.headers["content-type"] == NPZ_TYPE
            with np.load(io.BytesIO(resp.content), allow_pickle=False) as answer:
                got = answer["probabilities"]
            np.testing.assert_allclose(got, reference_mlp(x), rtol=1e-5, atol=1e-6)

            x = rng.standard_normal((5, 8)).astype(np.float32)
            headers = {
                "Content-Type": RAW_TYPE,
                "X-Tensor-Dtype": "float32",
                "X-Tensor-Shape": "5,8",
            }
            resp = c.post("/v1/infer", content=x.tobytes(), headers=headers)
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-tensor-shape"] == "5,4"
            got = np.frombuffer(resp.content, dtype=resp.headers["x-tensor-dtype"])
            np.testing.assert_allclose(got.reshape(5, 4), reference_mlp(x), rtol=1e-5, atol=1e-6)
    finally:
        server.shutdown(grace_s=2.0)
