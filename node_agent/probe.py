"""Validate and benchmark a model in a child process.

``probe_model`` spawns ``python -m node_agent.probe``, which loads the model in its
runtime, runs it once on generated inputs (validation), then times ``runs`` inferences
(benchmark). A child process because a runtime fed a hostile or broken artifact may
crash or hang: the caller gets a clean failure with the runtime's own text and stays up.
It also makes peak memory measurable: the child's high-water RSS is the model's alone,
and boundable: the child holds itself to the request's memory and CPU limits
(:func:`apply_limits`) before it opens the model.

The launcher (``probe_model``, ``ProbeRequest``, ``ProbeFailed``) lives in
:mod:`node_agent.probe_launcher`, which imports nothing heavy, and is re-exported here;
this module is the child's side and imports numpy and the runtimes. The node agent
imports the launcher only.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from node_agent.probe_launcher import (
    ProbeCancelled,
    ProbeFailed,
    ProbeLimits,
    ProbeRequest,
    out_of_memory,
    probe_model,
)
from node_agent.runtimes import (
    InputHints,
    Runner,
    generate_inputs,
    open_runner,
    preload_runtime,
)
from node_agent.sysinfo import cpu_model

__all__ = [
    "ProbeCancelled",
    "ProbeFailed",
    "ProbeLimits",
    "ProbeRequest",
    "apply_limits",
    "execute",
    "probe_model",
]


def _lower(which: int, soft: int, hard: int) -> None:
    """Set a limit, no higher than the inherited hard limit (which an unprivileged
    process cannot raise)."""
    _, inherited = resource.getrlimit(which)
    if inherited != resource.RLIM_INFINITY:
        soft, hard = min(soft, inherited), min(hard, inherited)
    resource.setrlimit(which, (soft, hard))


def apply_limits(limits: ProbeLimits) -> None:
    """Hold this process to ``limits``; the child calls it before it imports the
    runtime or reads the model. Both limits count from the process's start: the
    interpreter, numpy and the runtime take ~120 MiB and ~0.4 CPU seconds of them.

    Memory is RLIMIT_DATA, not RLIMIT_AS. RLIMIT_DATA (Linux >= 4.7) counts private
    writable mappings: the malloc heap, anonymous mmaps, and glibc's per-thread arenas
    as they are made writable (mprotect is checked too). RLIMIT_AS also counts what
    costs nothing: the 64 MiB arenas reserved per thread, thread stacks, mapped
    libraries. Measured with onnxruntime 1.32 and the test CNN, VmData / VmSize after a
    run: 123 / 220 MiB at 1 thread, 172 / 716 MiB at 8 (LiteRT: 98 / 180, 154 / 236),
    so an address-space limit would refuse normal models on a many-core node; and at
    8 threads under a 256 MiB RLIMIT_AS, onnxruntime deadlocked instead of failing.
    Under RLIMIT_DATA a ConstantOfShape of 10^9 float32 fails at once with
    onnxruntime's own "Failed to allocate memory" (and, in LiteRT, an empty
    RuntimeError from allocate_tensors).

    CPU is RLIMIT_CPU, summed over the threads: SIGXCPU at the limit (its default
    action ends the process), SIGKILL a second later should anything catch it."""
    if limits.memory_mb is not None:
        size = limits.memory_mb * 1024 * 1024
        _lower(resource.RLIMIT_DATA, size, size)
    if limits.cpu_s is not None:
        _lower(resource.RLIMIT_CPU, limits.cpu_s, limits.cpu_s + 1)


def _failure(req: ProbeRequest, text: str, exc: BaseException) -> str:
    """``text``, or the memory limit's reason when an allocation failed."""
    if isinstance(exc, MemoryError) or out_of_memory(text):
        return req.limits.memory_exceeded(text)
    if req.format == "tflite" and not str(exc) and req.limits.memory_mb is not None:
        return (
            f"{text}(LiteRT gave no reason; it fails so when the model needs more memory "
            f"than the limit of {req.limits.memory_mb} MiB, {req.limits.memory_setting})"
        )
    return text


def _peak_rss_bytes() -> int:
    """This process's high-water RSS. On Linux, VmHWM: ``ru_maxrss`` would not do, since
    Linux carries it across execve and the child would start at its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q))


def _cpu_model() -> str:
    """The same string the agent reports as its node's ``cpu_model``."""
    return cpu_model(Path("/proc")) or platform.processor() or "unknown"


def _try_inputs(runner: Runner, req: ProbeRequest) -> tuple[dict[str, np.ndarray], list[str]]:
    """Find inputs the model accepts: the user's hints with the default sizes first, then
    every dynamic dim at 1. Returns the working feeds and the errors of failed attempts."""
    hints = InputHints.from_metadata(req.metadata)
    attempts: list[str] = []
    for unknown in (None, 1):
        feeds = generate_inputs(
            runner.inputs, hints, default_dim=req.default_dim, unknown_dim=unknown
        )
        try:
            outputs = runner.run(feeds)
        except Exception as exc:
            shapes = {k: list(v.shape) for k, v in feeds.items()}
            attempts.append(f"inputs {shapes}: {type(exc).__name__}: {exc}")
            continue
        bad = [k for k, v in outputs.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
        if bad:
            attempts.append(f"outputs {bad} are not finite (NaN or Inf)")
            continue
        return feeds, attempts
    raise RuntimeError("; ".join(attempts))


def execute(req: ProbeRequest) -> dict[str, Any]:
    """Runs in the child. Never raises: failures are reported in the result."""
    result: dict[str, Any] = {"validation": {"passed": False}, "benchmark": None}
    try:
        preload_runtime(req.format)
    except Exception as exc:
        result["validation"]["error"] = _failure(req, f"runtime unavailable: {exc}", exc)
        return result
    # Baseline after the runtime library is loaded, so the difference to the peak is
    # what this model costs: weights, arenas, activations.
    baseline = _peak_rss_bytes()
    started = time.perf_counter()
    try:
        runner = open_runner(Path(req.path), req.format, threads=req.threads)
    except Exception as exc:
        error = f"load failed: {type(exc).__name__}: {exc}"
        result["validation"]["error"] = _failure(req, error, exc)
        return result
    validation: dict[str, Any] = {
        "runtime": runner.runtime,
        "providers": getattr(runner, "providers", []),
        "inputs": [s.as_dict() for s in runner.inputs],
        "outputs": [s.as_dict() for s in runner.outputs],
        "load_s": round(time.perf_counter() - started, 4),
    }
    result["validation"] = validation
    try:
        feeds, attempts = _try_inputs(runner, req)
    except Exception as exc:
        validation.update(passed=False, error=_failure(req, f"inference failed: {exc}", exc))
        return result
    outputs = runner.run(feeds)
    validation.update(
        passed=True,
        input_shapes={k: list(v.shape) for k, v in feeds.items()},
        output_shapes={k: list(v.shape) for k, v in outputs.items()},
        rejected_attempts=attempts,
    )
    if not req.benchmark:
        return result
    for _ in range(req.warmup_runs):
        runner.run(feeds)
    latencies_ms = []
    for _ in range(req.runs):
        t0 = time.perf_counter_ns()
        runner.run(feeds)
        latencies_ms.append((time.perf_counter_ns() - t0) / 1e6)
    peak = _peak_rss_bytes()
    result["benchmark"] = {
        "runs": req.runs,
        "warmup_runs": req.warmup_runs,
        "threads": req.threads,
        "input_shapes": validation["input_shapes"],
        "p50_ms": round(_percentile(latencies_ms, 50), 4),
        "p95_ms": round(_percentile(latencies_ms, 95), 4),
        "p99_ms": round(_percentile(latencies_ms, 99), 4),
        "mean_ms": round(float(np.mean(latencies_ms)), 4),
        "min_ms": round(min(latencies_ms), 4),
        "max_ms": round(max(latencies_ms), 4),
        "peak_rss_bytes": peak,
        "model_peak_bytes": max(0, peak - baseline),
        "runtime": runner.runtime,
        "machine": platform.machine(),
        "cpu": _cpu_model(),
    }
    return result


def main() -> None:
    req: ProbeRequest | None = None
    try:
        req = ProbeRequest.from_json(json.loads(sys.stdin.read()))
        try:
            apply_limits(req.limits)
        except (OSError, ValueError) as exc:  # fail closed: no limits, no model
            error = f"could not set the probe's resource limits, so the model was not opened: {exc}"
            result: dict[str, Any] = {"validation": {"passed": False, "error": error}}
        else:
            result = execute(req)
    except Exception as exc:  # a bug in the probe, or memory the benchmark runs lacked
        error = traceback.format_exc()
        if req is not None:
            error = _failure(req, error, exc)
        result = {"validation": {"passed": False, "error": error}, "benchmark": None}
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
