"""A Celery worker's counters in prometheus_client's multiprocess mode
(``controller/kit/multiprocess.py``).

The reconciles, validations and pushes of derived versions run in the prefork pool's
child processes, so the counters they increment live there; the worker's main process
(which serves ``/metrics``, ``controller/api/worker_metrics.py``) runs no task.

A child that exits (``--max-tasks-per-child``, a crash, the pool shrinking) leaves its
counter file behind on purpose: its counts stay in the sum. ``mark_process_dead`` only
drops the files of live-mode gauges, which the worker has none of today; it runs anyway,
so a gauge added later does not report dead processes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celery.signals import worker_process_shutdown

from controller.kit import multiprocess

DIR_NAME = "edgefleet-worker-metrics"


def enable_multiprocess() -> Path:
    """Multiprocess mode in ``$TMPDIR/edgefleet-worker-metrics`` (before anything
    imports prometheus_client), and the children's exit bookkeeping."""
    path = multiprocess.enable(DIR_NAME)
    worker_process_shutdown.connect(_child_exits, weak=False)
    return path


def _child_exits(pid: int | None = None, **_: Any) -> None:
    from prometheus_client import multiprocess as prometheus_multiprocess

    prometheus_multiprocess.mark_process_dead(pid or os.getpid())  # type: ignore[no-untyped-call]
