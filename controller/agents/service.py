"""Enrolment and authenticated heartbeat ingestion.

An agent proves it belongs to the fleet once, with the controller-wide join token, and
receives a credential of its own node. Only that credential's sha256 is stored: a
database dump does not let anyone speak for a node, and a lookup by hash is an index
probe (the credential is 256 random bits, so a fast hash is as good as a slow one).
Every heartbeat must name the credential's own node, so one compromised node cannot
report for, or silence, another.

Threat model of node identity. Every agent holds the join token, so the join token alone
must not be enough to become a node that already has an identity: enrolment binds a node
once, and a second enrolment of an enrolled node is refused (409) until an admin resets
that node (``edgefleet nodes reset CLUSTER/NODE``, after reinstalling it or when its
credential leaked). What remains open by design: a holder of the join token can claim a
node that has never enrolled (first come, first served), so enrol nodes as they are
installed and keep the join token as secret as the nodes themselves; the events
``AgentEnrolled`` and ``EnrolmentRefused`` show every attempt."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import Counter
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from controller import faults
from controller.agents import repository as repo
from controller.agents.coalesce import Coalescer
from controller.audit import record_event
from controller.db.base import utcnow
from controller.db.models import Node
from controller.db.session import lock_conflict, session_scope
from controller.errors import (
    Conflict,
    EdgefleetError,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    Unauthorized,
)
from controller.fleet import repository as fleet_repo
from controller.fleet.repository import IngestNode
from controller.fleet.service import HeartbeatFold
from controller.kit.transactions import after_commit
from controller.settings import Settings
from node_agent.contract import Heartbeat

HEARTBEATS = Counter(
    "edgefleet_heartbeats_total",
    "Heartbeats received from node agents, by result: accepted, duplicate (a replay), "
    "forbidden (for another node), unauthorized (requests with a bad credential).",
    ["result"],
)
CONFLICTS = Counter(
    "edgefleet_heartbeat_conflicts_total",
    "Heartbeat transactions Postgres aborted over a deadlock or a serialization failure, "
    "run once more instead of failing the requests.",
)


def hash_credential(credential: str) -> str:
    return hashlib.sha256(credential.encode()).hexdigest()


@dataclass(frozen=True)
class Enrollment:
    node: Node
    cluster: str
    credential: str


class AlreadyEnrolled(Conflict):
    """Returned, not raised: the refusal's event must commit with the request."""


def enroll(
    session: Session, settings: Settings, *, cluster: str, node: str, join_token: str
) -> Enrollment | AlreadyEnrolled:
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
    if found.credential_hash is not None:
        record_event(
            session,
            kind="Node",
            name=f"{cluster}/{node}",
            reason="EnrolmentRefused",
            message="the node is already enrolled (reset it to enrol again)",
            actor=f"node:{cluster}/{node}",
        )
        return AlreadyEnrolled(
            f"node {cluster}/{node} is already enrolled: an admin must reset it "
            f"(edgefleet nodes reset {cluster}/{node}) before it can enrol again"
        )
    credential = secrets.token_urlsafe(32)
    found.credential_hash = hash_credential(credential)
    session.flush()
    record_event(
        session,
        kind="Node",
        name=f"{cluster}/{node}",
        reason="AgentEnrolled",
        message="credential issued",
        actor=f"node:{cluster}/{node}",
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
    benchmarks_pending: int = 0


@dataclass(frozen=True)
class HeartbeatRequest:
    """One POST /v1/agents/heartbeat: the sha256 of its bearer credential and its
    heartbeats (validated)."""

    credential_hash: str
    beats: Sequence[Heartbeat]


def receive_heartbeats(
    session: Session, settings: Settings, requests: Sequence[HeartbeatRequest]
) -> list[Receipt | EdgefleetError]:
    """Fold the heartbeats of several requests in, in the session's one transaction,
    each request checked on its own: a request with an unknown or rotated credential
    (401), too many heartbeats (413) or a heartbeat for another node than its
    credential's (403) gets that error and stores nothing; the others are applied.
    Credentials are checked on the node rows this locks for the update, so a credential
    rotated meanwhile cannot write. A replayed batch is harmless: sequence numbers at or
    below the node's last are counted, not applied."""
    nodes = {
        n.credential_hash: n
        for n in fleet_repo.lock_nodes_by_credential(session, {r.credential_hash for r in requests})
    }
    fold = HeartbeatFold(utcnow())
    outcomes: list[Receipt | EdgefleetError] = []
    accepted = duplicates = 0
    for request in requests:
        node = nodes.get(request.credential_hash)
        refused = _refusal(node, request.beats, settings)
        if refused is not None:
            outcomes.append(refused)
            continue
        assert node is not None
        got = 0
        for beat in sorted(request.beats, key=lambda b: b.seq):
            got += fold.apply(node, beat)
        accepted += got
        duplicates += len(request.beats) - got
        outcomes.append(
            Receipt(got, len(request.beats) - got, node.last_seq, node.benchmarks_pending)
        )
    fold.write(session)
    faults.point("agents.heartbeat.folded")
    # Counted once the transaction is durable; a rolled-back batch was not received.
    after_commit(session, lambda: _count(accepted, duplicates))
    return outcomes


def _refusal(
    node: IngestNode | None, beats: Sequence[Heartbeat], settings: Settings
) -> EdgefleetError | None:
    if node is None:
        HEARTBEATS.labels("unauthorized").inc()
        return Unauthorized("unknown or revoked node credential: enrol again")
    if len(beats) > settings.agent_max_batch:
        return PayloadTooLarge(
            f"{len(beats)} heartbeats in one request; at most {settings.agent_max_batch} "
            "(EDGEFLEET_AGENT_MAX_BATCH)"
        )
    own = (node.cluster, node.name)
    others = sorted({f"{b.cluster}/{b.node}" for b in beats if (b.cluster, b.node) != own})
    if others:
        HEARTBEATS.labels("forbidden").inc(len(beats))
        return Forbidden(
            f"the credential of node {node.cluster}/{node.name} cannot report for "
            f"{', '.join(others[:5])}{' …' if len(others) > 5 else ''}"
        )
    return None


def _count(accepted: int, duplicates: int) -> None:
    if accepted:
        HEARTBEATS.labels("accepted").inc(accepted)
    if duplicates:
        HEARTBEATS.labels("duplicate").inc(duplicates)


class HeartbeatIntake:
    """Where the heartbeat endpoint hands requests over: requests arriving together
    (while a transaction is being written, or within ``agent_coalesce_window_ms`` of
    each other) share one transaction; each gets its own receipt or error."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.coalescer: Coalescer[HeartbeatRequest, Receipt] = Coalescer(
            self._handle,
            window_s=settings.agent_coalesce_window_ms / 1000,
            max_weight=settings.agent_coalesce_max_heartbeats,
            split_on_error=_worth_retrying_alone,
            name="edgefleet-heartbeats",
        )

    async def submit(self, credential: str, beats: Sequence[Heartbeat]) -> Receipt:
        """The request's receipt; raises its EdgefleetError (Unauthorized, Forbidden,
        PayloadTooLarge) or the database's error."""
        request = HeartbeatRequest(hash_credential(credential), beats)
        return await self.coalescer.submit(request, weight=max(len(beats), 1))

    def _handle(self, requests: Sequence[HeartbeatRequest]) -> list[Receipt | EdgefleetError]:
        """The batch in one transaction, run once more if Postgres aborted it over a
        deadlock or a serialization failure (the other transaction has gone on by then):
        the agents get their receipts, not a 500 and a retry of their own."""
        try:
            return self._receive(requests)
        except DBAPIError as exc:
            if not lock_conflict(exc):
                raise
            CONFLICTS.inc()
            return self._receive(requests)

    def _receive(self, requests: Sequence[HeartbeatRequest]) -> list[Receipt | EdgefleetError]:
        with session_scope() as session:
            return receive_heartbeats(session, self.settings, requests)

    def close(self) -> None:
        self.coalescer.close()


def _worth_retrying_alone(exc: Exception) -> bool:
    """A batch that failed for one request's sake (a constraint, a deadlock) is retried
    request by request; not when the database is unreachable."""
    return not (isinstance(exc, DBAPIError) and exc.connection_invalidated)
