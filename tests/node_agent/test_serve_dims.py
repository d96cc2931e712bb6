"""Dynamic dims as exporters write them: an unnamed ``?`` dim (or an unset one) takes any
size, independently of every other; only a real name ties dims together (issue #17)."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from onnx import TensorProto, helper

from controller.registry import samples
from node_agent.runtimes import TensorSpec, shared_dim
from node_agent.server.tensors import RequestError, validate
from tests.models import packaged_file
from tests.node_agent.test_serve_helpers import (
    load_npz,
    npz_bytes,
    ort_run,
    running,
    settings_for,
)

NPZ = "application/x-npz"


def build_square_and_free() -> bytes:
    """``x`` [side, side] (one name twice: a square matrix) -> ``xx`` = x @ x; ``y``
    [?, ?] -> ``y2`` = y + y."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "x"], ["xx"]),
            helper.make_node("Add", ["y", "y"], ["y2"]),
        ],
        "square-and-free",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["side", "side"]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["?", "?"]),
        ],
        [
            helper.make_tensor_value_info("xx", TensorProto.FLOAT, ["side", "side"]),
            helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["?", "?"]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


@pytest.mark.parametrize(
    ("dim", "name"),
    [
        ("batch", "batch"),
        ("p2o.DynamicDimension.1", "p2o.DynamicDimension.1"),
        ("?", None),
        ("", None),
        (" ? ", None),
        ("None", None),
        (None, None),
        (-1, None),
        (3, None),
        (0, None),
    ],
)
def test_only_real_names_are_shared(dim: int | str | None, name: str | None) -> None:
    assert shared_dim(dim) == name


def test_validate_lets_unnamed_dims_differ() -> None:
    spec = TensorSpec("x", "float32", (None, 3, "?", "?"))
    image = np.zeros((1, 3, 48, 192), np.float32)
    assert validate({"x": image}, [spec])["x"] is image
    # A named dim still ties: [batch, 3, h, h] refuses a non-square image.
    square = TensorSpec("x", "float32", ("batch", 3, "h", "h"))
    with pytest.raises(RequestError) as refused:
        validate({"x": image}, [square])
    assert refused.value.status == 422
    assert refused.value.code == "wrong_shape"
    assert "dim 3 ('h') is 192 but 'h' is 48 in input 'x'" in refused.value.message


def test_serves_a_48x192_image_to_a_question_mark_model(tmp_path: Path) -> None:
    """The Constant-weights CNN's input is [?, 3, ?, ?]: any height and width."""
    path = tmp_path / "cnn.onnx"
    path.write_bytes(samples.build_constant_cnn())
    image = np.random.default_rng(0).random((1, 3, 48, 192), dtype=np.float32)
    want = ort_run(path, {"x": image})["probabilities"]
    with (
        running(settings_for(tmp_path, path, model_name="ocr-cls")) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        signature = client.get("/v1/model").json()["inputs"]
        assert signature == [{"name": "x", "dtype": "float32", "shape": [None, 3, "?", "?"]}]
        raw = client.post(
            "/v1/infer",
            content=image.tobytes(),
            headers={
                "Content-Type": "application/octet-stream",
                "X-Tensor-Dtype": "float32",
                "X-Tensor-Shape": "1,3,48,192",
            },
        )
        assert raw.status_code == 200, raw.text
        got = np.frombuffer(raw.content, np.float32).reshape(1, 10)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        # Two images of other, different sizes in the same server: each its own.
        for h, w in ((192, 48), (32, 100)):
            other = np.ones((2, 3, h, w), np.float32)
            resp = client.post("/v1/infer", json={"inputs": {"x": other.tolist()}})
            assert resp.status_code == 200, resp.text
            assert np.asarray(resp.json()["outputs"]["probabilities"]).shape == (2, 10)


def test_serves_the_ppocr_direction_classifier_at_its_natural_shape(tmp_path: Path) -> None:
    """The PP-OCR text direction classifier (rapidocr-onnxruntime wheel), input
    [-1, 3, ?, ?], takes text-line crops of 48x192."""
    path = packaged_file("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx")
    crop = np.random.default_rng(1).random((1, 3, 48, 192), dtype=np.float32)
    want = ort_run(path, {"x": crop})
    with (
        running(settings_for(tmp_path, path, model_name="ppocr-cls")) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        resp = client.post("/v1/infer", content=npz_bytes(x=crop), headers={"Content-Type": NPZ})
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"] == NPZ
        got = load_npz(resp.content)
        assert got.keys() == want.keys()
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-7)


def test_named_dim_mismatch_is_a_clear_422(tmp_path: Path) -> None:
    path = tmp_path / "square.onnx"
    path.write_bytes(build_square_and_free())
    x = np.eye(3, dtype=np.float32)
    y = np.ones((3, 4), np.float32)
    with (
        running(settings_for(tmp_path, path, model_name="square")) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        ok = client.post("/v1/infer", content=npz_bytes(x=x, y=y), headers={"Content-Type": NPZ})
        assert ok.status_code == 200, ok.text  # y's two "?" dims: 3 and 4
        bad = client.post(
            "/v1/infer",
            content=npz_bytes(x=np.ones((3, 4), np.float32), y=y),
            headers={"Content-Type": NPZ},
        )
        assert bad.status_code == 422
        body = bad.json()
        assert body["error"] == "wrong_shape"
        assert body["input"] == "x"
        assert body["detail"] == (
            "input 'x': got shape [3, 4]: dim 1 ('side') is 4 but 'side' is 3 in input 'x'; "
            "expected dtype float32, shape [side, side]"
        )
