"""Static int8 on models as exporters write them (issue #17): calibration samples in
either layout, Constant weights prepared into initializers before quantizing, and a
report that says when a variant is not worth shipping."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from controller.optimizations import compare, optimize, sample_inputs
from controller.registry import samples
from controller.rollouts.choice import Candidate, Measured, choose
from controller.rollouts.spec import Gates
from node_agent.runtimes import TensorSpec
from tests.optimizations.test_variants import artifact, derive, finished, push

IMAGE = TensorSpec("image", "float32", ("batch", 3, 8, 8))


def npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


# ---------------------------------------------------------------- calibration layouts
def test_samples_along_the_batch_axis_or_an_extra_axis_are_the_same_feeds() -> None:
    images = np.random.default_rng(0).standard_normal((6, 3, 8, 8)).astype(np.float32)
    along_batch = sample_inputs.load_samples(npz(image=images), [IMAGE])
    extra_axis = sample_inputs.load_samples(npz(image=images[:, None]), [IMAGE])
    assert len(along_batch) == len(extra_axis) == 6
    for a, b, image in zip(along_batch, extra_axis, images, strict=True):
        assert a["image"].shape == b["image"].shape == (1, 3, 8, 8)
        np.testing.assert_array_equal(a["image"][0], image)
        np.testing.assert_array_equal(b["image"][0], image)


def test_float64_samples_are_cast_and_scalars_take_one_axis() -> None:
    rate = TensorSpec("sr", "int64", ())
    audio = TensorSpec("input", "float32", ("?", "?"))  # silero's [?, ?]
    feeds = sample_inputs.load_samples(
        npz(sr=np.full(3, 16000), input=np.zeros((3, 512))), [audio, rate]
    )
    assert [f["input"].shape for f in feeds] == [(1, 512)] * 3
    assert feeds[0]["input"].dtype == np.float32
    assert feeds[0]["sr"].shape == ()
    assert int(feeds[0]["sr"]) == 16000


@pytest.mark.parametrize(
    ("spec", "shape", "message"),
    [
        (
            IMAGE,
            (4, 8, 8),
            "calibration array 'image' has shape [4, 8, 8]; for the input 'image' "
            "[batch, 3, 8, 8] the accepted layouts are (N, ?, 3, 8, 8) (N samples of the "
            "input's shape) or (N, 3, 8, 8) (N samples along the batch axis)",
        ),
        (
            IMAGE,
            (4, 3, 8, 9),
            "calibration array 'image' has shape [4, 3, 8, 9]: dim 3 of the input 'image' "
            "[batch, 3, 8, 8] must be 8 (accepted layouts: (N, ?, 3, 8, 8) (N samples of "
            "the input's shape) or (N, 3, 8, 8) (N samples along the batch axis))",
        ),
        (
            # A fixed leading dim other than 1 is no batch axis to split along.
            TensorSpec("state", "float32", (2, "?", 128)),
            (4, 1, 128),
            "calibration array 'state' has shape [4, 1, 128]; for the input 'state' "
            "[2, ?, 128] the accepted layouts are (N, 2, ?, 128) (N samples of the "
            "input's shape)",
        ),
    ],
)
def test_a_wrong_layout_names_the_accepted_ones(
    spec: TensorSpec, shape: tuple[int, ...], message: str
) -> None:
    with pytest.raises(optimize.OptimizationError) as refused:
        sample_inputs.load_samples(npz(**{spec.name: np.zeros(shape, np.float32)}), [spec])
    assert str(refused.value) == message


def test_calibration_layouts_through_the_api(client: TestClient) -> None:
    push(client, "cam", "1", samples.build_cnn())
    images = np.random.default_rng(1).standard_normal((8, 3, 32, 32)).astype(np.float32)
    for version, array in (("1-a", images), ("1-b", images[:, None])):
        resp = derive(client, "cam", "1", version, "static-int8", calibration=npz(image=array))
        job = finished(client, "cam", resp)
        assert job["status"] == "Succeeded", job["message"]
    # The same samples either way: the same variant, byte for byte.
    assert artifact(client, "cam", "1-a") == artifact(client, "cam", "1-b")
    wrong = derive(client, "cam", "1", "1-c", "static-int8", calibration=npz(image=images[:, 0]))
    job = finished(client, "cam", wrong)
    assert job["status"] == "Failed"
    assert "(N, 3, 32, 32) (N samples along the batch axis)" in job["message"]
    assert client.get("/v1/models/cam/versions/1-c").status_code == 404


# ---------------------------------------------------------------- Constant weights
def test_constant_weights_are_moved_to_initializers() -> None:
    proto = onnx.load_from_string(samples.build_constant_cnn())
    constants = [n for n in proto.graph.node if n.op_type == "Constant"]
    assert len(proto.graph.initializer) == 0
    assert optimize.constants_to_initializers(proto) == len(constants)
    assert not [n for n in proto.graph.node if n.op_type == "Constant"]
    assert {t.name for t in proto.graph.initializer} == {c.output[0] for c in constants}
    onnx.checker.check_model(proto)


def test_static_int8_of_a_constant_weights_cnn_is_smaller_and_agrees(
    client: TestClient,
) -> None:
    """Before #17 the quantizer saw no weights in this model (0 initializers): its
    variant was bigger than the parent, or failed to run. Prepared, it is about 0.36x."""
    parent = samples.build_constant_cnn(channels=64, blocks=4)
    push(client, "ocr", "1", parent)
    images = np.random.default_rng(2).random((32, 3, 48, 192), dtype=np.float32)
    resp = derive(client, "ocr", "1", "1-int8", "static-int8", calibration=npz(x=images))
    job = finished(client, "ocr", resp)
    assert job["status"] == "Succeeded", job["message"]
    report = job["report"]
    variant = artifact(client, "ocr", "1-int8")
    assert report["size_bytes"] == {"original": len(parent), "variant": len(variant)}
    assert report["size_ratio"] == pytest.approx(len(variant) / len(parent), abs=1e-4)
    assert report["size_ratio"] < 0.45
    details = report["details"]
    assert details["preparation"][0] == "moved 47 Constant tensor(s) to initializers"
    assert details["preparation"][1] == "opset 11 -> 13 (per-channel scales need it)"
    assert details["per_channel"] is True
    assert (details["format"], details["target"]) == ("qoperator", "CPUExecutionProvider")
    ops = {n.op_type for n in onnx.load_from_string(variant).graph.node}
    assert "QLinearConv" in ops
    assert "Conv" not in ops  # every Conv runs in int8
    assert report["verdict"]["bigger"] is False
    # Independent check on the held-out quarter (the last 8 of the 32).
    a, b = ort.InferenceSession(parent), ort.InferenceSession(variant)
    held = images[24:]
    outs_a = np.concatenate([a.run(None, {"x": x[None]})[0] for x in held])
    outs_b = np.concatenate([b.run(None, {"x": x[None]})[0] for x in held])
    agreement = float(np.mean(outs_a.argmax(axis=1) == outs_b.argmax(axis=1)))
    assert report["top1_agreement"] == pytest.approx(agreement, abs=1e-4)
    assert report["top1_agreement"] >= 0.99 - 1e-9
    assert report["max_abs_error"] == pytest.approx(float(np.abs(outs_a - outs_b).max()), abs=1e-5)
    assert report["max_abs_error"] < 0.05
    # Validated and benchmarked as any version: its [?, 3, ?, ?] input kept.
    version = client.get("/v1/models/ocr/versions/1-int8").json()
    assert version["status"] == "Ready", version["status_message"]
    assert version["signature"]["inputs"][0]["shape"] == [None, 3, "?", "?"]


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"format": "qdq8"}, ["body", "params", "format"]),
        ({"calibration": "kl"}, ["body", "params", "calibration"]),
        ({"target": ""}, ["body", "params", "target"]),
        ({"op_types": "Conv"}, ["body", "params", "op_types"]),
    ],
)
def test_bad_quantization_choices_are_422(
    client: TestClient, params: dict[str, object], loc: list[str]
) -> None:
    push(client, "cam", "1", samples.build_cnn())
    resp = derive(client, "cam", "1", "2", "static-int8", params)
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["loc"] == loc


def test_qdq_for_other_providers_and_the_calibration_options() -> None:
    model = samples.build_cnn()
    rng = np.random.default_rng(4)
    feeds = [{"image": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(8)]
    for calibration in optimize.CALIBRATION_METHODS:
        variant = optimize.quantize(
            model,
            "static-int8",
            samples=feeds,
            target="QNNExecutionProvider",
            calibration=calibration,
        )
        assert variant.details["format"] == "qdq"
        assert variant.details["calibration"] == calibration
        ops = {n.op_type for n in onnx.load_from_string(variant.data).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
        assert "QLinearConv" not in ops


def test_the_size_breakdown_says_where_the_variants_bytes_go() -> None:
    """Every byte of the variant in one part; weights left in float named by the
    operator that reads them; biases int32 beside int8 weights."""
    model = samples.build_cnn(channels=32)
    rng = np.random.default_rng(5)
    feeds = [{"image": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(4)]
    convs_only = optimize.quantize(model, "static-int8", samples=feeds, op_types=["Conv"])
    size = convs_only.details["size"]
    assert sum(size["bytes"].values()) == len(convs_only.data)
    proto = onnx.load_from_string(convs_only.data)
    sizes = {t.name: len(t.SerializeToString()) for t in proto.graph.initializer}
    convs = [n for n in proto.graph.node if n.op_type == "QLinearConv"]
    assert len(convs) == 2  # inputs: x, its scale, zero point, w, ..., y's, bias
    assert size["bytes"]["int8_weights"] == sum(sizes[n.input[3]] for n in convs)
    assert size["bytes"]["int32_biases"] == sum(sizes[n.input[8]] for n in convs)
    # The Gemm stayed float: its weight and bias, and nothing else, in float.
    assert size["float_by_op"] == {"Gemm": sizes["fc_w"] + sizes["fc_b"]}
    assert size["largest_float"][0] == {"tensor": "fc_w", "bytes": sizes["fc_w"], "read_by": "Gemm"}
    assert (
        f"float tensors not quantized x{size['ratio']['float']} (read by Gemm"
        in (size["explanation"])
    )
    everything = optimize.quantize(model, "static-int8", samples=feeds)
    assert everything.details["size"]["bytes"]["float"] == 0
    assert everything.details["size"]["floor"] < size["floor"]


# ---------------------------------------------------------------- the verdict
def _report(
    size: float, p50: float, agreement: float | None, allclose: bool = True
) -> dict[str, object]:
    return {
        "size_ratio": size,
        "latency_ratio": {"p50": p50, "p95": p50},
        "top1_agreement": agreement,
        "allclose": allclose,
        "max_abs_error": 0.5,
    }


def test_the_verdict_flags_a_bigger_or_slower_variant() -> None:
    assert compare.verdict(_report(0.3, 0.8, 1.0)) == {
        "recommended": True,
        "bigger": False,
        "slower": False,
        "reasons": [],
    }
    # Within the latency noise: not slower.
    assert compare.verdict(_report(0.3, 1.04, 1.0))["recommended"] is True
    worse = compare.verdict(_report(1.29, 2.4, 0.9))
    assert worse["recommended"] is False
    assert (worse["bigger"], worse["slower"]) == (True, True)
    assert worse["reasons"] == [
        "it is bigger than its parent (size x1.29)",
        "it is slower than its parent on this machine (p50 x2.4)",
        "its top-1 predictions agree with its parent's on 0.9 of the samples (below 0.99)",
    ]
    off = compare.verdict(_report(0.5, 0.9, None, allclose=False))
    assert off["reasons"] == [
        "its outputs differ from its parent's beyond the tolerances (max abs error 0.5)"
    ]


def test_the_per_node_choice_does_not_pick_a_slower_variant() -> None:
    """The rollout's choice goes by each class's on-node benchmark: a variant slower
    than its parent there loses to the parent, a faster one wins."""
    parent = Candidate(1, "1", reference=True)
    slower = Candidate(2, "1-int8", reference=False)
    faster = Candidate(3, "1-fp16", reference=False)
    measured = {
        (1, "a"): Measured(p50_ms=1.0, p95_ms=1.2, peak_bytes=None, node="n1"),
        (2, "a"): Measured(p50_ms=2.4, p95_ms=2.6, peak_bytes=None, node="n1"),
        (1, "b"): Measured(p50_ms=1.0, p95_ms=1.2, peak_bytes=None, node="n2"),
        (2, "b"): Measured(p50_ms=2.4, p95_ms=2.6, peak_bytes=None, node="n2"),
        (3, "b"): Measured(p50_ms=0.7, p95_ms=0.9, peak_bytes=None, node="n2"),
    }
    got = choose(
        [(10, "a"), (11, "b")], [parent, slower, faster], measured, Gates(), memory_limit=None
    )
    assert got.by_class["a"].version == parent
    assert got.by_class["b"].version == faster
