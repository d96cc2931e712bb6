"""Stand-ins for the agent's neighbours: a local inference server's /metrics (exported
by prometheus_client with the server's exact names and layout) and a controller that
can be stopped and started again on the same address."""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from node_agent.agent.clock import Clock
from node_agent.contract import ERRORS_TOTAL, INFERENCE_LATENCY, REQUESTS_TOTAL
from tests.http_fake import FakeHTTPServer, reply
from tests.live import LiveController, live_controller

__all__ = ["JOIN_TOKEN", "LiveController", "live_controller"]

# The join token the agent tests enroll with (tests/conftest.py's join_token fixture).
JOIN_TOKEN = "join-0123456789abcdef"

# Where a FakeClock's wall time starts unless told.
WALL_START = datetime(2026, 1, 1, tzinfo=UTC)

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class FakeInferenceServer:
    """What ``edgefleet-serve`` exports: unlabelled series, one model per server, the
    model named by ``edgefleet_model_info``. ``restart()`` starts the counters over, as a
    new server process would; ``on_scrape`` runs before each scrape is answered (the
    traffic since the last one, say); ``keep_alive`` keeps the scraper's connection open."""

    def __init__(
        self,
        *,
        on_scrape: Callable[[FakeInferenceServer], None] | None = None,
        keep_alive: bool = False,
    ) -> None:
        self._lock = threading.Lock()
        self.scrapes = 0
        self.fail = False
        self._on_scrape = on_scrape
        self.restart()
        self.http = FakeHTTPServer(self._scrape, keep_alive=keep_alive)

    @property
    def url(self) -> str:
        return f"{self.http.url}/metrics"

    def _scrape(self, h: BaseHTTPRequestHandler) -> None:
        if self._on_scrape is not None:
            self._on_scrape(self)
        with self._lock:
            self.scrapes += 1
            body = generate_latest(self.registry)
            status = 500 if self.fail else 200
        reply(h, status, body, content_type="text/plain; version=0.0.4")

    def restart(self) -> None:
        with self._lock:
            r = self.registry = CollectorRegistry()
            self.latency = Histogram(INFERENCE_LATENCY, "x", buckets=BUCKETS, registry=r)
            self.requests = Counter(REQUESTS_TOTAL.removesuffix("_total"), "x", registry=r)
            self.errors = Counter(ERRORS_TOTAL.removesuffix("_total"), "x", registry=r)
            self.ready = Gauge("edgefleet_model_ready", "x", registry=r)
            self.info = Info("edgefleet_model", "x", registry=r)
            self.has_model = False

    def set_model(self, model: str, version: str, sha256: str, *, ready: bool = True) -> None:
        with self._lock:
            self.info.info(
                {
                    "model": model,
                    "version": version,
                    "sha256": sha256,
                    "runtime": "onnxruntime",
                    "provider": "CPUExecutionProvider",
                }
            )
            self.ready.set(1 if ready else 0)
            self.has_model = True

    def serve(self, n: int, latency_s: float, *, errors: int = 0) -> None:
        """``n`` inferences of ``latency_s`` each, ``errors`` more that failed."""
        with self._lock:
            for _ in range(n):
                self.latency.observe(latency_s)
            self.requests.inc(n + errors)
            if errors:
                self.errors.inc(errors)

    def close(self) -> None:
        self.http.close()


@contextmanager
def inference_server() -> Iterator[FakeInferenceServer]:
    server = FakeInferenceServer()
    try:
        yield server
    finally:
        server.close()


class FakeClock(Clock):
    """Time the test moves: an hour of 10 s intervals in no time. ``wait`` lets the time
    pass at once (each wait recorded in ``waits``) and runs what ``at`` scheduled for
    the instants it passes; an agent's ``run`` on this clock ends at ``stop_at``, as if
    SIGTERM came then, so a test drives the loop itself without a thread or a sleep."""

    def __init__(self, start: float = 1000.0, *, wall: datetime = WALL_START) -> None:
        self.start = self.now_s = start
        self.wall = wall
        self.waits: list[float] = []
        self.stop_at: float | None = None
        self._actions: list[tuple[float, int, Callable[[], None]]] = []

    def monotonic(self) -> float:
        return self.now_s

    def now(self) -> datetime:
        return self.wall + timedelta(seconds=self.now_s - self.start)

    def advance(self, seconds: float) -> None:
        self.now_s += seconds

    def at(self, when: float, action: Callable[[], None]) -> None:
        """Run ``action`` when a wait passes ``when`` (monotonic seconds)."""
        heapq.heappush(self._actions, (when, len(self._actions), action))

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        self.waits.append(seconds)
        until = self.now_s + max(0.0, seconds)
        if self.stop_at is not None and until > self.stop_at:
            until = max(self.now_s, self.stop_at)
            stop.set()
        while self._actions and self._actions[0][0] <= until:
            when, _, action = heapq.heappop(self._actions)
            self.now_s = max(self.now_s, when)
            action()
        self.now_s = until
        return stop.is_set()
