"""A Celery worker's counters in prometheus_client's multiprocess mode.

The reconciles, validations and pushes run in the prefork pool's child processes, so
the counters they increment live there; the worker's main process (which serves
``/metrics``, ``controller/api/worker_metrics.py``) runs no task. In multiprocess mode
every process writes its values to files of its own (``counter_<pid>.db``) in one
directory, and a scrape sums the files.

The value class is chosen once, when ``prometheus_client`` is first imported, from the
environment: :func:`enable_multiprocess` must run before anything imports it (``edgefleet
worker`` calls it first thing). The directory is emptied at start, so a restarted worker
(a new process, in the same pod's ``/tmp``) starts from zero as Prometheus expects of a
new process, and no file of a previous run is summed twice.

A child that exits (``--max-tasks-per-child``, a crash, the pool shrinking) leaves its
counter file behind on purpose: its counts stay in the sum. ``mark_process_dead`` only
drops the files of live-mode gauges, which the worker has none of today; it runs anyway,
so a gauge added later does not report dead processes. A new child with a recycled pid
opens the same file and goes on from the value in it: nothing is counted twice.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

from celery.signals import worker_process_shutdown

ENV = "PROMETHEUS_MULTIPROC_DIR"
DIR_NAME = "edgefleet-worker-metrics"


def metrics_dir() -> Path:
    """One directory per temporary directory: like the liveness file, one worker per
    pod (or per ``TMPDIR``)."""
    return Path(tempfile.gettempdir()) / DIR_NAME


class MetricsDirInUse(RuntimeError):
    pass


# The lock on the directory, held (open) for the life of the worker.
_held: list[IO[str]] = []


def enable_multiprocess() -> Path:
    """Create (or empty) the directory and point prometheus_client at it; connect the
    child processes' exit bookkeeping. Returns the directory.

    Raises :class:`MetricsDirInUse` when another worker holds it (two workers sharing a
    ``TMPDIR``): emptying it would throw that worker's counts away."""
    if "prometheus_client.values" in sys.modules:
        from prometheus_client import values

        if not getattr(values.ValueClass, "_multiprocess", False):
            raise RuntimeError(
                "prometheus_client was imported before its multiprocess mode was enabled: "
                "call enable_multiprocess() first"
            )
    path = metrics_dir()
    lock = (path.parent / f"{DIR_NAME}.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise MetricsDirInUse(
            f"another worker exports its metrics from {path}: give each worker a TMPDIR of its own"
        ) from None
    _held.append(lock)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ[ENV] = str(path)
    worker_process_shutdown.connect(_child_exits, weak=False)
    return path


def _child_exits(pid: int | None = None, **_: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid or os.getpid())  # type: ignore[no-untyped-call]
