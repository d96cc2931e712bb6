"""On-node benchmarks: a model version measured on each node class of the fleet.

A node class is what makes a benchmark transferable between nodes: architecture,
accelerator and CPU model (``amd64/none/Intel(R) Xeon(R) Gold 6230``). The accelerator
comes from the node label ``edgefleet.io/accelerator`` (none when absent), the CPU model
from the agent's heartbeat. A node labelled ``edgefleet.io/node-class`` is in that class
instead, for fleets that name their hardware themselves.

A request picks one enrolled, Ready node per class among the selected nodes (spread by a
hash, so two versions are not always measured on the same unlucky node) and leaves a
Pending job for it. The node's agent learns it from its next heartbeat answer, fetches
the job, measures in a child process and posts the result; the row then holds p50/p95/p99
and peak memory for (version, class). Measuring a class again replaces its row.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Mapping
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from controller.audit import record_event
from controller.benchmarks import repository as repo
from controller.benchmarks.schemas import BenchmarkRequestIn
from controller.db.base import utcnow
from controller.db.models import (
    BenchmarkStatus,
    ModelVersion,
    Node,
    NodeBenchmark,
    NodeHealth,
    VersionStatus,
)
from controller.errors import Conflict, InvalidInput, NotFound
from controller.fleet.selectors import selector_matches
from controller.fleet.service import artifact_url
from controller.settings import Settings
from node_agent.contract import BenchmarkJob, BenchmarkResult

NODE_CLASS_LABEL = "edgefleet.io/node-class"
ACCELERATOR_LABEL = "edgefleet.io/accelerator"
_SPACES = re.compile(r"\s+")
_REVISION = re.compile(r"\s+Rev\s+[0-9.]+$", re.IGNORECASE)


def node_class(architecture: str | None, labels: Mapping[str, str], cpu_model: str | None) -> str:
    named = labels.get(NODE_CLASS_LABEL)
    if named:
        return named
    # Board revisions ("Raspberry Pi 4 Model B Rev 1.4") are the same hardware class.
    cpu = _REVISION.sub("", _SPACES.sub(" ", cpu_model)).strip() if cpu_model else ""
    accelerator = labels.get(ACCELERATOR_LABEL) or "none"
    return f"{architecture or 'unknown'}/{accelerator}/{cpu or 'unknown'}"[:300]


def class_of(node: Node) -> str:
    return node_class(node.architecture, node.labels or {}, node.cpu_model)


def _in_flight(row: NodeBenchmark, nodes: dict[int, Node], now: datetime, stuck_s: float) -> bool:
    """A job still worth waiting for: its node is there and Ready, and it is not older
    than ``stuck_s`` (an agent that died mid-benchmark never answers)."""
    if row.status not in (BenchmarkStatus.PENDING, BenchmarkStatus.RUNNING):
        return False
    node = nodes.get(row.node_id) if row.node_id is not None else None
    if node is None or node.health != NodeHealth.READY:
        return False
    return now - row.updated_at < timedelta(seconds=stuck_s)


def request(
    session: Session,
    version: ModelVersion,
    model: str,
    body: BenchmarkRequestIn,
    *,
    stuck_s: float,
) -> list[NodeBenchmark]:
    """One Pending job per node class of the selected nodes. Classes whose benchmark is
    still in flight keep it; a stuck one (its node gone, not Ready, or silent for
    ``stuck_s``) is handed to a node again."""
    if version.status != VersionStatus.READY:
        raise Conflict(
            f"model version {model}:{version.version} is {version.status}: only a Ready "
            "(validated) version can be benchmarked on nodes"
        )
    classes: dict[str, list[tuple[Node, str]]] = defaultdict(list)
    candidates = repo.candidate_nodes(session)
    nodes = {n.id: n for n, _ in candidates}
    for node, cluster in candidates:
        if node.health != NodeHealth.READY:
            continue
        if not selector_matches(body.selector, cluster, node.labels or {}):
            continue
        classes[class_of(node)].append((node, cluster))
    if not classes:
        raise InvalidInput(
            "no enrolled, Ready node matches the selector: nothing to benchmark on",
            loc=("body", "selector"),
        )
    existing = repo.by_class(session, version.id)
    now = utcnow()
    out = []
    for cls, members in sorted(classes.items()):
        row = existing.get(cls)
        if row is not None and _in_flight(row, nodes, now, stuck_s):
            out.append(row)
            continue
        if row is not None and row.status == BenchmarkStatus.PENDING and row.node_id in nodes:
            stale = nodes[row.node_id]  # never fetched: take it off that node's count
            stale.benchmarks_pending = max(0, (stale.benchmarks_pending or 0) - 1)
        node, cluster = min(
            members,
            key=lambda m: hashlib.sha256(f"{version.sha256}/{m[1]}/{m[0].name}".encode()).digest(),
        )
        if row is None:
            row = NodeBenchmark(model_version_id=version.id, node_class=cls)
            session.add(row)
        row.node_id, row.node_name = node.id, f"{cluster}/{node.name}"
        row.status, row.runs = BenchmarkStatus.PENDING, body.runs
        row.result, row.message = None, None
        row.started_at = row.finished_at = None
        row.updated_at = now
        node.benchmarks_pending = (node.benchmarks_pending or 0) + 1
        out.append(row)
    session.flush()
    record_event(
        session,
        kind="ModelVersion",
        name=f"{model}:{version.version}",
        reason="BenchmarkRequested",
        message=f"on {len(out)} node class(es)",
        data={"classes": {b.node_class: b.node_name for b in out}},
    )
    return out


def jobs_for(session: Session, settings: Settings, node: Node) -> list[BenchmarkJob]:
    """What this node's agent is to measure; handing them out marks them Running."""
    now = utcnow()
    jobs = []
    for row, version, model in repo.open_jobs(session, node.id):
        if row.status == BenchmarkStatus.PENDING:
            row.status, row.started_at = BenchmarkStatus.RUNNING, now
        jobs.append(
            BenchmarkJob(
                id=row.id,
                model=model,
                version=version.version,
                sha256=version.sha256,
                format="tflite" if version.format == "tflite" else "onnx",
                artifact_url=artifact_url(settings, model, version.version),
                runs=row.runs,
                metadata=dict(version.meta or {}),
            )
        )
    node.benchmarks_pending = 0
    return jobs


def record(
    session: Session, node: Node, benchmark_id: int, result: BenchmarkResult
) -> tuple[NodeBenchmark, ModelVersion]:
    row = repo.lock(session, benchmark_id)
    if row is None or row.node_id != node.id:
        raise NotFound(f"no benchmark job {benchmark_id} for node {node.name}")
    if row.status not in (BenchmarkStatus.PENDING, BenchmarkStatus.RUNNING):
        raise Conflict(f"benchmark job {benchmark_id} is already {row.status}")
    if result.ok and (result.p50_ms is None or result.p95_ms is None):
        raise InvalidInput("a successful benchmark needs p50_ms and p95_ms", loc=("body",))
    now = utcnow()
    if row.status == BenchmarkStatus.PENDING:  # answered without a fetch: count it fetched
        node.benchmarks_pending = max(0, (node.benchmarks_pending or 0) - 1)
        row.started_at = now
    row.status = BenchmarkStatus.SUCCEEDED if result.ok else BenchmarkStatus.FAILED
    row.result = result.model_dump(mode="json", exclude_none=True)
    row.message = result.error
    row.finished_at = now
    version = session.get(ModelVersion, row.model_version_id)
    assert version is not None
    record_event(
        session,
        kind="ModelVersion",
        name=f"{version.model.name}:{version.version}",
        reason="BenchmarkSucceeded" if result.ok else "BenchmarkFailed",
        message=(
            f"{row.node_class} on {row.node_name}: p50 {result.p50_ms} ms, p95 {result.p95_ms} ms"
            if result.ok
            else f"{row.node_class} on {row.node_name}: {result.error}"
        ),
        data={"node_class": row.node_class, "result": row.result},
    )
    return row, version
