"""The agent's behaviour against an in-process fake controller (httpx MockTransport):
enrolment, credential handling, the outbox, retries. tests/node_agent/test_agent_live.py
runs it against the real controller."""

from __future__ import annotations

import json
import logging
import re
import stat
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from node_agent.agent import cli
from node_agent.agent.backoff import Backoff
from node_agent.agent.client import ControllerClient
from node_agent.agent.clock import SYSTEM_CLOCK
from node_agent.agent.credentials import write_secret
from node_agent.agent.loop import Agent
from node_agent.agent.settings import AgentSettings
from tests.agents.fakes import FakeClock

TOKEN = "join-token"


class FakeController:
    """Just enough of /v1/agents: per-node credentials and last_seq, duplicates by seq."""

    def __init__(
        self, clock: FakeClock, *, interval_s: float = 10.0, max_batch: int = 1000
    ) -> None:
        self.clock = clock
        self.interval_s = interval_s
        self.token = TOKEN
        self.enroll_attempts: list[float] = []  # when, on the agent's clock
        self.beat_attempts: list[float] = []  # heartbeat requests, also those that failed
        self.slow_s = 0.0  # each heartbeat request takes that long
        self.beat = threading.Event()  # set by every heartbeat request that got in
        self.max_batch = max_batch
        self.credentials: dict[str, str] = {}  # credential -> node
        self.last_seq: dict[str, int] = {}
        self.received: list[int] = []  # accepted seqs, in arrival order
        self.sent_at: list[datetime] = []  # of the accepted heartbeats, in arrival order
        self.batches: list[int] = []  # sizes of the heartbeat requests
        self.enrollments = 0
        self.down = False
        self.lose_next_response = False
        self.invalid_seqs: set[int] = set()
        self.job_fetches = 0
        self.lose_jobs_response = False
        self.benchmarks_pending: int | None = None  # None: a controller without benchmarks

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/agents/enroll":
            self.enroll_attempts.append(self.clock.monotonic())
        elif request.url.path == "/v1/agents/heartbeat":
            self.beat_attempts.append(self.clock.monotonic())
            self.clock.advance(self.slow_s)
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if request.method == "GET" and request.url.path == "/v1/agents/benchmarks":
            self.job_fetches += 1
            if self.lose_jobs_response:
                self.lose_jobs_response = False
                raise httpx.ReadTimeout("response lost", request=request)
            return httpx.Response(200, json=[])  # (tests/node_agent/test_agent_benchmarks.py)
        body = json.loads(request.content)
        if request.url.path == "/v1/agents/enroll":
            if body["join_token"] != self.token:
                return httpx.Response(401, json={"error": "unauthorized", "detail": "bad"})
            node = body["node"]
            self.credentials = {c: n for c, n in self.credentials.items() if n != node}
            credential = f"cred-{node}-{self.enrollments}"
            self.enrollments += 1
            self.credentials[credential] = node
            return httpx.Response(
                200,
                json={
                    "node": node,
                    "cluster": body["cluster"],
                    "credential": credential,
                    "heartbeat_interval_s": self.interval_s,
                    "last_seq": self.last_seq.get(node, 0),
                },
            )
        node = self.credentials.get(request.headers["Authorization"].removeprefix("Bearer "))
        if node is None:
            return httpx.Response(401, json={"error": "unauthorized", "detail": "unknown"})
        self.batches.append(len(body))
        if len(body) > self.max_batch:
            return httpx.Response(413, json={"error": "payload_too_large", "detail": "big"})
        if any(b["seq"] in self.invalid_seqs for b in body):
            return httpx.Response(422, json={"error": "validation_error", "detail": []})
        if any(b["node"] != node for b in body):
            return httpx.Response(403, json={"error": "forbidden", "detail": "not yours"})
        accepted = duplicates = 0
        for beat in body:
            if beat["seq"] <= self.last_seq.get(node, 0):
                duplicates += 1
            else:
                self.last_seq[node] = beat["seq"]
                self.received.append(beat["seq"])
                self.sent_at.append(datetime.fromisoformat(beat["sent_at"]))
                accepted += 1
        if self.lose_next_response:
            self.lose_next_response = False
            raise httpx.ReadTimeout("response lost", request=request)
        self.beat.set()
        ack = {"accepted": accepted, "duplicates": duplicates, "last_seq": self.last_seq[node]}
        if self.benchmarks_pending is not None:
            ack["benchmarks_pending"] = self.benchmarks_pending
        return httpx.Response(200, json=ack)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def controller(clock: FakeClock) -> FakeController:
    return FakeController(clock)


AgentFactory = Callable[..., Agent]


@pytest.fixture
def make_agent(
    tmp_path: Path, controller: FakeController, clock: FakeClock
) -> Iterator[AgentFactory]:
    made: list[Agent] = []

    def make(**overrides: Any) -> Agent:
        values: dict[str, Any] = {
            "controller_url": "http://controller.test",
            "join_token": TOKEN,
            "node_name": "n0",
            "cluster": "site",
            "state_dir": tmp_path / "state",
            "heartbeat_interval_s": 10.0,
            "retry_max_s": 60.0,
        }
        values.update(overrides)
        if values["heartbeat_interval_s"] is None:  # left to the default / the controller
            del values["heartbeat_interval_s"]
        client = ControllerClient(
            values["controller_url"], transport=httpx.MockTransport(controller.handle)
        )
        agent = Agent(AgentSettings(**values), client=client, clock=clock)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.close()


def run_cycles(agent: Agent, clock: FakeClock, n: int) -> None:
    for _ in range(n):
        agent.cycle()
        clock.advance(agent.interval_s)


def test_settings_from_the_daemonset_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "edge-7")
    monkeypatch.setenv("EDGEFLEET_CONTROLLER_URL", "https://fleet.example.com")
    monkeypatch.setenv("EDGEFLEET_JOIN_TOKEN", "s3cret")
    monkeypatch.setenv("EDGEFLEET_CLUSTER", "store-12")
    monkeypatch.setenv("EDGEFLEET_MODEL_CACHE_DIR", "/var/lib/edgefleet/models")
    monkeypatch.setenv("EDGEFLEET_INFERENCE_URLS", "http://127.0.0.1:8500/metrics, http://x/m")
    s = AgentSettings()
    assert (s.node_name, s.cluster, s.controller_url) == (
        "edge-7",
        "store-12",
        "https://fleet.example.com",
    )
    assert s.join_token is not None
    assert s.join_token.get_secret_value() == "s3cret"
    assert s.inference_urls == ["http://127.0.0.1:8500/metrics", "http://x/m"]
    assert (s.state_dir, s.heartbeat_interval_s, s.queue_max) == (
        Path("/var/lib/edgefleet/agent"),
        10.0,
        10_000,
    )
    monkeypatch.setenv("EDGEFLEET_INFERENCE_URLS", '["http://a/metrics"]')
    assert AgentSettings().inference_urls == ["http://a/metrics"]


def test_main_explains_a_missing_setting(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("NODE_NAME", "EDGEFLEET_NODE_NAME", "EDGEFLEET_CONTROLLER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EDGEFLEET_CLUSTER", "c")
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    lines = {line.strip() for line in caplog.text.splitlines()}
    assert "EDGEFLEET_CONTROLLER_URL: Field required" in lines
    assert "NODE_NAME: Field required" in lines


def test_help_lists_every_setting_without_needing_any(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in (
        "NODE_NAME",
        "EDGEFLEET_NODE_NAME",
        "EDGEFLEET_CONTROLLER_URL",
        "EDGEFLEET_CLUSTER",
    ):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    # "  NAME  (default ...)", each followed by its description, indented further.
    listed = {line.split()[0] for line in out.splitlines() if re.match(r"  [A-Z]", line)}
    expected = {"NODE_NAME"} | {
        f"EDGEFLEET_{name.upper()}" for name in AgentSettings.model_fields if name != "node_name"
    }
    assert listed == expected
    assert "  EDGEFLEET_CONTROLLER_URL  (required)" in out.splitlines()
    assert "  EDGEFLEET_HEARTBEAT_INTERVAL_S  (default 10.0)" in out.splitlines()
    assert "EDGEFLEET_EDGEFLEET" not in out


def test_enrolls_once_and_keeps_the_credential_private(
    make_agent: AgentFactory, controller: FakeController, clock: FakeClock, tmp_path: Path
) -> None:
    agent = make_agent()
    run_cycles(agent, clock, 3)
    assert controller.enrollments == 1
    assert controller.received == [1, 2, 3]
    path = tmp_path / "state" / "credential"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() in controller.credentials
    agent.close()
    # A restart: same credential, sequence continues.
    again = make_agent()
    run_cycles(again, clock, 2)
    assert controller.enrollments == 1
    assert controller.received == [1, 2, 3, 4, 5]


def test_write_secret_is_never_readable_by_others(tmp_path: Path) -> None:
    path = tmp_path / "credential"
    path.write_text("old")
    path.chmod(0o644)
    write_secret(path, "new")
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_rejected_credential_enrolls_again(
    make_agent: AgentFactory, controller: FakeController, clock: FakeClock
) -> None:
    agent = make_agent()
    run_cycles(agent, clock, 1)
    controller.credentials.clear()  # rotated elsewhere, node re-created...
    run_cycles(agent, clock, 1)
    assert controller.enrollments == 2
    assert controller.received == [1, 2]
    assert len(agent.queue) == 0


def test_without_a_join_token_a_rejected_credential_keeps_the_outbox(
    make_agent: AgentFactory, controller: FakeController, clock: FakeClock, tmp_path: Path
) -> None:
    first = make_agent()
    run_cycles(first, clock, 1)  # enrolled by a first start...
    first.close()
    agent = make_agent(join_token=None)  # ...then the token was removed from the pod
    run_cycles(agent, clock, 1)
    assert controller.received == [1, 2]
    controller.credentials.clear()
    run_cycles(agent, clock, 3)
    assert controller.enrollments == 1
    assert len(agent.queue) == 3
    assert agent.backoff.retry_at > clock.monotonic()


def test_enrolment_continues_above_the_controllers_sequence(
    make_agent: AgentFactory, controller: FakeController, clock: FakeClock
) -> None:
    controller.last_seq["n0"] = 1000  # this node's state directory was lost
    agent = make_agent()
    run_cycles(agent, clock, 2)
    assert controller.received == [1001, 1002]


def test_the_controller_suggests_the_interval_unless_it_is_set(
    make_agent: AgentFactory, controller: FakeController, clock: FakeClock, tmp_path: Path
) -> None:
    controller.interval_s = 30.0
    explicit = make_agent(heartbeat_interval_s=5.0)
    run_cycles(explicit, clock, 1)
    assert explicit.interval_s == 5.0
    explicit.close()
    agent = make_agent(heartbeat_interval_s=None, state_dir=tmp_path / "other")
    assert agent.interval_s == 10.0  # the default until the controller says otherwise
    run_cycles(agent, clock, 1)
    assert agent.interval_s == 30.0
    agent.close()
    assert make_agent(heartbeat_interval_s=None, state_dir=tmp_path / "other").interval_s == 30.0


def test_an_hour_offline_loses_nothing_and_replays_in_order(
    make_agent: AgentFactory, controller: FakeController, clock: FakeClock
) -> None:
    agent = make_agent()
    run_cycles(agent, clock, 5)
    controller.down = True
    run_cycles(agent, clock, 360)
    assert len(agent.queue) == 360
    controller.down = False
    # Back within the longest retry wait (60 s here): replayed in one batch, in order.
    cycles = 0
    while len(agent.queue) and cycles < 7:
        run_cycles(agent, clock, 1)
        cycles += 1
    last = 365 + cycles
    assert controller.received == list(range(1, last + 1))
    assert len(agent.queue) == 0
    assert (agent.stats.accepted, agent.stats.duplicates) == (last, 0)
    assert controller.batches[-1] == 360 + cycles  # one request
    # The backoff kept it from trying the dead controller every interval.
    assert agent.stats.failures < 100


def test_a_full_outbox_drops_the_oldest(
    make_agent: AgentFactory, controller: FakeController, clock: FakeClock
) -> None:
    agent = make_agent(queue_max=50)
    run_cycles(agent, clock, 1)
    controller.down = True
    run_cycles(agent, clock, 80)
    assert (len(agent.queue), agent.queue.dropped) == (50, 30)
    controller.down = False
    clock.advance(120)
    run_cycles(agent, clock, 1)
    assert controller.received == [1, *range(33, 83)]  # 82 made, 31 dropped
    assert agent.queue.dropped == 31


def test_a_lost_response_is_replayed_and_counted_once(
    make_agent: AgentFactory, controller: FakeController, clock: FakeClock
) -> None:
    agent = make_agent()
    run_cycles(agent, clock, 2)
    controller.lose_next_response = True
    run_cycles(agent, clock, 1)  # stored by the controller, but the agent never heard
    assert len(agent.queue) == 1
    clock.advance(120)
    run_cycles(agent, clock, 1)
    assert controller.received == [1, 2, 3, 4]
    assert (agent.stats.accepted, agent.stats.duplicates) == (3, 1)
    assert len(agent.queue) == 0


def test_replay_in_batches_no_larger_than_the_controller_takes(
    make_agent: AgentFactory, controller: FakeController, clock: FakeClock
) -> None:
    controller.max_batch = 40
    agent = make_agent(batch_size=100)
    run_cycles(agent, clock, 1)
    controller.down = True
    run_cycles(agent, clock, 150)
    controller.down = False
    clock.advance(120)
    run_cycles(agent, clock, 1)
    assert controller.received == list(range(1, 153))
    assert max(b for b in controller.batches if b <= 40) <= 40


def test_an_invalid_heartbeat_is_isolated_and_dropped_alone(
    make_agent: AgentFactory, controller: FakeController, clock: FakeClock
) -> None:
    controller.invalid_seqs = {4}
    agent = make_agent()
    controller.down = True
    run_cycles(agent, clock, 6)
    controller.down = False
    clock.advance(120)
    run_cycles(agent, clock, 1)
    assert controller.received == [1, 2, 3, 5, 6, 7]
    assert agent.queue.dropped == 1


def test_a_refusal_backs_off_to_the_maximum(
    make_agent: AgentFactory, controller: FakeController, clock: FakeClock
) -> None:
    agent = make_agent(node_name="n1")
    run_cycles(agent, clock, 1)
    agent.settings.node_name = "n2"  # misconfigured: speaks for a node not its own
    agent.cycle()
    assert agent.backoff.retry_at - clock.monotonic() >= 30  # max_s 60 with jitter
    assert len(agent.queue) == 1


def test_backoff_grows_and_resets() -> None:
    clock = FakeClock(0)
    b = Backoff(10, 60, clock, rng=lambda: 1.0)
    assert [b.failure() for _ in range(5)] == [10, 20, 40, 60, 60]
    assert not b.ready()
    b.success()
    assert b.ready()
    assert b.failure(permanent=True) == 60
    assert b.failure(at_least_s=90) == 90


def run_until(agent: Agent, clock: FakeClock, at: float) -> None:
    """The agent's own loop, on the fake clock, until it is stopped at ``at``."""
    clock.stop_at = at
    agent.run(threading.Event())


def test_run_keeps_the_schedule_and_does_not_burst_after_falling_behind(
    make_agent: AgentFactory, controller: FakeController, clock: FakeClock
) -> None:
    t0 = clock.monotonic()
    agent = make_agent()
    run_until(agent, clock, t0 + 100)
    assert [t - t0 for t in controller.beat_attempts] == [10.0 * i for i in range(11)]
    assert clock.waits == [10.0] * 11
    assert controller.received == list(range(1, 12))
    # Each heartbeat says when it was made, on the same clock.
    assert controller.sent_at == [clock.wall + timedelta(seconds=10 * i) for i in range(11)]
    agent.close()
    # A heartbeat request that takes 25 s (two and a half intervals): the next beat goes
    # at once, then every interval again; the two missed ones are not made up in a burst.
    again = make_agent()
    t1 = clock.monotonic()
    clock.at(t1 + 25, lambda: setattr(controller, "slow_s", 25.0))
    clock.at(t1 + 35, lambda: setattr(controller, "slow_s", 0.0))
    run_until(again, clock, t1 + 80)
    assert [t - t1 for t in controller.beat_attempts[11:]] == [0, 10, 20, 30, 55, 65, 75]


def test_run_backs_off_while_the_controller_is_down_then_replays(
    make_agent: AgentFactory, controller: FakeController, clock: FakeClock
) -> None:
    t0 = clock.monotonic()
    agent = make_agent()
    agent.backoff.rng = lambda: 1.0  # no jitter: the waits are exactly 10, 20, 40, 60
    clock.at(t0 + 5, lambda: setattr(controller, "down", True))
    clock.at(t0 + 150, lambda: setattr(controller, "down", False))
    run_until(agent, clock, t0 + 200)
    assert [t - t0 for t in controller.beat_attempts] == [0, 10, 20, 40, 80, 140, 200]
    assert controller.received == list(range(1, 22))
    assert controller.batches[-1] == 20  # everything since t0 + 10, in one request
    assert len(agent.queue) == 0


def test_run_enrolls_again_on_its_schedule(
    make_agent: AgentFactory, controller: FakeController, clock: FakeClock
) -> None:
    t0 = clock.monotonic()
    controller.token = "the operator has not set it yet"
    agent = make_agent()
    agent.backoff.rng = lambda: 1.0
    clock.at(t0 + 100, lambda: setattr(controller, "token", TOKEN))
    # A rejected credential: enrolled again in the same cycle, nothing lost.
    clock.at(t0 + 145, lambda: controller.credentials.clear())
    run_until(agent, clock, t0 + 160)
    # A refused join token waits the longest retry (60 s) before the next try.
    assert [t - t0 for t in controller.enroll_attempts] == [0, 60, 120, 150]
    assert controller.enrollments == 2
    assert [t - t0 for t in controller.beat_attempts] == [120, 130, 140, 150, 150, 160]
    assert controller.batches[0] == 13  # the beats of t0 .. t0 + 120, kept meanwhile
    assert controller.received == list(range(1, 18))


def test_stopping_sends_the_outbox_without_waiting_for_the_backoff(
    make_agent: AgentFactory, controller: FakeController, clock: FakeClock
) -> None:
    t0 = clock.monotonic()
    agent = make_agent()
    agent.backoff.rng = lambda: 1.0
    clock.at(t0 + 5, lambda: setattr(controller, "down", True))
    clock.at(t0 + 45, lambda: setattr(controller, "down", False))
    run_until(agent, clock, t0 + 55)  # next try due at t0 + 80
    assert [t - t0 for t in controller.beat_attempts] == [0, 10, 20, 40, 55]
    assert controller.received == list(range(1, 7))
    assert len(agent.queue) == 0


def test_stop_ends_the_real_wait_at_once(
    make_agent: AgentFactory, controller: FakeController
) -> None:
    agent = make_agent(heartbeat_interval_s=3600.0)
    agent.clock = agent.backoff.clock = SYSTEM_CLOCK
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    assert controller.beat.wait(10)  # the first beat: the loop now waits an hour
    stop.set()
    thread.join(10)
    assert not thread.is_alive()
    assert controller.received == [1]


def test_benchmark_jobs_are_fetched_once_after_a_start_then_when_told(
    make_agent: AgentFactory, controller: FakeController, clock: FakeClock
) -> None:
    agent = make_agent()
    run_cycles(agent, clock, 5)
    # One look after the start: jobs handed to a previous run count as fetched.
    assert controller.job_fetches == 1
    controller.benchmarks_pending = 0
    run_cycles(agent, clock, 3)
    assert controller.job_fetches == 1
    controller.benchmarks_pending = 1
    run_cycles(agent, clock, 1)
    assert controller.job_fetches == 2
    # Told again but the list was empty: not every interval, after retry_max_s.
    run_cycles(agent, clock, 3)
    assert controller.job_fetches == 2
    clock.advance(60)
    run_cycles(agent, clock, 1)
    assert controller.job_fetches == 3
    assert agent.stats.benchmark_results_posted == 0
    # A lost answer may have handed jobs out (counted fetched): asked again, after
    # retry_max_s, although the count is 0 by then.
    controller.benchmarks_pending = 0
    clock.advance(60)
    controller.lose_jobs_response = True
    agent.benchmarks_pending = 1  # (the count of the answer before the fetch)
    agent.benchmark_step()
    assert controller.job_fetches == 4
    run_cycles(agent, clock, 3)
    assert controller.job_fetches == 4
    clock.advance(60)
    run_cycles(agent, clock, 2)
    assert controller.job_fetches == 5
    agent.close()
    controller.benchmarks_pending = None
    run_cycles(make_agent(), clock, 3)
    assert controller.job_fetches == 6
