"""prometheus_client's multiprocess mode, for a command whose counting happens in
several processes: a Celery worker's pool (``controller/tasks/worker_metrics.py``) and
``edgefleet server --workers N`` (uvicorn's worker processes).

Every process writes its values to files of its own (``counter_<pid>.db``, ...) in one
directory, and a scrape sums the files. The value class is chosen once, when
``prometheus_client`` is first imported, from the environment: :func:`enable` must run
before anything imports it (the CLI commands call it first thing; this module imports it
only inside functions). The directory is emptied at start, so a restarted command (a new
process, in the same pod's ``/tmp``) starts from zero as Prometheus expects, and no file
of a previous run is summed twice. The command holds a lock on it for its life: a second
one given the same ``TMPDIR`` refuses to start rather than empty the first one's files.

A process that exits leaves its counter files behind on purpose: its counts stay in the
sum. A new process with a recycled pid opens the same file and goes on from the value in
it: nothing is counted twice."""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

ENV = "PROMETHEUS_MULTIPROC_DIR"


class MetricsDirInUse(RuntimeError):
    pass


# The locks on the directories, held (open) for the life of the process.
_held: list[IO[str]] = []


def metrics_dir(name: str) -> Path:
    """One directory per temporary directory: like the worker's liveness file, one
    command of a kind per pod (or per ``TMPDIR``)."""
    return Path(tempfile.gettempdir()) / name


def enable(name: str) -> Path:
    """Create (or empty) ``$TMPDIR/<name>`` and point prometheus_client at it. Returns
    the directory. Raises :class:`MetricsDirInUse` when another process holds it."""
    if "prometheus_client.values" in sys.modules:
        from prometheus_client import values

        if not getattr(values.ValueClass, "_multiprocess", False):
            raise RuntimeError(
                "prometheus_client was imported before its multiprocess mode was enabled: "
                "call enable() first"
            )
    path = metrics_dir(name)
    lock = (path.parent / f"{name}.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise MetricsDirInUse(
            f"another process exports its metrics from {path}: give each a TMPDIR of its own"
        ) from None
    _held.append(lock)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ[ENV] = str(path)
    return path


def enabled() -> bool:
    return ENV in os.environ


def scrape_registry() -> CollectorRegistry:
    """What a scrape of this process serves: in multiprocess mode, the sum over every
    process's files; otherwise this process's own metrics."""
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    if not enabled():
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry
