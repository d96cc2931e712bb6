"""``edgefleet demo``: the whole controller on embedded defaults (SQLite, in-process
tasks, simulated clusters), with a scenario that plays out on the dashboard:

1. three simulated sites (16 nodes, two architectures) and three model versions, each
   really validated and benchmarked in onnxruntime / LiteRT;
2. rollout ``detector-1-1`` moves every node to 1.1.0 wave by wave and succeeds;
3. rollout ``detector-1-2`` ships 1.2.0, a much heavier network: its measured latency
   breaks the p95 gate on the canary wave and the controller rolls it back by itself;
4. an int8 variant of 1.1.0 is derived (a real quantization job, with its comparison
   report), both are benchmarked per node class (the simulated agents answer the jobs),
   and rollout ``detector-1-1-auto`` (``variants: auto``) ships, per class, the faster.

The simulated agents report each node's latency from the version's *measured* benchmark
(its p50, scaled for the node's architecture, with noise and a tail), so the gate
decision is real.

The terminal tells the story and nothing else: a header per act, one line per decision
with its numbers, a live table of the waves while a rollout runs (on a terminal; a log
or a pipe gets the lines alone), a closing summary. The logs go to a file unless
``--verbose``."""

from __future__ import annotations

import itertools
import logging
import os
import random
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from rich.live import Live
from rich.table import Table
from sqlalchemy import func, select

from controller.agents import service as agents
from controller.agents.simulated import RunningWorkload, report_running
from controller.audit import acting_as
from controller.auth.service import create_token
from controller.benchmarks import service as benchmarks
from controller.benchmarks.schemas import BenchmarkRequestIn
from controller.cli.config import save_context
from controller.cli.output import console
from controller.db import migrate
from controller.db.models import (
    Assignment,
    BenchmarkStatus,
    Cluster,
    Event,
    Node,
    NodeBenchmark,
    Role,
    Rollout,
    Wave,
)
from controller.db.session import dispose_engines, session_scope
from controller.manifests.builders import RESOURCES, fleet, rollout
from controller.manifests.service import apply_documents
from controller.optimizations import service as optimizations
from controller.registry import repository as repo
from controller.registry import samples, service
from controller.registry.store import artifact_store
from controller.registry.tflite_builder import build_tflite_mlp
from controller.rollouts import reconciler as rollouts
from controller.settings import Settings, get_settings
from controller.tasks.celery_app import configure
from node_agent.contract import BenchmarkResult, InferenceMetrics

log = logging.getLogger("edgefleet.demo")

SEED: list[tuple[str, str, Callable[[], bytes], dict[str, Any]]] = [
    ("detector", "1.0.0", lambda: samples.build_cnn(seed=0), {"labels": {"task": "classify"}}),
    ("detector", "1.1.0", lambda: samples.build_cnn(seed=1), {"labels": {"task": "classify"}}),
    (
        "detector",
        "1.2.0",
        lambda: samples.build_cnn(seed=2, channels=48, size=96),
        {"labels": {"task": "classify", "note": "heavier backbone"}},
    ),
    (
        "keyword-scorer",
        "0.3.0",
        samples.build_sequence_scorer,
        {"validation": {"dims": {"seq": 32}}},
    ),
    ("sensor-mlp", "2.0.0", build_tflite_mlp, {"labels": {"runtime": "tflite"}}),
]

ARCH_SLOWDOWN = {"amd64": 1.0, "arm64": 2.5}
VARIANT = "1.1.0-int8"
ROLLOUTS = ("detector-1-1", "detector-1-2", "detector-1-1-auto")
TERMINAL = ("RolledBack", "Succeeded", "Failed", "Aborted")


def _cluster(name: str, nodes: int, arch: str) -> dict[str, Any]:
    node = {"architecture": arch, "cpu": "4", "memory": "4Gi"}
    return fleet(name, nodes, prefix=f"{name}-node", node=node, labels={"region": "eu"})


def _rollout(name: str, version: str, gate_ms: float, bake: str) -> dict[str, Any]:
    return rollout(
        name,
        version,
        resources=RESOURCES,
        strategy={
            "steps": [
                {"nodes": 1, "bake": bake},
                {"percent": 25, "bake": bake},
                {"percent": 60, "bake": bake},
                {"percent": 100},
            ],
            "maxUnavailable": "25%",
        },
        gates={
            "maxP95LatencyMs": round(gate_ms, 3),
            "maxErrorRate": 0.01,
            "minHealthyRatio": 0.9,
            "minSamples": 20,
        },
        onFailure="rollback",
    )


def seed_models(settings: Settings) -> None:
    store = artifact_store(settings)
    for name, version, build, meta in SEED:
        with session_scope() as session:
            if repo.get_version(session, name, version) is None:
                service.push_version(
                    session, store, name=name, version=version, chunks=[build()], metadata=meta
                )


# A node's p95 as the simulated agents report it: its p50 times this. The validation's
# own p95 of a model that runs in 50 µs is the machine's scheduling jitter more than the
# model (2 ms against a p50 of 0.05 ms on a loaded CI machine, while the heavy model's
# was 6.6 ms): derived from it, the gate once passed the heavy model on every wave. The
# p50s keep the two networks' 30-fold difference.
TAIL = 1.5


def _p50(version: str) -> float:
    with session_scope() as s:
        mv = repo.get_version(s, "detector", version)
        if mv is None or not mv.benchmark:
            raise RuntimeError(f"detector {version} has no benchmark (validation failed?)")
        return float(mv.benchmark["p50_ms"])


class SimulatedAgents:
    """What the node agents would send: for every node running a workload, the
    version's measured latency scaled by the node's architecture, with noise."""

    def __init__(self, seed: int = 7) -> None:
        self._rng = random.Random(seed)
        self._seq = itertools.count(int(time.time() * 1000))

    def _metrics(self, w: RunningWorkload) -> InferenceMetrics:
        bench = w.version.benchmark or {}
        scale = ARCH_SLOWDOWN.get(w.architecture or "amd64", 1.0) * self._rng.uniform(0.9, 1.2)
        p50 = float(bench.get("p50_ms", 1.0)) * scale
        return InferenceMetrics(window_s=10, samples=50, errors=0, p50_ms=p50, p95_ms=p50 * TAIL)

    def report_once(self) -> int:
        return report_running(self._metrics, self._seq)

    def enroll(self, settings: Settings) -> None:
        """Every simulated node enrols as its agent would (a credential per node)."""
        token = settings.agent_join_token
        assert token is not None
        with session_scope() as s:
            rows = s.execute(
                select(Node.name, Cluster.name).join(Cluster).where(Node.credential_hash.is_(None))
            ).all()
            for node, cluster in rows:
                agents.enroll(
                    s, settings, cluster=cluster, node=node, join_token=token.get_secret_value()
                )

    def answer_benchmarks(self, settings: Settings) -> int:
        """Each node with benchmark jobs fetches and answers them, with the version's
        measured registry benchmark scaled for the node's architecture (with noise)."""
        answered = 0
        with session_scope() as s:
            node_ids = s.scalars(
                select(NodeBenchmark.node_id)
                .where(NodeBenchmark.status == BenchmarkStatus.PENDING)
                .distinct()
            ).all()
            for node_id in node_ids:
                node = s.get(Node, node_id)
                if node is None:
                    continue
                for job in benchmarks.jobs_for(s, settings, node):
                    mv = repo.get_version(s, job.model, job.version)
                    bench = (mv.benchmark if mv else None) or {}
                    scale = ARCH_SLOWDOWN.get(node.architecture or "amd64", 1.0)
                    scale *= self._rng.uniform(0.95, 1.05)
                    result = BenchmarkResult(
                        ok=True,
                        runs=job.runs,
                        p50_ms=round(float(bench.get("p50_ms", 1.0)) * scale, 4),
                        p95_ms=round(float(bench.get("p95_ms", 1.0)) * scale, 4),
                        p99_ms=round(float(bench.get("p99_ms", 1.0)) * scale, 4),
                        peak_rss_bytes=bench.get("peak_rss_bytes"),
                        machine=node.architecture,
                        cpu="simulated",
                    )
                    benchmarks.record(s, node, job.id, result)
                    answered += 1
        return answered


# The events that tell the demo's story, one line each; the rest (every node batch's
# move, every benchmark) stays in the event log and `edgefleet describe rollout`.
STORY = (
    "Applied",
    "Validated",
    "ValidationFailed",
    "Started",
    "WaveStarted",
    "GatePassed",
    "GateFailed",
    "ProgressDeadlineExceeded",
    "RollingBack",
    "Succeeded",
    "VariantDerived",
)


def _gate_numbers(data: dict[str, Any]) -> str:
    """The numbers a gate decided on: the slowest p95 against its limit."""
    gate = data.get("gate") or {}
    p95, limit = gate.get("max_p95_ms"), (gate.get("limits") or {}).get("maxP95LatencyMs")
    if p95 is None or limit is None:
        return ""
    return f"; slowest p95 {p95:.3f} ms {'<=' if p95 <= limit else '>'} gate {limit:g} ms"


def wave_table(name: str) -> Table:
    """The waves of one rollout: their nodes' states and the slowest p95 against the gate."""
    with session_scope() as s:
        r = s.scalars(select(Rollout).where(Rollout.name == name)).one()
        limit = r.spec.get("gates", {}).get("maxP95LatencyMs")
        rows = s.execute(
            select(Assignment.wave_id, Assignment.state, Assignment.metrics).where(
                Assignment.rollout_id == r.id
            )
        ).all()
        waves = s.scalars(select(Wave).where(Wave.rollout_id == r.id).order_by(Wave.index)).all()
        table = Table(title=f"{name}: {r.phase}", title_justify="left")
        for col in ("wave", "phase", "nodes", "states", "slowest p95 ms", "gate ms"):
            table.add_column(col)
        for w in waves:
            mine = [row for row in rows if row.wave_id == w.id]
            states: dict[str, int] = {}
            for row in mine:
                states[row.state] = states.get(row.state, 0) + 1
            p95s = [row.metrics["p95_ms"] for row in mine if row.metrics.get("p95_ms") is not None]
            table.add_row(
                str(w.index),
                w.phase,
                str(w.node_count),
                ", ".join(f"{k} {v}" for k, v in sorted(states.items())),
                f"{max(p95s):.3f}" if p95s else "-",
                f"{limit:g}" if limit is not None else "-",
            )
    return table


class Narrator:
    """Prints the story as it happens: a header per act, each new event of the kinds in
    STORY in order, and on a terminal a live table of the running rollout's waves."""

    def __init__(self) -> None:
        self.seen = 0
        self.live: Live | None = None
        self.watching: str | None = None

    def act(self, title: str) -> None:
        console.print()
        console.rule(f"[bold]{title}", align="left")

    def watch(self, rollout_name: str | None) -> None:
        """Show the waves of this rollout live (a terminal only), or stop showing any."""
        self.watching = rollout_name
        if not console.is_terminal:
            return
        if rollout_name is None:
            if self.live is not None:
                self.live.stop()
                self.live = None
            return
        if self.live is None:
            self.live = Live(console=console, transient=True, auto_refresh=False)
            self.live.start()

    def tell(self) -> None:
        with session_scope() as s:
            rows = s.execute(
                select(Event.created_at, Event.object_name, Event.reason, Event.message, Event.data)
                .where(Event.id > self.seen, Event.reason.in_(STORY))
                .order_by(Event.id)
            ).all()
            last = s.scalar(select(func.max(Event.id)))
        for at, name, reason, message, data in rows:
            mix = (data or {}).get("versions")
            if mix:  # a rollout with variants: which version each node class got
                message += "; versions chosen: " + ", ".join(f"{v} x{n}" for v, n in mix.items())
            message += _gate_numbers(data or {})
            console.print(
                f"{at:%H:%M:%S}  {name:<20} {reason:<18} {message}", highlight=False, soft_wrap=True
            )
        self.seen = last or self.seen
        if self.live is not None and self.watching is not None:
            self.live.update(wave_table(self.watching), refresh=True)


class Scenario:
    def __init__(self, settings: Settings, *, bake: str) -> None:
        self.settings = settings
        self.bake = bake
        self.agents = SimulatedAgents()
        self.narrator = Narrator()
        self.stage = 0
        # A gate the light network passes on every architecture and the heavy one
        # misses by far: both numbers were measured when the versions were validated.
        self.gate_ms = 4 * ARCH_SLOWDOWN["arm64"] * TAIL * _p50("1.1.0")

    def apply(self, *docs: dict[str, Any]) -> None:
        with session_scope() as s:
            # The Narrator tells what was applied, from the Applied events.
            apply_documents(
                s,
                list(docs),
                self.settings,
                artifact_store(self.settings),
                dry_run=False,
                may_apply_clusters=True,  # the demo is its own admin
            )

    def phase(self, name: str) -> str | None:
        with session_scope() as s:
            return s.scalar(select(Rollout.phase).where(Rollout.name == name))

    def step(self) -> bool:
        """One beat of the demo; False once the story is told."""
        tell = self.narrator
        if self.stage == 0:
            tell.act("Act 1 · three sites, 16 nodes; model versions validated and benchmarked")
            self.apply(
                _cluster("berlin", 6, "amd64"),
                _cluster("paris", 6, "amd64"),
                _cluster("oslo", 4, "arm64"),
            )
            tell.tell()
            tell.act(
                f"Act 2 · detector 1.1.0, wave by wave, behind a p95 gate of {self.gate_ms:.3f} ms"
            )
            self.apply(_rollout("detector-1-1", "1.1.0", self.gate_ms, self.bake))
            tell.watch("detector-1-1")
            self.stage = 1
        rollouts.tick(self.settings)
        self.agents.report_once()
        if self.stage == 1 and self.phase("detector-1-1") == "Succeeded":
            tell.tell()
            tell.act("Act 3 · detector 1.2.0, a heavier network, behind the same gate")
            self.apply(_rollout("detector-1-2", "1.2.0", self.gate_ms, self.bake))
            tell.watch("detector-1-2")
            self.stage = 2
        if self.stage == 2 and self.phase("detector-1-2") in TERMINAL:
            tell.tell()
            tell.watch(None)
            tell.act("Act 4 · an int8 variant of 1.1.0, benchmarked per node class")
            self.derive_and_benchmark()
            self.stage = 3
        if self.stage == 3:
            self.agents.answer_benchmarks(self.settings)
            if self.benchmarked():
                tell.tell()
                doc = _rollout("detector-1-1-auto", "1.1.0", self.gate_ms, self.bake)
                doc["spec"]["model"]["variants"] = "auto"
                self.apply(doc)
                tell.watch("detector-1-1-auto")
                self.stage = 4
        tell.tell()
        if self.stage == 4 and self.phase("detector-1-1-auto") in TERMINAL:
            if tell.watching is not None:
                tell.watch(None)
                self.summary()
            return False
        return True

    def summary(self) -> None:
        """The decisive numbers of each rollout, and what the variant bought."""
        self.narrator.act("Summary")
        table = Table(box=None, pad_edge=False)
        for col in ("rollout", "phase", "waves passed", "slowest p95 ms", "gate ms"):
            table.add_column(col, no_wrap=True)
        table.add_column("versions")  # on a narrow terminal, the one cell that wraps
        with session_scope() as s:
            for name in ROLLOUTS:
                r = s.scalars(select(Rollout).where(Rollout.name == name)).one()
                passed = sum(1 for w in r.waves if w.phase == "Passed")
                gates = s.scalars(
                    select(Event.data).where(
                        Event.rollout_id == r.id, Event.reason.in_(("GatePassed", "GateFailed"))
                    )
                ).all()
                p95s = [d["gate"]["max_p95_ms"] for d in gates if d["gate"].get("max_p95_ms")]
                applied = s.scalars(
                    select(Event.data)
                    .where(Event.rollout_id == r.id, Event.reason == "Applied")
                    .order_by(Event.id.desc())
                ).first()
                mix = (applied or {}).get("versions") or {r.spec["model"]["version"]: None}
                table.add_row(
                    name,
                    r.phase,
                    f"{passed} of {len(r.waves)}",
                    f"{max(p95s):.3f}" if p95s else "-",
                    f"{r.spec['gates']['maxP95LatencyMs']:g}",
                    ", ".join(v if n is None else f"{v} x{n}" for v, n in mix.items()),
                )
            derived = s.scalars(
                select(Event.message)
                .where(Event.reason == "VariantDerived")
                .order_by(Event.id.desc())
            ).first()
        console.print(table)
        if derived:
            console.print(f"detector {VARIANT}: {derived}", highlight=False, soft_wrap=True)

    def derive_and_benchmark(self) -> None:
        """An int8 variant of 1.1.0 (a real quantization job), then benchmarks of both on
        every node class."""
        store = artifact_store(self.settings)
        with session_scope() as s:
            if repo.get_version(s, "detector", VARIANT) is None:
                optimizations.request_variant(
                    s,
                    store,
                    name="detector",
                    parent="1.1.0",
                    version=VARIANT,
                    method="static-int8",
                    params_json=None,
                    calibration=None,
                )
        self.agents.enroll(self.settings)
        for version in ("1.1.0", VARIANT):
            with session_scope() as s:
                mv = repo.get_version(s, "detector", version)
                if mv is None:
                    raise RuntimeError(f"detector {version} was not derived")
                benchmarks.request(
                    s,
                    mv,
                    "detector",
                    BenchmarkRequestIn(runs=50),
                    stuck_s=self.settings.stuck_validation_s,
                )

    def benchmarked(self) -> bool:
        with session_scope() as s:
            statuses = s.scalars(select(NodeBenchmark.status)).all()
        return bool(statuses) and all(st == BenchmarkStatus.SUCCEEDED for st in statuses)


def _embedded_settings() -> Settings:
    os.environ.setdefault("EDGEFLEET_ENVIRONMENT", "development")
    os.environ.setdefault("EDGEFLEET_DATABASE_URL", "sqlite:///.edgefleet/demo.db")
    get_settings.cache_clear()
    settings = get_settings()
    if settings.redis_url is None:
        settings.tasks_eager = True
    if settings.agent_join_token is None:  # the simulated agents enrol with it
        settings.agent_join_token = SecretStr(secrets.token_urlsafe(24))
    return settings


def _admin_context(url: str) -> tuple[str, Path]:
    """An admin token of the demo's database, saved as the CLI's current context: the
    README's commands work as they are, and every call still carries a token."""
    with acting_as("cli:demo"), session_scope() as s:
        _, token = create_token(
            s, name="demo-admin", role=Role.ADMIN, expires=None, created_by="cli:demo"
        )
    return token, save_context("demo", server=url, token=token)


def _log_to(path: Path | None, *, verbose: bool) -> None:
    """Every log line to ``path`` (or to stderr with ``verbose``): each eager Celery task
    and each heartbeat logs one, and the terminal is for the story."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return
    assert path is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[logging.FileHandler(path, mode="w")],
    )


def run_demo(
    *, port: int, serve: bool, fresh: bool = True, bake: str = "3s", verbose: bool = False
) -> dict[str, str | None]:
    logs = None if verbose else Path(".edgefleet", "demo.log").resolve()
    _log_to(logs, verbose=verbose)
    if logs is not None:
        console.print(f"logs: {logs}", highlight=False, soft_wrap=True)
    settings = _embedded_settings()
    db = settings.database_url.removeprefix("sqlite:///")
    if fresh and settings.database_url.startswith("sqlite:///") and Path(db).exists():
        dispose_engines()
        for suffix in ("", "-wal", "-shm"):
            Path(db + suffix).unlink(missing_ok=True)
    configure(settings)
    migrate.upgrade(settings)
    url = f"http://127.0.0.1:{port}"
    if serve:
        token, config = _admin_context(url)
        console.print(f"[bold]edgefleet demo[/bold] database {settings.database_url}")
        console.print(f"  dashboard {url}/  (sign in with the token below)")
        console.print(f"  API       {url}/docs")
        console.print(f"  CLI       edgefleet get rollouts  (context 'demo' saved to {config})")
        console.print(f"  token     {token}  (admin, this demo's database only)", highlight=False)
    seed_models(settings)
    scenario = Scenario(settings, bake=bake)
    if not serve:
        while scenario.step():
            time.sleep(0.05)
        result = {n: scenario.phase(n) for n in ROLLOUTS}
        if logs is not None:
            console.print(f"logs: {logs}", highlight=False, soft_wrap=True)
        return result

    def loop() -> None:
        told = False
        while True:
            try:
                if not scenario.step():
                    scenario.agents.report_once()
                    if not told:
                        console.print(f"dashboard {url}/  (Ctrl-C stops the demo)")
                        if logs is not None:
                            console.print(f"logs: {logs}", highlight=False, soft_wrap=True)
                        told = True
            except Exception:
                log.exception("demo step failed")
            time.sleep(1.0)

    threading.Thread(target=loop, name="edgefleet-demo", daemon=True).start()
    import uvicorn  # lazy: --no-serve never starts a server

    from controller.api.app import create_app

    uvicorn.run(
        create_app(settings),
        host="127.0.0.1",
        port=port,
        timeout_keep_alive=settings.api_keepalive_timeout_s,
        log_level="info" if verbose else "warning",
        log_config=None,  # uvicorn's lines go where the demo's logs go
    )
    return {}
