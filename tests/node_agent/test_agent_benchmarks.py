"""On-node benchmarks: a real agent (real clock, its own loop in a thread) against a fake
controller on loopback HTTP that asks for benchmarks, serves real ONNX artifacts and
records the results. The models run in onnxruntime, in the agent's child process."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from controller.registry import samples
from node_agent.agent.loop import SHUTDOWN_GRACE_S, Agent
from node_agent.agent.settings import AgentSettings
from node_agent.contract import BenchmarkResult
from tests.http_fake import FakeHTTPServer, read_json, reply, reply_json

TOKEN = "join-token"
INTERVAL_S = 0.05


class FakeController:
    """Enrolment, heartbeats, the jobs, the results, and artifacts under /artifacts/<name>.
    As the real controller does, a heartbeat answer counts the jobs not fetched yet, and
    the job list holds every job not answered (fetched before or not). Everything it saw
    is timestamped."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.credential = "cred-n0"
        self.last_seq = 0
        self.jobs: dict[int, dict[str, Any]] = {}  # not answered, by id
        self.unfetched: set[int] = set()
        self.results: dict[int, dict[str, Any]] = {}
        self.artifacts: dict[str, bytes] = {}
        self.heartbeats: list[float] = []
        self.cpu_models: list[str | None] = []
        self.job_fetches: list[float] = []
        self.artifact_gets: list[tuple[float, str | None]] = []  # (when, Authorization)
        self.result_posts: list[tuple[float, int]] = []  # every attempt that arrived
        self.drop_result_posts = 0  # that many posts: connection closed, no answer
        self.refuse_results_with: int | None = None  # 404 (withdrawn) or 409 (answered)
        self.http = FakeHTTPServer(self.handle)

    @property
    def url(self) -> str:
        return self.http.url

    def close(self) -> None:
        self.http.close()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        if h.command == "POST":
            self.post(h)
        else:
            self.get(h)

    def add_job(self, job_id: int, artifact: str, sha256: str, **fields: Any) -> None:
        self.jobs[job_id] = {
            "id": job_id,
            "model": "cnn",
            "version": f"1.0.{job_id}",
            "sha256": sha256,
            "format": "onnx",
            "artifact_url": artifact,
            "runs": 20,
            "warmup_runs": 2,
            "threads": 1,
            "metadata": {},
            **fields,
        }
        self.unfetched.add(job_id)

    def authorized(self, h: BaseHTTPRequestHandler) -> bool:
        if h.headers.get("Authorization") == f"Bearer {self.credential}":
            return True
        reply_json(h, 401, {"error": "unauthorized", "detail": "unknown credential"})
        return False

    def get(self, h: BaseHTTPRequestHandler) -> None:
        now = time.monotonic()
        if h.path.startswith("/artifacts/"):
            with self.lock:
                self.artifact_gets.append((now, h.headers.get("Authorization")))
                data = self.artifacts.get(h.path.removeprefix("/artifacts/"))
            if data is None:
                reply_json(h, 404, {"error": "not_found", "detail": h.path})
                return
            reply(h, 200, data, content_type="application/octet-stream")
        elif h.path == "/v1/agents/benchmarks" and self.authorized(h):
            with self.lock:
                self.job_fetches.append(now)
                jobs = list(self.jobs.values())
                self.unfetched.clear()
            reply_json(h, 200, jobs)

    def post(self, h: BaseHTTPRequestHandler) -> None:
        now = time.monotonic()
        body = read_json(h)
        if h.path == "/v1/agents/enroll":
            assert body["join_token"] == TOKEN
            reply_json(
                h,
                200,
                {"credential": self.credential, "heartbeat_interval_s": 10, "last_seq": 0},
            )
            return
        if not self.authorized(h):
            return
        with self.lock:
            if h.path == "/v1/agents/heartbeat":
                self.heartbeats.extend(now for _ in body)
                self.cpu_models.extend(b["status"].get("cpu_model") for b in body)
                self.last_seq = max(self.last_seq, *(b["seq"] for b in body))
                answer = {
                    "accepted": len(body),
                    "duplicates": 0,
                    "last_seq": self.last_seq,
                    "benchmarks_pending": len(self.unfetched),
                }
                reply_json(h, 200, answer)
                return
            job_id = int(h.path.rsplit("/", 1)[1])
            self.result_posts.append((now, job_id))
            if self.drop_result_posts:
                self.drop_result_posts -= 1
                h.close_connection = True  # no response at all: a transport error
                return
            if self.refuse_results_with is not None:
                self.jobs.pop(job_id, None)
                status = self.refuse_results_with
                reply_json(h, status, {"error": "gone", "detail": f"job {job_id}"})
                return
            if job_id not in self.jobs:
                reply_json(h, 409 if job_id in self.results else 404, {"detail": "no"})
                return
            BenchmarkResult.model_validate(body)  # the wire shape, exactly
            self.results[job_id] = body
            del self.jobs[job_id]
            reply_json(h, 200, {"id": job_id, "status": "Done"})


@pytest.fixture
def controller() -> Iterator[FakeController]:
    fake = FakeController()
    yield fake
    fake.close()


@pytest.fixture
def make_agent(tmp_path: Path, controller: FakeController) -> Iterator[Callable[..., Agent]]:
    made: list[Agent] = []

    def make(**overrides: Any) -> Agent:
        values: dict[str, Any] = {
            "controller_url": controller.url,
            "join_token": TOKEN,
            "node_name": "n0",
            "cluster": "site",
            "state_dir": tmp_path / "state",
            "model_cache_dir": tmp_path / "models",
            "heartbeat_interval_s": INTERVAL_S,
            "retry_max_s": 1.0,
            "benchmark_timeout_s": 120.0,
        }
        values.update(overrides)
        agent = Agent(AgentSettings(**values))
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.close()


@contextmanager
def running(agent: Agent) -> Iterator[threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive()


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def more_cycles(controller: FakeController, n: int) -> None:
    """Until the agent has sent ``n`` more heartbeats (a cycle sends one)."""
    with controller.lock:
        seen = len(controller.heartbeats)
    wait_for(lambda: len(controller.heartbeats) >= seen + n, 30, f"{n} more heartbeats")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def serve(controller: FakeController, name: str, data: bytes) -> str:
    controller.artifacts[name] = data
    return f"{controller.url}/artifacts/{name}"


def test_benchmark_runs_on_the_node_while_heartbeats_continue(
    make_agent: Callable[..., Agent], controller: FakeController, tmp_path: Path
) -> None:
    # About 2 ms an inference here: 600 runs keep the child busy for a second or more.
    model = samples.build_cnn(channels=32, size=128)
    controller.add_job(1, serve(controller, "cnn", model), sha(model), runs=600, warmup_runs=5)
    agent = make_agent()
    with running(agent):
        wait_for(lambda: 1 in controller.results, 120, "the benchmark result")
    result = BenchmarkResult.model_validate(controller.results[1])
    assert result.ok, result.error
    assert result.runs == 600
    assert result.p50_ms is not None
    assert result.p95_ms is not None
    assert result.p99_ms is not None
    assert 0 < result.p50_ms <= result.p95_ms <= result.p99_ms
    assert result.mean_ms is not None
    assert result.mean_ms > 0
    assert result.peak_rss_bytes is not None
    assert result.peak_rss_bytes > 0
    assert result.model_peak_bytes is not None
    assert result.cpu
    assert result.machine
    assert result.runtime is not None
    assert result.runtime.startswith("onnxruntime")
    assert result.duration_s is not None
    assert result.duration_s > 0.5
    # Downloaded once into the content-addressed cache, with the node's credential.
    cached = tmp_path / "models" / "sha256" / sha(model)[:2] / sha(model)
    assert cached.read_bytes() == model
    assert [auth for _, auth in controller.artifact_gets] == [f"Bearer {controller.credential}"]
    # Heartbeats kept their schedule while the child measured.
    started = controller.artifact_gets[0][0]
    posted = controller.result_posts[0][0]
    during = [t for t in controller.heartbeats if started < t < posted]
    assert len(during) >= 5, (len(during), posted - started)
    gaps = [b - a for a, b in zip([started, *during], [*during, posted], strict=True)]
    assert max(gaps) < (posted - started) / 2, gaps
    # The heartbeat names the CPU the numbers belong to.
    assert controller.cpu_models
    assert controller.cpu_models[-1]
    assert (agent.benchmarks.completed, agent.stats.benchmark_results_posted) == (1, 1)


def test_a_checksum_mismatch_is_reported_and_nothing_is_cached(
    make_agent: Callable[..., Agent], controller: FakeController, tmp_path: Path
) -> None:
    model = samples.build_cnn()
    promised = sha(b"what the controller registered")
    controller.add_job(7, serve(controller, "cnn", model), promised)
    with running(make_agent()):
        wait_for(lambda: 7 in controller.results, 60, "the benchmark result")
    result = BenchmarkResult.model_validate(controller.results[7])
    assert not result.ok
    assert result.error is not None
    assert "sha256 mismatch" in result.error
    assert promised in result.error
    assert sha(model) in result.error
    assert result.runs == 0
    assert result.p50_ms is None
    assert not (tmp_path / "models" / "sha256").exists() or not any(
        p.is_file() for p in (tmp_path / "models" / "sha256").rglob("*")
    )


def test_a_broken_model_reports_the_runtime_error(
    make_agent: Callable[..., Agent], controller: FakeController
) -> None:
    broken = samples.build_failing_model()
    controller.artifacts["broken"] = broken
    # Relative to the controller, as a controller may send it.
    controller.add_job(3, "/artifacts/broken", sha(broken))
    with running(make_agent()):
        wait_for(lambda: 3 in controller.results, 60, "the benchmark result")
    result = BenchmarkResult.model_validate(controller.results[3])
    assert not result.ok
    assert result.error is not None
    assert result.error.startswith("inference failed")
    assert "ONNXRuntimeError" in result.error
    assert "Reshape" in result.error
    assert len(result.error) <= 4000


def test_a_lost_result_post_is_retried_later_without_measuring_again(
    make_agent: Callable[..., Agent], controller: FakeController
) -> None:
    model = samples.build_cnn()
    controller.add_job(5, serve(controller, "cnn", model), sha(model))
    controller.drop_result_posts = 1
    agent = make_agent()
    with running(agent):
        wait_for(lambda: 5 in controller.results, 60, "the benchmark result")
        more_cycles(controller, 10)  # nothing else happens
    assert [job for _, job in controller.result_posts] == [5, 5]
    first, second = (t for t, _ in controller.result_posts)
    assert any(first < t < second for t in controller.heartbeats)  # a later cycle
    assert BenchmarkResult.model_validate(controller.results[5]).ok
    assert len(controller.job_fetches) == 1
    assert len(controller.artifact_gets) == 1
    assert agent.benchmarks.completed == 1  # measured once
    assert agent.stats.benchmark_results_posted == 1


@pytest.mark.parametrize("status", [404, 409])
def test_a_withdrawn_or_answered_job_drops_its_result(
    make_agent: Callable[..., Agent], controller: FakeController, status: int
) -> None:
    model = samples.build_cnn()
    controller.add_job(9, serve(controller, "cnn", model), sha(model))
    controller.refuse_results_with = status
    agent = make_agent()
    with running(agent):
        wait_for(lambda: bool(controller.result_posts), 60, "the result post")
        more_cycles(controller, 10)
    assert len(controller.result_posts) == 1  # not retried
    assert agent.benchmarks.completed == 1
    assert agent.stats.benchmark_results_posted == 0


def test_a_job_the_agent_cannot_read_is_answered_as_failed(
    make_agent: Callable[..., Agent], controller: FakeController
) -> None:
    controller.add_job(11, f"{controller.url}/artifacts/x", "0" * 64, format="coreml")
    with running(make_agent()):
        wait_for(lambda: 11 in controller.results, 30, "the answer")
    result = BenchmarkResult.model_validate(controller.results[11])
    assert not result.ok
    assert result.error is not None
    assert "cannot read the job" in result.error
    assert controller.artifact_gets == []


def test_the_node_credential_goes_to_the_controller_only(
    make_agent: Callable[..., Agent], controller: FakeController
) -> None:
    cdn = FakeController()  # another origin (another port)
    try:
        model = samples.build_cnn()
        controller.add_job(2, serve(cdn, "cnn", model), sha(model))
        with running(make_agent()):
            wait_for(lambda: 2 in controller.results, 60, "the benchmark result")
        assert BenchmarkResult.model_validate(controller.results[2]).ok
        assert [auth for _, auth in cdn.artifact_gets] == [None]
    finally:
        cdn.close()


def _probe_children() -> list[int]:
    """Live ``node_agent.probe`` processes whose parent is this process."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == me and fields[0] != "Z" and b"node_agent.probe" in cmdline:
            found.append(int(entry.name))
    return found


def test_shutdown_does_not_wait_for_a_running_benchmark_and_a_restart_runs_it(
    make_agent: Callable[..., Agent], controller: FakeController
) -> None:
    model = samples.build_cnn(channels=32, size=128)
    controller.add_job(4, serve(controller, "cnn", model), sha(model), runs=10_000)
    agent = make_agent()
    with running(agent) as stop:
        wait_for(lambda: bool(_probe_children()), 60, "the benchmark's child process")
        more_cycles(controller, 3)  # the child measures; the loop goes on meanwhile
        assert _probe_children()
        stopped_at = time.monotonic()
        stop.set()
    assert time.monotonic() - stopped_at < SHUTDOWN_GRACE_S + 2
    wait_for(lambda: not _probe_children(), 5, "the child to be gone")
    assert controller.results == {}
    assert controller.result_posts == []
    agent.close()
    # The controller counts the job as fetched (its heartbeat answers say 0); the next
    # start asks for its jobs anyway and measures it (shorter now, to keep the test short).
    assert controller.unfetched == set()
    controller.jobs[4]["runs"] = 20
    with running(make_agent()):
        wait_for(lambda: 4 in controller.results, 60, "the benchmark result")
    assert BenchmarkResult.model_validate(controller.results[4]).runs == 20
    assert len(controller.job_fetches) == 2
    assert len(controller.artifact_gets) == 1  # the second run found it in the cache


def test_importing_the_agent_loads_no_numpy_nor_runtime() -> None:
    code = (
        "import sys, node_agent.agent.cli; "
        "print(','.join(m for m in ('numpy', 'onnxruntime', 'ai_edge_litert', "
        "'tflite_runtime', 'node_agent.probe', 'node_agent.runtimes') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
