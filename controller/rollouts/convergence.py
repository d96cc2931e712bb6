"""The step of a Succeeded rollout whose nodes were offline while it ran."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from controller import faults
from controller.db.models import (
    AssignmentState,
    NodeHealth,
    RolloutPhase,
)
from controller.kit.durations import parse_duration
from controller.rollouts import gates as gate_eval
from controller.rollouts import planner
from controller.rollouts.repository import Row
from controller.rollouts.step import OFFLINE
from controller.rollouts.step_schedule import ScheduledStep

log = logging.getLogger(__name__)
P, A = RolloutPhase, AssignmentState

# Assignment.metrics key: when a converging node was told to switch (ISO time). Kept
# through heartbeats (fleet/service.py OBSERVED_KEYS); its health evidence counts from
# then and its progress deadline runs from then.
SINCE_KEY = "converging_since"


class Convergence(ScheduledStep):
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
        away = [r for r in self.in_state(rows, A.PENDING) if r.node.health in OFFLINE]
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
        failed goes into ``failed``. An unanswered observe holds its nodes, unless the
        cluster refused for good (a permanent error): those fail now, saying so, as a
        wave's do (Waves.observe), rather than at the progress deadline."""
        ready: set[int] = set()
        for r, obs in self.observations(rows):
            if obs.phase == "Failed":
                failed[r.assignment.id] = f"workload {obs.reason or 'failed'}"
            elif obs.phase == "Ready" and obs.sha256 == self.target_of(r).sha256:
                r.assignment.observed_version_id = self.target_of(r).id
                ready.add(r.assignment.id)
        for r in rows:
            error = self.refusing.get(r.cluster)
            if error is not None:
                failed[r.assignment.id] = self.refused_note(r.cluster, error)
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
