"""``edgefleet-serve``'s server: the model slot (:mod:`node_agent.server.model`) served by
a listener (:mod:`node_agent.server.connection`) whose connections run
:class:`node_agent.server.endpoints.Handler`; requests in flight, drain and stop. Nothing
else to install on an edge node.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time

from node_agent.cache import ArtifactCache
from node_agent.server.connection import Listener, Listener6
from node_agent.server.endpoints import Handler
from node_agent.server.metrics import ServerMetrics
from node_agent.server.model import ModelSlot, RunnerFactory
from node_agent.server.router import App, Router
from node_agent.server.settings import ServeSettings

log = logging.getLogger("node_agent.serve")

LOOPBACK = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})


class InferenceServer(ModelSlot):
    """The model slot plus the HTTP listener. ``start()`` listens at once (liveness
    answers while the artifact downloads), ``load()`` makes it ready, ``swap()`` replaces
    the version, ``shutdown()`` drains."""

    def __init__(
        self,
        settings: ServeSettings,
        *,
        cache: ArtifactCache | None = None,
        runner_factory: RunnerFactory | None = None,
    ) -> None:
        super().__init__(settings, ServerMetrics(), cache=cache, runner_factory=runner_factory)
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        self._idle = threading.Condition(self._inflight_lock)
        self._httpd: Listener[App] | None = None
        self._thread: threading.Thread | None = None
        self.handlers: set[Router] = set()  # open connections

    # ------------------------------------------------------------------ listener
    def start(self) -> None:
        settings = self.settings
        listener = Listener6 if ":" in settings.host else Listener
        httpd: Listener[App] = listener(
            (settings.host, settings.port),
            Handler,
            self,
            max_connections=settings.max_connections,
            max_connections_per_client=settings.max_connections_per_client,
            refused=self.metrics.connections_refused.inc,
            client_refused=self.metrics.client_connections_refused.inc,
        )
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.25}, name="http", daemon=True
        )
        self._thread.start()
        log.info("listening on %s", self.url)

    @property
    def port(self) -> int:
        assert self._httpd is not None, "start() first"
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self.settings.host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    # ------------------------------------------------------------------ admin guard
    def admin_allowed(self, client: str, authorization: str | None) -> bool:
        if self.settings.admin_allow_loopback and client in LOOPBACK:
            return True
        token = self.settings.admin_token
        if token is None or not token.get_secret_value() or not authorization:
            return False
        scheme, _, value = authorization.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), token.get_secret_value().encode()
        )

    # ------------------------------------------------------------------ lifecycle
    def begin_request(self) -> None:
        with self._inflight_lock:
            self._inflight += 1

    def end_request(self) -> None:
        with self._inflight_lock:
            self._inflight -= 1
            # shutdown() sets the state before it waits, under this lock, for zero.
            if not self._inflight and self.draining:
                self._idle.notify_all()

    def settle(self, timeout_s: float = 0.1) -> None:
        """Wait (briefly) until every inference answer sent so far is in the metrics:
        they are counted right after their answer leaves, so that a scrape after a
        response always sees it."""
        pending = [(h, h.sent) for h in list(self.handlers) if h.counted < h.sent]
        deadline = time.monotonic() + timeout_s
        for handler, sent in pending:
            while handler.counted < sent and time.monotonic() < deadline:
                time.sleep(0.0002)

    @property
    def idle(self) -> bool:
        """No request in flight (a connection may busy-poll for its next one)."""
        return not self._inflight

    @property
    def draining(self) -> bool:
        return self.state in ("draining", "stopped")

    def shutdown(self, grace_s: float | None = None, delay_s: float | None = None) -> None:
        """Readiness off; keep accepting for ``delay_s`` (``shutdown_delay_s``), answering
        every request with ``Connection: close``; stop accepting, let requests in flight
        finish (up to ``grace_s``), close. Idle keep-alive connections are not waited for.

        The delay is for the pod being replaced in a handover (controller/kube/objects.py):
        the Service stops sending it new connections only when kube-proxy on the node has
        seen the pod go, a moment after the SIGTERM; until then a new connection must still
        find a listener, and every client on an open one is told to reconnect, which takes
        it to the new version."""
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        delay = self.settings.shutdown_delay_s if delay_s is None else delay_s
        self.state = "draining"
        self.metrics.ready.set(0)
        if delay > 0:
            log.info("draining: accepting for %.1fs more", delay)
            time.sleep(delay)
        httpd = self._httpd
        if httpd is not None:
            httpd.shutdown()
        deadline = time.monotonic() + grace
        with self._idle:
            while self._inflight and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)
            if self._inflight:
                log.warning("%d request(s) still running after %.1fs", self._inflight, grace)
        if httpd is not None:
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.state = "stopped"
        log.info("stopped")
