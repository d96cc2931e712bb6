"""The Celery application: Redis broker in production, eager (in-process) in the
embedded setup. Tasks get IDs, never ORM objects, and open their own sessions."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from celery import Celery
from sqlalchemy.orm import Session

from controller.db.session import after_commit
from controller.settings import Settings, get_settings

log = logging.getLogger(__name__)

TASK_MODULES = [
    "controller.registry.tasks",
    "controller.rollouts.tasks",
    "controller.fleet.tasks",
]

celery_app = Celery("edgefleet", include=TASK_MODULES)


def configure(settings: Settings) -> Celery:
    celery_app.conf.update(
        broker_url=settings.redis_url or "memory://localhost/",
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
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": 3600},
        task_serializer="json",
        accept_content=["json"],
        timezone="UTC",
        beat_schedule={
            "registry-requeue-stuck": {
                "task": "registry.requeue_stuck",
                "schedule": timedelta(seconds=60),
            },
            # Gate evaluation and the safety net for lost follow-up steps.
            "rollouts-tick": {"task": "rollouts.tick", "schedule": timedelta(seconds=10)},
            "fleet-mark-silent": {"task": "fleet.mark_silent", "schedule": timedelta(seconds=15)},
            "fleet-repair-drift": {"task": "fleet.repair_drift", "schedule": timedelta(seconds=60)},
            "fleet-resync": {"task": "fleet.resync", "schedule": timedelta(seconds=300)},
        },
    )
    return celery_app


configure(get_settings())


def enqueue(session: Session, task: Any, *args: Any, countdown: float | None = None) -> None:
    """Send ``task`` once the session's transaction commits; never if it rolls back."""

    def send() -> None:
        result = task.apply_async(args=args, countdown=countdown)
        if celery_app.conf.task_always_eager and getattr(result, "failed", lambda: False)():
            log.error("eager task %s%r failed: %s", task.name, args, result.result)

    after_commit(session, send)
