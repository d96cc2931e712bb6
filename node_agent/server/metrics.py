"""The server's Prometheus metrics, in a registry of its own (two servers in one process,
as in the tests, never share counters). Names come from :mod:`node_agent.contract`, which
the agent uses to read them back."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from node_agent import contract

# Exported as ``edgefleet_model_info{model,version,sha256,runtime,provider} 1``.
MODEL_INFO = contract.MODEL_INFO
REJECTED_TOTAL = "edgefleet_inference_rejected_total"
SWAPS_TOTAL = "edgefleet_model_swaps_total"
BUSY_POLL_SECONDS = "edgefleet_serve_busy_poll_seconds_total"
BUSY_POLL_HITS = "edgefleet_serve_busy_poll_hits_total"
CONNECTIONS_REFUSED = "edgefleet_serve_connections_refused_total"
CLIENT_CONNECTIONS_REFUSED = "edgefleet_serve_client_connections_refused_total"
REQUEST_TIMEOUTS = "edgefleet_serve_request_timeouts_total"
READY = contract.MODEL_READY

# Edge models run from tens of microseconds (a small MLP) to seconds (a detector on a
# Raspberry Pi): buckets cover both ends.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


def _counter_name(name: str) -> str:
    # prometheus_client appends ``_total`` to a counter's name itself.
    return name.removesuffix("_total")


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.request_latency = Histogram(
            contract.REQUEST_LATENCY,
            "Server-side time of an inference request, from its first byte read to its "
            "response written (decode, validation, inference, encode)",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inference_latency = Histogram(
            contract.INFERENCE_LATENCY,
            "Time in the model runtime alone, per successful inference",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            _counter_name(contract.REQUESTS_TOTAL),
            "Inference requests that passed validation and reached the runtime",
            registry=self.registry,
        )
        self.errors = Counter(
            _counter_name(contract.ERRORS_TOTAL),
            "Inferences that failed in the runtime (answered 500)",
            registry=self.registry,
        )
        self.rejected = Counter(
            _counter_name(REJECTED_TOTAL),
            "Inference requests rejected before the runtime (4xx), by status code",
            ["code"],
            registry=self.registry,
        )
        self.swaps = Counter(
            _counter_name(SWAPS_TOTAL),
            "Model versions activated by a hot swap",
            registry=self.registry,
        )
        self.busy_poll_seconds = Counter(
            _counter_name(BUSY_POLL_SECONDS),
            "Time spent busy-polling connections for a client's next request (spinning: CPU time)",
            registry=self.registry,
        )
        self.busy_poll_hits = Counter(
            _counter_name(BUSY_POLL_HITS),
            "Requests that arrived while their connection was being busy-polled",
            registry=self.registry,
        )
        self.connections_refused = Counter(
            _counter_name(CONNECTIONS_REFUSED),
            "Connections answered 503 and closed: max_connections were open",
            registry=self.registry,
        )
        self.client_connections_refused = Counter(
            _counter_name(CLIENT_CONNECTIONS_REFUSED),
            "Connections answered 503 and closed: max_connections_per_client were open from "
            "their address",
            registry=self.registry,
        )
        self.request_timeouts = Counter(
            _counter_name(REQUEST_TIMEOUTS),
            "Requests answered 408 and closed: their head or body took over its deadline",
            ["phase"],
            registry=self.registry,
        )
        self.ready = Gauge(
            READY, "1 when a model is loaded, warmed up and served", registry=self.registry
        )
        self.model_info = Info(
            MODEL_INFO.removesuffix("_info"),
            "The model being served (value always 1)",
            registry=self.registry,
        )

    def set_model(
        self, *, model: str, version: str, sha256: str, runtime: str, provider: str
    ) -> None:
        # Info.info replaces the whole label set at once: a scrape never sees two models.
        self.model_info.info(
            {
                "model": model,
                "version": version,
                "sha256": sha256,
                "runtime": runtime,
                "provider": provider,
            }
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
