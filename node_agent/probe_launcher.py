"""The parent's half of :mod:`node_agent.probe`: start ``python -m node_agent.probe`` on a
model file and read its verdict back.

Stdlib only, on purpose: the node agent launches benchmarks through this module and must
not load numpy or a model runtime itself (it stays a ~50 MiB process). Everything that
touches the model runs in the child (:func:`node_agent.probe.execute`)."""

from __future__ import annotations

import contextlib
import json
import os
import re
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

DEFAULT_MEMORY_LIMIT_MB = 2048
DEFAULT_CPU_LIMIT_S = 600  # 2x the default timeout (300 s) of a one-thread probe

# How a failed allocation reads: numpy ("Unable to allocate 3.73 GiB"), onnxruntime's
# arena ("Failed to allocate memory for requested buffer"), C++ (std::bad_alloc, "bad
# allocation"), strerror(ENOMEM), Python's MemoryError in a traceback.
_OUT_OF_MEMORY = re.compile(
    r"unable to allocate|failed to allocate|bad_alloc|bad allocation|cannot allocate memory"
    r"|out of memory|MemoryError",
    re.IGNORECASE,
)


def out_of_memory(text: str) -> bool:
    """Whether a runtime's error text (or a dead child's stderr) says an allocation
    failed: under the probe's memory limit, that is the limit speaking."""
    return _OUT_OF_MEMORY.search(text) is not None


@dataclass(frozen=True)
class ProbeLimits:
    """Resource limits of the probe child (None: none), set with setrlimit in the child
    before it opens the model (:func:`node_agent.probe.apply_limits`). The settings'
    names go into a verdict over a limit, so its reader knows what to raise.

    setrlimit is the portable floor, per process. A cgroup v2 per probe (memory.max,
    cpu.max in a delegated subtree or a systemd scope) would be better where there is
    one: it counts resident memory rather than mappings, takes cpu.max as a rate instead
    of a total, and its OOM kill is the kernel's clear verdict. An agent pod has only its
    container's cgroup, shared with the agent, so the limit here is what keeps a hostile
    model from getting the agent itself OOM-killed."""

    memory_mb: int | None = DEFAULT_MEMORY_LIMIT_MB
    cpu_s: int | None = DEFAULT_CPU_LIMIT_S
    memory_setting: str = "EDGEFLEET_PROBE_MEMORY_LIMIT_MB"
    cpu_setting: str = "EDGEFLEET_PROBE_CPU_LIMIT_S"

    def memory_exceeded(self, detail: str) -> str:
        if self.memory_mb is None:
            return f"the model ran out of memory: {detail}"
        return (
            f"the model exceeded the memory limit of {self.memory_mb} MiB "
            f"({self.memory_setting}): {detail}"
        )

    def cpu_exceeded(self, detail: str) -> str:
        return (
            f"the model exceeded the CPU time limit of {self.cpu_s} s "
            f"({self.cpu_setting}): {detail}"
        )


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
    limits: ProbeLimits = field(default_factory=ProbeLimits)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ProbeRequest:
        """The inverse of ``asdict`` (the child's side of the payload)."""
        limits = ProbeLimits(**doc.pop("limits", {}))
        return cls(**doc, limits=limits)


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


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def crash_reason(returncode: int, stderr: str, limits: ProbeLimits) -> str:
    """Why a child that ended with ``returncode`` (non-zero; negative: the signal that
    killed it) left no verdict: a limit, named with its setting, or the crash itself
    with its stderr's tail."""
    tail = stderr.strip()[-2000:]
    said = f": {tail}" if tail else ""
    if returncode < 0:
        how = f"killed by {_signal_name(-returncode)}"
        if -returncode == signal.SIGXCPU and limits.cpu_s is not None:
            return limits.cpu_exceeded(how + said)
    else:
        how = f"exited with code {returncode}"
    # A runtime that does not survive its failed allocation (std::terminate on a
    # bad_alloc: SIGABRT; a MemoryError at import: exit 1) says so on stderr.
    if out_of_memory(tail):
        return limits.memory_exceeded(how + said)
    if returncode == -signal.SIGKILL:
        # Not ours (the timeout and cancel kills raise before this): the kernel's OOM
        # killer, a cgroup's memory.max, the CPU limit's hard stop, or an operator.
        return (
            f"runtime {how} (out of memory in its cgroup or machine, or killed from outside){said}"
        )
    if returncode < 0:
        return f"runtime crashed ({how}){said}"
    return f"probe {how}{said}"


def probe_model(
    req: ProbeRequest, *, timeout_s: float, cancel: threading.Event | None = None
) -> dict[str, Any]:
    """Validate (and with ``req.benchmark``, benchmark) the model in a child process
    held to ``req.limits``. Returns the child's result (``{"validation": {...},
    "benchmark": {...} | None}``; a model that ran out of memory under the limit fails
    validation with :meth:`ProbeLimits.memory_exceeded`'s reason); raises
    :class:`ProbeFailed` when the child crashed (past the CPU limit, say), hung past
    ``timeout_s`` or printed nothing readable, and :class:`ProbeCancelled` (the child
    killed) once ``cancel`` is set."""
    payload = json.dumps(asdict(req))  # limits included: the child applies them first
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
    if proc.returncode != 0:
        raise ProbeFailed(crash_reason(proc.returncode, stderr, req.limits))
    try:
        last = stdout.strip().splitlines()[-1]
        result: dict[str, Any] = json.loads(last)
    except (IndexError, json.JSONDecodeError) as exc:
        raise ProbeFailed(f"probe printed no result: {stdout[-500:]!r}") from exc
    return result
