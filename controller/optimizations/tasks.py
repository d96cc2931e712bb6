from __future__ import annotations

from controller.optimizations import service
from controller.settings import get_settings
from controller.tasks.celery_app import celery_app


# The name predates this package (variants began inside the registry) and stays: it is
# what the API sends and the workers resolve, so both sides of a rolling upgrade agree.
@celery_app.task(name="registry.derive_variant")
def derive_variant(job_id: int) -> str | None:
    return service.run_job(job_id, get_settings())


@celery_app.task(name="optimizations.compare_variant")
def compare_variant(version_id: int) -> str | None:
    return service.compare_pushed(version_id, get_settings())
