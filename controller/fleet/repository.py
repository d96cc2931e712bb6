"""All SQL of the fleet: clusters and nodes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from controller.db.models import Cluster, Node, NodeHealth


def get_cluster(session: Session, name: str) -> Cluster | None:
    return session.scalar(select(Cluster).where(Cluster.name == name))


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


def all_nodes(session: Session) -> Sequence[tuple[Node, str]]:
    rows = session.execute(
        select(Node, Cluster.name).join(Cluster).order_by(Cluster.name, Node.name)
    )
    return [(row[0], row[1]) for row in rows]


def list_nodes(
    session: Session, *, cluster: str | None, limit: int, offset: int
) -> tuple[Sequence[tuple[Node, str]], int]:
    base = select(Node, Cluster.name).join(Cluster)
    count = select(func.count()).select_from(Node).join(Cluster)
    if cluster is not None:
        base = base.where(Cluster.name == cluster)
        count = count.where(Cluster.name == cluster)
    rows = session.execute(base.order_by(Cluster.name, Node.name).limit(limit).offset(offset))
    return [(r[0], r[1]) for r in rows], session.scalar(count) or 0


def nodes_by_key(session: Session, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Node]:
    wanted = set(keys)
    if not wanted:
        return {}
    clusters = {c for c, _ in wanted}
    names = {n for _, n in wanted}
    rows = session.execute(
        select(Node, Cluster.name)
        .join(Cluster)
        .where(Cluster.name.in_(clusters), Node.name.in_(names))
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
