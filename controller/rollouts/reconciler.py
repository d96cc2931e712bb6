"""The reconciler: one step of one rollout at a time, queued by the apply, the
commands, its own follow-ups and beat's tick.

It is level-triggered: every step reads the rows, pushes the desired state to the
clusters again, observes, and moves states forward. A worker killed anywhere in a step
loses nothing: its transaction rolls back, the driver calls it made are repeated (they
are idempotent), and the next step picks up from the database."""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from controller import faults, metrics
from controller.audit import record_event
from controller.db.base import utcnow
from controller.db.models import (
    AssignmentState,
    Cluster,
    ModelVersion,
    NodeHealth,
    Rollout,
    RolloutPhase,
    VersionStatus,
    Wave,
    WavePhase,
)
from controller.db.session import session_scope
from controller.fleet import repository as fleet_repo
from controller.fleet.service import build_workload, cluster_driver
from controller.kit.durations import parse_duration
from controller.kube.driver import ClusterDriver, DriverError, ObservedWorkload, WorkloadSpec
from controller.rollouts import gates as gate_eval
from controller.rollouts import planner
from controller.rollouts import repository as repo
from controller.rollouts.repository import Row
from controller.rollouts.spec import RolloutSpec
from controller.rollouts.state import advance_wave, move, transition
from controller.schedules import windows
from controller.schedules.service import Calendars, GroupKey
from controller.settings import Settings
from controller.tasks.celery_app import celery_app, enqueue

log = logging.getLogger(__name__)
P, A = RolloutPhase, AssignmentState
# How a rollout's message begins while it waits for a maintenance window.
WAITING = "waiting for a maintenance window"
_OFFLINE = (NodeHealth.OFFLINE, NodeHealth.STALE, NodeHealth.NOT_READY)
# The message of a reverted node that is offline (Step._verify_reverted).
_OFFLINE_NOTE = "node offline: its previous version is pushed and is verified once it is back"


def queue_step(session: Session, rollout_id: int, *, countdown: float | None = None) -> None:
    """Queue a step of the rollout once the session's transaction commits."""
    if countdown is not None and celery_app.conf.task_always_eager:
        return  # in-process: the ticker drives follow-ups, never a recursion
    enqueue(session, "rollouts.reconcile", rollout_id, countdown=countdown)


def _follow_up(
    session: Session,
    rollout: Rollout,
    settings: Settings,
    now: datetime,
    *,
    wake: datetime | None = None,
) -> None:
    """Queue the rollout's next step, unless one is already queued for later. Beat's
    tick and the commands queue extra steps; were each to queue its own follow-up, the
    chains would add up, one more per tick, and never merge. Under the row lock, the
    check and the write are one. A follow-up that ran, or was lost, leaves
    ``next_step_at`` behind the clock, so the next step queues again (beat's tick is the
    net for a lost one). Half an interval of slack: a follow-up runs at its ETA, a
    little late or early, and two chains due closer than that merge at their next step.
    ``wake``: nothing is worth doing before then (a rollout waiting for its maintenance
    window), so the follow-up is queued for then rather than every interval. A follow-up
    queued for later than this step wants one (for the end of a freeze since deleted, a
    window since moved) does not count: a new chain starts now, and the late message
    merges into it when it runs."""
    if celery_app.conf.task_always_eager:
        return  # in-process: the ticker drives follow-ups (see queue_step)
    interval = settings.reconcile_interval_s
    delay = interval if wake is None else max(interval, (wake - now).total_seconds())
    slack = timedelta(seconds=interval / 2)
    due = rollout.next_step_at
    if due is not None and now + slack < due <= now + timedelta(seconds=delay) + slack:
        return
    rollout.next_step_at = now + timedelta(seconds=delay)
    queue_step(session, rollout.id, countdown=delay)


class Step:
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
                self.event(
                    reason="DriverError",
                    message=f"cluster {cluster}: {exc}",
                    data={"transient": exc.transient, "nodes": len(group)},
                )
                if count_transient or not exc.transient:
                    refused.extend(group)
        return refused

    def observations(self, rows: Iterable[Row]) -> Iterator[tuple[Row, ObservedWorkload]]:
        """What each row's cluster reports of its node, one observe call per cluster.
        An unanswered observe says nothing about the nodes: they hold where they are, the
        next step observes again and the progress deadline bounds the wait. The error is
        recorded, and a deadline that fails the wave names it, so the operator sees why
        the nodes never showed up Ready."""
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

    def observe_failed(self, cluster: str, nodes: int, exc: DriverError) -> None:
        """A cluster that could not be observed this step: logged, remembered (a progress
        deadline that fails the wave names it) and recorded as an event."""
        log.warning("observe %s failed: %s", cluster, exc)
        self.unobserved[cluster] = str(exc)
        self.event(
            reason="DriverError",
            message=f"cluster {cluster}: observe failed: {exc}",
            data={"transient": exc.transient, "nodes": nodes, "call": "observe"},
        )

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

    # -- progressing

    def progress(self) -> None:
        wave = self.r.waves[self.r.current_wave]
        if not self.follow_schedule(wave):
            return
        if wave.phase == WavePhase.PENDING:
            advance_wave(self.r, wave, WavePhase.APPLYING)
            wave.started_at = self.now
            self.r.message = f"wave {wave.index} of {len(self.r.waves)} applying"
            self.event(
                reason="WaveStarted",
                message=f"wave {wave.index}: {wave.node_count} node(s)",
                data={"wave": wave.index},
            )
            faults.point("rollout.wave.started")
        opened = [r for r in self.rows if self._wave_index(r) <= self.r.current_wave]
        self.defer_offline(opened)
        if self.phase_changed():
            return
        self.admit(opened)
        faults.point("rollout.nodes.admitted")
        applying = self.in_state(self.rows, A.APPLYING)
        refused = self.push(applying, self.target_workload)
        faults.point("rollout.nodes.pushed")
        if refused:
            self.moved(refused, A.FAILED, "ClusterRefused")
        self.observe()
        faults.point("rollout.observed")
        self.judge(wave)

    def _wave_index(self, row: Row) -> int:
        for wave in self.r.waves:
            if wave.id == row.assignment.wave_id:
                return wave.index
        return len(self.r.waves)

    def defer_offline(self, opened: list[Row]) -> None:
        self.moved(
            [r for r in self.in_state(opened, A.PENDING) if r.node.health in _OFFLINE],
            A.DEFERRED,
            "NodeOffline",
        )
        self.moved(
            [r for r in self.in_state(opened, A.DEFERRED) if r.node.health == NodeHealth.READY],
            A.PENDING,
            "NodeBack",
        )
        wave = self.r.waves[self.r.current_wave]
        deferred = self.in_state(self.wave_rows(wave.index), A.DEFERRED)
        budget = planner.max_deferred(self.spec.strategy, wave.node_count)
        if len(deferred) > budget:
            self.fail(
                wave,
                gate_eval.GateResult(
                    "fail",
                    f"{len(deferred)} node(s) of wave {wave.index} are offline, over the "
                    f"maxDeferred budget of {budget}",
                    {"deferred_nodes": [r.key for r in deferred][:100]},
                ),
                reason="TooManyOfflineNodes",
            )

    def phase_changed(self) -> bool:
        return self.r.phase != P.PROGRESSING

    def admit(self, opened: list[Row]) -> None:
        budget = planner.max_unavailable(self.spec.strategy, len(self.rows))
        room = budget - len(self.in_state(self.rows, A.APPLYING))
        if room <= 0:
            return
        pending = sorted(
            self.allowed(self.in_state(opened, A.PENDING)),
            key=lambda r: (self._wave_index(r), r.key),
        )
        admitted = pending[:room]
        for r in admitted:
            r.assignment.desired_version_id = self.target_of(r).id
        self.moved(admitted, A.APPLYING, "Applying")

    def observe(self) -> None:
        watched = self.in_state(self.rows, A.APPLYING, A.RUNNING, A.HEALTHY)
        ready, failed = [], []
        reasons: dict[int, str] = {}
        restarted: dict[str, int] = {}
        for r, obs in self.observations(watched):
            before = int((r.assignment.metrics or {}).get("restarts", 0))
            if obs.restarts > before:
                restarted[r.key] = obs.restarts
                r.assignment.metrics = {
                    **(r.assignment.metrics or {}),
                    "restarts": obs.restarts,
                }
                r.assignment.message = f"{obs.restarts} container restart(s)"
            if obs.phase == "Failed":
                failed.append(r)
                note = f" after {obs.restarts} restart(s)" if obs.restarts else ""
                reasons[r.assignment.id] = f"{obs.reason or 'failed'}{note}"
            elif obs.phase == "Ready" and obs.sha256 == self.target_of(r).sha256:
                r.assignment.observed_version_id = self.target_of(r).id
                if r.assignment.state == A.APPLYING:
                    ready.append(r)
        self.moved(ready, A.RUNNING, "WorkloadReady")
        self.moved(failed, A.FAILED, "WorkloadFailed", reasons)
        if restarted:
            self.event(
                reason="WorkloadRestarted",
                message=f"{len(restarted)} node(s) restarted their inference container",
                data={"restarts": dict(sorted(restarted.items())[:100])},
            )

    def samples(self, rows: Iterable[Row]) -> list[gate_eval.NodeSample]:
        return [
            gate_eval.NodeSample(
                r.key, r.assignment.state, r.assignment.metrics or {}, self.target_of(r).sha256
            )
            for r in rows
            if r.assignment.state != A.DEFERRED
        ]

    def judge(self, wave: Wave) -> None:
        rows = self.wave_rows(wave.index)
        started = wave.started_at or self.now
        deadline = parse_duration(self.spec.strategy.progressDeadline)
        still_applying = self.in_state(rows, A.PENDING, A.APPLYING)
        if not still_applying and wave.phase == WavePhase.APPLYING:
            advance_wave(self.r, wave, WavePhase.BAKING)
            self.r.message = f"wave {wave.index} of {len(self.r.waves)} baking"
            wave.baked_at = self.bake_until(wave)
        bake_end = wave.baked_at
        since = self.progress_since(wave, started)
        result = gate_eval.evaluate(
            self.samples(rows),
            self.spec.gates,
            target_sha=self.target.sha256,
            since=started,
            bake_done=bake_end is not None and self.now >= bake_end,
            deadline_passed=self.now > (bake_end or since) + timedelta(seconds=deadline),
        )
        faults.point("rollout.gate.evaluated")
        self._node_health(rows)
        if still_applying and result.decision == "pass":
            result.decision = "hold"
        metrics.GATE_EVALUATIONS.labels(result.decision).inc()
        if result.decision == "fail" and not (result.cause == "silent" and still_applying):
            self.fail(wave, result, reason="GateFailed")
        elif result.decision == "pass":
            self.promote(wave, result)
        elif (
            still_applying
            and not self.waiting_for_window(still_applying)
            and (result.decision == "fail" or self.now > since + timedelta(seconds=deadline))
        ):
            # Also where the gate failed on silence: nodes that never got the new version
            # running are the cause, not their numbers, and the operator is told which.
            result.reason = (
                f"progress deadline ({self.spec.strategy.progressDeadline}) passed with "
                f"{len(still_applying)} node(s) not running the new version"
            )
            result.snapshot["applying_nodes"] = [r.key for r in still_applying][:100]
            blind = sorted({r.cluster for r in still_applying} & self.unobserved.keys())
            if blind:
                result.reason += "; could not observe " + "; ".join(
                    f"cluster {c} ({self.unobserved[c]})" for c in blind
                )
                result.snapshot["unobserved_clusters"] = {c: self.unobserved[c] for c in blind}
            self.fail(wave, result, reason="ProgressDeadlineExceeded")

    def _node_health(self, rows: list[Row]) -> None:
        healthy, unhealthy = [], []
        for r in self.in_state(rows, A.RUNNING, A.HEALTHY):
            verdict, _ = gate_eval._node_verdict(
                gate_eval.NodeSample(r.key, r.assignment.state, r.assignment.metrics or {}),
                self.spec.gates,
                self.target_of(r).sha256,
                self.r.waves[self._wave_index(r)].started_at or self.now,
            )
            if verdict == "healthy" and r.assignment.state == A.RUNNING:
                healthy.append(r)
            elif verdict == "unhealthy" and r.assignment.state == A.HEALTHY:
                unhealthy.append(r)
        self.moved(healthy, A.HEALTHY, "MetricsHealthy")
        self.moved(unhealthy, A.RUNNING, "MetricsUnhealthy")

    def promote(self, wave: Wave, result: gate_eval.GateResult) -> None:
        advance_wave(self.r, wave, WavePhase.PASSED)
        wave.finished_at = self.now
        self.r.message = f"wave {wave.index} of {len(self.r.waves)} passed its gate"
        self.event(
            reason="GatePassed",
            message=f"wave {wave.index}: {result.reason}",
            data={"wave": wave.index, "gate": result.snapshot},
        )
        self.r.current_wave += 1
        faults.point("rollout.wave.promoted")
        if self.r.current_wave >= len(self.r.waves):
            self.r.current_wave = len(self.r.waves) - 1
            deferred = len(self.in_state(self.rows, A.DEFERRED))
            note = f"; {deferred} offline node(s) deferred" if deferred else ""
            transition(
                self.s,
                self.r,
                P.SUCCEEDED,
                reason="Succeeded",
                message=f"all {len(self.r.waves)} wave(s) passed their gates{note}",
            )
            faults.point("rollout.succeeded")

    def fail(self, wave: Wave, result: gate_eval.GateResult, *, reason: str) -> None:
        advance_wave(self.r, wave, WavePhase.FAILED)
        wave.finished_at = self.now
        transition(
            self.s,
            self.r,
            P.FAILED,
            reason=reason,
            message=f"wave {wave.index}: {result.reason}",
            data={"wave": wave.index, "gate": result.snapshot},
        )
        faults.point("rollout.failed")
        if self.spec.onFailure == "rollback":
            transition(
                self.s,
                self.r,
                P.ROLLED_BACK,
                reason="RollingBack",
                message=(
                    f"wave {wave.index} failed ({result.reason}); onFailure: rollback, every "
                    "touched node returns to its previous version"
                ),
            )
            faults.point("rollout.rolling_back")
            self.revert()
        else:
            transition(
                self.s,
                self.r,
                P.PAUSED,
                reason="WaitingForHuman",
                message=f"onFailure: pause ({result.reason}); resume, retry or abort",
            )

    # -- the schedule (spec.schedule): when a node may start

    @functools.cached_property
    def calendars(self) -> Calendars | None:
        """The calendars of the rollout's nodes, read once a step; None without a
        schedule (any time)."""
        if self.spec.schedule is None:
            return None
        return Calendars.load(self.s, self.spec.schedule, [r.node.id for r in self.rows])

    def allowed(self, rows: Iterable[Row]) -> list[Row]:
        """The rows whose calendar lets them start now: inside a window, in no freeze,
        not before the start time. Admission takes only these. A node admitted keeps going
        when its window closes or a freeze begins: a node is never left half-applied."""
        cals = self.calendars
        if cals is None:
            return list(rows)
        return [r for r in rows if cals.allows(r.node.id, self.now)]

    def follow_schedule(self, wave: Wave) -> bool:
        """Read the schedule for this step: report once the windows that opened since the
        last step (and those that opened and closed while no step ran: not replayed), say
        in the message and once in an event that the wave waits for a window, and
        remember the instant. False when the wave has not started and none of its nodes
        may start yet: it starts when the first of them may."""
        cals = self.calendars
        if cals is None:
            self._stop_waiting(wave)
            return True
        last, self.r.schedule_evaluated_at = self.r.schedule_evaluated_at, self.now
        pending = self.in_state(self.wave_rows(wave.index), A.PENDING)
        groups = cals.by_group(r.node.id for r in pending)
        if last is not None and last < self.now:
            self._catch_up(wave, cals, list(groups), last)
        verdicts = {key: cals.verdict(key, self.now) for key in groups}
        if not groups or any(v is not None and v.allowed for v in verdicts.values()):
            self._stop_waiting(wave)
            return True
        waits: dict[str, Any] = {}
        for key, ids in groups.items():
            group, verdict = cals.group(key), verdicts[key]
            entry: dict[str, Any] = {"nodes": len(ids)}
            if verdict is None:
                entry["problem"] = group.problem
            else:
                entry["reason"] = verdict.reason
                nxt = verdict.next_window
                entry["next"] = None if nxt is None else nxt.start.isoformat()
                if verdict.frozen_by:
                    entry["frozenBy"] = list(verdict.frozen_by)
            waits[group.label] = entry
        opens = [e["next"] for e in waits.values() if e.get("next")]
        frozen = sorted({f for e in waits.values() for f in e.get("frozenBy", [])})
        message = (
            f"{WAITING}: wave {wave.index} of {len(self.r.waves)}, {len(pending)} node(s) "
            "not started"
            + (f", frozen by {', '.join(frozen)}" if frozen else "")
            + (f"; the next opens at {min(opens)}" if opens else "; none opens within a year")
        )
        if self.r.message != message:  # once per wait, not once per step
            self.r.message = message
            self.event(
                reason="WaitingForWindow",
                message=message,
                data={"wave": wave.index, "zones": waits},
            )
        return wave.phase != WavePhase.PENDING

    def _stop_waiting(self, wave: Wave) -> None:
        if self.r.message is not None and self.r.message.startswith(WAITING):
            self.r.message = f"wave {wave.index} of {len(self.r.waves)} {wave.phase.lower()}"

    def _catch_up(self, wave: Wave, cals: Calendars, keys: list[GroupKey], last: datetime) -> None:
        opened: dict[str, Any] = {}
        missed: dict[str, Any] = {}
        for key in keys:
            group = cals.group(key)
            if group.calendar is None:
                continue
            got = windows.catch_up(group.calendar, last, self.now)
            if got.opened is not None:
                opened[group.label] = {
                    "opened": got.opened.start.isoformat(),
                    "closes": None if got.opened.end is None else got.opened.end.isoformat(),
                    "late_s": int((self.now - got.opened.start).total_seconds()),
                }
            if got.missed_total:
                missed[group.label] = {
                    "count": got.missed_total,
                    "windows": [[i.start.isoformat(), _iso(i.end)] for i in got.missed[:10]],
                }
        if missed:
            total = sum(m["count"] for m in missed.values())
            self.event(
                reason="WindowsMissed",
                message=(
                    f"wave {wave.index}: {total} window(s) opened and closed while no step "
                    "ran (the controller down, or the rollout paused); they are not replayed"
                ),
                data={"wave": wave.index, "zones": missed},
            )
        if opened:
            self.event(
                reason="WindowOpened",
                message=f"wave {wave.index}: window open for {', '.join(opened)}",
                data={"wave": wave.index, "zones": opened},
            )

    def waiting_for_window(self, unfinished: Sequence[Row]) -> bool:
        """The wave's unfinished nodes all wait to start and none may (a closed window,
        a freeze, a start time ahead): the wave is held, its progress deadline stands."""
        return (
            self.calendars is not None
            and all(r.assignment.state == A.PENDING for r in unfinished)
            and not self.allowed(unfinished)
        )

    def progress_since(self, wave: Wave, started: datetime) -> datetime:
        """Where the progress deadline counts from: the wave's start or, under a
        schedule, the latest instant since at which its nodes could start again (a
        window opening, a freeze's end), so a wave that paused has its whole deadline
        again when it may go on."""
        cals = self.calendars
        if cals is None or self.now <= started:
            return started
        latest = started
        # The horizon excludes its end, and the nodes may have been let go just now.
        span = self.now - started + timedelta(seconds=1)
        for key in cals.by_group(r.node.id for r in self.wave_rows(wave.index)):
            cal = cals.group(key).calendar
            if cal is None:
                continue
            for interval in windows.allowed_intervals(cal, started, span):
                if interval.start <= self.now:
                    latest = max(latest, interval.start)
        return latest

    def bake_until(self, wave: Wave) -> datetime:
        """When the wave's bake, starting now, ends: ``bakeInWindowsOnly`` counts only
        time inside the windows, until it has run in every zone of the wave."""
        bake = timedelta(seconds=wave.bake_s)
        cals = self.calendars
        if cals is None or not cals.schedule.bakeInWindowsOnly:
            return self.now + bake
        ends: list[datetime] = []
        for key in cals.by_group(r.node.id for r in self.wave_rows(wave.index)):
            cal = cals.group(key).calendar
            if cal is not None:
                end = windows.bake_end_in_windows(cal, self.now, bake)
                ends.append(self.now + windows.DEFAULT_HORIZON if end is None else end)
        return max(ends, default=self.now + bake)

    def wake_at(self) -> datetime | None:
        """When the next step is worth running, if the rollout does nothing but wait for
        a window: the earliest opening among its waiting nodes. None: the usual
        interval (nodes in flight, or none waiting)."""
        cals = self.calendars
        if cals is None or self.r.phase != P.PROGRESSING:
            return None
        if self.in_state(self.rows, A.APPLYING, A.RUNNING):
            return None
        wave = self.r.waves[self.r.current_wave]
        if wave.phase not in (WavePhase.PENDING, WavePhase.APPLYING):
            return None
        waiting = self.in_state(self.wave_rows(wave.index), A.PENDING)
        if not waiting or self.allowed(waiting):
            return None
        opens = []
        for key in cals.by_group(r.node.id for r in waiting):
            verdict = cals.verdict(key, self.now)
            if verdict is not None and verdict.next_window is not None:
                opens.append(verdict.next_window.start)
        return min(opens, default=None)

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
        offline = [r for r in rows if r.node.health in _OFFLINE]
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
        offline = [r for r in self.in_state(rows, A.REVERTING) if r.node.health in _OFFLINE]
        failed = [r for r in self.in_state(rows, A.FAILED) if revert_failed(r)]
        left = [r for r in rows if reverting_left(r)]
        if refused:
            self.r.message = f"revert incomplete: {len(refused)} node(s) not reached yet, retrying"
            return
        if left:
            self.r.message = (
                f"reverting: {len(left)} node(s) not yet seen on their previous version"
            )
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
    return not (a.state == A.REVERTING and row.node.health in _OFFLINE)


# Assignment.metrics key: when a converging node was told to switch (ISO time). Kept
# through heartbeats (fleet/service.py OBSERVED_KEYS); its health evidence counts from
# then and its progress deadline runs from then.
SINCE_KEY = "converging_since"


class Convergence(Step):
    """The step of a Succeeded rollout whose nodes were offline while it ran: each node
    that is back gets its version (the rollout's, or the variant chosen for its class),
    and counts as done (Healthy, ``Converged``) only once it passes the same per-node
    health check a wave's nodes pass (gates.py). A node that fails it, whose workload
    fails, or that shows no health evidence within the progress deadline returns to its
    previous version (``ConvergenceFailed``). The rollout stays Succeeded throughout;
    its ``status.pending`` counts the nodes still on their way.

    Like every step: level-triggered, one transaction. A node is recorded Applying
    before its version is pushed, and Healthy or RolledBack only after what decides it
    was seen, so a worker killed anywhere repeats the push (idempotent) and nothing
    else. A node a later rollout of the same model claimed has left this rollout's rows
    (its claim wins: service.py ``_claim_nodes`` records that, once)."""

    def converge(self) -> None:
        rows = self.rows
        # Reverted earlier and not seen back yet: told again (idempotent), seen below.
        self.push(self.in_state(rows, A.REVERTING), self.previous_workload, count_transient=True)
        back = [r for r in self.in_state(rows, A.DEFERRED) if r.node.health == NodeHealth.READY]
        self.moved(back, A.PENDING, "NodeBack", data=self._versions_of(back))
        away = [r for r in self.in_state(rows, A.PENDING) if r.node.health in _OFFLINE]
        self.moved(away, A.DEFERRED, "NodeOffline")
        self._admit_back(rows)
        applying = self.in_state(rows, A.APPLYING)
        refused = self.push(applying, self.target_workload)
        faults.point("rollout.converge.pushed")
        failed: dict[int, str] = {
            r.assignment.id: "the cluster refused the new version" for r in refused
        }
        seen = self._observe_converging(
            [r for r in applying if r.assignment.id not in failed], failed
        )
        healthy = self._judge_converging(applying, seen, failed)
        self.moved(healthy, A.HEALTHY, "Converged", data=self._versions_of(healthy))
        self._revert_converging([r for r in applying if r.assignment.id in failed], failed)
        self._verify_reverted(self.in_state(rows, A.REVERTING))

    def _versions_of(self, rows: Iterable[Row]) -> dict[str, Any]:
        """The version each node moves to, for its Event (as many as it lists nodes)."""
        versions = sorted((r.key, self.target_of(r).version) for r in rows)
        return {"versions": dict(versions[:500])}

    def _admit_back(self, rows: list[Row]) -> None:
        budget = planner.max_unavailable(self.spec.strategy, len(rows))
        room = budget - len(self.in_state(rows, A.APPLYING))
        # A node back from offline follows the rollout's schedule too: it starts only
        # inside its site's window and outside any freeze.
        waiting = self.allowed(self.in_state(rows, A.PENDING))
        admitted = sorted(waiting, key=lambda r: r.key)[: max(room, 0)]
        for r in admitted:
            r.assignment.desired_version_id = self.target_of(r).id
            # Numbers of what the node ran before do not count for the new version.
            r.assignment.metrics = {SINCE_KEY: self.now.isoformat()}
        self.moved(admitted, A.APPLYING, "Converging", data=self._versions_of(admitted))

    def _since(self, row: Row) -> datetime:
        stamp = (row.assignment.metrics or {}).get(SINCE_KEY)
        if stamp is None:
            # Lost to a heartbeat written over it in the same instant: the clock starts
            # again (a later deadline, never an earlier one).
            row.assignment.metrics = {
                **(row.assignment.metrics or {}),
                SINCE_KEY: self.now.isoformat(),
            }
            return self.now
        return datetime.fromisoformat(stamp)

    def _observe_converging(self, rows: list[Row], failed: dict[int, str]) -> set[int]:
        """The ids of the rows whose cluster shows the new version Ready; a workload that
        failed goes into ``failed``. An unanswered observe holds its nodes."""
        ready: set[int] = set()
        for r, obs in self.observations(rows):
            if obs.phase == "Failed":
                failed[r.assignment.id] = f"workload {obs.reason or 'failed'}"
            elif obs.phase == "Ready" and obs.sha256 == self.target_of(r).sha256:
                r.assignment.observed_version_id = self.target_of(r).id
                ready.add(r.assignment.id)
        return ready

    def _judge_converging(
        self, rows: list[Row], ready: set[int], failed: dict[int, str]
    ) -> list[Row]:
        """The rows that passed their health check; the ones that failed it, or are out
        of time, go into ``failed`` with the reason."""
        deadline = timedelta(seconds=parse_duration(self.spec.strategy.progressDeadline))
        healthy = []
        for r in rows:
            if r.assignment.id in failed:
                continue
            since = self._since(r)
            verdict, why = gate_eval._node_verdict(
                gate_eval.NodeSample(r.key, r.assignment.state, r.assignment.metrics or {}),
                self.spec.gates,
                self.target_of(r).sha256,
                since,
            )
            if r.assignment.id in ready and verdict == "healthy":
                healthy.append(r)
            elif r.assignment.id in ready and verdict == "unhealthy":
                failed[r.assignment.id] = f"health check failed: {why}"
            elif self.now > since + deadline:
                failed[r.assignment.id] = (
                    f"progress deadline ({self.spec.strategy.progressDeadline}) passed "
                    + (
                        "without health evidence on the new version"
                        if r.assignment.id in ready
                        else "before the new version was ready"
                    )
                )
        return healthy

    def _revert_converging(self, rows: list[Row], why: dict[int, str]) -> None:
        """Back to the previous version: Reverting where the cluster took it (RolledBack
        once seen there, as in a rollback: Step.revert), the others stay Applying and
        are reverted again next step (never left half-way)."""
        refused = {
            r.assignment.id for r in self.push(rows, self.previous_workload, count_transient=True)
        }
        done = [r for r in rows if r.assignment.id not in refused]
        for r in done:
            r.assignment.desired_version_id = r.assignment.previous_version_id
        previous = {r.key: self._version_name(r.assignment.previous_version_id) for r in done[:500]}
        self.moved(
            done,
            A.REVERTING,
            "ConvergenceFailed",
            {r.assignment.id: f"{why[r.assignment.id]}; reverted" for r in done},
            data={
                "versions": previous,
                "why": {r.key: why[r.assignment.id] for r in done[:500]},
            },
        )


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def reconcile(rollout_id: int, settings: Settings, *, now: datetime | None = None) -> str | None:
    """One step of one rollout; returns its phase (None when another reconciler holds it)."""

    with session_scope() as session:
        rollout = repo.try_lock(session, rollout_id)
        if rollout is None:
            return None
        kind = Convergence if rollout.phase == P.SUCCEEDED else Step
        step = kind(session, rollout, settings, now or utcnow())
        faults.on_commit(session, "rollout.step.committed")
        faults.point("rollout.step.locked")
        if rollout.phase == P.PENDING and step.target.status != VersionStatus.READY:
            if step.target.status == VersionStatus.INVALID:
                transition(
                    session,
                    rollout,
                    P.FAILED,
                    reason="ModelVersionInvalid",
                    message=(
                        f"model version {step.target.version} failed validation: "
                        f"{step.target.status_message}"
                    ),
                )
            else:
                rollout.message = (
                    f"waiting for model version {step.target.version} to be validated "
                    f"({step.target.status})"
                )
                _follow_up(session, rollout, settings, step.now)
            return rollout.phase
        if rollout.phase == P.PENDING:
            if not rollout.waves:
                transition(
                    session, rollout, P.SUCCEEDED, reason="Succeeded", message="no nodes to update"
                )
                return rollout.phase
            transition(session, rollout, P.PROGRESSING, reason="Started", message="wave 0 starting")
            faults.point("rollout.started")
        if rollout.phase == P.PROGRESSING:
            step.progress()
        elif rollout.phase in (P.ROLLED_BACK, P.ABORTED):
            step.revert()
        elif isinstance(step, Convergence):
            step.converge()
        if (
            rollout.phase == P.PROGRESSING
            or (rollout.phase in (P.ROLLED_BACK, P.ABORTED) and any(map(reverting_left, step.rows)))
            or (
                # Nodes back and on their way (or on their way back); the offline ones
                # wait for beat's tick (repository.to_reconcile finds them once back).
                isinstance(step, Convergence)
                and any(
                    r.assignment.state in (A.PENDING, A.APPLYING)
                    or (r.assignment.state == A.REVERTING and r.node.health not in _OFFLINE)
                    for r in step.rows
                )
            )
        ):
            _follow_up(session, rollout, settings, step.now, wake=step.wake_at())
        return rollout.phase


def tick(settings: Settings) -> list[int]:
    """Beat's safety net: queue a step for every rollout with work left."""

    with session_scope() as session:
        ids = list(repo.to_reconcile(session))
        for rollout_id in ids:
            enqueue(session, "rollouts.reconcile", rollout_id)
    return ids
