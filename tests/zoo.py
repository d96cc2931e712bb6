"""The model zoo: real third-party models that PyPI wheels ship (ONNX and TFLite; vision,
audio, text, tabular), each with inputs of its natural shape and range, the validation
hints a user would push with it, and the optimizations that apply to it.

The wheels are installed by scripts/test with ``--no-deps`` and pinned versions (only the
model files are used): rapidocr-onnxruntime 1.4.4, silero-vad 6.2.3, magika 1.0.3,
mediapipe 0.10.14; onnxruntime's own wheel ships the scikit-learn model. Nothing is
downloaded at run time. tests/test_zoo.py runs each through the whole pipeline."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tests.models import packaged_file

Feeds = dict[str, np.ndarray]
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Method:
    """An optimization to derive, and what it must reach: the largest size ratio it may
    have, and the least top-1 agreement where the model classifies (both ``None``: no
    expectation beyond a consistent report). ``fails``: the job must fail, saying so."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    max_size_ratio: float | None = None
    min_agreement: float | None = None
    fails: str | None = None
    int8_goal: bool = False  # held to INT8_GOAL (its variant meets it, or the report explains)


@dataclass(frozen=True)
class ZooModel:
    name: str
    package: str
    path: str  # inside the package
    what: str  # task and origin
    traits: str  # what about it breaks naive pipelines
    feeds: Callable[[int], Feeds]  # realistic inputs at the natural shape, by seed
    hints: dict[str, Any] = field(default_factory=dict)  # push metadata "validation"
    methods: tuple[Method, ...] = ()
    variant: str | None = None  # a lighter build in the same package, pushed with --parent
    label: Callable[[np.ndarray], str] | None = None  # the parent's answer, in words
    answer: Callable[[int], str] | None = None  # what ``label`` must say of feeds(seed)

    @property
    def file(self) -> Path:
        return packaged_file(self.package, self.path)

    @property
    def format(self) -> str:
        return "tflite" if self.path.endswith(".tflite") else "onnx"

    def variant_file(self) -> Path:
        assert self.variant is not None
        return packaged_file(self.package, self.variant)


def _image(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A smooth NHWC image in [0, 1] (gradients and blocks, as photos have, not white
    noise)."""
    rng = np.random.default_rng(seed)
    h, w = shape[1], shape[2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    planes = []
    for _ in range(3):
        a, b, c = rng.uniform(-1, 1, 3)
        plane = 0.5 + 0.25 * np.sin(a * xx / 7 + b * yy / 11 + c * 6)
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        plane[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.uniform(0, 1)
        planes.append(plane)
    img: np.ndarray = np.clip(np.stack(planes, axis=-1)[None], 0, 1).astype(np.float32)
    return img


def _speech(seed: int) -> Feeds:
    """Silero VAD's call: 512 samples (32 ms at 16 kHz) of a voiced tone in noise, the
    recurrent state (zeros at the start of a stream), the sample rate."""
    rng = np.random.default_rng(seed)
    t = np.arange(512, dtype=np.float32) / 16000
    tone = 0.4 * np.sin(2 * np.pi * rng.uniform(100, 300) * t)
    chunk = tone + 0.05 * rng.standard_normal(512).astype(np.float32)
    return {
        "input": chunk[None].astype(np.float32),
        "state": np.zeros((2, 1, 128), np.float32),
        "sr": np.array(16000, np.int64),
    }


def _magika_config() -> dict[str, Any]:
    path = packaged_file("magika", "models/standard_v3_3/config.min.json")
    config: dict[str, Any] = json.loads(path.read_text())
    return config


SOURCES = sorted(p for p in (REPO / "controller").rglob("*.py") if p.stat().st_size > 2048)
"""Real files for Magika to label: this repository's Python sources."""


def _file_features(seed: int) -> Feeds:
    """Magika's input for one real file: its first and last bytes (whitespace stripped at
    both ends), padded with the padding token to the model's sizes (its config)."""
    config = _magika_config()
    data = SOURCES[seed % len(SOURCES)].read_bytes()
    beg, end = list(data.lstrip()[: config["beg_size"]]), list(data.rstrip()[-config["end_size"] :])
    pad = config["padding_token"]
    beg += [pad] * (config["beg_size"] - len(beg))
    end = [pad] * (config["end_size"] - len(end)) + end
    return {"bytes": np.array([beg + end], dtype=np.int32)}


def _magika_label(scores: np.ndarray) -> str:
    labels: list[str] = _magika_config()["target_labels_space"]
    return labels[int(np.argmax(scores))]


def _iris(seed: int) -> Feeds:
    """Three flowers' sepal length and width (cm), about where the species lie."""
    rng = np.random.default_rng(seed)
    centers = np.array([[5.0, 3.4], [5.9, 2.8], [6.6, 3.0]], np.float32)
    return {"float_input": (centers + rng.normal(0, 0.2, (3, 2))).astype(np.float32)}


def _text(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A scan of printed text, NCHW: lines of dark glyph-like blocks (random strokes, a
    gap between glyphs, now and then a space) on light paper, normalized to [-1, 1] as
    PP-OCR does. The detector finds text in it (flat or smooth images give it none)."""
    rng = np.random.default_rng(seed)
    h, w = shape[2], shape[3]
    page = np.full((h, w), 0.92, np.float32)
    y = int(rng.integers(2, 8))
    while y + 16 < h:
        x, size = 4, int(rng.integers(10, 16))
        while x + size < w - 4:
            width = int(rng.integers(size // 2, size))
            strokes = rng.random((size, width)) < 0.45
            page[y : y + size, x : x + width][strokes] = 0.1
            x += width + int(rng.integers(1, 4)) + (size if rng.random() < 0.1 else 0)
        y += size + int(rng.integers(6, 14))
    return np.repeat(page[None, None] * 2 - 1, 3, axis=1).astype(np.float32)


def _ocr(shape: tuple[int, ...]) -> Callable[[int], Feeds]:
    return lambda seed: {"x": _text(shape, seed)}


DIGITS = {
    "0": ("01110", "10001", "10001", "10001", "10001", "10001", "01110"),
    "1": ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "3": ("11110", "00001", "00001", "01110", "00001", "00001", "11110"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "6": ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    "8": ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    "9": ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
}
"""A 5x7 bitmap font of the digits (no font file: the test downloads nothing)."""


def _printed_line(shape: tuple[int, ...]) -> Callable[[int], Feeds]:
    """A cropped line of printed digits, NCHW, as the recognizer gets it from the
    detector: four to six digits of the bitmap font, 28 px high, dark on light paper,
    normalized to [-1, 1] as PP-OCR does. The recognizer reads them with confidence
    (the glyph-like blocks of :func:`_text` it reads as noise, near ties between
    classes that any rounding flips)."""

    def feeds(seed: int) -> Feeds:
        h, w, scale = shape[2], shape[3], 4
        page = np.full((h, w), 0.92, np.float32)
        x, y = _indent(seed), (h - 7 * scale) // 2
        for digit in _digits(seed):
            glyph = np.array([[c == "1" for c in row] for row in DIGITS[digit]])
            ink = np.kron(glyph, np.ones((scale, scale), bool))
            page[y : y + ink.shape[0], x : x + ink.shape[1]][ink] = 0.1
            x += ink.shape[1] + scale + 2
        return {"x": np.repeat(page[None, None] * 2 - 1, 3, axis=1).astype(np.float32)}

    return feeds


def _indent(seed: int) -> int:
    """Where :func:`_printed_line`'s first digit starts for ``seed``, in px."""
    return int(np.random.default_rng(seed).integers(2, 10))


def _digits(seed: int) -> str:
    """The digits :func:`_printed_line` prints for ``seed`` (six fit in 160 px)."""
    rng = np.random.default_rng(seed)
    rng.integers(2, 10)  # (the indent)
    return "".join(rng.choice(list(DIGITS), int(rng.integers(4, 7))))


def _ocr_text(probabilities: np.ndarray) -> str:
    """The recognizer's reading (CTC: the best class per step, repeats merged, blanks
    (class 0) dropped), in characters of the dictionary its file carries."""
    model = onnx.load(packaged_file("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx"))
    chars = next(p.value for p in model.metadata_props if p.key == "character").splitlines()
    best = probabilities[0].argmax(axis=-1)
    steps = [int(c) for i, c in enumerate(best) if c and (i == 0 or best[i - 1] != c)]
    return "".join(chars[c - 1] for c in steps)


def _mediapipe(name: str, shape: tuple[int, ...]) -> Callable[[int], Feeds]:
    return lambda seed: {name: _image(shape, seed)}


INT8_GOAL = (0.35, 0.99)
"""Issue #17's bar for static int8 of a CNN that classifies: at most this size ratio,
at least this top-1 agreement; a variant that misses the size must have a report whose
size breakdown shows why (no weight left in float: what remains is what int8 does not
shrink)."""
INT8_CNN = Method("static-int8", max_size_ratio=0.35)

CATALOGUE: tuple[ZooModel, ...] = (
    ZooModel(
        "ppocr-det",
        "rapidocr_onnxruntime",
        "models/ch_PP-OCRv4_det_infer.onnx",
        "text detection (PP-OCRv4, paddle2onnx)",
        "dynamic batch, height, width; Constant weights",
        _ocr((1, 3, 128, 256)),
        {"shapes": {"x": [1, 3, 128, 256]}},
        (INT8_CNN,),
    ),
    ZooModel(
        "ppocr-cls",
        "rapidocr_onnxruntime",
        "models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "text direction classifier (PP-OCR v2, paddle2onnx)",
        "`?` dims; Constant weights; depthwise convolutions",
        _ocr((1, 3, 48, 192)),
        {"shapes": {"x": [1, 3, 48, 192]}},
        (Method("static-int8", max_size_ratio=0.4, min_agreement=0.99, int8_goal=True),),
    ),
    ZooModel(
        "ppocr-rec",
        "rapidocr_onnxruntime",
        "models/ch_PP-OCRv4_rec_infer.onnx",
        "text recognition (PP-OCRv4 SVTR, 6625 classes per step)",
        "`?` and named dims; a softmax per position; 10 MB",
        _printed_line((1, 3, 48, 160)),
        {"shapes": {"x": [1, 3, 48, 160]}},
        (Method("static-int8", max_size_ratio=0.35, min_agreement=0.99, int8_goal=True),),
        label=_ocr_text,
        answer=_digits,
    ),
    ZooModel(
        "silero-vad",
        "silero_vad",
        "data/silero_vad.onnx",
        "voice activity detection (Silero VAD 6)",
        "recurrent state in and out; int64 scalar input; If subgraphs",
        _speech,
        {"shapes": {"input": [1, 512], "state": [2, 1, 128]}, "values": {"sr": 16000}},
        (Method("dynamic-int8"),),
    ),
    ZooModel(
        "magika",
        "magika",
        "models/standard_v3_3/model.onnx",
        "file type detection (Magika 1.0, jax2tf, 214 types)",
        "int32 byte input; Gemm bias of shape (1, N)",
        _file_features,
        {"shapes": {"bytes": [1, 2048]}},
        (Method("static-int8", max_size_ratio=0.35, min_agreement=0.99, int8_goal=True),),
        label=_magika_label,
        answer=lambda seed: "python",  # SOURCES are Python files
    ),
    ZooModel(
        "iris",
        "onnxruntime",
        "datasets/logreg_iris.onnx",
        "logistic regression (scikit-learn, skl2onnx)",
        "ai.onnx.ml operators; a sequence of maps as output",
        _iris,
        {},
        (Method("prune", fails="no weight matrices to prune"),),
    ),
    ZooModel(
        "face-detection",
        "mediapipe",
        "modules/face_detection/face_detection_short_range.tflite",
        "face detection (MediaPipe BlazeFace short range)",
        "TFLite; NHWC; two outputs",
        _mediapipe("input", (1, 128, 128, 3)),
    ),
    ZooModel(
        "selfie-segmentation",
        "mediapipe",
        "modules/selfie_segmentation/selfie_segmentation.tflite",
        "person segmentation (MediaPipe)",
        "TFLite; a 256x256 mask out",
        _mediapipe("input_1", (1, 256, 256, 3)),
    ),
    ZooModel(
        "hand-landmark",
        "mediapipe",
        "modules/hand_landmark/hand_landmark_full.tflite",
        "hand landmarks (MediaPipe, full; lite pushed as its variant)",
        "TFLite; four outputs; a lighter build as variant",
        _mediapipe("input_1", (1, 224, 224, 3)),
        variant="modules/hand_landmark/hand_landmark_lite.tflite",
    ),
    ZooModel(
        "palm-detection",
        "mediapipe",
        "modules/palm_detection/palm_detection_full.tflite",
        "palm detection (MediaPipe, full; lite pushed as its variant)",
        "TFLite; 2016 anchors; a lighter build as variant",
        _mediapipe("input_1", (1, 192, 192, 3)),
        variant="modules/palm_detection/palm_detection_lite.tflite",
    ),
)
