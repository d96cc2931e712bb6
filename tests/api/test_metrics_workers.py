"""``edgefleet server --workers 2``, real processes: each scrape of /metrics is answered
by one of uvicorn's two processes, and must still count every request either of them
served (prometheus_client's multiprocess mode, controller/kit/multiprocess.py), with
the fleet gauges once each, not once per process."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from controller.cli.main import API_METRICS_DIR
from controller.db.models import RolloutPhase
from controller.settings import Settings
from tests.live import free_port
from tests.tasks.test_restarts import process
from tests.tasks.test_worker import wait_for
from tests.tasks.test_worker_metrics import by_label, scrape


def test_every_scrape_counts_the_requests_of_both_processes(
    settings: Settings, redis_available: None, tmp_path: Path
) -> None:
    port = free_port()
    files = tmp_path / API_METRICS_DIR
    env = {"EDGEFLEET_API_PORT": str(port), "TMPDIR": str(tmp_path)}
    argv = ["server", "--host", "127.0.0.1", "--workers", "2"]
    base = f"http://127.0.0.1:{port}"
    sent = 0

    def ready() -> None:
        assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200

    def both_served() -> bool:
        """Another round of requests, each on a connection of its own, until both
        processes have served some (each then has a histogram file)."""
        nonlocal sent
        with ThreadPoolExecutor(8) as pool:
            for _ in pool.map(lambda _: ready(), range(16)):
                sent += 1
        return len(list(files.glob("histogram_*.db"))) == 2

    with process(argv, tmp_path / "api.log", env, "Application startup complete"):
        wait_for(lambda: _up(base), 30, "the API")
        wait_for(both_served, 60, "requests served by both processes")
        scrapes = [scrape(f"{base}/metrics") for _ in range(6)]
        anonymous = httpx.get(f"{base}/metrics", headers={"Authorization": ""}, timeout=10)
    assert anonymous.status_code == 401
    for samples in scrapes:
        counts = by_label(samples, "edgefleet_http_request_duration_seconds_count")
        assert counts[("GET", "/readyz", "2xx")] == sent
        # One series per phase, whichever process counted last: no pid label.
        phases = by_label(samples, "edgefleet_rollouts")
        assert set(phases) == {(phase.value,) for phase in RolloutPhase}


def _up(base: str) -> bool:
    try:
        httpx.get(f"{base}/healthz", timeout=5)
    except httpx.TransportError:
        return False
    return True
