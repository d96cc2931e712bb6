"""Sample inputs for calibration and comparison: uploaded as an ``.npz`` laid out like
the model's inputs, or generated from its input specs and validation hints."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from controller.optimizations.optimize import Feeds, OptimizationError
from node_agent.runtimes import (
    InputHints,
    TensorSpec,
    fixed_dim,
    generate_inputs,
)


def load_samples(npz: bytes, specs: Sequence[TensorSpec]) -> list[Feeds]:
    """Sample inputs uploaded as an ``.npz`` of arrays named like the model's inputs. For
    an input ``[batch, 3, 32, 32]`` an array may be laid out either way:

    - one axis more than the input, leading axis = samples: ``(N, 1, 3, 32, 32)`` gives
      N feeds of ``(1, 3, 32, 32)``;
    - the input's own rank, when its leading dim is dynamic or 1: ``(N, 3, 32, 32)`` is
      split along the batch axis into N feeds of ``(1, 3, 32, 32)``.

    Float arrays are cast to the input's float type (``np.random`` gives float64)."""
    try:
        arrays = dict(np.load(io.BytesIO(npz), allow_pickle=False))
    except Exception as exc:
        raise OptimizationError(f"calibration file is not a readable .npz: {exc}") from exc
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise OptimizationError(
            f"calibration .npz lacks input(s) {missing}; it has {sorted(arrays)} "
            "(one array per model input, leading axis = samples)"
        )
    split = {spec.name: _sample_axis(arrays[spec.name], spec) for spec in specs}
    for spec in specs:
        if spec.dtype != "str" and arrays[spec.name].dtype != np.dtype(spec.dtype):
            arrays[spec.name] = arrays[spec.name].astype(spec.dtype)
    counts = {n: arrays[n].shape[0] for n in names}
    if len(set(counts.values())) != 1:
        raise OptimizationError(f"calibration arrays disagree on the sample count: {counts}")
    n = next(iter(counts.values()))
    # (np.array, not ascontiguousarray, which would turn a scalar input's samples 1-d)
    return [
        {
            name: np.array(arrays[name][i : i + 1] if split[name] else arrays[name][i], order="C")
            for name in names
        }
        for i in range(n)
    ]


def _tuple(dims: Sequence[str]) -> str:
    return f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"


def _layouts(spec: TensorSpec) -> str:
    dims = ["?" if fixed_dim(d) is None else str(d) for d in spec.shape]
    layouts = [f"{_tuple(['N', *dims])} (N samples of the input's shape)"]
    if dims and fixed_dim(spec.shape[0]) in (None, 1):
        layouts.append(f"{_tuple(['N', *dims[1:]])} (N samples along the batch axis)")
    return " or ".join(layouts)


def _signature(spec: TensorSpec) -> str:
    return f"{spec.name!r} [{', '.join('?' if d is None else str(d) for d in spec.shape)}]"


def _sample_axis(array: np.ndarray, spec: TensorSpec) -> bool:
    """Whether the samples lie along ``spec``'s own batch axis (rank = the input's),
    rather than along an extra leading axis (rank = the input's + 1). Checks the array's
    sizes against the input's fixed dims and its dtype's kind."""
    rank = len(spec.shape)
    if array.ndim == rank + 1:
        sample_shape, split = array.shape[1:], False
    elif array.ndim == rank and rank and fixed_dim(spec.shape[0]) in (None, 1):
        sample_shape, split = (1, *array.shape[1:]), True
    else:
        raise OptimizationError(
            f"calibration array {spec.name!r} has shape {list(array.shape)}; for the input "
            f"{_signature(spec)} the accepted layouts are {_layouts(spec)}"
        )
    for axis, (dim, size) in enumerate(zip(spec.shape, sample_shape, strict=True)):
        if (want := fixed_dim(dim)) is not None and size != want:
            raise OptimizationError(
                f"calibration array {spec.name!r} has shape {list(array.shape)}: dim {axis} "
                f"of the input {_signature(spec)} must be {want} (accepted layouts: "
                f"{_layouts(spec)})"
            )
    if spec.dtype != "str" and np.dtype(spec.dtype).kind != array.dtype.kind:
        raise OptimizationError(
            f"calibration array {spec.name!r} is {array.dtype}; the input {spec.name!r} "
            f"is {spec.dtype}"
        )
    return split


def generated_samples(
    specs: Sequence[TensorSpec], count: int, default_dim: int, hints: InputHints | None = None
) -> list[Feeds]:
    """``count`` generated feeds, sized by the version's validation ``hints`` where it
    has them (as the probe sizes its inputs)."""
    hints = hints or InputHints(dims={}, shapes={}, values={})
    return [generate_inputs(specs, hints, default_dim=default_dim, seed=i) for i in range(count)]
