"""``edgefleet demo``: the whole controller on embedded defaults (SQLite, in-process
tasks, artifacts under ./.edgefleet), seeded with generated models."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from controller.cli.output import console
from controller.db import migrate
from controller.db.session import session_scope
from controller.registry import repository as repo
from controller.registry import samples, service
from controller.registry.tflite_builder import build_tflite_mlp
from controller.settings import Settings, get_settings
from controller.tasks.celery_app import configure

SEED: list[tuple[str, str, Callable[[], bytes], dict[str, Any]]] = [
    ("detector", "1.0.0", lambda: samples.build_cnn(seed=0), {"labels": {"task": "classify"}}),
    ("detector", "1.1.0", lambda: samples.build_cnn(seed=1), {"labels": {"task": "classify"}}),
    (
        "keyword-scorer",
        "0.3.0",
        samples.build_sequence_scorer,
        {"validation": {"dims": {"seq": 32}}},
    ),
    ("sensor-mlp", "2.0.0", build_tflite_mlp, {"labels": {"runtime": "tflite"}}),
]


def seed(settings: Settings) -> None:
    store = service.artifact_store(settings)
    for name, version, build, meta in SEED:
        with session_scope() as session:
            if repo.get_version(session, name, version) is not None:
                continue
            service.push_version(
                session, store, name=name, version=version, chunks=[build()], metadata=meta
            )


def run_demo(*, port: int, serve: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("EDGEFLEET_ENVIRONMENT", "development")
    settings = get_settings()
    if settings.redis_url is None:
        settings.tasks_eager = True
    configure(settings)
    migrate.upgrade(settings)
    seed(settings)
    url = f"http://127.0.0.1:{port}"
    console.print(f"[bold]edgefleet demo[/bold] database {settings.database_url}")
    console.print(f"  API      {url}/docs")
    console.print(f"  models   EDGEFLEET_API_URL={url} edgefleet models list")
    if not serve:
        return
    import uvicorn

    from controller.api.app import create_app

    uvicorn.run(create_app(settings), host="127.0.0.1", port=port, log_level="info")
