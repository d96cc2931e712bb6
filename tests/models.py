"""Where the tests find their model files: built in code, or shipped by a PyPI package
(installed by scripts/test with --no-deps: only the model files are used)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def packaged_file(package: str, relative: str) -> Path:
    # find_spec does not import the package (silero_vad's __init__ imports torch).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(
            f"package {package} is not installed; scripts/test installs it (--no-deps)",
            pytrace=False,
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    assert path.is_file(), f"{path} missing from package {package}"
    return path


def silero_vad() -> Path:
    """Silero VAD: a recurrent voice-activity model with state inputs and outputs."""
    return packaged_file("silero_vad", "data/silero_vad.onnx")


def ppocr_detector() -> Path:
    """PP-OCRv4 text detector: image input with dynamic batch, height and width."""
    return packaged_file("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx")
