"""The reconciler: one step of one rollout at a time, queued by the apply, the
commands, its own follow-ups and beat's tick.

It is level-triggered: every step reads the rows, pushes the desired state to the
clusters again, observes, and moves states forward. A worker killed anywhere in a step
loses nothing: its transaction rolls back, the driver calls it made are repeated (they
are idempotent), and the next step picks up from the database.

The step itself is split by job: ``step.py`` (plumbing, the revert), ``step_schedule.py``
(maintenance windows), ``waves.py`` (waves and gates), ``convergence.py`` (nodes back from
offline after a rollout succeeded)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from controller import faults
from controller.db.base import utcnow
from controller.db.models import (
    AssignmentState,
    Rollout,
    RolloutPhase,
    VersionStatus,
)
from controller.db.session import session_scope
from controller.rollouts import repository as repo
from controller.rollouts.convergence import Convergence
from controller.rollouts.state import transition
from controller.rollouts.step import OFFLINE, reverting_left
from controller.rollouts.waves import Step
from controller.settings import Settings
from controller.tasks.celery_app import celery_app, enqueue

log = logging.getLogger(__name__)
P, A = RolloutPhase, AssignmentState


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


def reconcile(rollout_id: int, settings: Settings, *, now: datetime | None = None) -> str | None:
    """One step of one rollout; returns its phase (None when another reconciler holds it)."""

    with session_scope() as session:
        rollout = repo.try_lock(session, rollout_id)
        if rollout is None:
            return None
        phase = _step(session, rollout, settings, now or utcnow())
        # The counts of the nodes it moved, under the lock the fold needs (repository).
        repo.fold_counts(session, rollout.id)
        return phase


def _step(session: Session, rollout: Rollout, settings: Settings, at: datetime) -> str:
    """The step itself, on the locked rollout; returns its phase."""
    step: Step | Convergence = (
        Convergence(session, rollout, settings, at)
        if rollout.phase == P.SUCCEEDED
        else Step(session, rollout, settings, at)
    )
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
    if rollout.phase == P.PROGRESSING and isinstance(step, Step):
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
                or (r.assignment.state == A.REVERTING and r.node.health not in OFFLINE)
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
        # Counts of rollouts without a step to fold them: nodes another rollout took
        # over, or deleted. One skipped (locked by a command) is folded next tick.
        for rollout_id in set(repo.unfolded(session)) - set(ids):
            if repo.try_lock(session, rollout_id) is not None:
                repo.fold_counts(session, rollout_id)
    return ids
