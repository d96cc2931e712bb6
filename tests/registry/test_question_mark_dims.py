"""Models whose dynamic dims are written ``?`` or -1 (paddle2onnx, tf2onnx) and whose
weights are Constant nodes: inspected, validated and benchmarked (issue #17)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from controller.registry import samples
from tests import models as packaged
from tests.registry.test_endpoints import pushed


def test_constant_weights_and_question_mark_dims(client: TestClient) -> None:
    body = pushed(client, samples.build_constant_cnn(), name="cls", version="1")
    assert body["status"] == "Ready", body["status_message"]
    assert body["signature"]["inputs"] == [
        {"name": "x", "dtype": "float32", "shape": [None, 3, "?", "?"]}
    ]
    # Weights in Constant nodes count as parameters: stem, 2 x (depthwise + pointwise),
    # 5 BatchNorms of 4 vectors, the classifier.
    c = 32
    assert body["signature"]["parameter_count"] == (
        c * 3 * 9 + 2 * (c * 9 + c * c) + 5 * 4 * c + c * 10 + 10
    )
    assert body["validation"]["input_shapes"] == {"x": [1, 3, 64, 64]}


def test_ppocr_direction_classifier_at_its_natural_shape(client: TestClient) -> None:
    """Input [-1, 3, ?, ?] in the file: the signature says [null, 3, "?", "?"], as
    onnxruntime and the inference server do; the metadata's whole shape is used."""
    data = packaged.packaged_file(
        "rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
    ).read_bytes()
    meta = {"validation": {"shapes": {"x": [1, 3, 48, 192]}}}
    body = pushed(client, data, name="ppocr-cls", version="2.0", metadata=meta)
    assert body["status"] == "Ready", body["status_message"]
    assert body["signature"]["inputs"] == [
        {"name": "x", "dtype": "float32", "shape": [None, 3, "?", "?"]}
    ]
    assert body["validation"]["input_shapes"] == {"x": [1, 3, 48, 192]}
    assert body["validation"]["output_shapes"] == {"save_infer_model/scale_0.tmp_1": [1, 2]}
