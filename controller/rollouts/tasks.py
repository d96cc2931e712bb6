from __future__ import annotations

from controller.rollouts import service
from controller.settings import get_settings
from controller.tasks.celery_app import celery_app


@celery_app.task(name="rollouts.reconcile")
def reconcile(rollout_id: int) -> str | None:
    return service.reconcile(rollout_id, get_settings())


@celery_app.task(name="rollouts.tick")
def tick() -> int:
    return len(service.tick(get_settings()))
