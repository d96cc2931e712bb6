"""What every reconcile step stands on: the rollout's rows read once, its clusters'
drivers, the workloads to push, observations, node moves, and the revert (rollback, abort,
undo) that a failed wave and a failed convergence share.

The step's jobs are split by module, each a class on top of the one before:
``step.StepBase`` (this: plumbing and the revert) < ``step_schedule.ScheduledStep``
(maintenance windows and freezes) < ``waves.Step`` (a Progressing rollout's waves, gates,
promotion and failure); ``convergence.Convergence`` (a Succeeded rollout's nodes back from
offline) stands on ``ScheduledStep``. ``reconciler.py`` picks the kind, runs it under the
rollout's row lock and queues the next step."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from controller import faults
from controller.audit import record_event
from controller.db.models import (
    AssignmentState,
    Cluster,
    ModelVersion,
    NodeHealth,
    Rollout,
    RolloutPhase,
)
from controller.fleet import repository as fleet_repo
from controller.fleet.service import build_workload, cluster_driver
from controller.kube.driver import ClusterDriver, DriverError, ObservedWorkload, WorkloadSpec
from controller.rollouts import repository as repo
from controller.rollouts.repository import Row
from controller.rollouts.spec import RolloutSpec
from controller.rollouts.state import move
from controller.settings import Settings

log = logging.getLogger(__name__)
P, A = RolloutPhase, AssignmentState

OFFLINE = (NodeHealth.OFFLINE, NodeHealth.STALE, NodeHealth.NOT_READY)
# The message of a reverted node that is offline (Step._verify_reverted).
_OFFLINE_NOTE = "node offline: its previous version is pushed and is verified once it is back"


class StepBase:
    """One reconcile step of one rollout, inside its row lock."""

    def __init__(
        self, session: Session, rollout: Rollout, settings: Settings, now: datetime
    ) -> None:
        self.s = session
        self.r = rollout
        self.settings = settings
        self.now = now
        self.spec = RolloutSpec.model_validate(rollout.spec)
        self.rows = repo.rows_of(session, rollout.id)
        self.target: ModelVersion = session.get(ModelVersion, rollout.model_version_id)  # type: ignore[assignment]
        self._drivers: dict[str, ClusterDriver] = {}
        self.unobserved: dict[str, str] = {}  # cluster -> why this step could not observe it
        # cluster -> its permanent refusal to observe (403, 404, ...) this step
        self.refusing: dict[str, str] = {}
        # DriverError keys the rollout's latest events hold (driver_error), read once.
        self._said_errors: list[dict[str, Any]] | None = None
        self._versions: dict[int, ModelVersion] = {self.target.id: self.target}
        self.resources = self.spec.resources.model_dump(mode="json", exclude_none=True)
        # Other rollouts' resources by id (previous_workload); None: that rollout is gone.
        self._resources: dict[int, dict[str, Any] | None] = {}
        chosen = {r.assignment.target_version_id for r in self.rows} - {None, self.target.id}
        self._versions.update(repo.versions_by_id(session, {v for v in chosen if v is not None}))

    def target_of(self, row: Row) -> ModelVersion:
        """The version this rollout plans for the row's node: the rollout's own, or the
        variant chosen for the node's class."""
        chosen = row.assignment.target_version_id
        return self._versions[chosen] if chosen is not None else self.target

    # -- plumbing

    def event(self, *, reason: str, message: str, data: dict[str, Any] | None = None) -> None:
        record_event(
            self.s,
            kind="Rollout",
            name=self.r.name,
            rollout_id=self.r.id,
            reason=reason,
            message=message,
            data=data,
        )

    def driver(self, cluster: str) -> ClusterDriver:
        if cluster not in self._drivers:
            row = fleet_repo.get_cluster(self.s, cluster)
            assert isinstance(row, Cluster)
            self._drivers[cluster] = cluster_driver(row, self.settings)
        return self._drivers[cluster]

    def workload(
        self, version_id: int | None, resources: dict[str, Any] | None = None
    ) -> WorkloadSpec | None:
        if version_id is None:
            return None
        if version_id not in self._versions:
            self._versions.update(repo.versions_by_id(self.s, {version_id}))
        return build_workload(
            self.spec.model.name,
            self._versions[version_id],
            self.settings,
            rollout=self.r.name,
            resources=self.resources if resources is None else resources,
        )

    def target_workload(self, row: Row) -> WorkloadSpec | None:
        return self.workload(self.target_of(row).id)

    def previous_workload(self, row: Row) -> WorkloadSpec | None:
        """The version a node returns to, as it ran before this rollout: under the
        resources of the rollout that had shipped it. Its pod template is then the one
        its pods run, so a rollback restarts none of them, on this node or on the nodes
        this rollout never touched (one DaemonSet per version). Unknown (that rollout
        deleted since): this rollout's resources."""
        a = row.assignment
        return self.workload(a.previous_version_id, self._resources_of(a.previous_rollout_id))

    def _resources_of(self, rollout_id: int | None) -> dict[str, Any] | None:
        if rollout_id is None or rollout_id == self.r.id:
            return None
        if rollout_id not in self._resources:
            spec = repo.spec_of(self.s, rollout_id)
            self._resources[rollout_id] = None if spec is None else spec.get("resources", {})
        return self._resources[rollout_id]

    def by_cluster(self, rows: Iterable[Row]) -> dict[str, list[Row]]:
        out: dict[str, list[Row]] = defaultdict(list)
        for row in rows:
            out[row.cluster].append(row)
        return out

    def push(
        self,
        rows: Sequence[Row],
        workload_of: Callable[[Row], WorkloadSpec | None],
        *,
        count_transient: bool = False,
    ) -> list[Row]:
        """Send each row's workload (``target_workload``, ``previous_workload``) to its
        cluster. Returns the rows whose cluster refused permanently; transient errors
        are retried next step. A revert passes ``count_transient``: its rows are done
        only where the call landed, and the rows returned are retried until it does."""
        refused: list[Row] = []
        for cluster, group in self.by_cluster(rows).items():
            desired = {r.node.name: workload_of(r) for r in group}
            try:
                self.driver(cluster).apply(self.spec.model.name, desired)
            except DriverError as exc:
                self.driver_error(
                    f"cluster {cluster}: {exc}",
                    {"cluster": cluster, "call": "apply", "transient": exc.transient},
                    nodes=len(group),
                )
                if count_transient or not exc.transient:
                    refused.extend(group)
        return refused

    def observations(self, rows: Iterable[Row]) -> Iterator[tuple[Row, ObservedWorkload]]:
        """What each row's cluster reports of its node, one observe call per cluster.
        An unanswered observe says nothing about the nodes: they hold where they are, the
        next step observes again and the progress deadline bounds the wait. The error is
        recorded, and a deadline that fails the wave names it, so the operator sees why
        the nodes never showed up Ready. A permanent one is remembered in ``refusing``:
        a wave's step fails the nodes it hides (Waves.observe)."""
        for cluster, group in self.by_cluster(rows).items():
            try:
                seen = self.driver(cluster).observe(
                    self.spec.model.name, [r.node.name for r in group]
                )
            except DriverError as exc:
                self.observe_failed(cluster, len(group), exc)
                continue
            for r in group:
                obs = seen.get(r.node.name)
                if obs is not None:
                    yield r, obs

    def blind(self, rows: Iterable[Row]) -> dict[str, str]:
        """The clusters of ``rows`` this step could not observe, with their errors."""
        return {
            c: self.unobserved[c] for c in sorted({r.cluster for r in rows}) if c in self.unobserved
        }

    @staticmethod
    def could_not_observe(blind: Mapping[str, str]) -> str:
        """``blind`` (see :meth:`blind`) as a message's tail."""
        return "; could not observe " + "; ".join(f"cluster {c} ({e})" for c, e in blind.items())

    @staticmethod
    def refused_note(cluster: str, error: str) -> str:
        """A node's message where its cluster refused for good to report it."""
        return f"cluster {cluster} refused to report it: {error}"

    def observe_failed(self, cluster: str, nodes: int, exc: DriverError) -> None:
        """A cluster that could not be observed this step: logged, remembered (a progress
        deadline that fails the wave names it) and recorded as an event."""
        log.warning("observe %s failed: %s", cluster, exc)
        self.unobserved[cluster] = str(exc)
        if not exc.transient:
            self.refusing[cluster] = str(exc)
        self.driver_error(
            f"cluster {cluster}: observe failed: {exc}",
            {"cluster": cluster, "call": "observe", "transient": exc.transient},
            nodes=nodes,
        )

    def driver_error(self, message: str, key: dict[str, Any], *, nodes: int) -> None:
        """A ``DriverError`` event, unless the rollout's latest events already say it:
        the same cluster, call and kind of error, with nothing else recorded since. A
        cluster that stays unreachable would otherwise add one at every step (beat steps
        a held revert every 10 s: 8,640 a day), burying the events that matter; the
        rollout's message and status name the cluster meanwhile. Once anything else
        happens, the next error is recorded again."""
        if self._said_errors is None:
            self._said_errors = [
                {k: d.get(k) for k in key}
                for d in repo.trailing_data(self.s, self.r.id, "DriverError")
            ]
        if key in self._said_errors:
            log.debug("%s (recorded already; not again)", message)
            return
        self._said_errors.append(key)
        self.event(reason="DriverError", message=message, data={**key, "nodes": nodes})

    def wave_rows(self, index: int) -> list[Row]:
        wave_id = self.r.waves[index].id
        return [r for r in self.rows if r.assignment.wave_id == wave_id]

    def in_state(self, rows: Iterable[Row], *states: str) -> list[Row]:
        return [r for r in rows if r.assignment.state in states]

    def moved(
        self,
        rows: Iterable[Row],
        to: AssignmentState,
        reason: str,
        messages: dict[int, str] | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        move(
            self.s,
            self.r,
            [(r.assignment, r.key) for r in rows],
            to,
            reason=reason,
            messages=messages,
            data=data,
        )

    # -- reverting (rollback, abort, undo)

    def revert(self) -> None:
        """Every node the rollout touched goes back to its previous version, and counts
        as back (RolledBack) only once its cluster shows that version Ready there (or,
        where the node ran none, no workload): until then it is Reverting, pushed again
        and observed at every step, so the bad version serves nowhere longer than the
        handover takes, not until drift repair. A node the rollout never touched still
        runs its previous version: it is released at once. An offline node stays
        Reverting (status.pending counts it) until it is back and seen; a node whose
        previous version fails there is Failed, saying why, and nothing more is tried."""
        rows = [r for r in self.rows if r.assignment.state != A.ROLLED_BACK]
        untouched = [r for r in rows if _never_touched(r)]
        targets = [r for r in rows if r not in untouched and not revert_failed(r)]
        refused = self.push(targets, self.previous_workload, count_transient=True)
        faults.point("rollout.revert.pushed")
        self.moved(untouched, A.ROLLED_BACK, "RolledBack")
        landed = [r for r in targets if r not in refused]
        for r in landed:
            r.assignment.desired_version_id = r.assignment.previous_version_id
        started = [r for r in landed if r.assignment.state != A.REVERTING]
        self.moved(started, A.REVERTING, "Reverting", data=self._previous_of(started))
        verified = self._verify_reverted(self.in_state(rows, A.REVERTING))
        faults.point("rollout.revert.recorded")
        self._say_revert(refused, changed=bool(untouched or verified))

    def _previous_of(self, rows: Iterable[Row]) -> dict[str, Any]:
        """The version each node returns to (None: it ran none), for its Event."""
        versions = sorted(
            (r.key, self._version_name(r.assignment.previous_version_id)) for r in rows
        )
        return {"versions": dict(versions[:500])}

    def _verify_reverted(self, rows: list[Row]) -> bool:
        """Reverting rows seen on their previous version become RolledBack, those whose
        previous version fails Failed; an offline node is not asked (what its cluster
        last heard of it proves nothing). True when any row moved."""
        offline = [r for r in rows if r.node.health in OFFLINE]
        for r in offline:
            r.assignment.message = _OFFLINE_NOTE
        back: list[Row] = []
        failed: dict[int, str] = {}
        for r, obs in self.observations([r for r in rows if r not in offline]):
            previous = r.assignment.previous_version_id
            if previous is None:
                if obs.phase == "Absent":
                    back.append(r)
                continue
            sha = self._version(previous).sha256
            if obs.phase == "Ready" and obs.sha256 == sha:
                back.append(r)
            elif obs.phase == "Failed" and obs.sha256 == sha:
                failed[r.assignment.id] = (
                    f"its previous version {self._version(previous).version} failed "
                    f"({obs.reason or 'failed'}) after the revert; it stays there"
                )
        for r in back:
            r.assignment.observed_version_id = r.assignment.previous_version_id
            if r.assignment.message == _OFFLINE_NOTE:
                r.assignment.message = None
        self.moved(back, A.ROLLED_BACK, "RolledBack", data=self._previous_of(back))
        broken = [r for r in rows if r.assignment.id in failed]
        self.moved(broken, A.FAILED, "RevertFailed", failed, data=self._previous_of(broken))
        return bool(back or broken)

    def _say_revert(self, refused: list[Row], *, changed: bool) -> None:
        """The rollout's message says how far the revert is; the step that finishes
        it records ``RollbackComplete`` (with the nodes still offline or failed)."""
        rows = self.rows
        offline = [r for r in self.in_state(rows, A.REVERTING) if r.node.health in OFFLINE]
        failed = [r for r in self.in_state(rows, A.FAILED) if revert_failed(r)]
        left = [r for r in rows if reverting_left(r)]
        if refused:
            self.r.message = f"revert incomplete: {len(refused)} node(s) not reached yet, retrying"
            return
        if left:
            self.r.message = (
                f"reverting: {len(left)} node(s) not yet seen on their previous version"
            )
            # A cluster that cannot tell (unreachable, or refusing: a 403 waits for its
            # RBAC to be repaired) is named: the wait is on its side, not the rollout's.
            blind = self.blind(left)
            if blind:
                self.r.message += self.could_not_observe(blind)
            return
        notes = []
        if offline:
            notes.append(f"{len(offline)} offline node(s) reverted once they are back")
        if failed:
            notes.append(f"{len(failed)} node(s) failing on their previous version")
        message = "every node the rollout touched runs its previous version again" + (
            f", except {' and '.join(notes)}" if notes else ""
        )
        if self.r.message == message or not changed:
            return
        self.r.message = message
        self.event(
            reason="RollbackComplete",
            message=message,
            data={
                "offline": [r.key for r in offline][:500],
                "failed": {r.key: r.assignment.message for r in failed[:500]},
            },
        )

    def _version(self, version_id: int) -> ModelVersion:
        if version_id not in self._versions:
            self._versions.update(repo.versions_by_id(self.s, {version_id}))
        return self._versions[version_id]

    def _version_name(self, version_id: int | None) -> str | None:
        """None: the node ran no version of the model before."""
        return None if version_id is None else self._version(version_id).version


def _never_touched(row: Row) -> bool:
    """A node the rollout never told to change (Pending or Deferred, its desired version
    still its previous one): it runs what it ran before, there is nothing to revert."""
    a = row.assignment
    return a.state in (A.PENDING, A.DEFERRED) and a.desired_version_id == a.previous_version_id


def revert_failed(row: Row) -> bool:
    """A node whose revert landed and whose previous version then failed there."""
    a = row.assignment
    return a.state == A.FAILED and a.desired_version_id == a.previous_version_id


def reverting_left(row: Row) -> bool:
    """A reverted rollout's node with work left for a step: its revert to push, or to
    see on a node that is online (repository.to_reconcile says the same in SQL)."""
    a = row.assignment
    if a.state == A.ROLLED_BACK or revert_failed(row):
        return False
    return not (a.state == A.REVERTING and row.node.health in OFFLINE)
