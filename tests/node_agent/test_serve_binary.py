"""The single-tensor body forms of ``POST /v1/infer``: raw bytes
(``application/octet-stream`` with ``X-Tensor-Dtype`` / ``X-Tensor-Shape``) and one
``.npy`` array (``application/x-npy``). Real models over real HTTP, outputs compared with a
direct runtime run; every malformed request is a 4xx that names the problem."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter
from onnx import TensorProto, helper

from node_agent import contract
from node_agent.runtimes import TensorSpec
from node_agent.server import npz
from node_agent.server.app import InferenceServer
from node_agent.server.tensors import (
    RequestError,
    decode_tensor,
    encode_raw,
    parse_shape,
    response_type,
    validate,
)
from tests.node_agent.test_serve import scrape, value
from tests.node_agent.test_serve_helpers import (
    Models,
    image,
    load_npz,
    npz_bytes,
    ort_run,
    running,
    settings_for,
)
from tests.node_agent.test_serve_wire import connect, read_response

RAW = "application/octet-stream"
NPY = "application/x-npy"
NPZ = "application/x-npz"


@pytest.fixture
def client(cnn_server: InferenceServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cnn_server.url, timeout=30) as c:
        yield c


def raw_headers(array: np.ndarray, **extra: str) -> dict[str, str]:
    return {
        "Content-Type": RAW,
        "X-Tensor-Dtype": array.dtype.name,
        "X-Tensor-Shape": ",".join(map(str, array.shape)),
        **extra,
    }


def npy_bytes(array: np.ndarray, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, **kwargs)
    return buffer.getvalue()


def from_raw(resp: httpx.Response) -> np.ndarray:
    """A raw answer back into an array, from its own headers."""
    assert resp.headers["content-type"] == RAW
    shape = parse_shape(resp.headers["x-tensor-shape"])
    assert shape is not None
    return np.frombuffer(resp.content, dtype=resp.headers["x-tensor-dtype"]).reshape(shape)


# ---------------------------------------------------------------------- correct answers
def test_raw_bytes_in_and_out_match_onnxruntime(client: httpx.Client, models: Models) -> None:
    x = image(batch=2, seed=4)
    want = ort_run(models.cnn, {"image": x})["probabilities"]
    resp = client.post("/v1/infer", content=x.tobytes(), headers=raw_headers(x))
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-tensor-name"] == "probabilities"
    assert resp.headers["x-tensor-dtype"] == "float32"
    assert resp.headers["x-tensor-shape"] == "2,10"
    assert resp.headers["x-model-version"] == "1"
    got = from_raw(resp)
    assert got.shape == (2, 10)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # The name may be given; the shape in brackets; the Accept header may ask for JSON.
    named = client.post(
        "/v1/infer",
        content=x.tobytes(),
        headers=raw_headers(x, **{"X-Tensor-Name": "image", "X-Tensor-Shape": "[2, 3, 32, 32]"}),
    )
    np.testing.assert_allclose(from_raw(named), got)
    as_json = client.post(
        "/v1/infer", content=x.tobytes(), headers=raw_headers(x, Accept="application/json")
    )
    assert as_json.headers["content-type"] == "application/json"
    np.testing.assert_allclose(
        np.asarray(as_json.json()["outputs"]["probabilities"], np.float32), got
    )
    # And an npz request may ask for raw bytes back.
    from_npz = client.post(
        "/v1/infer", content=npz_bytes(image=x), headers={"Content-Type": NPZ, "Accept": RAW}
    )
    np.testing.assert_allclose(from_raw(from_npz), got)


def test_npy_in_and_out_match_onnxruntime(client: httpx.Client, models: Models) -> None:
    x = image(batch=3, seed=2)
    want = ort_run(models.cnn, {"image": x})["probabilities"]
    resp = client.post("/v1/infer", content=npy_bytes(x), headers={"Content-Type": NPY})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == NPY
    assert resp.headers["x-tensor-name"] == "probabilities"
    got = np.load(io.BytesIO(resp.content), allow_pickle=False)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # Big-endian and Fortran-ordered arrays are the same tensor.
    for variant in (x.astype(">f4"), np.asfortranarray(x)):
        again = client.post("/v1/infer", content=npy_bytes(variant), headers={"Content-Type": NPY})
        assert again.status_code == 200, again.text
        np.testing.assert_allclose(np.load(io.BytesIO(again.content)), got, rtol=1e-6)


def test_raw_on_tflite_matches_litert(models: Models, tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    interp = Interpreter(model_path=str(models.mlp))
    detail = interp.get_input_details()[0]
    interp.resize_tensor_input(detail["index"], list(x.shape))
    interp.allocate_tensors()
    interp.set_tensor(detail["index"], x)
    interp.invoke()
    want = interp.get_tensor(interp.get_output_details()[0]["index"]).copy()
    with (
        running(settings_for(tmp_path, models.mlp, model_name="mlp")) as server,
        httpx.Client(base_url=server.url) as c,
    ):
        resp = c.post("/v1/infer", content=x.tobytes(), headers=raw_headers(x))
        assert resp.status_code == 200, resp.text
        np.testing.assert_allclose(from_raw(resp), want, rtol=1e-6)


def build_two_outputs() -> bytes:
    """``same = Identity(x)`` and ``negated = Neg(x)``: two outputs, one of them the input
    itself (the request's buffer must not leak into the next request's answer)."""
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["x"], ["same"]),
            helper.make_node("Neg", ["x"], ["negated"]),
        ],
        "two_outputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [
            helper.make_tensor_value_info("same", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("negated", TensorProto.FLOAT, ["n"]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def test_several_outputs_are_answered_as_npz(tmp_path: Path) -> None:
    path = tmp_path / "two.onnx"
    path.write_bytes(build_two_outputs())
    with (
        running(settings_for(tmp_path, path, model_name="two")) as server,
        httpx.Client(base_url=server.url) as c,
    ):
        for seed in range(3):  # the same connection, a new body each time
            x = np.random.default_rng(seed).standard_normal(5).astype(np.float32)
            for headers, body in (
                (raw_headers(x), x.tobytes()),
                (raw_headers(x, Accept=RAW), x.tobytes()),
                ({"Content-Type": NPY}, npy_bytes(x)),
            ):
                resp = c.post("/v1/infer", content=body, headers=headers)
                assert resp.status_code == 200, resp.text
                assert resp.headers["content-type"] == NPZ
                got = load_npz(resp.content)
                np.testing.assert_array_equal(got["same"], x)
                np.testing.assert_array_equal(got["negated"], -x)


def test_pipelined_raw_requests_on_one_connection(
    cnn_server: InferenceServer, models: Models
) -> None:
    xs = [image(seed=s) for s in range(3)]
    wants = [ort_run(models.cnn, {"image": x})["probabilities"] for x in xs]
    head = (
        "POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        "X-Tensor-Dtype: float32\r\nX-Tensor-Shape: 1,3,32,32\r\nContent-Length: {}\r\n\r\n"
    )
    with connect(cnn_server) as sock:
        sock.sendall(b"".join(head.format(x.nbytes).encode() + x.tobytes() for x in xs))
        for want in wants:
            status, headers, body = read_response(sock)
            assert status == 200
            assert headers["x-tensor-shape"] == "1,10"
            got = np.frombuffer(body, np.float32).reshape(1, 10)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------- client errors
X = image()
F64 = X.astype(np.float64)


@pytest.mark.parametrize(
    ("body", "headers", "status", "code", "mentions"),
    [
        (
            F64.tobytes(),
            raw_headers(F64),
            422,
            "wrong_dtype",
            "got dtype float64; expected dtype float32",
        ),
        (
            X[..., :31].tobytes(),
            raw_headers(X, **{"X-Tensor-Shape": "1,3,32,31"}),
            422,
            "wrong_shape",
            "dim 3 must be 32",
        ),
        (
            X[0].tobytes(),
            raw_headers(X, **{"X-Tensor-Shape": "3,32,32"}),
            422,
            "wrong_shape",
            "rank 3, expected 4",
        ),
        (X.tobytes()[:-4], raw_headers(X), 400, "invalid_tensor", "needs 12288"),
        (
            X.tobytes(),
            {"Content-Type": RAW, "X-Tensor-Shape": "1,3,32,32"},
            400,
            "missing_header",
            "X-Tensor-Dtype is missing",
        ),
        (
            X.tobytes(),
            {"Content-Type": RAW, "X-Tensor-Dtype": "float32"},
            400,
            "missing_header",
            "X-Tensor-Shape is missing",
        ),
        (
            X.tobytes(),
            raw_headers(X, **{"X-Tensor-Dtype": "complex64"}),
            400,
            "invalid_tensor",
            "'complex64' is not one of bool",
        ),
        (
            X.tobytes(),
            raw_headers(X, **{"X-Tensor-Shape": "1x3x32x32"}),
            400,
            "invalid_tensor",
            "'1x3x32x32' is not a list of sizes",
        ),
        (npy_bytes(F64), {"Content-Type": NPY}, 422, "wrong_dtype", "expected dtype float32"),
        (npy_bytes(X[:, :2]), {"Content-Type": NPY}, 422, "wrong_shape", "dim 1 must be 3"),
        (b"not an array", {"Content-Type": NPY}, 400, "invalid_tensor", "not a numpy .npy"),
        (npy_bytes(X)[:-8], {"Content-Type": NPY}, 400, "invalid_tensor", "npy data is"),
        (npz_bytes(image=X), {"Content-Type": NPY}, 400, "invalid_tensor", "not a numpy .npy"),
        (
            npy_bytes(np.array([{"evil": 1}], dtype=object), allow_pickle=True),
            {"Content-Type": NPY},
            400,
            "invalid_tensor",
            "allow_pickle",
        ),
    ],
)
def test_bad_binary_requests_are_4xx_naming_the_problem(
    client: httpx.Client,
    body: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
    mentions: str,
) -> None:
    resp = client.post("/v1/infer", content=body, headers=headers)
    assert resp.status_code == status, resp.text
    document = resp.json()
    assert document["error"] == code
    assert document["input"] == "image"
    assert "'image'" in document["detail"]
    assert mentions in document["detail"]
    # The connection stays usable; the request counted as rejected, not as inference.
    assert client.get("/healthz").status_code == 200
    samples = scrape(client)
    assert value(samples, "edgefleet_inference_rejected_total", code=str(status)) == 1
    assert value(samples, contract.REQUESTS_TOTAL) == 0


def test_tensor_names_are_checked(client: httpx.Client, models: Models, tmp_path: Path) -> None:
    unknown = client.post(
        "/v1/infer", content=X.tobytes(), headers=raw_headers(X, **{"X-Tensor-Name": "img"})
    )
    assert unknown.status_code == 422
    assert unknown.json()["error"] == "unknown_input"
    assert unknown.json()["input"] == "img"
    assert "'image' (float32 [batch, 3, 32, 32])" in unknown.json()["detail"]
    tokens = np.zeros((1, 7, 16), np.float32)
    with (
        running(settings_for(tmp_path, models.scorer, model_name="scorer")) as server,
        httpx.Client(base_url=server.url) as c,
    ):
        # Two inputs: a lone tensor must say which it is, and the other one is missing.
        anonymous = c.post("/v1/infer", content=tokens.tobytes(), headers=raw_headers(tokens))
        assert anonymous.status_code == 422
        assert anonymous.json()["error"] == "missing_input"
        assert "X-Tensor-Name" in anonymous.json()["detail"]
        assert "'tokens'" in anonymous.json()["detail"]
        assert "'mask'" in anonymous.json()["detail"]
        named = c.post(
            "/v1/infer",
            content=tokens.tobytes(),
            headers=raw_headers(tokens, **{"X-Tensor-Name": "tokens"}),
        )
        assert named.status_code == 422
        assert (named.json()["error"], named.json()["input"]) == ("missing_input", "mask")


def test_unsupported_media_type_lists_every_form(client: httpx.Client) -> None:
    resp = client.post("/v1/infer", content=b"x", headers={"Content-Type": "image/png"})
    assert resp.status_code == 415
    for form in ("application/json", NPZ, NPY, RAW, "X-Tensor-Dtype"):
        assert form in resp.json()["detail"]


# ---------------------------------------------------------------------- decoding, encoding
def test_raw_decoding_is_zero_copy_and_strict() -> None:
    specs = [TensorSpec("image", "float32", ("batch", 3, 32, 32))]
    body = X.tobytes()
    arrays = decode_tensor(body, RAW, specs, name=None, dtype="float32", shape="1,3,32,32")
    feeds = validate(arrays, specs)
    assert np.shares_memory(feeds["image"], np.frombuffer(body, np.uint8))
    np.testing.assert_array_equal(feeds["image"], X)
    scalar = decode_tensor(
        np.float64(2.5).tobytes(),
        RAW,
        [TensorSpec("t", "float64", ())],
        name=None,
        dtype="float64",
        shape="",
    )["t"]
    assert scalar.shape == ()
    assert float(scalar) == 2.5
    empty = decode_tensor(
        b"", RAW, [TensorSpec("e", "int64", (None, 4))], name="e", dtype="int64", shape="0,4"
    )["e"]
    assert empty.shape == (0, 4)
    with pytest.raises(RequestError) as exc:
        decode_tensor(body, RAW, specs, name=None, dtype="object", shape="1,3,32,32")
    assert exc.value.status == 400


@pytest.mark.parametrize(
    ("text", "shape"),
    [
        ("1,3,224,224", (1, 3, 224, 224)),
        (" 1 , 3 ", (1, 3)),
        ("[2, 5]", (2, 5)),
        ("(7,)", (7,)),
        ("", ()),
        ("[]", ()),
        ("0,4", (0, 4)),
        ("1,,2", None),
        ("-1,3", None),
        ("1.5", None),
        ("1x3", None),
        ("[1,2)", None),
        ("²", None),
        ("1" * 13, None),
        (",".join(["1"] * 33), None),
    ],
)
def test_parse_shape(text: str, shape: tuple[int, ...] | None) -> None:
    assert parse_shape(text) == shape


def test_encode_raw_is_little_endian_c_order() -> None:
    for array in (
        np.arange(12, dtype=">i4").reshape(3, 4),
        np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        np.array([True, False]),
        np.array(1.5),
        np.zeros((0, 3), np.float16),
    ):
        data, headers = encode_raw("out", array)
        assert headers["X-Tensor-Name"] == "out"
        shape = parse_shape(headers["X-Tensor-Shape"])
        assert shape == array.shape
        dtype = np.dtype(headers["X-Tensor-Dtype"]).newbyteorder("<")
        back = np.frombuffer(bytes(data), dtype=dtype).reshape(array.shape)
        np.testing.assert_array_equal(back, array)
    with pytest.raises(ValueError, match="not representable"):
        encode_raw("s", np.array(["text"]))


def test_response_type_negotiation() -> None:
    assert response_type(None, RAW) == RAW
    assert response_type(None, NPY) == NPY
    assert response_type(None, RAW, outputs=2) == NPZ
    assert response_type(RAW, "application/json") == RAW
    assert response_type("application/json", RAW) == "application/json"
    assert response_type("text/html, */*", NPY) == NPY
    assert response_type(f"image/png, {NPY};q=0.9", NPZ) == NPY
    assert response_type("", NPZ) == NPZ


def test_npy_fast_reader_and_writer_match_numpy() -> None:
    arrays = [
        np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32),
        np.array(3.5),
        np.array([True, False, True]),
        np.arange(6, dtype=np.float16).reshape(2, 3),
        np.zeros((0, 4), dtype=np.int64),
        np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4)),
        np.arange(20, dtype=np.float64)[::3],
    ]
    for array in arrays:
        body = npy_bytes(array)
        fast = npz.read_npy(body)
        assert fast is not None, "np.save output must take the fast path"
        assert (fast.dtype, fast.shape) == (array.dtype, array.shape)
        np.testing.assert_array_equal(fast, array)
        if fast.nbytes:
            assert np.shares_memory(fast, np.frombuffer(body, np.uint8))
        written = npz.write_npy(array)
        back = np.load(io.BytesIO(written), allow_pickle=False)
        assert (back.dtype, back.shape) == (array.dtype, array.shape)
        np.testing.assert_array_equal(back, array)
    with pytest.raises(ValueError, match="object"):
        npz.write_npy(np.array([{"a": 1}], dtype=object))
