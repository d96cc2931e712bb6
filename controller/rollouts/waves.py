"""The step of a Progressing rollout: waves, their gates, promotion and failure."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import timedelta

from controller import faults, metrics
from controller.db.models import (
    AssignmentState,
    NodeHealth,
    RolloutPhase,
    Wave,
    WavePhase,
)
from controller.kit.durations import parse_duration
from controller.rollouts import gates as gate_eval
from controller.rollouts import planner
from controller.rollouts.repository import Row
from controller.rollouts.state import advance_wave, transition
from controller.rollouts.step import OFFLINE
from controller.rollouts.step_schedule import ScheduledStep

log = logging.getLogger(__name__)
P, A = RolloutPhase, AssignmentState


class Step(ScheduledStep):
    """One reconcile step of a Progressing rollout, inside its row lock: the current
    wave starts, admits its nodes within maxUnavailable, pushes, observes, and its gate
    promotes it or fails the rollout (then rolls back or pauses, per onFailure)."""

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
            [r for r in self.in_state(opened, A.PENDING) if r.node.health in OFFLINE],
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
        # A cluster that refuses to report (a permanent error: forbidden, not found) will
        # not report next step either: its nodes still applying fail now, with its answer,
        # as a refused apply fails them, instead of holding until the progress deadline.
        # Nodes it had seen Ready keep their state: their health comes from heartbeats.
        for cluster, error in sorted(self.refusing.items()):
            hidden = [r for r in self.in_state(watched, A.APPLYING) if r.cluster == cluster]
            note = self.refused_note(cluster, error)
            self.moved(
                hidden,
                A.FAILED,
                "ClusterRefused",
                {r.assignment.id: note for r in hidden},
                data={"cluster": cluster, "call": "observe", "error": error},
            )
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
            blind = self.blind(still_applying)
            if blind:
                result.reason += self.could_not_observe(blind)
                result.snapshot["unobserved_clusters"] = blind
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
