"""The agent's own ``/metrics``: how its heartbeats fare, for the node's operator and
for alerting on an agent that cannot reach the controller (which the controller only
sees as silence).

A registry of its own (a test process may run several agents, and the controller's
metrics beside them), served by a small threaded HTTP server on
``EDGEFLEET_METRICS_HOST:EDGEFLEET_METRICS_PORT``. Only ``GET /metrics`` answers; it
needs no credential and holds none: counts, a queue depth and a timestamp, no URL,
token or node credential (docs/security.md says who may call it and why it is open).
Loopback unless configured: the chart binds the pod's own IP so Prometheus can scrape."""

from __future__ import annotations

import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

log = logging.getLogger("edgefleet.agent")

# Why a heartbeat request failed: bounded, so the label stays a handful of series.
FAILURE_REASONS = ("unreachable", "unauthorized", "too_large", "invalid", "refused")


def failure_reason(status: int | None) -> str:
    """The reason label of a failed request: ``None`` is a controller not reached."""
    if status is None:
        return "unreachable"
    return {401: "unauthorized", 413: "too_large", 422: "invalid"}.get(status, "refused")


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.sent = Counter(
            "edgefleet_agent_heartbeats_sent",
            "Heartbeats the controller acknowledged (stored, or already stored before).",
            registry=self.registry,
        )
        self.replayed = Counter(
            "edgefleet_agent_heartbeats_replayed",
            "Acknowledged heartbeats that had waited in the outbox past the cycle that "
            "built them (the controller was unreachable or refused them then).",
            registry=self.registry,
        )
        self.failures = Counter(
            "edgefleet_agent_heartbeat_failures",
            "Heartbeat requests that failed, by reason: unreachable (no answer, 5xx, 429), "
            "unauthorized (401), too_large (413), invalid (422), refused (any other 4xx).",
            ["reason"],
            registry=self.registry,
        )
        for reason in FAILURE_REASONS:
            self.failures.labels(reason)
        self.queued = Gauge(
            "edgefleet_agent_heartbeats_queued",
            "Heartbeats in the outbox, not yet acknowledged by the controller.",
            registry=self.registry,
        )
        self.dropped = Gauge(
            "edgefleet_agent_heartbeats_dropped",
            "Heartbeats dropped unsent (outbox full, or refused as invalid) since the "
            "agent's state directory was created.",
            registry=self.registry,
        )
        self.last_success = Gauge(
            "edgefleet_agent_last_heartbeat_timestamp_seconds",
            "Unix time of the last heartbeat request the controller acknowledged (0: none "
            "since the agent started).",
            registry=self.registry,
        )


class MetricsServer:
    """``GET /metrics`` of ``registry`` on ``host:port``, in a daemon thread (``port``
    0 picks a free one: ``self.port`` says which). Binding happens here, so a port in
    use fails the agent's start, not a thread later."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        server = _IPv6Server if ":" in host else ThreadingHTTPServer
        self._http = server((host, port), _handler(registry))
        self._http.daemon_threads = True
        self.host, self.port = self._http.server_address[:2]
        self._thread = threading.Thread(
            target=self._http.serve_forever, name="edgefleet-agent-metrics", daemon=True
        )
        self._thread.start()
        log.info("metrics on http://%s:%s/metrics", self.host, self.port)

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(5)


class _IPv6Server(ThreadingHTTPServer):
    """For an IPv6 address (the pod's IP on an IPv6-only cluster)."""

    address_family = socket.AF_INET6


def _handler(registry: CollectorRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                self._answer(404, b"only /metrics here\n", "text/plain; charset=utf-8")
                return
            self._answer(200, generate_latest(registry), CONTENT_TYPE_LATEST)

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # a scrape every 15-30 s: not worth a log line each

    return Handler
