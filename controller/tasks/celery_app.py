"""The Celery application: Redis broker in production, eager (in-process) in the
embedded setup. Tasks get IDs, never ORM objects, and open their own sessions.

A worker outlives its broker: when Redis restarts it reconnects for as long as it takes
(Celery gives up after 100 attempts by default, some 45 minutes, and exits), and a
liveness file tells Kubernetes whether its event loop still turns (``LivenessFile``)."""

from __future__ import annotations

import logging
import random
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery import Celery, bootsteps
from celery.signals import task_success
from sqlalchemy.orm import Session

from controller.kit.transactions import after_commit
from controller.settings import Settings, get_settings

log = logging.getLogger(__name__)

TASK_MODULES = [
    "controller.registry.tasks",
    "controller.optimizations.tasks",
    "controller.rollouts.tasks",
    "controller.fleet.tasks",
]

celery_app = Celery("edgefleet", include=TASK_MODULES)


def _guard_closed_redis_channels() -> None:
    """Make a Redis channel of a dropped broker connection fail like a dropped
    connection, not with an AttributeError that kills the worker.

    When Redis goes away, the worker's consumer calls ``connection.collect()``, which
    detaches the transport from its connection (``transport.client = None``), and then
    ``connection.close()``. Closing the channel hands the messages the worker held
    unacknowledged (acks_late, the follow-up steps waiting for their countdown) back
    to Redis, which needs a new Redis pool, built from ``transport.client.hostname``:
    ``AttributeError: 'NoneType' object has no attribute 'hostname'``. Celery ignores
    only connection errors there, so the AttributeError stops the worker ("Unrecoverable
    error"). Seen with celery 5.7.0 and kombu 5.7.0 (the same failure as kombu issue
    #582, where the gossip step closed such a channel); tests/tasks/test_restarts.py
    reproduces it. As a connection error, it is ignored like the failed hand-back it
    is: the messages stay in Redis's unacked set, redelivered after the visibility
    timeout, and beat's tick re-queues any rollout step they carried."""
    from kombu.transport import redis as kombu_redis
    from redis.exceptions import ConnectionError as RedisConnectionError

    channel: Any = kombu_redis.Channel
    original: Any = channel._connparams
    if getattr(original, "edgefleet_guard", False):
        return

    def _connparams(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.connection is None or self.connection.client is None:
            raise RedisConnectionError("the broker connection of this channel was closed")
        return original(self, *args, **kwargs)

    _connparams.edgefleet_guard = True  # type: ignore[attr-defined]
    channel._connparams = _connparams


_guard_closed_redis_channels()


def _periodic_task_succeeded(sender: Any = None, **_: Any) -> None:
    """A periodic task of beat's schedule finished without an error: its time, for the
    alert that beat (or every worker) stopped (controller.metrics)."""
    name = getattr(sender, "name", None)
    if name in PERIODIC_TASKS:
        from controller import metrics  # the worker's multiprocess mode is set by then

        metrics.PERIODIC_TASK_SUCCESS.labels(name).set_to_current_time()


task_success.connect(_periodic_task_succeeded, weak=False)


BEAT_SCHEDULE: dict[str, dict[str, Any]] = {
    "registry-requeue-stuck": {"task": "registry.requeue_stuck", "schedule": timedelta(seconds=60)},
    # Gate evaluation and the safety net for lost follow-up steps.
    "rollouts-tick": {"task": "rollouts.tick", "schedule": timedelta(seconds=10)},
    "fleet-mark-silent": {"task": "fleet.mark_silent", "schedule": timedelta(seconds=15)},
    "fleet-repair-drift": {"task": "fleet.repair_drift", "schedule": timedelta(seconds=60)},
    "fleet-resync": {"task": "fleet.resync", "schedule": timedelta(seconds=300)},
    # Retention of the audit log (event_retention_days), in bounded batches.
    "events-purge": {"task": "events.purge", "schedule": timedelta(seconds=3600)},
}
PERIODIC_TASKS = frozenset(entry["task"] for entry in BEAT_SCHEDULE.values())


def configure(settings: Settings) -> Celery:
    broker_url = settings.redis_url or "memory://localhost/"
    if celery_app.conf.broker_url not in (None, broker_url):
        _forget_broker_connections()
    celery_app.conf.update(
        broker_url=broker_url,
        result_backend=None,
        task_ignore_result=True,
        task_always_eager=settings.eager_tasks,
        task_default_queue=settings.celery_queue,
        # An eager task that fails must not turn the request that queued it into a 500:
        # the task records its own failure on the rows it works on.
        task_eager_propagates=False,
        # A worker killed mid-task leaves the message unacknowledged, so another worker
        # runs it again; every task is idempotent against the database state.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Reconnect to a restarted or unreachable Redis forever, at startup too: the
        # default gives up after 100 attempts and the worker exits, leaving every
        # rollout to wait for whoever restarts it.
        broker_connection_retry=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_channel_error_retry=True,
        # A task still running when the connection drops finishes: each commits its own
        # result and is idempotent, so cancelling it (Celery 6's default) would only
        # throw work away (a benchmark of minutes, its probe process orphaned); its
        # message, if Redis lost track of it, is redelivered and finds the work done.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_transport_options={
            "visibility_timeout": 3600,
            # A broker that vanished without closing the socket (failover, NAT or
            # firewall timeout) must not hang a publish forever: kombu's own health
            # checks need the socket calls to return.
            "socket_timeout": 15,
            "socket_connect_timeout": 5,
            "socket_keepalive": True,
        },
        # Sending a task (a reconcile's follow-up, from the worker or the API) rides
        # out a Redis restart of a few seconds before it fails; beat's tick is the
        # safety net beyond that.
        task_publish_retry=True,
        task_publish_retry_policy={
            "max_retries": 4,
            "interval_start": 0.2,
            "interval_step": 0.5,
            "interval_max": 2.0,
        },
        # No result backend (task_ignore_result): nothing to retry on that side.
        task_serializer="json",
        accept_content=["json"],
        timezone="UTC",
        beat_schedule=BEAT_SCHEDULE,
    )
    return celery_app


configure(get_settings())


def _forget_broker_connections() -> None:
    """Close the pooled connections to the previous broker (a process reconfigured for
    another Redis: the tests' private ones); Celery would keep sending to it."""
    from kombu import pools

    app: Any = celery_app
    app._pool = None
    app.amqp._producer_pool = None
    reset: Any = pools.reset  # closes every pooled kombu connection of this process
    reset()


def enqueue(session: Session, task_name: str, *args: Any, countdown: float | None = None) -> None:
    """Send the task named ``task_name`` once the session's transaction commits; never if
    it rolls back. By name, so a service never imports its own ``tasks`` module (which
    imports the service): a worker resolves the name, and so does the eager, in-process
    mode, after importing ``TASK_MODULES``."""

    def send() -> None:
        if not celery_app.conf.task_always_eager:
            celery_app.send_task(task_name, args=args, countdown=countdown)
            return
        celery_app.loader.import_default_modules()  # registers the tasks; once per process
        result = celery_app.tasks[task_name].apply_async(args=args, countdown=countdown)
        if result.failed():
            log.error("eager task %s%r failed: %s", task_name, args, result.result)

    after_commit(session, send)


# ---------------------------------------------------------------- outages

OUTAGE_RETRY_MAX_S = 30.0
OUTAGE_MAX_RETRIES = 40  # a quarter of an hour or so; beat's tick takes over after


def outage_countdown_s(retries: int) -> float:
    """Seconds before retry ``retries + 1`` of a task whose database was unavailable:
    1 s doubling to 30 s, jittered so workers that lost it together do not all come
    back in the same instant."""
    return min(OUTAGE_RETRY_MAX_S, 2.0**retries) * random.uniform(0.5, 1.0)


# ---------------------------------------------------------------- liveness

LIVENESS_FILE_NAME = "edgefleet-worker.alive"
LIVENESS_INTERVAL_S = 10.0
# The event loop's timer fires every LIVENESS_INTERVAL_S; missing it this long is a hang.
LIVENESS_LOOP_STALE_S = 60.0


def liveness_file() -> Path:
    """Where a worker touches its liveness file (the pod's /tmp in the Helm chart)."""
    return Path(tempfile.gettempdir()) / LIVENESS_FILE_NAME


class LivenessFile(bootsteps.StartStopStep):  # type: ignore[misc]  # celery is untyped
    """Touches :func:`liveness_file` every 10 s while the worker can make progress, so
    the liveness probe is one stat(2) of a file. The alternative, ``celery inspect
    ping``, starts a Python with the whole app (about a second of CPU and 100 MB per
    probe) and needs the broker: it fails whenever Redis is down and would restart
    every healthy worker just while they reconnect.

    Progress means the worker's event loop fired its timer within the last
    ``LIVENESS_LOOP_STALE_S``, or the consumer is reconnecting to the broker (that
    blocks the loop by design, and a restart would not help). A loop stuck anywhere
    else stops the touching, and the probe has the pod restarted."""

    requires = {"celery.worker.components:Timer"}

    def __init__(
        self, parent: Any, clock: Callable[[], float] = time.monotonic, **kwargs: Any
    ) -> None:
        super().__init__(parent, **kwargs)
        self.path = liveness_file()
        self._clock = clock  # a test's moves time instead of sleeping past the staleness
        self._loop_turned = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, worker: Any) -> None:
        self._loop_turned = self._clock()
        self._touch()
        worker.timer.call_repeatedly(LIVENESS_INTERVAL_S, self._turned)
        self._thread = threading.Thread(
            target=self._watch, args=(worker,), name="edgefleet-liveness", daemon=True
        )
        self._thread.start()

    def stop(self, worker: Any) -> None:
        self._stop.set()
        self.path.unlink(missing_ok=True)  # a stopping worker is not alive

    def _turned(self) -> None:
        self._loop_turned = self._clock()

    def _watch(self, worker: Any) -> None:
        while not self._stop.wait(LIVENESS_INTERVAL_S):
            self.check(worker)

    def check(self, worker: Any) -> bool:
        """One look, as the watcher takes every ``LIVENESS_INTERVAL_S``: touch the file
        when the worker can make progress; whether it did."""
        consumer = getattr(worker, "consumer", None)
        reconnecting = consumer is not None and consumer.connection is None
        if reconnecting or self._clock() - self._loop_turned < LIVENESS_LOOP_STALE_S:
            self._touch()
            return True
        return False

    def _touch(self) -> None:
        try:
            self.path.touch()
        except OSError:  # a full or read-only /tmp: the probe will say so
            log.warning("cannot touch the liveness file %s", self.path, exc_info=True)


celery_app.steps["worker"].add(LivenessFile)
