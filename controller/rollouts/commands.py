"""The commands a user gives a rollout: pause, resume, abort, undo, retry. Each moves
the rollout's phase under its row lock and queues a reconcile step to act on it."""

from __future__ import annotations

from sqlalchemy.orm import Session

from controller import faults
from controller.db.models import AssignmentState, Rollout, RolloutPhase, WavePhase
from controller.errors import Conflict, NotFound
from controller.rollouts import repository as repo
from controller.rollouts.reconciler import queue_step
from controller.rollouts.state import ACTIVE_PHASES, advance_wave, move, transition
from controller.rollouts.step import reverting_left

P, A = RolloutPhase, AssignmentState


def _locked(session: Session, name: str) -> Rollout:
    rollout = repo.lock(session, name)
    if rollout is None:
        raise NotFound(f"rollout {name!r} not found")
    return rollout


def command(session: Session, name: str, action: str) -> Rollout:
    rollout = _locked(session, name)
    faults.point("rollout.command.locked")
    if action == "pause":
        if rollout.phase != P.PROGRESSING:
            # Failed → Paused is onFailure: pause's own move, not a user's: a Failed
            # rollout paused and then resumed would skip the check of its model version.
            raise Conflict(
                f"rollout {name} is {rollout.phase}: it cannot become Paused "
                "(only a Progressing rollout can be paused)"
            )
        transition(session, rollout, P.PAUSED, reason="Paused", message="paused by a user")
    elif action == "resume":
        if rollout.phase != P.PAUSED:
            raise Conflict(f"rollout {name} is {rollout.phase}, not Paused: nothing to resume")
        transition(session, rollout, P.PROGRESSING, reason="Resumed", message="resumed by a user")
    elif action == "abort":
        if rollout.phase not in ACTIVE_PHASES:
            raise Conflict(
                f"rollout {name} is {rollout.phase}: only an active rollout can be aborted"
            )
        transition(
            session,
            rollout,
            P.ABORTED,
            reason="Aborted",
            message="aborted by a user: touched nodes return to their previous version",
        )
    elif action == "undo":
        if rollout.phase != P.SUCCEEDED:
            raise Conflict(
                f"rollout {name} is {rollout.phase}: only a Succeeded rollout can be undone"
            )
        if not repo.rows_of(session, rollout.id):
            raise Conflict(
                f"rollout {name} no longer owns any node: later rollouts of the same model took "
                "them over; undo or retry those instead"
            )
        transition(
            session,
            rollout,
            P.ROLLED_BACK,
            reason="Undone",
            message="undone by a user: nodes return to their previous version",
        )
    elif action == "retry":
        if rollout.phase not in (P.FAILED, P.ROLLED_BACK, P.ABORTED):
            raise Conflict(
                f"rollout {name} is {rollout.phase}: only Failed, RolledBack or Aborted "
                "rollouts can be retried"
            )
        # Nodes still on their way back: a retry now would start over on nodes whose
        # revert is not seen yet. An offline node's revert (pushed, seen once it is
        # back) and one that failed on its previous version hold nothing up.
        reverting = [
            r.key
            for r in repo.rows_of(session, rollout.id)
            if rollout.phase != P.FAILED and reverting_left(r)
        ]
        if reverting:
            raise Conflict(
                f"rollout {name} is {rollout.phase} but still reverting: {len(reverting)} "
                f"node(s) not back on their previous version yet ({', '.join(reverting[:5])}"
                f"{', ...' if len(reverting) > 5 else ''}); retry once the revert has "
                "finished (edgefleet rollout status shows it). Its last step said: "
                f"{rollout.message}"
            )
        _reset_for_retry(session, rollout)
    else:
        raise NotFound(f"unknown rollout command {action!r} (pause, resume, abort, undo, retry)")
    faults.point("rollout.command.recorded")
    queue_step(session, rollout.id)
    return rollout


def _reset_for_retry(session: Session, rollout: Rollout) -> None:
    rows = repo.rows_of(session, rollout.id)
    transition(session, rollout, P.PENDING, reason="Retried", message="retried by a user")
    for wave in rollout.waves:
        advance_wave(rollout, wave, WavePhase.PENDING)
        wave.started_at = wave.baked_at = wave.finished_at = None
    rollout.current_wave = 0
    rollout.started_at = rollout.finished_at = None
    # A retry starts over: its schedule is read afresh (no windows that came and went
    # since the last try to catch up on), and no follow-up of the last try holds back
    # the new chain of steps.
    rollout.schedule_evaluated_at = rollout.next_step_at = None
    retry = [(r.assignment, r.key) for r in rows if r.assignment.state != A.PENDING]
    move(session, rollout, retry, A.PENDING, reason="Retried")
    for r in rows:
        r.assignment.metrics = {}
