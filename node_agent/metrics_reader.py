"""Read the local inference servers' ``/metrics`` and turn their cumulative counters into
one window's numbers: what happened since the previous scrape.

Latency quantiles come from the DELTA of the latency histogram between two scrapes, with
linear interpolation inside the bucket that holds the rank (what PromQL's
``histogram_quantile`` does), so a slow minute is not averaged away by a fast day.
Counters that went down mean the server restarted: its current totals are then the
window's. The first scrape of a server only sets the baseline (no numbers yet).

Series are matched to a model by their ``model`` label; a server whose series carry no
such label serves one model, named by its ``edgefleet_model_info`` metric."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families

from node_agent import contract
from node_agent.contract import (
    ERRORS_TOTAL,
    INFERENCE_LATENCY,
    REQUESTS_TOTAL,
    InferenceMetrics,
    WorkloadReport,
)
from node_agent.discovery import Discovery, StaticDiscovery

log = logging.getLogger(__name__)

# Exported by the inference server (node_agent.server.metrics) beside the contract's
# names: the model it serves, and 1 once that model is loaded and warmed up.
MODEL_INFO = contract.MODEL_INFO
MODEL_READY = contract.MODEL_READY
_BUCKET = f"{INFERENCE_LATENCY}_bucket"
_COUNT = f"{INFERENCE_LATENCY}_count"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_T = TypeVar("_T")


@dataclass(frozen=True)
class ModelInfo:
    model: str
    version: str
    sha256: str
    runtime: str | None = None
    provider: str | None = None


@dataclass
class Totals:
    """One model's cumulative counters at one instant (summed over other labels)."""

    at: float
    buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> cumulative
    count: float = 0.0
    requests: float | None = None
    errors: float = 0.0


@dataclass
class Scrape:
    models: dict[str, ModelInfo]
    # Keyed by the series' model label; None for series without one.
    totals: dict[str | None, Totals]
    ready: dict[str | None, bool] = field(default_factory=dict)

    def of(self, model: str, key: dict[str | None, _T]) -> _T | None:
        """The entry of ``model``: its own label, or the unlabelled one of a one-model
        server."""
        if model in key:
            return key[model]
        return key.get(None) if len(self.models) == 1 else None


def parse(text: str, at: float) -> Scrape:
    models: dict[str, ModelInfo] = {}
    totals: dict[str | None, Totals] = {}
    ready: dict[str | None, bool] = {}

    def of(labels: dict[str, str]) -> Totals:
        key = labels.get("model")
        got = totals.get(key)
        if got is None:
            got = totals[key] = Totals(at=at)
        return got

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name, labels, value = s.name, s.labels, s.value
            if name == _BUCKET:
                t = of(labels)
                le = float(labels["le"])
                t.buckets[le] = t.buckets.get(le, 0.0) + value
            elif name == _COUNT:
                of(labels).count += value
            elif name == REQUESTS_TOTAL:
                t = of(labels)
                t.requests = (t.requests or 0.0) + value
            elif name == ERRORS_TOTAL:
                of(labels).errors += value
            elif name == MODEL_READY:
                ready[labels.get("model")] = value >= 1
            elif name == MODEL_INFO and value > 0:
                if not {"model", "version", "sha256"} <= set(labels) or not _SHA256.fullmatch(
                    labels["sha256"]
                ):
                    log.warning("ignoring %s without model, version and sha256: %s", name, labels)
                    continue
                models[labels["model"]] = ModelInfo(
                    model=labels["model"],
                    version=labels["version"],
                    sha256=labels["sha256"],
                    runtime=labels.get("runtime"),
                    provider=labels.get("provider"),
                )
    return Scrape(models, totals, ready)


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The q-quantile of a cumulative histogram given as sorted (upper bound, count)
    pairs ending with +Inf. A rank in the +Inf bucket answers the highest finite bound:
    the histogram cannot say more."""
    if not buckets or not math.isinf(buckets[-1][0]):
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(upper):
                return lower
            in_bucket = cumulative - below
            if in_bucket <= 0:
                return upper
            return lower + (upper - lower) * (rank - below) / in_bucket
        lower, below = upper, cumulative
    return lower


def window(prev: Totals, cur: Totals) -> InferenceMetrics | None:
    """The numbers of the window between two scrapes, or None when there is no usable
    window (no time passed, or the histogram's buckets changed)."""
    window_s = cur.at - prev.at
    if window_s <= 0:
        return None
    if prev.buckets and cur.buckets and set(prev.buckets) != set(cur.buckets):
        return None  # another bucket layout: the two cannot be subtracted
    reset = (
        cur.count < prev.count
        or cur.errors < prev.errors
        or (cur.requests is not None and cur.requests < (prev.requests or 0.0))
        or any(cur.buckets.get(le, 0.0) < v for le, v in prev.buckets.items())
    )
    if reset:
        prev = Totals(at=prev.at)  # a restarted server: everything it counted is new
    buckets = sorted((le, v - prev.buckets.get(le, 0.0)) for le, v in cur.buckets.items())
    if cur.requests is not None:
        samples = cur.requests - (prev.requests or 0.0)
    else:
        samples = cur.count - prev.count
    errors = cur.errors - prev.errors

    def ms(q: float) -> float | None:
        v = histogram_quantile(q, buckets)
        return round(v * 1000.0, 3) if v is not None else None

    return InferenceMetrics(
        window_s=round(window_s, 3),
        samples=max(0, round(samples)),
        errors=max(0, round(errors)),
        p50_ms=ms(0.50),
        p95_ms=ms(0.95),
        p99_ms=ms(0.99),
        rate_per_s=round(max(0.0, samples) / window_s, 4),
    )


@dataclass
class _Seen:
    info: ModelInfo
    totals: Totals | None


class MetricsReader:
    """Scrapes each server once per call and remembers the previous totals per model.

    ``servers``: a fixed list of metrics URLs, or a :class:`~node_agent.discovery.Discovery`
    asked at every call (this node's inference pods)."""

    def __init__(
        self,
        servers: Iterable[str] | Discovery,
        *,
        client: httpx.Client,
        clock: Callable[[], float],
    ) -> None:
        self.servers = servers if isinstance(servers, Discovery) else _as_static(servers)
        self.client = client
        self.clock = clock
        self._seen: dict[tuple[str, str], _Seen] = {}

    def _forget(self, url: str) -> None:
        for key in [k for k in self._seen if k[0] == url]:
            del self._seen[key]

    def _fetch(self, url: str) -> Scrape | None:
        try:
            resp = self.client.get(url, headers={"Accept": "text/plain; version=0.0.4"})
            resp.raise_for_status()
            return parse(resp.text, self.clock())
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("cannot read inference metrics from %s: %s", url, exc)
            return None

    def read(self) -> list[WorkloadReport]:
        reports: list[WorkloadReport] = []
        urls = self.servers.urls()
        for url in {k[0] for k in self._seen} - set(urls):
            self._forget(url)  # removed on purpose (a pod replaced in a wave)
        rediscovered: list[str] | None = None
        for url in urls:
            scrape = self._fetch(url)
            if scrape is None and self.servers.dynamic:
                # Gone between the list and the scrape? Ask once per read, not per server.
                if rediscovered is None:
                    rediscovered = self.servers.urls(refresh=True)
                if url not in rediscovered:
                    self._forget(url)
                    continue
            known = [(key, seen) for key, seen in self._seen.items() if key[0] == url]
            if scrape is None:
                # The server was there and is not now: its workloads are failing.
                reports.extend(_report(seen.info, "Failed", None) for _, seen in known)
                continue
            for key, _ in known:
                if key[1] not in scrape.models:
                    del self._seen[key]
            for name, info in scrape.models.items():
                cur = scrape.of(name, scrape.totals)
                seen = self._seen.get((url, name))
                metrics = None
                if cur is not None and seen is not None and seen.totals is not None:
                    same = seen.info.sha256 == info.sha256
                    restarted = cur.count < seen.totals.count
                    # A model swapped in place with counters running on would mix two
                    # versions' numbers into one window: start over instead.
                    if same or restarted:
                        metrics = window(seen.totals, cur)
                self._seen[(url, name)] = _Seen(info, cur)
                ready = scrape.of(name, scrape.ready)
                reports.append(_report(info, "Starting" if ready is False else "Ready", metrics))
        return reports


def _report(info: ModelInfo, state: str, metrics: InferenceMetrics | None) -> WorkloadReport:
    return WorkloadReport(
        model=info.model,
        version=info.version,
        sha256=info.sha256,
        state=state,
        metrics=metrics,
    )


def _as_static(urls: Iterable[str]) -> Discovery:
    if isinstance(urls, str):  # one URL passed where a list was meant
        raise TypeError("servers: a list of metrics URLs or a Discovery, not a string")
    return StaticDiscovery(list(urls))
