from __future__ import annotations

from controller.registry import service
from controller.settings import get_settings
from controller.tasks.celery_app import celery_app


@celery_app.task(name="registry.validate_version")
def validate_version(version_id: int) -> str | None:
    return service.run_validation(version_id, get_settings())


@celery_app.task(name="registry.requeue_stuck")
def requeue_stuck() -> int:
    return len(service.requeue_stuck(get_settings()))
