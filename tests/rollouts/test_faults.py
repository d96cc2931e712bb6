"""Crash tests at named fault points (controller/faults.py): a real Celery worker killed
(SIGKILL to its whole process group, as ``kill -9`` of its pod) exactly at a decision
boundary of the reconciler, in every phase and after every reverting command; then a
clean worker finishes the rollout. Checked from the event log and the simulated
clusters' objects: the rollout ends in the right phase, every transition is recorded
once and in a legal order, and every node runs exactly the version it should.

The same for the API process during apply and commands: killed inside the request's
transaction it leaves nothing half-written, and applying again works.

Time: one worker boot per point (overlapped with seeding the fleet in-process), one
clean worker for the whole module on a queue of its own, steps every 0.2 s."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import func, select

from controller.agents.simulated import RunningWorkload, report_running
from controller.db.base import utcnow
from controller.db.models import (
    Assignment,
    Cluster,
    Event,
    Model,
    ModelVersion,
    Node,
    Rollout,
    VersionStatus,
    Wave,
)
from controller.db.session import session_scope
from controller.fleet.service import ingest_heartbeats, mark_silent_nodes
from controller.manifests.service import apply_documents
from controller.registry.store import artifact_store
from controller.rollouts import commands
from controller.rollouts import repository as rollout_repo
from controller.rollouts.state import ASSIGNMENT_TRANSITIONS, ROLLOUT_TRANSITIONS
from controller.settings import Settings
from controller.tasks.celery_app import celery_app, configure
from node_agent.contract import Heartbeat, InferenceMetrics
from tests.conftest import bearer
from tests.live import free_port, repeating, stop_process_group
from tests.rollouts.helpers import (
    assert_counts_agree,
    cluster_doc,
    drive,
    next_seq,
    rollout_doc,
    rollout_events,
    running_versions,
)
from tests.tasks.test_restarts import process
from tests.tasks.test_worker import wait_for, worker

CLUSTERS = (("east", 2), ("west", 2))
NODES = sorted(f"{c}-n{i}" for c, n in CLUSTERS for i in range(n))
FAST = {"EDGEFLEET_RECONCILE_INTERVAL_S": "0.2"}
BASE, NEW = "1.0.0", "2.0.0"
_queues = itertools.count(1)
# The stand-in agents take their heartbeat numbers where drive()'s come from: one
# sequence per node, or a node's later heartbeats would be dropped as replays.
_seq = iter(next_seq, None)


# ---------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """Kill the worker at the ``hit``-th pass of ``point`` in ``scenario``: ``deploy``
    (1.0.0 -> 2.0.0 succeeds), ``rollback`` (2.0.0 fails its gate, onFailure: rollback),
    ``abort`` (aborted mid-rollout), ``undo`` (the Succeeded rollout undone), ``converge``
    (a node offline while 2.0.0 succeeded comes back and converges)."""

    scenario: str
    point: str
    hit: int = 1

    def __str__(self) -> str:
        return f"{self.scenario}-{self.point}-{self.hit}"


CASES = [
    Case("deploy", "rollout.step.locked"),
    Case("deploy", "rollout.started"),
    Case("deploy", "rollout.wave.started"),
    Case("deploy", "rollout.wave.started", 3),
    Case("deploy", "rollout.nodes.admitted"),
    Case("deploy", "rollout.nodes.pushed"),
    Case("deploy", "rollout.observed"),
    Case("deploy", "rollout.gate.evaluated", 2),
    Case("deploy", "rollout.wave.promoted"),
    Case("deploy", "rollout.wave.promoted", 2),
    Case("deploy", "rollout.succeeded"),
    Case("deploy", "rollout.step.committed"),
    Case("deploy", "rollout.step.committed", 3),
    Case("rollback", "rollout.failed"),
    Case("rollback", "rollout.rolling_back"),
    Case("rollback", "rollout.revert.pushed"),
    Case("rollback", "rollout.revert.recorded"),
    Case("abort", "rollout.revert.pushed"),
    Case("abort", "rollout.revert.recorded"),
    Case("undo", "rollout.revert.pushed"),
    Case("undo", "rollout.revert.recorded"),
    Case("converge", "rollout.converge.pushed"),
]
FINAL = {
    "deploy": "Succeeded",
    "rollback": "RolledBack",
    "abort": "Aborted",
    "undo": "RolledBack",
    "converge": "Succeeded",
}
# The rollout-phase transitions each scenario records, once each and in this order.
TRANSITIONS = {
    "deploy": ["Started", "Succeeded"],
    "rollback": ["Started", "GateFailed", "RollingBack"],
    "abort": ["Started", "Aborted"],
    "undo": ["Started", "Succeeded", "Undone"],
    "converge": ["Started", "Succeeded"],
}
# converge: the rollout succeeds (in-process) while this node is offline; the worker is
# killed while the node, back, converges.
AWAY = "west-n1"
ON_NEW = ("deploy", "converge")  # scenarios that end with every node on 2.0.0


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def clean_worker(
    settings: Settings, redis_available: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A worker with no fault armed, on a queue of its own; yields the queue."""
    queue = f"{settings.celery_queue}-clean"
    log = tmp_path_factory.mktemp("clean-worker") / "worker.log"
    with worker(log, EDGEFLEET_CELERY_QUEUE=queue, **FAST):
        yield queue


@contextlib.contextmanager
def faulty_worker(
    log: Path, queue: str, faults: str
) -> Iterator[tuple[subprocess.Popen[bytes], Callable[[], None]]]:
    """A worker with ``faults`` armed, booting in the background; yields the process and
    a function that waits until it is ready."""
    env = {
        **os.environ,
        "EDGEFLEET_TASKS_EAGER": "false",
        "EDGEFLEET_CELERY_QUEUE": queue,
        "EDGEFLEET_FAULTS": faults,
        **FAST,
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "controller.cli.main", "worker", "--concurrency", "1"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def ready() -> None:
        wait_for(
            lambda: b"ready." in log.read_bytes() or proc.poll() is not None, 60, "worker ready"
        )
        assert proc.poll() is None, log.read_text()

    try:
        yield proc, ready
    finally:
        stop_process_group(proc)


def register_versions(*versions: str) -> None:
    """Ready versions of model detector, registered directly: the rollout is under test
    here, not validation (the simulated clusters never load the artifact)."""
    with session_scope() as s:
        model = Model(name="detector")
        s.add(model)
        s.flush()
        for v in versions:
            s.add(
                ModelVersion(
                    model_id=model.id,
                    version=v,
                    format="onnx",
                    sha256=hashlib.sha256(v.encode()).hexdigest(),
                    size_bytes=1,
                    status=VersionStatus.READY,
                )
            )


def apply_docs(settings: Settings, *docs: dict[str, Any]) -> None:
    with session_scope() as s:
        apply_documents(
            s,
            list(docs),
            settings,
            artifact_store(settings),
            dry_run=False,
            may_apply_clusters=True,
        )


def command(name: str, action: str) -> None:
    with session_scope() as s:
        commands.command(s, name, action)


def seed(settings: Settings) -> None:
    """Clusters, versions, and every node on 1.0.0 by a finished rollout (in-process)."""
    configure(settings)  # eager: this process steps the baseline rollout itself
    apply_docs(settings, *(cluster_doc(c, n) for c, n in CLUSTERS))
    register_versions(BASE, NEW)
    apply_docs(settings, rollout_doc("base", BASE))
    assert drive("base", settings)[-1] == "Succeeded"


@contextlib.contextmanager
def agents(bad_version: str | None = None) -> Iterator[None]:
    """Stand-ins for the node agents: every 0.1 s, healthy numbers, except from nodes
    running ``bad_version`` (p95 far over the gate)."""

    def numbers(w: RunningWorkload) -> InferenceMetrics:
        p95 = 400.0 if w.version.version == bad_version else 12.0
        return InferenceMetrics(window_s=60, samples=100, errors=0, p50_ms=p95 / 2, p95_ms=p95)

    with repeating(lambda: report_running(numbers, _seq), 0.1, ignore=(Exception,)):
        yield


@contextlib.contextmanager
def beat(every_s: float = 1.0) -> Iterator[None]:
    """Beat's tick, the net for a follow-up step that died with its worker: every 10 s
    in production (twice the default step interval), every second here."""
    with repeating(lambda: celery_app.send_task("rollouts.tick"), every_s):
        yield


def heartbeat(node: str, *, at: datetime) -> None:
    """One heartbeat of ``node``'s agent, received at ``at``."""
    with session_scope() as s:
        beat = Heartbeat(cluster=node.split("-")[0], node=node, seq=next_seq(), sent_at=at)
        ingest_heartbeats(s, [beat], now=at)


def succeed_while_away(settings: Settings, name: str) -> None:
    """Rollout ``name`` (2.0.0) succeeds, stepped in-process, while AWAY is offline: its
    agent's last heartbeat is old and beat's silence check marks it Offline (after the
    claim, so that the stand-in agents no longer beat for it)."""
    configure(settings.model_copy(update={"tasks_eager": False, "celery_queue": "nobody"}))
    try:
        strategy = {"steps": [{"percent": 100}], "maxUnavailable": "100%", "maxDeferred": 1}
        apply_docs(settings, rollout_doc(name, NEW, strategy=strategy))
    finally:
        configure(settings)
    heartbeat(AWAY, at=utcnow() - timedelta(seconds=settings.node_offline_s + 60))
    with session_scope() as s:
        mark_silent_nodes(s, settings)
    assert drive(name, settings)[-1] == "Succeeded"
    assert assignments(name)[f"west/{AWAY}"][0] == "Deferred"
    assert running_versions(settings, [c for c, _ in CLUSTERS])[AWAY] == BASE


Recorded = list[tuple[str, dict[str, Any]]]


def events(name: str) -> Recorded:
    return rollout_events(name)


def phase(name: str) -> str | None:
    with session_scope() as s:
        return s.scalar(select(Rollout.phase).where(Rollout.name == name))


def assignments(name: str) -> dict[str, tuple[str, str | None, str | None]]:
    """Per node (cluster/node): state, desired and observed version of its assignment."""
    with session_scope() as s:
        versions: dict[int, str] = dict(
            s.execute(select(ModelVersion.id, ModelVersion.version)).all()
        )
        rows = s.execute(
            select(Node.name, Assignment.state, Assignment.desired_version_id)
            .add_columns(Assignment.observed_version_id, Cluster.name)
            .join(Cluster, Cluster.id == Node.cluster_id)
            .join(Assignment, Assignment.node_id == Node.id)
            .join(Rollout, Rollout.id == Assignment.rollout_id)
            .where(Rollout.name == name)
        ).all()
    return {
        f"{cluster}/{node}": (state, versions.get(desired or 0), versions.get(observed or 0))
        for node, state, desired, observed, cluster in rows
    }


def settled(name: str, scenario: str) -> bool:
    if phase(name) != FINAL[scenario]:
        return False
    final = {"Running", "Healthy"} if scenario in ON_NEW else {"RolledBack"}
    return all(state in final for state, _, _ in assignments(name).values())


def assert_consistent(settings: Settings, name: str, scenario: str, before_fault: Recorded) -> None:
    """The invariants, from the event log and the clusters' objects."""
    recorded = events(name)
    # Nothing committed before the kill was lost or rewritten.
    assert recorded[: len(before_fault)] == before_fault
    # Rollout phases: each transition once, chained, each one legal.
    phases = [
        (reason, d["from"], d["to"]) for reason, d in recorded if isinstance(d.get("from"), str)
    ]
    assert [reason for reason, _, _ in phases] == TRANSITIONS[scenario], phases
    current = "Pending"
    for reason, frm, to in phases:
        assert frm == current, (reason, phases)
        assert to in ROLLOUT_TRANSITIONS[frm], (reason, phases)
        current = to
    assert current == FINAL[scenario]
    # Waves: started and passed at most once each (exactly once when the rollout succeeded).
    per_wave = Counter((reason, d.get("wave")) for reason, d in recorded)
    with session_scope() as s:
        rollout = rollout_repo.get(s, name)
        assert rollout is not None
        waves = len(rollout.waves)
        # The counts the triggers kept through the kill: what the assignments say.
        assert_counts_agree(s)
    for wave in range(waves):
        for reason in ("WaveStarted", "GatePassed"):
            assert per_wave[(reason, wave)] <= 1, recorded
            if scenario in ("deploy", "undo", "converge"):
                assert per_wave[(reason, wave)] == 1, recorded
    # Nodes: every recorded move legal from the node's previous state, none twice in a row.
    states: dict[str, list[str]] = defaultdict(lambda: ["Pending"])
    for reason, d in recorded:
        if isinstance(d.get("from"), dict):
            for node in d["nodes"]:
                last = states[node][-1]
                assert d["to"] != last, f"{node} recorded {d['to']} twice ({reason})"
                assert d["to"] in ASSIGNMENT_TRANSITIONS[last], (node, last, d["to"], reason)
                states[node].append(d["to"])
    # The clusters: every node runs exactly one version, the one it should; the database
    # says the same.
    version = NEW if scenario in ON_NEW else BASE
    running = running_versions(settings, [c for c, _ in CLUSTERS])
    assert sorted(running) == NODES, running
    assert set(running.values()) == {version}, running
    rows = assignments(name)
    assert sorted(rows) == sorted(f"{n.split('-')[0]}/{n}" for n in NODES)
    for node, (_, desired, observed) in rows.items():
        assert desired == version, (node, rows[node])
        if scenario in ON_NEW:
            assert observed == version, (node, rows[node])
    for node, chain in states.items():
        assert chain[-1] == rows[node][0], (node, chain, rows[node])


# ---------------------------------------------------------------- the worker


@pytest.mark.parametrize("case", CASES, ids=str)
def test_worker_killed_at_fault_point(
    case: Case,
    clean_worker: str,
    settings: Settings,
    committed: None,
    sim_fleet: None,
    tmp_path: Path,
) -> None:
    name, scenario = "r", case.scenario
    queue = f"{settings.celery_queue}-fault-{next(_queues)}"
    log = tmp_path / "faulty.log"
    spec = f"{case.point}={case.hit}*kill"
    steps: dict[str, Any] = {}
    if scenario == "abort":  # wave 0 bakes long enough for the abort to land mid-rollout
        steps = {"strategy": {"steps": [{"nodes": 1, "bake": "60s"}, {"percent": 100}]}}
    try:
        with (
            faulty_worker(log, queue, spec) as (proc, ready),
            agents(bad_version=NEW if scenario == "rollback" else None),
        ):
            seed(settings)  # while the worker boots
            if scenario == "undo":
                apply_docs(settings, rollout_doc(name, NEW))
                assert drive(name, settings)[-1] == "Succeeded"
            if scenario == "converge":
                succeed_while_away(settings, name)
            ready()
            configure(settings.model_copy(update={"tasks_eager": False, "celery_queue": queue}))
            if scenario == "undo":
                command(name, "undo")
            elif scenario == "converge":
                heartbeat(AWAY, at=utcnow())  # back: beat's tick finds the work
                celery_app.send_task("rollouts.tick")
            else:
                apply_docs(settings, rollout_doc(name, NEW, **steps))
            if scenario == "abort":
                wait_for(
                    lambda: any(
                        s in ("Running", "Healthy") for s, _, _ in assignments(name).values()
                    ),
                    60,
                    "a node of wave 0 to run 2.0.0",
                )
                command(name, "abort")
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(60)
            output = log.read_text()
            assert proc.returncode == -signal.SIGKILL, output[-3000:]
            assert f"edgefleet fault point {case.point}: kill (hit {case.hit})" in output
            before_fault = events(name)
            assert not settled(name, scenario), "the kill came too late to matter"

            # A clean worker takes over: beat's tick finds the rollout with work left
            # (a follow-up lost with the worker is due in 0.2 s: the first tick may
            # leave it to that follow-up, which never comes; the next one queues it).
            configure(
                settings.model_copy(update={"tasks_eager": False, "celery_queue": clean_worker})
            )
            with beat():
                wait_for(lambda: settled(name, scenario), 60, f"{name} {FINAL[scenario]} settled")
        assert_consistent(settings, name, scenario, before_fault)
    finally:
        configure(settings)


def test_fault_points_of_the_worker_cover_every_phase_and_command() -> None:
    """At least 20 points, over every step kind and every reverting command."""
    assert len(CASES) >= 20
    assert {c.scenario for c in CASES} == set(FINAL)
    covered = {c.point for c in CASES}
    for point in (
        "rollout.wave.started",
        "rollout.nodes.pushed",
        "rollout.observed",
        "rollout.gate.evaluated",
        "rollout.wave.promoted",
        "rollout.failed",
        "rollout.revert.pushed",
    ):
        assert point in covered


# ---------------------------------------------------------------- the API process


@dataclass(frozen=True)
class ApiCase:
    point: str
    hit: int = 1
    committed: bool = False  # the kill comes after the commit: the apply stands

    def __str__(self) -> str:
        return f"{self.point}-{self.hit}"


API_CASES = [
    ApiCase("manifests.apply.validated"),
    ApiCase("manifests.apply.document", 2),
    ApiCase("manifests.apply.document", 3),
    ApiCase("rollout.apply.claimed"),
    ApiCase("rollout.apply.committed", committed=True),
]


def counts() -> dict[str, int]:
    with session_scope() as s:
        return {
            model.__name__: s.scalar(select(func.count()).select_from(model)) or 0
            for model in (Cluster, Node, Rollout, Wave, Assignment, Event)
        }


@pytest.mark.parametrize("case", API_CASES, ids=str)
def test_api_killed_during_apply(
    case: ApiCase, settings: Settings, committed: None, sim_fleet: None, tmp_path: Path
) -> None:
    register_versions(BASE)
    empty = counts()
    docs = [*(cluster_doc(c, n) for c, n in CLUSTERS), rollout_doc("r", BASE)]
    port = free_port()
    env = {
        "EDGEFLEET_API_PORT": str(port),
        "EDGEFLEET_TASKS_EAGER": "false",
        # No worker listens: a reconcile sent by this API would show in to_reconcile only.
        "EDGEFLEET_CELERY_QUEUE": f"{settings.celery_queue}-api-{next(_queues)}",
        "EDGEFLEET_FAULTS": f"{case.point}={case.hit}*exit",
    }
    log = tmp_path / "api.log"
    with process(
        ["server", "--host", "127.0.0.1"], log, env, "Application startup complete"
    ) as proc:
        with (
            httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=bearer("admin")) as api,
            pytest.raises(httpx.TransportError),
        ):
            api.post(
                "/v1/apply",
                content=yaml.safe_dump_all(docs),
                headers={"content-type": "application/yaml"},
                timeout=30,
            )
        assert proc.wait(30) == 137
    assert f"edgefleet fault point {case.point}: exit (hit {case.hit})" in log.read_text()

    if case.committed:
        # Everything stands, the first step was never sent: beat's tick finds it.
        assert phase("r") == "Pending"
        with session_scope() as s:
            stored = rollout_repo.get(s, "r")
            assert stored is not None
            assert list(rollout_repo.to_reconcile(s)) == [stored.id]
    else:
        assert counts() == empty  # all or nothing: nothing
    # Applying again works, and the rollout runs to the end.
    configure(settings)
    apply_docs(settings, *docs)
    with agents():
        assert drive("r", settings)[-1] == "Succeeded"
    running = running_versions(settings, [c for c, _ in CLUSTERS])
    assert sorted(running) == NODES
    assert set(running.values()) == {BASE}
    reasons = [r for r, _ in events("r")]
    assert reasons.count("Applied") == 1
    assert reasons.count("Started") == 1
    assert reasons.count("Succeeded") == 1


def test_api_killed_during_a_command(
    settings: Settings, committed: None, sim_fleet: None, tmp_path: Path
) -> None:
    """abort recorded in the request's transaction, the API killed before the commit:
    the rollout is as it was, and the abort, sent again, lands once."""
    register_versions(BASE)
    configure(settings.model_copy(update={"tasks_eager": False, "celery_queue": "nobody"}))
    try:
        apply_docs(settings, *(cluster_doc(c, n) for c, n in CLUSTERS), rollout_doc("r", BASE))
    finally:
        configure(settings)
    before = events("r")
    port = free_port()
    env = {
        "EDGEFLEET_API_PORT": str(port),
        "EDGEFLEET_TASKS_EAGER": "false",
        "EDGEFLEET_CELERY_QUEUE": f"{settings.celery_queue}-api-{next(_queues)}",
        "EDGEFLEET_FAULTS": "rollout.command.recorded=exit",
    }
    log = tmp_path / "api.log"
    with process(
        ["server", "--host", "127.0.0.1"], log, env, "Application startup complete"
    ) as proc:
        with (
            httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=bearer("admin")) as api,
            pytest.raises(httpx.TransportError),
        ):
            api.post("/v1/rollouts/r/abort", timeout=30)
        assert proc.wait(30) == 137
    assert "edgefleet fault point rollout.command.recorded: exit (hit 1)" in log.read_text()
    assert phase("r") == "Pending"
    assert events("r") == before
    command("r", "abort")
    assert phase("r") == "Aborted"
    assert [r for r, _ in events("r")].count("Aborted") == 1


def test_worker_killed_after_the_probe_of_a_validation(
    clean_worker: str, settings: Settings, committed: None, tmp_path: Path
) -> None:
    """Killed with the verdict in hand, not recorded: the version stays Validating until
    the sweeper queues it again, and gets exactly one verdict."""
    from controller.registry import samples
    from controller.registry.service import push_version, requeue_stuck

    queue = f"{settings.celery_queue}-fault-{next(_queues)}"
    log = tmp_path / "faulty.log"
    with faulty_worker(log, queue, "registry.validate.probed=kill") as (proc, ready):
        ready()
        configure(settings.model_copy(update={"tasks_eager": False, "celery_queue": queue}))
        try:
            with session_scope() as s:
                push_version(
                    s,
                    artifact_store(settings),
                    name="detector",
                    version=BASE,
                    chunks=[samples.build_cnn()],
                    metadata={},
                )
            assert proc.wait(60) == -signal.SIGKILL
        finally:
            configure(settings)
    assert "edgefleet fault point registry.validate.probed: kill (hit 1)" in log.read_text()

    def status() -> str | None:
        with session_scope() as s:
            return s.scalar(select(ModelVersion.status))

    assert status() == VersionStatus.VALIDATING
    configure(settings.model_copy(update={"tasks_eager": False, "celery_queue": clean_worker}))
    try:
        requeue_stuck(settings.model_copy(update={"stuck_validation_s": 0.001}))
        wait_for(lambda: status() == VersionStatus.READY, 60, "the version validated")
    finally:
        configure(settings)
    with session_scope() as s:
        reasons = s.scalars(select(Event.reason).where(Event.object_name == f"detector:{BASE}"))
        assert list(reasons) == ["Pushed", "Validated"]
