from __future__ import annotations

import logging
from typing import Any

from controller.db.session import database_unavailable
from controller.rollouts import reconciler, service
from controller.settings import get_settings
from controller.tasks.celery_app import OUTAGE_MAX_RETRIES, celery_app, outage_countdown_s

log = logging.getLogger(__name__)


@celery_app.task(name="rollouts.reconcile", bind=True, max_retries=OUTAGE_MAX_RETRIES)
def reconcile(self: Any, rollout_id: int) -> str | None:
    try:
        return reconciler.reconcile(rollout_id, get_settings())
    except Exception as exc:
        # The step is one transaction, so a database that went away rolled it back
        # whole: run it again once the database is back, rather than leave the rollout
        # to beat's tick. Eager (embedded) runs would retry at once, in the caller.
        if self.request.is_eager or not database_unavailable(exc):
            raise
        countdown = outage_countdown_s(self.request.retries)
        log.warning(
            "rollout %s: database unavailable, step retried in %.1f s (retry %d)",
            rollout_id,
            countdown,
            self.request.retries + 1,
        )
        raise self.retry(exc=exc, countdown=countdown) from exc


@celery_app.task(name="rollouts.tick")
def tick() -> int:
    return len(reconciler.tick(get_settings()))


@celery_app.task(name="events.purge")
def purge_events() -> int:
    return service.purge_events(get_settings())
