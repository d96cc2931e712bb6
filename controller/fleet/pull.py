"""Pull mode, the controller's side of the cluster agent's requests.

A cluster in pull mode is one the controller cannot connect to (NAT, an outbound-only
firewall). Its cluster agent (``edgefleet-agent cluster``) connects out instead:

1. it enrols once with the cluster's own join token, which an admin issued for that
   cluster alone (``POST /v1/clusters/NAME/pull/join-token``, ``edgefleet clusters
   join-token NAME``): single use, expiring (24 h by default), kept as its sha256 and
   shown only once. It receives the cluster's own credential (only its sha256 is stored);
   a second enrolment is refused until an admin resets the cluster
   (``POST /v1/clusters/NAME/pull/reset``) and issues a new join token. Why not the
   fleet's join token, as node agents use: a cluster agent gets the workload rights of a
   whole cluster, and a secret shared by every site would let whoever took it from one
   site enrol as any other pull cluster not enrolled yet;
2. it long-polls the desired state (``GET .../pull/desired?since=REVISION``): the
   answer comes as soon as the revision differs from ``since``, or after
   ``pull_poll_timeout_s`` with ``changed: false``. The objects are the very ones the push
   driver applies (controller/kube/objects.py), rendered here from what the pull driver
   stored (controller/kube/pull.py);
3. it reports its nodes and the inference pods it sees (``POST .../pull/observed``);
   the report syncs the node inventory at once, and the pull driver's ``observe`` reads
   it for the rollout engine and drift repair.

Why a long poll and not a watch stream or a websocket: it is plain HTTP/1.1 that every
proxy and LTE middlebox passes, a dropped connection costs nothing but a new request,
and the resume token makes a retried request exact (no event is lost or applied twice:
the answer is the whole state at a revision). The poll holds no database connection
while it waits, and makes no query: the commit of a new revision wakes it (Postgres
``NOTIFY``, see :func:`wait_for_desired`)."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from controller.audit import record_event
from controller.crypto import mint_artifact_token
from controller.db import notify
from controller.db.base import utcnow
from controller.db.models import Cluster, PullCluster
from controller.db.session import session_scope
from controller.errors import Conflict, InvalidInput, NotFound, Unauthorized
from controller.fleet import repository as repo
from controller.fleet.schemas import JoinTokenOut
from controller.fleet.service import cluster_driver, sync_nodes
from controller.kit.durations import parse_duration
from controller.kube import objects
from controller.kube.driver import WorkloadSpec
from controller.kube.pull import PULL_CHANNEL
from controller.settings import Settings
from node_agent.cluster import handover
from node_agent.cluster.contract import (
    ClusterEnrollOut,
    DesiredState,
    ObservedReport,
    ReportAck,
)

CREDENTIAL_PREFIX = "efc_"
JOIN_TOKEN_PREFIX = "efj_"
JOIN_TOKEN_DEFAULT_TTL = "24h"
JOIN_TOKEN_MIN_TTL_S, JOIN_TOKEN_MAX_TTL_S = 60.0, 7 * 86400.0
# How often a waiting poll looks at the revision again when no listener can wake it.
POLL_CHECK_S = 1.0


def hash_credential(credential: str) -> str:
    return hashlib.sha256(credential.encode()).hexdigest()


def _pull_cluster(session: Session, name: str) -> Cluster:
    cluster = repo.get_cluster(session, name)
    if cluster is None:
        raise NotFound(f"cluster {name!r} not found")
    if cluster.spec.get("mode") != "pull":
        raise Conflict(f"cluster {name!r} is not in pull mode (spec.mode: pull)")
    return cluster


def _state(session: Session, cluster: Cluster) -> PullCluster:
    """The cluster's pull state, locked; made on first use."""
    state = repo.pull_state(session, cluster.id, lock=True)
    if state is None:
        state = PullCluster(cluster_id=cluster.id, revision=0, report={})
        session.add(state)
        session.flush()
    return state


def issue_join_token(session: Session, cluster: str, *, expires: str | None) -> JoinTokenOut:
    """A new join token for the cluster's agent: it enrols that one cluster, once, until it
    expires. Shown only in this answer (the controller keeps its sha256, and no event or
    log line names it); a new one replaces any unused one."""
    lifetime = expires or JOIN_TOKEN_DEFAULT_TTL
    try:
        ttl_s = parse_duration(lifetime)
    except ValueError as exc:
        raise InvalidInput(
            f"expires: {exc}; use a duration such as 1h or 2d", loc=("body", "expires")
        ) from exc
    if not JOIN_TOKEN_MIN_TTL_S <= ttl_s <= JOIN_TOKEN_MAX_TTL_S:
        raise InvalidInput("expires: a join token lives between 1m and 7d", loc=("body", "expires"))
    state = _state(session, _pull_cluster(session, cluster))
    token = JOIN_TOKEN_PREFIX + secrets.token_urlsafe(32)
    replaced = state.join_token_hash is not None
    state.join_token_hash = hash_credential(token)
    state.join_token_expires_at = utcnow() + timedelta(seconds=ttl_s)
    session.flush()
    record_event(
        session,
        kind="Cluster",
        name=cluster,
        reason="ClusterJoinTokenIssued",
        message=f"join token issued, valid until {state.join_token_expires_at:%Y-%m-%d %H:%M} "
        "UTC or its first use" + ("; the unused one before it no longer works" if replaced else ""),
    )
    return JoinTokenOut(cluster=cluster, token=token, expires_at=state.join_token_expires_at)


class AlreadyEnrolled(Conflict):
    """Returned, not raised: the refusal's event must commit with the request."""


class JoinTokenRefused(Unauthorized):
    """Returned, not raised, as AlreadyEnrolled."""


def enroll(
    session: Session, settings: Settings, *, cluster: str, join_token: str
) -> ClusterEnrollOut | AlreadyEnrolled | JoinTokenRefused:
    """Exchange the cluster's join token for its credential. Every refusal of the token
    (an unknown cluster, one not in pull mode, another cluster's token, a used or expired
    one) is the same 401, so the answer tells nobody without a token which names exist;
    the event log of a pull cluster says which it was."""
    refused = JoinTokenRefused(f"invalid, used or expired join token for cluster {cluster!r}")
    found = repo.get_cluster(session, cluster)
    if found is None or found.spec.get("mode") != "pull":
        raise refused
    state = _state(session, found)
    why = None
    if state.join_token_hash is None:
        why = "no unused join token (an admin issues one: edgefleet clusters join-token NAME)"
    elif not secrets.compare_digest(hash_credential(join_token), state.join_token_hash):
        why = "not this cluster's join token"
    elif state.join_token_expires_at is None or state.join_token_expires_at <= utcnow():
        why = "the join token has expired"
    if why is None and state.credential_hash is not None:
        record_event(
            session,
            kind="Cluster",
            name=cluster,
            reason="EnrolmentRefused",
            message="the cluster agent is already enrolled (reset the cluster to enrol again)",
            actor=f"cluster:{cluster}",
        )
        return AlreadyEnrolled(
            f"cluster {cluster} already has an enrolled cluster agent: an admin must reset "
            f"it (POST /v1/clusters/{cluster}/pull/reset) before it can enrol again"
        )
    if why is not None:
        record_event(
            session,
            kind="Cluster",
            name=cluster,
            reason="EnrolmentRefused",
            message=f"cluster agent enrolment refused: {why}",
            actor=f"cluster:{cluster}",
        )
        return refused
    credential = CREDENTIAL_PREFIX + secrets.token_urlsafe(32)
    state.credential_hash = hash_credential(credential)
    state.join_token_hash = state.join_token_expires_at = None  # single use
    session.flush()
    record_event(
        session,
        kind="Cluster",
        name=cluster,
        reason="ClusterAgentEnrolled",
        message="cluster credential issued; the join token is used up",
        actor=f"cluster:{cluster}",
    )
    return ClusterEnrollOut(
        cluster=cluster, credential=credential, poll_timeout_s=settings.pull_poll_timeout_s
    )


def reset(session: Session, cluster: str) -> None:
    """Revoke the cluster agent's credential; it may enrol again."""
    state = _state(session, _pull_cluster(session, cluster))
    was = state.credential_hash is not None
    state.credential_hash = None
    session.flush()
    record_event(
        session,
        kind="Cluster",
        name=cluster,
        reason="ClusterAgentReset",
        message="credential revoked; the cluster agent may enrol again with a new join token"
        if was
        else "no cluster agent had enrolled; nothing to revoke",
    )


def authenticate(session: Session, credential: str) -> str | None:
    """The cluster whose agent holds this credential (None: unknown or revoked)."""
    if not credential.startswith(CREDENTIAL_PREFIX) or len(credential) > 200:
        return None
    return repo.pull_cluster_by_credential(session, hash_credential(credential))


def desired_state(
    session: Session, settings: Settings, cluster: str, *, since: int | None
) -> DesiredState:
    """The cluster's desired state at its current revision; only the Secret and the
    revision when that is ``since`` (nothing changed)."""
    found = _pull_cluster(session, cluster)
    state = _state(session, found)
    state.polled_at = utcnow()
    namespace = str(found.spec.get("namespace", "edgefleet-workloads"))
    token = mint_artifact_token(
        settings.secret_key.get_secret_value(),
        cluster,
        now=time.time(),
        ttl_s=settings.artifact_token_ttl_s,
    )
    out = DesiredState(
        cluster=cluster,
        revision=state.revision,
        changed=state.revision != since,
        namespace=namespace,
        secret=objects.artifact_secret(namespace, token),
        poll_timeout_s=settings.pull_poll_timeout_s,
    )
    if out.changed:
        out.daemonsets, out.services, out.node_labels = _render(
            session, settings, found.id, namespace
        )
    return out


def _render(
    session: Session, settings: Settings, cluster_id: int, namespace: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, dict[str, str | None]]]:
    """The objects the push driver would have applied for the stored desired state: one
    DaemonSet per (model, version) some node should run (the newest spec of it: rows
    come oldest change first), the Service of each model some node should run, and the
    version each node should run of each model (None: none). The previous labels of a
    handover are the cluster agent's to set: it sees the pods turn Ready, the controller
    only hears of it at the next report (node_agent/cluster/handover.py)."""
    specs: dict[tuple[str, str], WorkloadSpec] = {}
    labels: dict[str, dict[str, str | None]] = {}
    for row in repo.pull_desired(session, cluster_id):
        version = None
        if row.workload is not None:
            spec = WorkloadSpec(**row.workload)
            specs[(spec.model, spec.version)] = spec
            version = spec.version
        labels.setdefault(row.node, {})[handover.node_label(row.model)] = version
    daemonsets = [
        objects.daemonset(
            spec, namespace=namespace, image=settings.inference_image, port=settings.inference_port
        )
        for _, spec in sorted(specs.items())
    ]
    # Node-local (internalTrafficPolicy: Local); the agent leaves the field out for an
    # API server older than 1.22, which refuses it, as the push driver does.
    services = [
        objects.service(model, namespace=namespace, port=settings.inference_port)
        for model in sorted({model for model, _ in specs})
    ]
    return daemonsets, services, labels


def _revision(cluster: str) -> int | None:
    with session_scope() as session:
        return repo.pull_revision(session, cluster)


def _desired(settings: Settings, cluster: str, since: int | None) -> DesiredState:
    with session_scope() as session:
        return desired_state(session, settings, cluster, since=since)


async def wait_for_desired(
    settings: Settings, cluster: str, *, since: int | None, wait_s: float | None = None
) -> DesiredState:
    """The long poll: the desired state as soon as its revision differs from ``since``,
    or unchanged after ``wait_s`` (at most ``pull_poll_timeout_s``). A coroutine that
    holds neither a worker thread nor a database connection while it waits.

    It reads the revision once, then sleeps until the commit of a new revision of its
    cluster wakes it (the pull driver's ``NOTIFY``, controller/db/notify.py) or its time
    is up: an idle poll costs that one read and the final answer's. Subscribed before
    the read, so a commit after it cannot be missed. Without a listener (SQLite, or its
    connection down) it checks the revision every ``POLL_CHECK_S`` instead."""
    limit = settings.pull_poll_timeout_s
    wait = limit if wait_s is None else max(0.0, min(wait_s, limit))
    deadline = time.monotonic() + wait
    listener = notify.listener(settings.database_url, PULL_CHANNEL) if since is not None else None
    sub = listener.subscribe(cluster) if listener is not None else None
    try:
        while since is not None:
            current = await run_in_threadpool(_revision, cluster)
            remaining = deadline - time.monotonic()
            if current is None or current != since or remaining <= 0:
                break
            if listener is not None and sub is not None and listener.listening:
                if not await sub.wait(remaining):
                    break  # time is up, and nothing was committed meanwhile
            else:
                await asyncio.sleep(min(POLL_CHECK_S, remaining))
    finally:
        if listener is not None and sub is not None:
            listener.unsubscribe(cluster, sub)
    return await run_in_threadpool(_desired, settings, cluster, since)


def receive_report(
    session: Session, settings: Settings, cluster: str, report: ObservedReport
) -> ReportAck:
    """Store the agent's report, and sync the node inventory from it at once when it
    changed (beat's resync would reach it within minutes; a new site's nodes should not
    wait for that). A report with the same nodes writes one row: reports come every few
    seconds, and node rows are what heartbeat ingestion locks. An apply error is an
    event when it first appears, not at every report."""
    found = _pull_cluster(session, cluster)
    state = _state(session, found)
    names = [n.name for n in report.nodes]
    if len(set(names)) != len(names):
        raise InvalidInput("duplicate node names in the report", loc=("body", "nodes"))
    previous = state.report or {}
    state.report = report.model_dump(mode="json")
    state.reported_at = utcnow()
    state.applied_revision = report.applied_revision
    session.flush()
    if report.apply_error and report.apply_error != previous.get("apply_error"):
        record_event(
            session,
            kind="Cluster",
            name=cluster,
            reason="PullApplyFailed",
            message=report.apply_error,
            data={"revision": report.applied_revision},
        )
    if state.report["nodes"] != previous.get("nodes") or found.status != "Ready":
        sync_nodes(session, found, cluster_driver(found, settings))
    if report.apply_error:
        found.message = f"cluster agent: {report.apply_error}"[:500]
    return ReportAck(revision=state.revision)
