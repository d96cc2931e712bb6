"""Builders for manifests and a stand-in for the node agents: heartbeats with the
inference numbers the gates read, sent through the same ingestion code the heartbeat
endpoint uses."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import httpx
import yaml
from fastapi.testclient import TestClient
from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.orm import Session

from controller.agents.simulated import RunningWorkload, report_running
from controller.db.models import (
    Assignment,
    AssignmentState,
    Cluster,
    Event,
    Model,
    ModelVersion,
    Node,
    Rollout,
    RolloutPhase,
    Wave,
)
from controller.db.session import session_scope
from controller.manifests.builders import RESOURCES, document, rollout, site_labels
from controller.registry import samples
from controller.rollouts import reconciler
from controller.rollouts import repository as repo
from controller.rollouts.repository import Count
from controller.settings import Settings
from node_agent.contract import InferenceMetrics

_seq = itertools.count(1)


def next_seq() -> int:
    """The next heartbeat sequence number of the stand-in agents (a test sending its
    own heartbeats takes them from here, or the agents' next ones are duplicates)."""
    return next(_seq)


def cluster_doc(
    name: str, nodes: int, *, labels: dict[str, str] | None = None, **extra: Any
) -> dict[str, Any]:
    """Simulated cluster ``name`` of nodes listed one by one, ``<name>-n0``, ``<name>-n1``...
    (the names the tests use), retail nodes of site ``name`` (and ``labels``); ``extra``
    adds to the simulated section (``failures``, ``restarts``, ``applyLatency``)."""
    listed = [
        {"name": f"{name}-n{i}", "labels": site_labels(name, **(labels or {}))}
        for i in range(nodes)
    ]
    spec = {"driver": "simulated", "simulated": {"nodes": listed, **extra}}
    return document("Cluster", name, spec, labels={"region": "eu"})


def rollout_doc(name: str, version: str, **spec: Any) -> dict[str, Any]:
    """Three waves (one node, half, all) behind gates a good node passes; ``spec``
    replaces any field."""
    defaults = {
        "resources": RESOURCES,
        "strategy": {
            "steps": [{"nodes": 1}, {"percent": 50}, {"percent": 100}],
            "maxUnavailable": "50%",
        },
        "gates": {
            "maxP95LatencyMs": 40,
            "maxErrorRate": 0.01,
            "minHealthyRatio": 1.0,
            "minSamples": 20,
        },
    }
    return rollout(name, version, **{**defaults, **spec})


def apply(client: httpx.Client, *docs: dict[str, Any], dry_run: bool = False) -> Any:
    """POST documents to /v1/apply (a TestClient or a client of a live server)."""
    return client.post(
        "/v1/apply",
        params={"dryRun": "true"} if dry_run else None,
        content=yaml.safe_dump_all(list(docs)),
        headers={"content-type": "application/yaml"},
    )


def push_versions(client: TestClient, *versions: str) -> None:
    for i, version in enumerate(versions):
        resp = client.post(
            "/v1/models/detector/versions",
            data={"version": version},
            files={"file": ("m.onnx", samples.build_cnn(seed=i), "application/octet-stream")},
        )
        assert resp.status_code == 201, resp.text
        got = client.get(f"/v1/models/detector/versions/{version}").json()
        assert got["status"] == "Ready", got


def rollout_id(name: str) -> int:
    with session_scope() as s:
        rid = s.scalar(select(Rollout.id).where(Rollout.name == name))
        assert rid is not None
        return rid


Metrics = Callable[[str], tuple[float, int]]  # node key -> (p95 ms, errors per 100)


def good(_: str) -> tuple[float, int]:
    return 12.0, 0


def report(metrics: Metrics = good, *, samples_per_node: int = 100) -> int:
    """Every node running a workload reports, as its agent would, the version it runs
    and its numbers (controller/agents/simulated.py). Returns how many heartbeats were
    ingested."""

    def numbers(w: RunningWorkload) -> InferenceMetrics:
        p95, errors = metrics(w.key)
        return InferenceMetrics(
            window_s=60, samples=samples_per_node, errors=errors, p50_ms=p95 / 2, p95_ms=p95
        )

    return report_running(numbers, _seq)


def drive(
    name: str, settings: Settings, *, metrics: Metrics = good, max_steps: int = 60
) -> list[str]:
    """Run reconcile steps (what the worker does), reporting metrics between them,
    until the rollout leaves Pending/Progressing. Returns the phases seen."""
    rid = rollout_id(name)
    phases: list[str] = []
    for _ in range(max_steps):
        phase = reconciler.reconcile(rid, settings)
        assert phase is not None
        phases.append(phase)
        if phase not in ("Pending", "Progressing"):
            return phases
        report(metrics)
    raise AssertionError(f"rollout {name} still {phases[-1]} after {max_steps} steps")


def node_states(name: str) -> dict[str, str]:
    with session_scope() as s:
        rows = s.execute(
            select(Node.name, Assignment.state)
            .join(Assignment, Assignment.node_id == Node.id)
            .join(Rollout, Rollout.id == Assignment.rollout_id)
            .where(Rollout.name == name)
        ).all()
        return {r[0]: r[1] for r in rows}


def wave_nodes(name: str) -> list[list[str]]:
    """The node keys ("cluster/node") of each wave, by wave index, as the database
    holds the plan: a test finds its canary here instead of guessing it."""
    with session_scope() as s:
        rows = s.execute(
            select(Wave.index, Cluster.name, Node.name)
            .join(Rollout, Rollout.id == Wave.rollout_id)
            .join(Assignment, Assignment.wave_id == Wave.id)
            .join(Node, Node.id == Assignment.node_id)
            .join(Cluster, Cluster.id == Node.cluster_id)
            .where(Rollout.name == name)
            .order_by(Wave.index, Cluster.name, Node.name)
        ).all()
        waves: list[list[str]] = []
        for index, cluster, node in rows:
            while len(waves) <= index:
                waves.append([])
            waves[index].append(f"{cluster}/{node}")
        return waves


def wave_phases(name: str) -> list[str]:
    with session_scope() as s:
        return list(
            s.scalars(
                select(Wave.phase)
                .join(Rollout, Rollout.id == Wave.rollout_id)
                .where(Rollout.name == name)
                .order_by(Wave.index)
            )
        )


def running_workloads(settings: Settings, clusters: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The workload each node of the simulated clusters really runs (WorkloadSpec as a
    dict), by node; a node with none is absent."""
    import json

    import redis

    client = redis.Redis.from_url(settings.redis_url or "", decode_responses=True)
    out: dict[str, dict[str, Any]] = {}
    for cluster in clusters:
        data = client.hgetall(f"{settings.sim_state_prefix}:{cluster}:detector")
        for node, raw in data.items():
            out[node] = json.loads(raw)
    client.close()
    return out


def running_versions(settings: Settings, clusters: Iterable[str]) -> dict[str, str | None]:
    """What the simulated clusters really run, per node (None: no workload)."""
    return {n: w["version"] for n, w in running_workloads(settings, clusters).items()}


def rollout_events(name: str) -> list[tuple[str, dict[str, Any]]]:
    """A rollout's events (reason, data), oldest first."""
    with session_scope() as s:
        rows = s.execute(
            select(Event.reason, Event.data)
            .join(Rollout, Rollout.id == Event.rollout_id)
            .where(Rollout.name == name)
            .order_by(Event.id)
        ).all()
    return [(r[0], r[1] or {}) for r in rows]


def state_counts(session: Session, rollout_id: int) -> dict[int | None, dict[str, int]]:
    """Assignment counts per wave id and state (an oracle of repository.tally)."""
    out: dict[int | None, dict[str, int]] = {}
    rows = session.execute(
        select(Assignment.wave_id, Assignment.state, func.count())
        .where(Assignment.rollout_id == rollout_id)
        .group_by(Assignment.wave_id, Assignment.state)
    )
    for wave_id, state, n in rows:
        out.setdefault(wave_id, {})[state] = n
    return out


def target_counts(session: Session, rollout: Rollout) -> dict[str, int]:
    """How many of the rollout's nodes it plans on which version (by name): its own, or
    the variants chosen per node class (an oracle of repository.tally)."""
    target = func.coalesce(Assignment.target_version_id, rollout.model_version_id)
    rows = session.execute(
        select(ModelVersion.version, func.count())
        .select_from(Assignment)
        .join(ModelVersion, ModelVersion.id == target)
        .where(Assignment.rollout_id == rollout.id)
        .group_by(ModelVersion.version)
    )
    return dict(sorted((str(v), int(n)) for v, n in rows.all()))


def counted_oracle(session: Session, rollout_ids: Iterable[int]) -> set[Count]:
    """The rollouts' assignments aggregated by the counted key, from the assignments
    themselves (an oracle of repository.counted, which reads the counts the triggers
    keep)."""
    key = (
        Assignment.rollout_id,
        func.coalesce(Assignment.wave_id, 0),
        Assignment.state,
        func.coalesce(Assignment.target_version_id, 0),
        Assignment.desired_version_id.is_distinct_from(Assignment.previous_version_id),
    )
    rows = session.execute(
        select(*key, func.count())
        .where(Assignment.rollout_id.in_(list(rollout_ids)))
        .group_by(*key)
    )
    return {Count(r[0] or 0, r[1] or None, r[2], r[3] or None, bool(r[4]), r[5]) for r in rows}


def assert_counts_agree(session: Session, *rollout_ids: int) -> None:
    """The rollouts' counts (folded or not) are what their assignments say."""
    ids = list(rollout_ids) or list(session.scalars(select(Rollout.id)))
    assert set(repo.counted(session, ids)) == counted_oracle(session, ids)


def pending_oracle(session: Session, rollout: Rollout) -> int:
    """A settled rollout's nodes not yet where it leaves it, counted over its assignments
    (an oracle of repository.pending_counts)."""
    where = Assignment.rollout_id == rollout.id
    pending: ColumnElement[bool]
    if rollout.phase == RolloutPhase.SUCCEEDED:
        pending = Assignment.state.in_(repo.PENDING_STATES)
    elif rollout.phase in (RolloutPhase.ROLLED_BACK, RolloutPhase.ABORTED):
        pending = and_(
            Assignment.state != AssignmentState.ROLLED_BACK,
            or_(
                Assignment.state != AssignmentState.FAILED,
                Assignment.desired_version_id.is_distinct_from(Assignment.previous_version_id),
            ),
        )
    else:
        return 0
    return int(session.scalar(select(func.count()).where(where, pending)) or 0)


def stored_version(session: Session, model: str, version: str = "1.0.0") -> ModelVersion:
    """A model and one version of it as rows only (no artifact): for tests of what the
    database does with rollouts, their waves and events."""
    row = Model(name=model)
    session.add(row)
    session.flush()
    mv = ModelVersion(
        model_id=row.id, version=version, format="onnx", sha256="a" * 64, size_bytes=1
    )
    session.add(mv)
    session.flush()
    return mv
