"""Legal transitions of rollouts and assignments. Every transition goes through here: it
is checked, recorded as an Event (with the evidence that decided it) and counted."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from sqlalchemy.orm import Session

from controller import metrics
from controller.audit import record_event
from controller.db.base import utcnow
from controller.db.models import (
    ACTIVE_ROLLOUT_PHASES,
    Assignment,
    AssignmentState,
    Rollout,
    RolloutPhase,
    Wave,
    WavePhase,
)
from controller.errors import Conflict

P, A, W = RolloutPhase, AssignmentState, WavePhase

ROLLOUT_TRANSITIONS: dict[str, set[str]] = {
    P.PENDING: {P.PROGRESSING, P.SUCCEEDED, P.FAILED, P.ABORTED},
    P.PROGRESSING: {P.PAUSED, P.SUCCEEDED, P.FAILED, P.ABORTED},
    P.PAUSED: {P.PROGRESSING, P.ABORTED},
    P.FAILED: {P.ROLLED_BACK, P.PAUSED, P.PENDING, P.ABORTED},
    P.SUCCEEDED: {P.ROLLED_BACK, P.PENDING},
    P.ROLLED_BACK: {P.PENDING},
    P.ABORTED: {P.PENDING},
}
ACTIVE_PHASES = ACTIVE_ROLLOUT_PHASES
TERMINAL_PHASES = (P.SUCCEEDED, P.ROLLED_BACK, P.ABORTED)

# A revert (rollback, abort, undo) releases a node it never touched at once (-> RolledBack)
# and moves every other to Reverting once its cluster took the previous version; the
# node is RolledBack only when that version is seen Ready there, Failed when it fails
# there (step.py StepBase.revert).
ASSIGNMENT_TRANSITIONS: dict[str, set[str]] = {
    A.PENDING: {A.APPLYING, A.DEFERRED, A.REVERTING, A.ROLLED_BACK},
    # Applying -> Healthy: a node converging after its rollout ended (it was offline while
    # the rollout ran) counts as done only once its health check passed (convergence.py
    # Convergence.converge); it has no wave left to bake in, so it does not rest in Running.
    A.APPLYING: {A.RUNNING, A.HEALTHY, A.FAILED, A.REVERTING},
    A.RUNNING: {A.HEALTHY, A.FAILED, A.REVERTING},
    A.HEALTHY: {A.RUNNING, A.FAILED, A.REVERTING},
    A.FAILED: {A.REVERTING, A.PENDING},
    A.DEFERRED: {A.PENDING, A.REVERTING, A.ROLLED_BACK},
    A.REVERTING: {A.ROLLED_BACK, A.FAILED, A.PENDING},
    A.ROLLED_BACK: {A.PENDING},
}


# A wave starts (Applying) when it becomes current, bakes once none of its nodes is still
# being applied, and ends Passed or Failed by its gate, its progress deadline or its
# offline budget. A Failed wave of a rollout paused by onFailure: pause passes when the
# rollout is resumed and its gate then holds. A retry starts every wave over.
WAVE_TRANSITIONS: dict[str, set[str]] = {
    W.PENDING: {W.APPLYING},
    W.APPLYING: {W.BAKING, W.FAILED, W.PENDING},
    W.BAKING: {W.PASSED, W.FAILED, W.PENDING},
    W.PASSED: {W.PENDING},
    W.FAILED: {W.PASSED, W.PENDING},
}


class IllegalTransition(Conflict):
    pass


def transition(
    session: Session,
    rollout: Rollout,
    to: RolloutPhase,
    *,
    reason: str,
    message: str,
    data: dict[str, Any] | None = None,
) -> None:
    current = rollout.phase
    if to not in ROLLOUT_TRANSITIONS.get(current, set()):
        allowed = ", ".join(sorted(ROLLOUT_TRANSITIONS.get(current, set()))) or "none"
        raise IllegalTransition(
            f"rollout {rollout.name} is {current}: it cannot become {to} "
            f"(from {current} it can become: {allowed})"
        )
    rollout.phase = to
    rollout.message = message
    now = utcnow()
    if to == P.PROGRESSING and rollout.started_at is None:
        rollout.started_at = now
    if to in TERMINAL_PHASES:
        rollout.finished_at = now
    record_event(
        session,
        kind="Rollout",
        name=rollout.name,
        rollout_id=rollout.id,
        reason=reason,
        message=message,
        data={"from": current, "to": to, **(data or {})},
    )
    metrics.ROLLOUT_TRANSITIONS.labels(current, to).inc()


def move(
    session: Session,
    rollout: Rollout,
    assignments: Iterable[tuple[Assignment, str]],
    to: AssignmentState,
    *,
    reason: str,
    messages: dict[int, str] | None = None,
    data: dict[str, Any] | None = None,
) -> int:
    """Move assignments (with their node keys) to ``to``: one Event per call listing the
    nodes, so a 10,000-node wave writes one row per transition, not 10,000. ``data`` is
    added to the Event's (the versions the nodes move to, say)."""
    moved: dict[str, list[str]] = defaultdict(list)
    now = utcnow()
    batch = [(a, key) for a, key in assignments if a.state != to]
    for assignment, node_key in batch:  # all or nothing: check every node first
        if to not in ASSIGNMENT_TRANSITIONS.get(assignment.state, set()):
            raise IllegalTransition(
                f"assignment of node {node_key} is {assignment.state}: it cannot become {to}"
            )
    for assignment, node_key in batch:
        moved[assignment.state].append(node_key)
        assignment.state = to
        assignment.updated_at = now
        if messages and assignment.id in messages:
            assignment.message = messages[assignment.id]
    total = sum(len(v) for v in moved.values())
    if total:
        record_event(
            session,
            kind="Rollout",
            name=rollout.name,
            rollout_id=rollout.id,
            reason=reason,
            message=f"{total} node(s) → {to}",
            data={
                "to": to,
                "from": {k: len(v) for k, v in moved.items()},
                "nodes": sorted(n for v in moved.values() for n in v)[:500],
                **({"reasons": dict(list(messages.items())[:50])} if messages else {}),
                **(data or {}),
            },
        )
    return total


def advance_wave(rollout: Rollout, wave: Wave, to: WavePhase) -> None:
    """Move ``wave`` to ``to`` (nothing when it is there already), refusing a move the
    table does not list: a wave that passed never starts applying again but by a retry."""
    if wave.phase == to:
        return
    if to not in WAVE_TRANSITIONS.get(wave.phase, set()):
        allowed = ", ".join(sorted(WAVE_TRANSITIONS.get(wave.phase, set()))) or "none"
        raise IllegalTransition(
            f"wave {wave.index} of rollout {rollout.name} is {wave.phase}: it cannot become "
            f"{to} (from {wave.phase} it can become: {allowed})"
        )
    wave.phase = to
