"""All SQL of the fleet: clusters and nodes, and the pull state of pull clusters."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from operator import attrgetter, itemgetter
from typing import Any, NamedTuple, cast

from sqlalchemy import Select, Table, Text, bindparam, func, literal, select, update
from sqlalchemy import cast as sql_cast
from sqlalchemy.orm import Session

from controller.db.arrays import any_of
from controller.db.models import (
    ACTIVE_ROLLOUT_PHASES,
    Assignment,
    Cluster,
    Model,
    ModelVersion,
    Node,
    NodeHealth,
    PullCluster,
    PullDesired,
    Rollout,
)


def get_cluster(session: Session, name: str) -> Cluster | None:
    return session.scalar(select(Cluster).where(Cluster.name == name))


def lock_cluster(session: Session, name: str) -> Cluster | None:
    return session.scalar(select(Cluster).where(Cluster.name == name).with_for_update())


def workload_count(session: Session, cluster_id: int) -> int:
    """How many workloads the cluster's nodes are meant to run."""
    return (
        session.scalar(
            select(func.count())
            .select_from(Assignment)
            .join(Node, Node.id == Assignment.node_id)
            .where(Node.cluster_id == cluster_id, Assignment.desired_version_id.is_not(None))
        )
        or 0
    )


def cluster_workloads(session: Session, cluster_id: int) -> dict[str, list[str]]:
    """Per model, the cluster's nodes that run (or are meant to run) a workload of it."""
    rows = session.execute(
        select(Model.name, Node.name)
        .join(Assignment, Assignment.model_id == Model.id)
        .join(Node, Node.id == Assignment.node_id)
        .where(
            Node.cluster_id == cluster_id,
            (Assignment.desired_version_id.is_not(None))
            | (Assignment.observed_version_id.is_not(None)),
        )
        .order_by(Model.name, Node.name)
    ).all()
    out: dict[str, list[str]] = {}
    for model, node in rows:
        out.setdefault(model, []).append(node)
    return out


def active_rollouts_on(session: Session, cluster_id: int) -> list[str]:
    """The rollouts not over yet that hold nodes of the cluster."""
    return list(
        session.scalars(
            select(Rollout.name)
            .join(Assignment, Assignment.rollout_id == Rollout.id)
            .join(Node, Node.id == Assignment.node_id)
            .where(Node.cluster_id == cluster_id, Rollout.phase.in_(ACTIVE_ROLLOUT_PHASES))
            .distinct()
            .order_by(Rollout.name)
        )
    )


def list_clusters(session: Session) -> Sequence[Cluster]:
    return session.scalars(select(Cluster).order_by(Cluster.name)).all()


def node_counts(session: Session) -> dict[int, dict[str, int]]:
    out: dict[int, dict[str, int]] = {}
    for row in session.execute(
        select(Node.cluster_id, Node.health, func.count()).group_by(Node.cluster_id, Node.health)
    ):
        out.setdefault(row[0], {})[row[1]] = row[2]
    return out


def nodes_of(session: Session, cluster_id: int) -> dict[str, Node]:
    return {n.name: n for n in session.scalars(select(Node).where(Node.cluster_id == cluster_id))}


class NodeFacts(NamedTuple):
    """What planning a rollout reads of a node (the whole fleet at once)."""

    id: int
    cluster: str
    name: str
    labels: dict[str, str]
    architecture: str | None
    allocatable: dict[str, Any]
    runtimes: list[str]
    health: str
    cpu_model: str | None


def _shared_json() -> Callable[[str | None], Any]:
    """A parser of JSON documents read as text that parses each distinct document once
    and hands the same object to every row that holds it (read-only): nodes of one kind
    share their allocatable resources and runtimes."""
    shared: dict[str, Any] = {}

    def parse(raw: str | None) -> Any:
        if raw is None:
            return None
        doc = shared.get(raw)
        if doc is None:
            doc = shared[raw] = json.loads(raw)
        return doc

    return parse


def node_facts(session: Session) -> list[NodeFacts]:
    """Every node, by cluster and node name (code point order): plain rows of the
    columns a plan reads. Loading ORM objects (every column, four JSON documents,
    identity-map state) cost 30 times more at 100,000 nodes. The JSON documents come as
    text and are parsed here: nodes of one kind share their allocatable resources and
    runtimes, so each distinct document is parsed once, and the parsed documents are
    shared between rows: read-only."""
    rows = session.execute(
        select(
            Node.id,
            Cluster.name,
            Node.name,
            sql_cast(Node.labels, Text),
            Node.architecture,
            sql_cast(Node.allocatable, Text),
            sql_cast(Node.runtimes, Text),
            Node.health,
            Node.cpu_model,
        ).join(Cluster, Cluster.id == Node.cluster_id)
    )
    parse = _shared_json()

    loads = json.loads
    facts = [
        NodeFacts(
            r[0],
            r[1],
            r[2],
            loads(r[3]) if r[3] is not None else {},
            r[4],
            parse(r[5]) or {},
            parse(r[6]) or [],
            r[7],
            r[8],
        )
        for r in rows
    ]
    # Sorted here, not by the database: its collation-aware sort of 100,000 names took
    # longer than the rest of the query (and orders differently on each backend).
    facts.sort(key=_BY_KEY)
    return facts


_BY_KEY = attrgetter("cluster", "name")


class NodeRow(NamedTuple):
    """A node as ``GET /v1/nodes`` lists it (``NodeOut``'s fields)."""

    cluster: str
    name: str
    health: str
    architecture: str | None
    labels: dict[str, Any]
    allocatable: dict[str, Any]
    runtimes: list[Any]
    last_heartbeat_at: datetime | None


def _node_rows(rows: Iterable[Any]) -> list[NodeRow]:
    """Rows of (cluster, name, health, architecture, labels, allocatable, runtimes,
    last_heartbeat_at), the JSON documents as text: parsed here, each distinct
    allocatable and runtimes document once (nodes of a kind share them; the parsed
    documents are shared between rows, read-only). Loading a page of 1,000 as ORM
    objects, psycopg decoding four documents a node, took 40-50 ms; this, 13."""
    parse = _shared_json()

    return [
        NodeRow(
            r[0],
            r[1],
            r[2],
            r[3],
            json.loads(r[4]) if r[4] else {},
            parse(r[5]) or {},
            parse(r[6]) or [],
            r[7],
        )
        for r in rows
    ]


def _listed(cluster_name: Any) -> Select[Any]:
    return select(
        cluster_name,
        Node.name,
        Node.health,
        Node.architecture,
        sql_cast(Node.labels, Text),
        sql_cast(Node.allocatable, Text),
        sql_cast(Node.runtimes, Text),
        Node.last_heartbeat_at,
    )


def list_nodes(
    session: Session, *, cluster: str | None, limit: int, offset: int
) -> tuple[list[NodeRow], int]:
    """A page of nodes by cluster name, then node name (of one cluster, or the fleet),
    and how many there are. The work is bounded by the page, not by its offset: the
    clusters' node counts (one aggregate over the ``(cluster_id, name)`` index) tell
    which clusters the page falls in, and only their nodes are read. An ORDER BY over
    the join with an OFFSET read and sorted every node before it instead: 250 ms for the
    last page of 100,000 nodes (bench/bench_reads.py)."""
    clusters = select(Cluster.id, Cluster.name).order_by(Cluster.name)
    per_cluster = select(Node.cluster_id, func.count()).group_by(Node.cluster_id)
    if cluster is not None:
        clusters = clusters.where(Cluster.name == cluster)
        per_cluster = per_cluster.join(Cluster).where(Cluster.name == cluster)
    counts: dict[int, int] = {int(cid): int(n) for cid, n in session.execute(per_cluster).all()}
    total = sum(counts.values())
    spanned: list[tuple[int, str]] = []
    skip, wanted = offset, limit
    first_offset = 0
    for cid, name in session.execute(clusters).all():
        have = counts.get(cid, 0)
        if not spanned and skip >= have:
            skip -= have
            continue
        if not spanned:
            first_offset, have = skip, have - skip
        spanned.append((cid, name))
        wanted -= have
        if wanted <= 0:
            break
    if not spanned:
        return [], total
    if len(spanned) == 1:  # by the (cluster_id, name) index, in its order
        ((cid, name),) = spanned
        stmt = _listed(literal(name)).where(Node.cluster_id == cid).order_by(Node.name)
    else:
        stmt = (
            _listed(Cluster.name)
            .join(Cluster, Cluster.id == Node.cluster_id)
            .where(any_of(Node.cluster_id, [cid for cid, _ in spanned]))
            .order_by(Cluster.name, Node.name)
        )
    rows = session.execute(stmt.limit(limit).offset(first_offset))
    return _node_rows(rows), total


def get_node(session: Session, cluster: str, node: str) -> Node | None:
    """One node by its cluster's name and its own (read only, no lock)."""
    return session.scalar(
        select(Node).join(Cluster).where(Cluster.name == cluster, Node.name == node)
    )


def nodes_by_key(session: Session, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Node]:
    wanted = set(keys)
    if not wanted:
        return {}
    clusters = {c for c, _ in wanted}
    names = {n for _, n in wanted}
    rows = session.execute(
        select(Node, Cluster.name)
        .join(Cluster)
        .where(any_of(Cluster.name, clusters), any_of(Node.name, names))
        .order_by(Node.id)  # (locked in id order, as ingestion locks them: no deadlock)
        .with_for_update(of=Node)
    )
    return {(r[1], r[0].name): r[0] for r in rows if (r[1], r[0].name) in wanted}


def mark_silent_nodes(session: Session, *, stale_before: datetime, offline_before: datetime) -> int:
    """Nodes that have sent heartbeats before but stopped: Stale, then Offline."""
    offline = session.execute(
        update(Node)
        .where(Node.last_heartbeat_at < offline_before, Node.health != NodeHealth.OFFLINE)
        .values(health=NodeHealth.OFFLINE)
    )
    stale = session.execute(
        update(Node)
        .where(
            Node.last_heartbeat_at < stale_before,
            Node.last_heartbeat_at >= offline_before,
            Node.health == NodeHealth.READY,
        )
        .values(health=NodeHealth.STALE)
    )
    return int(getattr(offline, "rowcount", 0)) + int(getattr(stale, "rowcount", 0))


# --- heartbeat ingestion: Core statements (no ORM unit of work on the hot path) ----------

_NODES = cast(Table, Node.__table__)
_CLUSTERS = cast(Table, Cluster.__table__)
_ASSIGNMENTS = cast(Table, Assignment.__table__)
_MODELS = cast(Table, Model.__table__)
_VERSIONS = cast(Table, ModelVersion.__table__)


@dataclass
class AssignedWorkload:
    """One assignment of a node, as heartbeat ingestion needs it."""

    id: int
    desired_sha256: str | None
    metrics: dict[str, Any]


@dataclass
class IngestNode:
    """A node row locked for heartbeat ingestion, with its assignments by model name."""

    id: int
    cluster: str
    name: str
    last_seq: int
    credential_hash: str | None
    benchmarks_pending: int
    workloads: dict[str, AssignedWorkload] = field(default_factory=dict)


@dataclass(frozen=True)
class NodeSeen:
    """What heartbeats change on a node row (besides health and last_heartbeat_at)."""

    last_seq: int
    cpu_model: str | None
    """None keeps the stored one."""


def lock_nodes_by_key(session: Session, keys: Collection[tuple[str, str]]) -> list[IngestNode]:
    """The nodes named by ``keys`` ((cluster, node)), locked for ingestion."""
    if not keys:
        return []
    wanted = set(keys)
    params = {"clusters": list({c for c, _ in wanted}), "names": list({n for _, n in wanted})}
    found = _ingest_nodes(session, _LOCK_BY_KEY, params)
    return [n for n in found if (n.cluster, n.name) in wanted]


def lock_nodes_by_credential(session: Session, hashes: Collection[str]) -> list[IngestNode]:
    """The nodes holding one of these credential hashes, locked for ingestion."""
    if not hashes:
        return []
    return _ingest_nodes(session, _LOCK_BY_CREDENTIAL, {"hashes": list(set(hashes))})


# Nodes and their assignments in one round trip, the node rows locked FOR UPDATE in id
# order (so that concurrent batches never deadlock on each other). The lock serialises
# concurrent heartbeats of one node: last_seq never moves back. Built once: only the
# array parameters change between executions (one each, however many nodes).
_FOR_INGEST = (
    select(
        _NODES.c.id,
        _CLUSTERS.c.name,
        _NODES.c.name,
        _NODES.c.last_seq,
        _NODES.c.credential_hash,
        _NODES.c.benchmarks_pending,
        _ASSIGNMENTS.c.id,
        _MODELS.c.name,
        _VERSIONS.c.sha256,
        _ASSIGNMENTS.c.metrics,
    )
    .select_from(
        _NODES.join(_CLUSTERS, _CLUSTERS.c.id == _NODES.c.cluster_id)
        .outerjoin(_ASSIGNMENTS, _ASSIGNMENTS.c.node_id == _NODES.c.id)
        .outerjoin(_MODELS, _MODELS.c.id == _ASSIGNMENTS.c.model_id)
        .outerjoin(_VERSIONS, _VERSIONS.c.id == _ASSIGNMENTS.c.desired_version_id)
    )
    .order_by(_NODES.c.id)
    .with_for_update(of=_NODES)
)
_LOCK_BY_KEY = _FOR_INGEST.where(
    any_of(_CLUSTERS.c.name, key="clusters"), any_of(_NODES.c.name, key="names")
)
_LOCK_BY_CREDENTIAL = _FOR_INGEST.where(any_of(_NODES.c.credential_hash, key="hashes"))


def _ingest_nodes(
    session: Session, stmt: Select[Any], params: dict[str, list[str]]
) -> list[IngestNode]:
    nodes: dict[int, IngestNode] = {}
    for row in session.connection().execute(stmt, params):
        node = nodes.get(row[0])
        if node is None:
            node = nodes[row[0]] = IngestNode(row[0], row[1], row[2], row[3], row[4], row[5] or 0)
        if row[6] is not None:
            node.workloads[row[7]] = AssignedWorkload(row[6], row[8], row[9] or {})
    return list(nodes.values())


_NODE_SEEN = (
    update(_NODES)
    .where(_NODES.c.id == bindparam("b_id", type_=_NODES.c.id.type))
    .values(
        last_seq=bindparam("b_seq", type_=_NODES.c.last_seq.type),
        last_heartbeat_at=bindparam("b_at", type_=_NODES.c.last_heartbeat_at.type),
        health=NodeHealth.READY.value,
        cpu_model=func.coalesce(
            bindparam("b_cpu", type_=_NODES.c.cpu_model.type), _NODES.c.cpu_model
        ),
    )
)
# A metric window is written only if its assignment row is free: a row another
# transaction holds (a reconcile step changing it) is skipped, not waited for. A step
# locks the rows it changes flush by flush, in no one order, and an ingest waiting for
# one of them while holding others deadlocked with it. A skipped window is the node's
# latest numbers missed for one heartbeat: the next heartbeat (agent_heartbeat_interval_s
# later) brings a newer window, which replaces the stored one whole anyway.
_ASSIGNMENT_METRICS = (
    update(_ASSIGNMENTS)
    .where(
        _ASSIGNMENTS.c.id
        == select(_ASSIGNMENTS.c.id)
        .where(_ASSIGNMENTS.c.id == bindparam("b_id", type_=_ASSIGNMENTS.c.id.type))
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    .values(metrics=bindparam("b_metrics", type_=_ASSIGNMENTS.c.metrics.type))
)


def write_heartbeats(
    session: Session,
    *,
    nodes: Mapping[int, NodeSeen],
    metrics: Mapping[int, dict[str, Any]],
    now: datetime,
) -> None:
    """Nodes (by id) seen at ``now``: Ready, their last_seq and CPU model; assignments'
    (by id) new metric windows, except for assignment rows locked by another transaction
    (_ASSIGNMENT_METRICS). One executemany each (updated_at is set by the columns'
    onupdate), in id order: concurrent ingests lock node rows in one order, and wait for
    no assignment row, so they never deadlock with each other or with a reconcile step."""
    conn = session.connection()
    if nodes:
        conn.execute(
            _NODE_SEEN,
            [
                {"b_id": i, "b_seq": seen.last_seq, "b_at": now, "b_cpu": seen.cpu_model}
                for i, seen in sorted(nodes.items(), key=itemgetter(0))
            ],
        )
    if metrics:
        conn.execute(
            _ASSIGNMENT_METRICS,
            [{"b_id": i, "b_metrics": m} for i, m in sorted(metrics.items(), key=itemgetter(0))],
        )


def lock_node(session: Session, cluster: str, node: str) -> Node | None:
    return session.scalar(
        select(Node)
        .join(Cluster)
        .where(Cluster.name == cluster, Node.name == node)
        .with_for_update(of=Node)
    )


SITE_LABEL = "site"


def site_nodes(
    session: Session, cluster_id: int, *, site: str | None, limit: int
) -> tuple[Sequence[Node], int]:
    """A cluster's first ``limit`` nodes by name (of one site: its ``site`` label, ""
    for none), and how many there are."""
    where = [Node.cluster_id == cluster_id]
    if site is not None:
        where.append(func.coalesce(Node.labels[SITE_LABEL].as_string(), "") == site)
    total = session.scalar(select(func.count()).select_from(Node).where(*where)) or 0
    rows = session.scalars(select(Node).where(*where).order_by(Node.name).limit(limit)).all()
    return rows, total


def site_health(session: Session) -> dict[tuple[str, str], dict[str, int]]:
    """Node counts per (cluster, site label) and health: one GROUP BY, whatever the
    fleet's size (the dashboard's overview of 10,000 nodes is a few dozen rows). Grouped
    by cluster id, named afterwards: joining every node to its cluster's name took a
    third of the aggregate's time at 100,000 nodes."""
    site = func.coalesce(Node.labels[SITE_LABEL].as_string(), "")
    rows = session.execute(
        select(Node.cluster_id, site, Node.health, func.count()).group_by(
            Node.cluster_id, site, Node.health
        )
    ).all()
    names = dict(session.execute(select(Cluster.id, Cluster.name)).all())
    out: dict[tuple[str, str], dict[str, int]] = {}
    for cluster_id, site_name, health, n in rows:
        if cluster_id in names:
            out.setdefault((names[cluster_id], site_name), {})[health] = int(n)
    return dict(sorted(out.items()))


# --- pull mode ----------------------------------------------------------------------


def pull_state(session: Session, cluster_id: int, *, lock: bool = False) -> PullCluster | None:
    stmt = select(PullCluster).where(PullCluster.cluster_id == cluster_id)
    if lock:
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    return session.scalar(stmt)


def pull_revision(session: Session, cluster: str) -> int | None:
    """The desired revision of a pull cluster by name (None: no pull state yet)."""
    return session.scalar(
        select(PullCluster.revision)
        .join(Cluster, Cluster.id == PullCluster.cluster_id)
        .where(Cluster.name == cluster)
    )


def pull_cluster_by_credential(session: Session, credential_hash: str) -> str | None:
    """The name of the cluster whose agent holds this credential."""
    return session.scalar(
        select(Cluster.name)
        .join(PullCluster, PullCluster.cluster_id == Cluster.id)
        .where(PullCluster.credential_hash == credential_hash)
    )


def pull_desired(session: Session, cluster_id: int) -> Sequence[PullDesired]:
    """The cluster's desired workloads, oldest change first."""
    return session.scalars(
        select(PullDesired)
        .where(PullDesired.cluster_id == cluster_id)
        .order_by(PullDesired.revision, PullDesired.id)
    ).all()
