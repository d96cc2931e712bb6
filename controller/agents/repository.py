"""All SQL of the agents domain: nodes by key and by credential."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.db.models import Cluster, Node


def node_by_key(session: Session, cluster: str, node: str) -> Node | None:
    return session.scalar(
        select(Node)
        .join(Cluster)
        .where(Cluster.name == cluster, Node.name == node)
        .with_for_update(of=Node)
    )


def node_by_credential_hash(session: Session, credential_hash: str) -> tuple[Node, str] | None:
    """The node holding this credential, locked: ingestion re-reads the row, and a
    concurrent request for the same node must not interleave with its last_seq."""
    row = session.execute(
        select(Node, Cluster.name)
        .join(Cluster)
        .where(Node.credential_hash == credential_hash)
        .with_for_update(of=Node)
    ).first()
    return (row[0], row[1]) if row is not None else None


def node_name_by_credential_hash(session: Session, credential_hash: str) -> tuple[str, str] | None:
    """(node, cluster) holding this credential, without a lock (a read-only check)."""
    row = session.execute(
        select(Node.name, Cluster.name).join(Cluster).where(Node.credential_hash == credential_hash)
    ).first()
    return (row[0], row[1]) if row is not None else None
