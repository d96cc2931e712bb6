from __future__ import annotations

import math
from collections.abc import Iterator

import httpx
import pytest

from node_agent.metrics_reader import MetricsReader, Totals, histogram_quantile, parse, window
from tests.agents.fakes import FakeClock, FakeInferenceServer, inference_server

SHA1 = "1" * 64
SHA2 = "2" * 64
INF = math.inf


def test_histogram_quantile_interpolates_inside_the_bucket() -> None:
    buckets = [(0.005, 0.0), (0.01, 90.0), (0.025, 90.0), (0.05, 100.0), (INF, 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.005 + 0.005 * 50 / 90)
    assert histogram_quantile(0.95, buckets) == pytest.approx(0.0375)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.0475)
    # In the first bucket the lower bound is 0.
    assert histogram_quantile(0.5, [(0.01, 10.0), (INF, 10.0)]) == pytest.approx(0.005)


def test_histogram_quantile_edges() -> None:
    assert histogram_quantile(0.5, []) is None
    assert histogram_quantile(0.5, [(0.01, 0.0), (INF, 0.0)]) is None  # nothing observed
    assert histogram_quantile(0.5, [(0.01, 5.0)]) is None  # no +Inf bucket: not a histogram
    # A rank beyond the last finite bound: the histogram only knows "more than 1 s".
    assert histogram_quantile(0.99, [(0.5, 1.0), (1.0, 2.0), (INF, 100.0)]) == 1.0


def test_window_is_the_delta_between_scrapes() -> None:
    prev = Totals(at=100.0, buckets={0.01: 1000.0, INF: 1000.0}, count=1000, requests=1010)
    cur = Totals(
        at=110.0,
        buckets={0.01: 1090.0, INF: 1100.0},
        count=1100,
        requests=1112,
        errors=2,
    )
    got = window(prev, cur)
    assert got is not None
    assert (got.window_s, got.samples, got.errors, got.rate_per_s) == (10.0, 102, 2, 10.2)
    # Of the window's 100 latencies, 90 are <= 10 ms: p50 in the first bucket.
    assert got.p50_ms == pytest.approx(10 * 50 / 90, abs=1e-3)
    assert got.p95_ms == 10.0  # rank 95 is past the last finite bound


def test_a_counter_going_down_is_a_restart() -> None:
    prev = Totals(at=0.0, buckets={0.01: 500.0, INF: 500.0}, count=500, requests=500)
    cur = Totals(at=10.0, buckets={0.01: 20.0, INF: 20.0}, count=20, requests=20)
    got = window(prev, cur)
    assert got is not None
    assert got.samples == 20


def test_no_window_without_time_or_with_new_buckets() -> None:
    t = Totals(at=5.0, buckets={0.01: 1.0, INF: 1.0}, count=1)
    assert window(t, t) is None
    other = Totals(at=6.0, buckets={0.02: 2.0, INF: 2.0}, count=2)
    assert window(t, other) is None


def test_parse_labelled_series_of_several_models() -> None:
    text = """
# TYPE edgefleet_inference_latency_seconds histogram
edgefleet_inference_latency_seconds_bucket{model="a",le="0.01"} 3
edgefleet_inference_latency_seconds_bucket{model="a",le="+Inf"} 4
edgefleet_inference_latency_seconds_count{model="a"} 4
edgefleet_inference_latency_seconds_bucket{model="b",le="0.01"} 7
edgefleet_inference_latency_seconds_bucket{model="b",le="+Inf"} 7
edgefleet_inference_latency_seconds_count{model="b"} 7
# TYPE edgefleet_inference_requests_total counter
edgefleet_inference_requests_total{model="a",status="ok"} 4
edgefleet_inference_requests_total{model="a",status="error"} 1
# TYPE edgefleet_model_info gauge
edgefleet_model_info{model="a",version="1",sha256="@SHA1@",runtime="onnxruntime",provider="cpu"} 1
edgefleet_model_info{model="b",version="2",sha256="@SHA2@",runtime="litert",provider="cpu"} 1
edgefleet_model_info{model="c",version="3",sha256="not-a-sha"} 1
""".replace("@SHA1@", SHA1).replace("@SHA2@", SHA2)
    scrape = parse(text, at=1.0)
    assert sorted(scrape.models) == ["a", "b"]
    assert scrape.models["b"].runtime == "litert"
    a = scrape.of("a", scrape.totals)
    assert a is not None
    assert (a.buckets, a.count, a.requests) == ({0.01: 3.0, INF: 4.0}, 4.0, 5.0)
    b = scrape.of("b", scrape.totals)
    assert b is not None
    assert b.requests is None  # falls back to the histogram's count


@pytest.fixture
def server() -> Iterator[FakeInferenceServer]:
    with inference_server() as s:
        yield s


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=2) as c:
        yield c


def test_reader_against_a_prometheus_client_exposition(
    server: FakeInferenceServer, http: httpx.Client
) -> None:
    clock = FakeClock()
    reader = MetricsReader([server.url], client=http, clock=clock.monotonic)
    assert reader.read() == []  # no model loaded yet: nothing to report
    server.set_model("detector", "1.0.0", SHA1)
    server.serve(500, 0.003)  # before the first scrape: not this agent's window
    [first] = reader.read()
    assert (first.model, first.version, first.sha256, first.state) == (
        "detector",
        "1.0.0",
        SHA1,
        "Ready",
    )
    assert first.metrics is None  # the baseline

    clock.advance(10)
    server.serve(90, 0.008)
    server.serve(10, 0.040, errors=4)
    [second] = reader.read()
    m = second.metrics
    assert m is not None
    assert (m.window_s, m.samples, m.errors, m.rate_per_s) == (10.0, 104, 4, 10.4)
    assert m.p50_ms == pytest.approx(5 + 5 * 50 / 90, abs=1e-3)
    assert m.p95_ms == pytest.approx(37.5)
    assert m.p99_ms == pytest.approx(47.5)

    clock.advance(10)
    [idle] = reader.read()
    assert idle.metrics is not None
    assert (idle.metrics.samples, idle.metrics.p95_ms) == (0, None)


def test_reader_after_a_server_restart(server: FakeInferenceServer, http: httpx.Client) -> None:
    clock = FakeClock()
    reader = MetricsReader([server.url], client=http, clock=clock.monotonic)
    server.set_model("detector", "1.0.0", SHA1)
    server.serve(1000, 0.003)
    reader.read()
    server.restart()  # a new process: counters from zero, a new version
    server.set_model("detector", "2.0.0", SHA2)
    server.serve(30, 0.02)
    clock.advance(10)
    [got] = reader.read()
    assert (got.version, got.sha256) == ("2.0.0", SHA2)
    assert got.metrics is not None
    assert got.metrics.samples == 30


def test_a_hot_swap_does_not_mix_two_versions_into_one_window(
    server: FakeInferenceServer, http: httpx.Client
) -> None:
    clock = FakeClock()
    reader = MetricsReader([server.url], client=http, clock=clock.monotonic)
    server.set_model("detector", "1.0.0", SHA1)
    reader.read()
    server.serve(50, 0.2)  # slow old version...
    server.set_model("detector", "2.0.0", SHA2)  # ...swapped in place, counters run on
    clock.advance(10)
    [swapped] = reader.read()
    assert (swapped.sha256, swapped.metrics) == (SHA2, None)
    server.serve(50, 0.002)
    clock.advance(10)
    [after] = reader.read()
    assert after.metrics is not None
    assert after.metrics.samples == 50
    assert after.metrics.p95_ms is not None
    assert after.metrics.p95_ms < 5


def test_a_model_still_loading_is_starting(server: FakeInferenceServer, http: httpx.Client) -> None:
    server.set_model("detector", "1.0.0", SHA1, ready=False)
    reader = MetricsReader([server.url], client=http, clock=FakeClock().monotonic)
    assert [r.state for r in reader.read()] == ["Starting"]


def test_an_unreachable_server_reports_its_workload_failed(
    server: FakeInferenceServer, http: httpx.Client
) -> None:
    clock = FakeClock()
    reader = MetricsReader(
        [server.url, "http://127.0.0.1:9/metrics"], client=http, clock=clock.monotonic
    )
    server.set_model("detector", "1.0.0", SHA1)
    assert [r.state for r in reader.read()] == ["Ready"]  # the never-seen one: nothing
    server.fail = True
    clock.advance(10)
    [failed] = reader.read()
    assert (failed.model, failed.state, failed.metrics) == ("detector", "Failed", None)
