"""Enrolment and authenticated heartbeat ingestion.

An agent proves it belongs to the fleet once, with the controller-wide join token, and
receives a credential of its own node. Only that credential's sha256 is stored: a
database dump does not let anyone speak for a node, and a lookup by hash is an index
probe (the credential is 256 random bits, so a fast hash is as good as a slow one).
Re-enrolling rotates the credential. Every heartbeat must name the credential's own
node, so one compromised node cannot report for, or silence, another."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import Counter
from sqlalchemy.orm import Session

from controller.agents import repository as repo
from controller.audit import record_event
from controller.db.models import Node
from controller.db.session import after_commit
from controller.errors import (
    Forbidden,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    Unauthorized,
)
from controller.fleet.service import ingest_heartbeats
from controller.settings import Settings
from node_agent.contract import Heartbeat

HEARTBEATS = Counter(
    "edgefleet_heartbeats_total",
    "Heartbeats received from node agents, by result: accepted, duplicate (a replay), "
    "forbidden (for another node), unauthorized (requests with a bad credential).",
    ["result"],
)


def hash_credential(credential: str) -> str:
    return hashlib.sha256(credential.encode()).hexdigest()


@dataclass(frozen=True)
class Enrollment:
    node: Node
    cluster: str
    credential: str


def enroll(
    session: Session, settings: Settings, *, cluster: str, node: str, join_token: str
) -> Enrollment:
    expected = settings.agent_join_token
    if expected is None:
        raise ServiceUnavailable(
            "agent enrolment is disabled: set EDGEFLEET_AGENT_JOIN_TOKEN on the controller"
        )
    # The token is checked before the node is looked up, so nobody without it can probe
    # which node names exist.
    if not hmac.compare_digest(join_token.encode(), expected.get_secret_value().encode()):
        raise Unauthorized("invalid join token")
    found = repo.node_by_key(session, cluster, node)
    if found is None:
        raise NotFound(
            f"node {cluster}/{node} is not known to the controller: apply its Cluster "
            "manifest (or wait for the next node sync) before the agent enrols"
        )
    rotated = found.credential_hash is not None
    credential = secrets.token_urlsafe(32)
    found.credential_hash = hash_credential(credential)
    session.flush()
    record_event(
        session,
        kind="Node",
        name=f"{cluster}/{node}",
        reason="AgentEnrolled",
        message="credential rotated" if rotated else "credential issued",
    )
    return Enrollment(found, cluster, credential)


def authenticate(session: Session, credential: str) -> tuple[Node, str] | None:
    """The node (and its cluster's name) this credential belongs to, locked."""
    found = repo.node_by_credential_hash(session, hash_credential(credential))
    if found is None:
        HEARTBEATS.labels("unauthorized").inc()
    return found


@dataclass(frozen=True)
class Receipt:
    accepted: int
    duplicates: int
    last_seq: int


def receive_heartbeats(
    session: Session,
    settings: Settings,
    node: Node,
    cluster: str,
    beats: Sequence[Heartbeat],
) -> Receipt:
    """Fold one node's heartbeats in (one transaction: the request's). A replayed batch
    is harmless: sequence numbers at or below the node's last are counted, not applied."""
    if len(beats) > settings.agent_max_batch:
        raise PayloadTooLarge(
            f"{len(beats)} heartbeats in one request; at most {settings.agent_max_batch} "
            "(EDGEFLEET_AGENT_MAX_BATCH)"
        )
    others = sorted({f"{b.cluster}/{b.node}" for b in beats} - {f"{cluster}/{node.name}"})
    if others:
        HEARTBEATS.labels("forbidden").inc(len(beats))
        raise Forbidden(
            f"the credential of node {cluster}/{node.name} cannot report for "
            f"{', '.join(others[:5])}{' …' if len(others) > 5 else ''}"
        )
    result = ingest_heartbeats(session, beats)
    # Counted once the transaction is durable; a rolled-back batch was not received.
    accepted, duplicates = result.accepted, result.duplicates
    after_commit(session, lambda: _count(accepted, duplicates))
    return Receipt(accepted=accepted, duplicates=duplicates, last_seq=node.last_seq)


def _count(accepted: int, duplicates: int) -> None:
    if accepted:
        HEARTBEATS.labels("accepted").inc(accepted)
    if duplicates:
        HEARTBEATS.labels("duplicate").inc(duplicates)
