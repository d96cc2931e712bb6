"""Fleet: clusters (applied from manifests), their nodes (synced from the driver) and
what the nodes' agents report (heartbeats)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, object_session
from sqlalchemy.orm.util import identity_key

from controller import faults
from controller.audit import record_event
from controller.crypto import decrypt_json, encrypt_json, fingerprint
from controller.db.base import utcnow
from controller.db.models import (
    Assignment,
    AssignmentState,
    Cluster,
    Model,
    ModelVersion,
    Node,
    NodeHealth,
    Rollout,
)
from controller.errors import Conflict, InvalidInput, NotFound, ServiceUnavailable
from controller.fleet import repository as repo
from controller.fleet.spec import ClusterManifest
from controller.kit.diff import diff
from controller.kit.outcome import ApplyOutcome
from controller.kube.driver import ClusterDriver, DriverError, NodeInventory, WorkloadSpec
from controller.kube.factory import driver_for
from controller.kube.kubeconfig import parse_kubeconfig, server_allowed
from controller.settings import Settings
from node_agent.contract import Heartbeat


def _stored_spec(manifest: ClusterManifest, settings: Settings) -> dict[str, Any]:
    spec = manifest.spec.model_dump(mode="json", exclude_none=True, exclude={"credentials"})
    if spec.get("mode") == "push":  # the default: clusters stored before modes stay equal
        del spec["mode"]
    if manifest.spec.credentials is not None:
        creds = manifest.spec.credentials.model_dump(mode="json", exclude_none=True)
        # Re-applying the same credentials must be "unchanged" without decrypting them.
        spec["credentialsFingerprint"] = fingerprint(creds, settings.secret_key.get_secret_value())
    return spec


def cluster_driver(cluster: Cluster, settings: Settings) -> ClusterDriver:
    creds = (
        decrypt_json(settings.secret_key.get_secret_value(), cluster.credentials)
        if cluster.credentials
        else None
    )
    return driver_for(
        cluster.name, cluster.driver, cluster.spec, settings, creds, session=object_session(cluster)
    )


def check_remote_access(manifest: ClusterManifest, settings: Settings) -> None:
    """The controller's own limits on where a Cluster may point it, before any client is
    built or contacted: insecure TLS only where allowed, servers only on the allow-list."""
    creds = manifest.spec.credentials
    if creds is None:
        return
    loc = ("body", "spec", "credentials")
    access = parse_kubeconfig(creds.kubeconfig) if creds.kubeconfig else None
    if not settings.cluster_allow_insecure_tls:
        if creds.insecureSkipTLSVerify:
            raise InvalidInput(
                "insecureSkipTLSVerify is refused by this controller "
                "(EDGEFLEET_CLUSTER_ALLOW_INSECURE_TLS=false): give caData instead",
                loc=(*loc, "insecureSkipTLSVerify"),
            )
        if access is not None and access.insecure_skip_tls_verify:
            raise InvalidInput(
                "kubeconfig: clusters[].cluster.insecure-skip-tls-verify is refused by this "
                "controller (EDGEFLEET_CLUSTER_ALLOW_INSECURE_TLS=false): give "
                "certificate-authority-data instead",
                loc=(*loc, "kubeconfig"),
            )
    server = manifest.spec.server or (access.server if access is not None else None)
    server_loc = ("body", "spec", "server") if manifest.spec.server else (*loc, "kubeconfig")
    if (
        server is not None
        and server.startswith("http://")
        and not settings.cluster_allow_insecure_tls
    ):
        raise InvalidInput(
            f"API server {server!r}: plain http would send the cluster's credentials in "
            "clear; use https (EDGEFLEET_CLUSTER_ALLOW_INSECURE_TLS=true allows it)",
            loc=server_loc,
        )
    allowlist = settings.cluster_server_allowlist
    if allowlist and server is not None and not server_allowed(server, allowlist):
        raise InvalidInput(
            f"API server {server!r} is not on this controller's allow-list "
            f"(EDGEFLEET_CLUSTER_SERVER_ALLOWLIST: {', '.join(allowlist)})",
            loc=server_loc,
        )


def delete_cluster(
    session: Session, name: str, settings: Settings, *, cascade: bool = False
) -> None:
    """Forget a cluster whose nodes run nothing of ours (409 otherwise: its workloads
    would keep running with no controller to roll them back). Its nodes, their
    assignments and its pull state go with it.

    ``cascade``: first remove its workloads through its driver, synchronously (each call
    bounded by the driver's own timeouts), then forget it; refused while a rollout not
    over holds its nodes (abort it first), and for a pull cluster, whose agent could no
    longer learn that they are gone. A driver error leaves everything as it was (the
    request's transaction rolls back); the removal is idempotent, so it can be asked
    again."""
    cluster = repo.lock_cluster(session, name)
    if cluster is None:
        raise NotFound(f"cluster {name!r} not found")
    removed: dict[str, list[str]] = {}
    if cascade:
        active = repo.active_rollouts_on(session, cluster.id)
        if active:
            raise Conflict(
                f"cluster {name!r} has nodes in rollout(s) not over yet: {', '.join(active)}; "
                "abort them first (edgefleet rollout abort NAME)"
            )
        if cluster.spec.get("mode") == "pull":
            raise Conflict(
                f"cluster {name!r} is in pull mode: its agent removes workloads only when it "
                "fetches that they are gone, and a deleted cluster has nothing to fetch; "
                "remove its workloads first"
            )
        removed = repo.cluster_workloads(session, cluster.id)
        driver = cluster_driver(cluster, settings)
        for model, nodes in removed.items():
            try:
                driver.apply(model, dict.fromkeys(nodes))
            except DriverError as exc:
                raise ServiceUnavailable(
                    f"cluster {name!r}: removing the workloads of model {model!r} failed "
                    f"({exc}); nothing was deleted, ask again"
                ) from exc
        if removed:
            record_event(
                session,
                kind="Cluster",
                name=name,
                reason="WorkloadsRemoved",
                message=", ".join(f"{m} from {len(n)} node(s)" for m, n in removed.items()),
                data={"workloads": {m: n[:100] for m, n in removed.items()}},
            )
    else:
        workloads = repo.workload_count(session, cluster.id)
        if workloads:
            raise Conflict(
                f"cluster {name!r} runs {workloads} workload(s) of edgefleet's on its nodes: "
                "remove them first, or delete with cascade"
            )
    session.delete(cluster)
    record_event(session, kind="Cluster", name=name, reason="Deleted", data={"cascade": cascade})


def apply_cluster(session: Session, manifest: ClusterManifest, settings: Settings) -> ApplyOutcome:
    name = manifest.metadata.name
    spec = _stored_spec(manifest, settings)
    labels = dict(manifest.metadata.labels)
    creds = (
        manifest.spec.credentials.model_dump(mode="json", exclude_none=True)
        if manifest.spec.credentials is not None
        else None
    )
    check_remote_access(manifest, settings)
    # Builds the driver first: an unavailable driver is a 422 before anything is stored.
    driver = driver_for(name, manifest.spec.driver, spec, settings, creds, session=session)
    cluster = repo.get_cluster(session, name)
    if cluster is not None:
        old = {"labels": cluster.labels, "spec": cluster.spec}
        changes = diff(old, {"labels": labels, "spec": spec})
        if not changes:
            return ApplyOutcome("Cluster", name, "unchanged", cluster.generation)
        cluster.generation += 1
        action = "configured"
    else:
        cluster = Cluster(name=name, driver=manifest.spec.driver, generation=1)
        session.add(cluster)
        changes, action = [], "created"
    cluster.driver = manifest.spec.driver
    cluster.labels = labels
    cluster.spec = spec
    cluster.api_server = manifest.spec.server
    if creds is not None:
        cluster.credentials = encrypt_json(settings.secret_key.get_secret_value(), creds)
    else:
        cluster.credentials = None
    session.flush()
    sync_nodes(session, cluster, driver)
    record_event(
        session,
        kind="Cluster",
        name=name,
        reason="Applied",
        message=f"{action} (generation {cluster.generation})",
        data={"changes": changes},
    )
    return ApplyOutcome("Cluster", name, action, cluster.generation, changes)


def sync_nodes(session: Session, cluster: Cluster, driver: ClusterDriver) -> dict[str, int]:
    """Make the node inventory match the driver's: add, update, remove."""
    try:
        driver.check()
        inventory = driver.list_nodes()
    except DriverError as exc:
        cluster.status, cluster.message = "Unreachable", str(exc)
        record_event(
            session, kind="Cluster", name=cluster.name, reason="SyncFailed", message=str(exc)
        )
        return {"added": 0, "updated": 0, "removed": 0}
    existing = repo.nodes_of(session, cluster.id)
    seen: set[str] = set()
    added = updated = 0
    for inv in inventory:
        seen.add(inv.name)
        node = existing.get(inv.name)
        if node is None:
            node = Node(cluster_id=cluster.id, name=inv.name, last_seq=0)
            session.add(node)
            added += 1
        elif _node_fields(node) != _inventory_fields(inv):
            updated += 1
        _apply_inventory(node, inv)
    removed = [node for name, node in existing.items() if name not in seen]
    for node in removed:
        session.delete(node)
    cluster.status, cluster.message = "Ready", None
    cluster.last_sync_at = utcnow()
    session.flush()
    counts = {"added": added, "updated": updated, "removed": len(removed)}
    if any(counts.values()):
        record_event(
            session,
            kind="Cluster",
            name=cluster.name,
            reason="NodesSynced",
            message=", ".join(f"{v} {k}" for k, v in counts.items()),
            data={"removed": sorted(n.name for n in removed)[:100]},
        )
    return counts


def _inventory_fields(inv: NodeInventory) -> tuple[Any, ...]:
    return (
        dict(inv.labels),
        inv.architecture,
        dict(inv.capacity),
        dict(inv.allocatable),
        list(inv.runtimes),
    )


def _node_fields(node: Node) -> tuple[Any, ...]:
    return (node.labels, node.architecture, node.capacity, node.allocatable, node.runtimes)


def _apply_inventory(node: Node, inv: NodeInventory) -> None:
    node.labels = dict(inv.labels)
    node.architecture = inv.architecture
    node.capacity = dict(inv.capacity)
    node.allocatable = dict(inv.allocatable)
    node.runtimes = list(inv.runtimes)
    if node.last_heartbeat_at is None:  # no agent yet: the cluster's Ready condition
        node.health = NodeHealth.READY if inv.ready else NodeHealth.NOT_READY


def set_node_health(session: Session, cluster: str, node: str, health: NodeHealth) -> Node:
    found = repo.nodes_by_key(session, [(cluster, node)]).get((cluster, node))
    if found is None:
        raise NotFound(f"node {cluster}/{node} not found")
    found.health = health
    return found


@dataclass
class IngestResult:
    accepted: int = 0
    duplicates: int = 0
    unknown_nodes: list[str] = field(default_factory=list)


# Keys of Assignment.metrics that the reconciler observes in the cluster or records
# itself (not reported by agents): a heartbeat replaces the agent's window but keeps
# these. converging_since: when a node back from offline was told to switch
# (rollouts/convergence.py Convergence).
OBSERVED_KEYS = ("restarts", "converging_since")


class HeartbeatFold:
    """Heartbeats folded into locked node rows (repository.lock_nodes_by_*), then
    written with one statement per table: node health and last_seq, and each
    assignment's metric window (the last accepted heartbeat's). Sequence numbers make
    replays harmless: a heartbeat at or below the node's last_seq is a duplicate."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        self.nodes: dict[int, repo.NodeSeen] = {}
        self.metrics: dict[int, dict[str, Any]] = {}

    def apply(self, node: repo.IngestNode, beat: Heartbeat) -> bool:
        """Fold one heartbeat of ``node`` in; False for a duplicate."""
        if beat.seq <= node.last_seq:
            return False
        node.last_seq = beat.seq
        earlier = self.nodes.get(node.id)
        # The CPU model is part of the node class benchmarks are kept per.
        cpu_model = beat.status.cpu_model or (earlier.cpu_model if earlier else None)
        self.nodes[node.id] = repo.NodeSeen(beat.seq, cpu_model)
        # When the agent measured, not when it arrived: a window replayed from the
        # offline queue must not pass for fresh evidence (capped at now against clocks
        # running ahead).
        reported_at: str | None = None
        # During a handover (make before break) a node runs two versions of one model
        # for a moment and its agent reports both: the one the node moves to is the
        # evidence, whichever the agent listed last.
        handed_over = {
            r.model
            for r in beat.workloads
            if (w := node.workloads.get(r.model)) is not None and r.sha256 == w.desired_sha256
        }
        for report in beat.workloads:
            found = node.workloads.get(report.model)
            if found is None:
                continue
            if report.model in handed_over and report.sha256 != found.desired_sha256:
                continue
            if reported_at is None:
                reported_at = min(beat.sent_at.astimezone(UTC), self.now).isoformat()
            metrics: dict[str, Any] = {
                "sha256": report.sha256,
                "version": report.version,
                "state": report.state,
                "reported_at": reported_at,
                "on_desired": report.sha256 == found.desired_sha256,
            }
            if report.metrics is not None:
                metrics.update(report.metrics.model_dump(exclude_none=True))
                metrics["error_rate"] = report.metrics.error_rate
            for key in OBSERVED_KEYS:  # what the controller observed itself stays
                if key in found.metrics:
                    metrics[key] = found.metrics[key]
            found.metrics = self.metrics[found.id] = metrics
        return True

    def write(self, session: Session) -> None:
        repo.write_heartbeats(session, nodes=self.nodes, metrics=self.metrics, now=self.now)
        _expire_loaded(session, self.nodes.keys(), self.metrics.keys())


def _expire_loaded(
    session: Session, node_ids: Iterable[int], assignment_ids: Iterable[int]
) -> None:
    """The rows were written with Core statements: a Node or Assignment this session
    had loaded is reloaded on its next access instead of showing the old values."""
    if not session.identity_map:
        return
    for cls, ids in ((Node, node_ids), (Assignment, assignment_ids)):
        for pk in ids:
            loaded = session.identity_map.get(identity_key(cls, pk))
            if loaded is not None:
                session.expire(loaded)


def ingest_heartbeats(
    session: Session, beats: Sequence[Heartbeat], *, now: datetime | None = None
) -> IngestResult:
    """Fold agents' heartbeats into node health and per-assignment metric windows, in
    one transaction for the whole batch. Sequence numbers make replays harmless."""
    result = IngestResult()
    nodes = {
        (n.cluster, n.name): n
        for n in repo.lock_nodes_by_key(session, {(b.cluster, b.node) for b in beats})
    }
    fold = HeartbeatFold(now or utcnow())
    for beat in sorted(beats, key=lambda b: (b.cluster, b.node, b.seq)):
        node = nodes.get((beat.cluster, beat.node))
        if node is None:
            result.unknown_nodes.append(f"{beat.cluster}/{beat.node}")
        elif fold.apply(node, beat):
            result.accepted += 1
        else:
            result.duplicates += 1
    fold.write(session)
    faults.point("fleet.heartbeat.folded")
    return result


def mark_silent_nodes(session: Session, settings: Settings, *, now: datetime | None = None) -> int:
    """Nodes whose agent has been silent longer than ``node_stale_s`` turn Stale, longer
    than ``node_offline_s`` Offline, as of ``now`` (default: the current time)."""
    now = now or utcnow()
    return repo.mark_silent_nodes(
        session,
        stale_before=now - timedelta(seconds=settings.node_stale_s),
        offline_before=now - timedelta(seconds=settings.node_offline_s),
    )


def resync_cluster(session: Session, name: str, settings: Settings) -> dict[str, int]:
    cluster = repo.get_cluster(session, name)
    if cluster is None:
        raise NotFound(f"cluster {name!r} not found")
    return sync_nodes(session, cluster, cluster_driver(cluster, settings))


def reset_node(session: Session, cluster: str, node: str) -> Node:
    """Forget a node's agent credential: the agent's next request is refused, and the
    node may enrol again (after a reinstall, or when its credential leaked)."""
    found = repo.lock_node(session, cluster, node)
    if found is None:
        raise NotFound(f"node {cluster}/{node} not found")
    was_enrolled = found.credential_hash is not None
    found.credential_hash = None
    session.flush()
    record_event(
        session,
        kind="Node",
        name=f"{cluster}/{node}",
        reason="NodeReset",
        message="credential revoked; the node may enrol again"
        if was_enrolled
        else "the node had not enrolled; nothing to revoke",
    )
    return found


def resync_all(session: Session, settings: Settings) -> dict[str, dict[str, int]]:
    out = {}
    for cluster in repo.list_clusters(session):
        try:
            out[cluster.name] = sync_nodes(session, cluster, cluster_driver(cluster, settings))
        except Exception as exc:  # one broken cluster must not stop the others
            cluster.status, cluster.message = "Error", str(exc)[:500]
    return out


# States in which an assignment's desired version is settled and must hold on the node;
# Pending/Applying/Failed belong to an active rollout step, Deferred nodes are offline.
_SETTLED = (AssignmentState.RUNNING, AssignmentState.HEALTHY, AssignmentState.ROLLED_BACK)


def repair_drift(session: Session, settings: Settings) -> dict[str, list[str]]:
    """Make every cluster run what the assignments say, whatever happened behind our
    back (a DaemonSet deleted or edited, a node label changed). Each repair is an event."""
    rows = session.execute(
        select(Assignment, Node.name, Cluster, Model.name, ModelVersion)
        .join(Node, Node.id == Assignment.node_id)
        .join(Cluster, Cluster.id == Node.cluster_id)
        .join(Model, Model.id == Assignment.model_id)
        .outerjoin(ModelVersion, ModelVersion.id == Assignment.desired_version_id)
        .where(Assignment.state.in_(_SETTLED), Node.health == NodeHealth.READY)
    ).all()
    groups: dict[tuple[str, str], list[Any]] = {}
    clusters: dict[str, Cluster] = {}
    for row in rows:
        clusters[row[2].name] = row[2]
        groups.setdefault((row[2].name, row[3]), []).append(row)
    repaired: dict[str, list[str]] = {}
    for (cluster_name, model), members in groups.items():
        driver = cluster_driver(clusters[cluster_name], settings)
        try:
            seen = driver.observe(model, [m[1] for m in members])
        except DriverError as exc:
            record_event(
                session,
                kind="Cluster",
                name=cluster_name,
                reason="DriftCheckFailed",
                message=str(exc),
            )
            continue
        desired: dict[str, WorkloadSpec | None] = {}
        drifted = []
        for assignment, node, _cluster, _model, version in members:
            obs = seen.get(node)
            want_sha = version.sha256 if version is not None else None
            have_sha = obs.sha256 if obs is not None and obs.phase != "Absent" else None
            if want_sha != have_sha:
                drifted.append(node)
                desired[node] = (
                    _workload_for(session, model, version, settings, assignment)
                    if version
                    else None
                )
        if not drifted:
            continue
        try:
            driver.apply(model, desired)
        except DriverError as exc:
            record_event(
                session,
                kind="Cluster",
                name=cluster_name,
                reason="DriftRepairFailed",
                message=f"{model}: {exc}",
                data={"nodes": sorted(drifted)[:100]},
            )
            continue
        repaired[f"{cluster_name}/{model}"] = sorted(drifted)
        record_event(
            session,
            kind="Cluster",
            name=cluster_name,
            reason="DriftRepaired",
            message=f"{model}: {len(drifted)} node(s) did not run their assigned version; restored",
            data={"model": model, "nodes": sorted(drifted)[:100]},
        )
    return repaired


def artifact_url(settings: Settings, model: str, version: str) -> str:
    """Where edge nodes download a version's artifact (the controller's public URL)."""
    return f"{settings.public_url.rstrip('/')}/v1/models/{model}/versions/{version}/artifact"


def build_workload(
    model: str,
    version: ModelVersion,
    settings: Settings,
    *,
    rollout: str,
    resources: dict[str, Any],
) -> WorkloadSpec:
    """The workload of one model version, as every driver receives it."""
    return WorkloadSpec(
        model=model,
        version=version.version,
        sha256=version.sha256,
        format=version.format,
        artifact_url=artifact_url(settings, model, version.version),
        rollout=rollout,
        resources=resources,
        warmup_inputs=dict((version.meta or {}).get("validation") or {}),
    )


def _workload_for(
    session: Session, model: str, version: ModelVersion, settings: Settings, assignment: Assignment
) -> WorkloadSpec:
    shipped_by = assignment.shipped_by
    rollout = session.get(Rollout, shipped_by) if shipped_by is not None else None
    return build_workload(
        model,
        version,
        settings,
        rollout=rollout.name if rollout is not None else "",
        resources=(rollout.spec if rollout is not None else {}).get("resources", {}),
    )
