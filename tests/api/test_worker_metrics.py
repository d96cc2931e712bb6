"""controller/api/worker_metrics.py in this process: the exporter binds the address it
is given (IPv4 or IPv6: a pod's IP may be either), serves under uvicorn in a thread,
refuses an anonymous scrape, answers nothing but /metrics, and stops. The scrape of a
real worker's counters is tests/tasks/test_worker_metrics.py."""

from __future__ import annotations

import httpx
import pytest

from controller.api.worker_metrics import Exporter
from controller.settings import Settings
from tests.tasks.test_worker import wait_for


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_the_exporter_binds_serves_and_stops(settings: Settings, host: str) -> None:
    exporter = Exporter(
        settings.model_copy(update={"worker_metrics_host": host, "worker_metrics_port": 0})
    )
    port = exporter.socket.getsockname()[1]
    base = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    exporter.start()
    try:
        wait_for(lambda: exporter.server.started, 10, "the exporter")
        anonymous = httpx.get(f"{base}/metrics", timeout=5)
        assert anonymous.status_code == 401
        assert anonymous.json()["error"] == "unauthorized"
        assert httpx.get(f"{base}/docs", timeout=5).status_code == 404
        assert httpx.get(f"{base}/openapi.json", timeout=5).status_code == 404
    finally:
        exporter.stop()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}/metrics", timeout=5)
