"""The parent's half of :mod:`node_agent.probe`: start ``python -m node_agent.probe`` on a
model file and read its verdict back.

Stdlib only, on purpose: the node agent launches benchmarks through this module and must
not load numpy or a model runtime itself (it stays a ~50 MiB process). Everything that
touches the model runs in the child (:func:`node_agent.probe.execute`)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import site
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# How often a cancellable probe looks at its cancel event.
_CANCEL_POLL_S = 0.1
# The directory holding the node_agent package.
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


@dataclass
class ProbeRequest:
    path: str
    format: str
    metadata: dict[str, Any] = field(default_factory=dict)
    runs: int = 50
    warmup_runs: int = 5
    threads: int = 1
    default_dim: int = 64
    benchmark: bool = True


def _site_dirs() -> set[str]:
    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    return {str(Path(d).resolve()) for d in dirs}


class ProbeFailed(RuntimeError):
    """The child died or timed out: not a verdict on the model's outputs, but on the
    runtime's ability to load and run it at all."""


class ProbeCancelled(ProbeFailed):
    """The caller asked the probe to stop (the agent shuts down): no verdict at all."""


def _communicate(
    proc: subprocess.Popen[str], payload: str, timeout_s: float, cancel: threading.Event | None
) -> tuple[str, str]:
    """The child's stdout and stderr; kills it on timeout or cancel."""
    if cancel is None:
        try:
            return proc.communicate(payload, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            proc.kill()
            proc.communicate()
            raise ProbeFailed(f"runtime did not finish within {timeout_s:g} s") from exc
    deadline = time.monotonic() + timeout_s
    send: str | None = payload  # communicate() takes the input on its first call only
    while True:
        wait_s = min(_CANCEL_POLL_S, max(0.0, deadline - time.monotonic()))
        try:
            return proc.communicate(send, timeout=wait_s)
        except subprocess.TimeoutExpired:
            send = None
        if cancel.is_set() or time.monotonic() >= deadline:
            proc.kill()
            proc.communicate()
            if cancel.is_set():
                raise ProbeCancelled("probe cancelled")
            raise ProbeFailed(f"runtime did not finish within {timeout_s:g} s")


def probe_model(
    req: ProbeRequest, *, timeout_s: float, cancel: threading.Event | None = None
) -> dict[str, Any]:
    """Validate (and with ``req.benchmark``, benchmark) the model in a child process.
    Returns the child's result (``{"validation": {...}, "benchmark": {...} | None}``);
    raises :class:`ProbeFailed` when the child crashed, hung past ``timeout_s`` or printed
    nothing readable, and :class:`ProbeCancelled` (the child killed) once ``cancel`` is
    set."""
    payload = json.dumps(asdict(req))
    env = dict(os.environ)
    # One BLAS/OpenMP thread pool per requested thread, not per host core.
    env.setdefault("OMP_NUM_THREADS", str(req.threads))
    # -P: the working directory does not go on the child's sys.path (the agent's is the
    # node's shared cache volume); this package is found where the parent found it.
    if _PACKAGE_ROOT not in _site_dirs():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (_PACKAGE_ROOT, env.get("PYTHONPATH"))))
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "node_agent.probe"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        stdout, stderr = _communicate(proc, payload, timeout_s, cancel)
    finally:
        if proc.poll() is None:  # an unexpected error above: leave no child behind
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        raise ProbeFailed(f"runtime crashed ({name}): {stderr.strip()[-2000:]}")
    if proc.returncode != 0:
        raise ProbeFailed(f"probe exited {proc.returncode}: {stderr.strip()[-2000:]}")
    try:
        last = stdout.strip().splitlines()[-1]
        result: dict[str, Any] = json.loads(last)
    except (IndexError, json.JSONDecodeError) as exc:
        raise ProbeFailed(f"probe printed no result: {stdout[-500:]!r}") from exc
    return result
