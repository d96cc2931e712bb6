"""A Celery worker's ``/metrics``: served by the worker's main process, summed over its
pool's child processes (``controller/tasks/worker_metrics.py``), guarded like the API's
(``METRICS``: a viewer token unless ``EDGEFLEET_METRICS_PUBLIC``).

It is a FastAPI app of one route under uvicorn, in a thread of the main process, so the
route goes through the very guard and error shape of the API's ``/metrics`` (a 401 with
the same body), not a copy of them. It serves the counters the tasks increment; the
fleet gauges, counted in the database at scrape time, stay on the API (every worker
would only repeat them).

The socket is bound when the worker starts (a port in use stops it with the error, not
later in a thread) and the server starts once the worker is ready. The pool's child
processes are forked from the main process and inherit the listening socket and the
database connections the guard opened there: each closes its copy of the socket at start,
so none holds the port, and leaves the connections to the parent."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any

import uvicorn
from celery.signals import worker_process_init, worker_ready, worker_shutdown
from fastapi import APIRouter, FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controller.auth.guard import METRICS
from controller.db.session import forget_inherited_connections
from controller.kit.multiprocess import scrape_registry
from controller.settings import Settings
from controller.web.errors import install_error_handlers

log = logging.getLogger(__name__)
router = APIRouter()


@router.get("/metrics", dependencies=[METRICS])
def metrics() -> Response:
    return Response(generate_latest(scrape_registry()), media_type=CONTENT_TYPE_LATEST)


def create_exporter_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="edgefleet worker", openapi_url=None, docs_url=None, redoc_url=None)
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(router)
    return app


class Exporter:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        host = settings.worker_metrics_host
        self.socket = socket.create_server(
            (host, settings.worker_metrics_port or 0),
            family=socket.AF_INET6 if ":" in host else socket.AF_INET,
        )
        self.server = uvicorn.Server(
            uvicorn.Config(
                create_exporter_app(settings),
                log_config=None,  # the worker's logging stays as Celery set it up
                access_log=False,
                lifespan="off",
            )
        )
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self.server.serve(sockets=[self.socket])),
            name="edgefleet-metrics",
            daemon=True,
        )
        self._thread.start()
        host, port = self.socket.getsockname()[:2]
        log.info("worker metrics exporter on http://%s:%s/metrics", host, port)

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(5)
        self.socket.close()


def serve_from_worker(settings: Settings) -> Exporter:
    """Bind the exporter's socket now and run it while the worker runs (Celery's
    signals, sent in the main process); every pool child closes its inherited copy."""
    exporter = Exporter(settings)

    def ready(**_: Any) -> None:
        exporter.start()

    def shutdown(**_: Any) -> None:
        exporter.stop()

    def child_starts(**_: Any) -> None:
        exporter.socket.close()
        # The guard's token look-ups open database connections in the main process.
        forget_inherited_connections()

    worker_ready.connect(ready, weak=False)
    worker_shutdown.connect(shutdown, weak=False)
    worker_process_init.connect(child_starts, weak=False)
    return exporter
