from __future__ import annotations

from controller.db.session import session_scope
from controller.fleet import service
from controller.settings import get_settings
from controller.tasks.celery_app import celery_app


@celery_app.task(name="fleet.mark_silent")
def mark_silent() -> int:
    with session_scope() as session:
        return service.mark_silent_nodes(session, get_settings())


@celery_app.task(name="fleet.repair_drift")
def repair_drift() -> int:
    with session_scope() as session:
        return sum(len(v) for v in service.repair_drift(session, get_settings()).values())


@celery_app.task(name="fleet.resync")
def resync() -> int:
    with session_scope() as session:
        return len(service.resync_all(session, get_settings()))
