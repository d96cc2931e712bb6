"""Every (from, to) pair of the two state machines: legal transitions happen and write
exactly one Event; illegal ones raise IllegalTransition (409) and write nothing.

What is legal is written out below from the documented phases (README "Rollouts", DESIGN
"Flow of one rollout", the commands' docstrings), with the cause of every move, and never
read from controller/rollouts/state.py: a wrong entry there must fail a test here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.db.models import (
    Assignment,
    AssignmentState,
    Cluster,
    Event,
    ModelVersion,
    Node,
    Rollout,
    RolloutPhase,
    Wave,
    WavePhase,
)
from controller.errors import Conflict
from controller.rollouts import commands
from controller.rollouts.state import (
    ACTIVE_PHASES,
    ASSIGNMENT_TRANSITIONS,
    ROLLOUT_TRANSITIONS,
    TERMINAL_PHASES,
    WAVE_TRANSITIONS,
    IllegalTransition,
    advance_wave,
    move,
    transition,
)
from tests.rollouts.helpers import stored_version

P, A = RolloutPhase, AssignmentState

# ---------------------------------------------------------------- the independent tables

ROLLOUT_PHASES = (
    "Pending",
    "Progressing",
    "Paused",
    "Succeeded",
    "Failed",
    "RolledBack",
    "Aborted",
)
ASSIGNMENT_STATES = (
    "Pending",
    "Applying",
    "Running",
    "Healthy",
    "Failed",
    "Deferred",
    "Reverting",
    "RolledBack",
)
FINISHED = {"Succeeded", "RolledBack", "Aborted"}  # finished_at is set; nodes are free again

LEGAL_ROLLOUT: dict[tuple[str, str], str] = {
    ("Pending", "Progressing"): "the reconciler starts wave 0",
    ("Pending", "Succeeded"): "a plan without nodes has nothing to do",
    ("Pending", "Failed"): "its model version failed validation while it waited",
    ("Pending", "Aborted"): "abort",
    ("Progressing", "Paused"): "pause",
    ("Progressing", "Succeeded"): "the last wave passed its gate",
    ("Progressing", "Failed"): "a gate failed, the progress deadline passed, too many offline",
    ("Progressing", "Aborted"): "abort",
    ("Paused", "Progressing"): "resume",
    ("Paused", "Aborted"): "abort",
    ("Failed", "RolledBack"): "onFailure: rollback",
    ("Failed", "Paused"): "onFailure: pause",
    ("Failed", "Pending"): "retry",
    ("Failed", "Aborted"): "abort: a Failed rollout still holds its nodes",
    ("Succeeded", "RolledBack"): "undo",
    ("Succeeded", "Pending"): "apply of a changed spec",
    ("RolledBack", "Pending"): "retry, or apply of a changed spec",
    ("Aborted", "Pending"): "retry, or apply of a changed spec",
}

LEGAL_ASSIGNMENT: dict[tuple[str, str], str] = {
    ("Pending", "Applying"): "admitted within maxUnavailable: the workload is pushed",
    ("Pending", "Deferred"): "its node is offline",
    ("Pending", "RolledBack"): "a revert releases a node it never touched",
    ("Applying", "Running"): "the cluster runs the new version",
    ("Applying", "Healthy"): "back after its rollout ended: runs its version, health check passed",
    ("Applying", "Failed"): "the cluster refused it, or the workload failed",
    ("Pending", "Reverting"): "revert of a node a retry reset, still on the new version",
    ("Applying", "Reverting"): "revert (or a converging node's failed check): pushed",
    ("Running", "Healthy"): "its agent reports numbers within the gates",
    ("Running", "Failed"): "the workload failed",
    ("Running", "Reverting"): "revert: its cluster took the previous version",
    ("Healthy", "Running"): "its numbers left the gates",
    ("Healthy", "Failed"): "the workload failed",
    ("Healthy", "Reverting"): "revert: its cluster took the previous version",
    ("Failed", "Reverting"): "revert: its cluster took the previous version",
    ("Failed", "Pending"): "retry",
    ("Deferred", "Pending"): "its node is back",
    ("Deferred", "Reverting"): "revert of a node a retry reset, still on the new version",
    ("Deferred", "RolledBack"): "a revert releases a node it never touched",
    ("Reverting", "RolledBack"): "its previous version is seen Ready on the node",
    ("Reverting", "Failed"): "its previous version fails on the node",
    ("Reverting", "Pending"): "retry while the node is offline (its revert seen when back)",
    ("RolledBack", "Pending"): "retry",
}

WAVE_PHASES = ("Pending", "Applying", "Baking", "Passed", "Failed")

LEGAL_WAVE: dict[tuple[str, str], str] = {
    ("Pending", "Applying"): "the wave becomes the current one: its nodes are admitted",
    ("Applying", "Baking"): "none of its nodes is still being applied: the bake starts",
    ("Applying", "Failed"): "progress deadline, too many offline nodes, or a failed gate",
    ("Baking", "Passed"): "the bake is over and the gate passes: the next wave starts",
    ("Baking", "Failed"): "the gate fails",
    ("Failed", "Passed"): "resumed after onFailure: pause, and the gate now passes",
    ("Applying", "Pending"): "retry",
    ("Baking", "Pending"): "retry",
    ("Passed", "Pending"): "retry",
    ("Failed", "Pending"): "retry",
}

# command -> {phase it is accepted in: the phase it leads to}; refused (409) elsewhere.
COMMANDS: dict[str, dict[str, str]] = {
    "pause": {"Progressing": "Paused"},
    "resume": {"Paused": "Progressing"},
    "abort": dict.fromkeys(("Pending", "Progressing", "Paused", "Failed"), "Aborted"),
    "undo": {"Succeeded": "RolledBack"},
    "retry": dict.fromkeys(("Failed", "RolledBack", "Aborted"), "Pending"),
}


def test_the_independent_tables_agree_with_each_other() -> None:
    assert set(P) == set(ROLLOUT_PHASES)
    assert set(A) == set(ASSIGNMENT_STATES)
    for table, states in ((LEGAL_ROLLOUT, ROLLOUT_PHASES), (LEGAL_ASSIGNMENT, ASSIGNMENT_STATES)):
        assert all(src in states and dst in states and src != dst for src, dst in table)
        # Every state is entered (claims start at Pending) and can be left.
        assert {dst for _, dst in table} | {"Pending"} == set(states)
        assert {src for src, _ in table} == set(states)
    for accepted in COMMANDS.values():
        assert all((src, dst) in LEGAL_ROLLOUT for src, dst in accepted.items())
    # A finished rollout only starts again or is undone.
    assert all(dst in ("Pending", "RolledBack") for src, dst in LEGAL_ROLLOUT if src in FINISHED)


def test_finished_and_active_phases() -> None:
    assert set(TERMINAL_PHASES) == FINISHED
    assert set(ACTIVE_PHASES) == set(ROLLOUT_PHASES) - FINISHED


def pairs(states: Sequence[str]) -> list[Any]:
    return [
        pytest.param(
            src,
            dst,
            id=f"{src}->{dst}",
        )
        for src in states
        for dst in states
    ]


@pytest.mark.parametrize(("src", "dst"), pairs(ROLLOUT_PHASES))
def test_rollout_table_matches_the_documented_one(src: str, dst: str) -> None:
    assert (dst in ROLLOUT_TRANSITIONS[P(src)]) == ((src, dst) in LEGAL_ROLLOUT)


@pytest.mark.parametrize(("src", "dst"), pairs(ASSIGNMENT_STATES))
def test_assignment_table_matches_the_documented_one(src: str, dst: str) -> None:
    assert (dst in ASSIGNMENT_TRANSITIONS[A(src)]) == ((src, dst) in LEGAL_ASSIGNMENT)


def make_rollout(session: Session, phase: RolloutPhase = P.PENDING) -> Rollout:
    version = stored_version(session, "detector")
    rollout = Rollout(name="r", spec={}, model_version_id=version.id, phase=phase)
    session.add(rollout)
    session.flush()
    return rollout


def make_assignments(
    session: Session, rollout: Rollout, states: Sequence[AssignmentState]
) -> list[tuple[Assignment, str]]:
    cluster = Cluster(name="site", driver="simulated")
    session.add(cluster)
    session.flush()
    nodes = [Node(cluster_id=cluster.id, name=f"n{i:04}", last_seq=0) for i in range(len(states))]
    session.add_all(nodes)
    session.flush()
    version = session.get(ModelVersion, rollout.model_version_id)
    assert version is not None
    rows = [
        Assignment(node_id=n.id, model_id=version.model_id, rollout_id=rollout.id, state=s)
        for n, s in zip(nodes, states, strict=True)
    ]
    session.add_all(rows)
    session.flush()
    return [(a, f"site/{n.name}") for a, n in zip(rows, nodes, strict=True)]


def events_of(session: Session, rollout: Rollout) -> list[Event]:
    session.flush()
    return list(
        session.scalars(select(Event).where(Event.rollout_id == rollout.id).order_by(Event.id))
    )


def counted(src: str, dst: str) -> float:
    value = REGISTRY.get_sample_value(
        "edgefleet_rollout_transitions_total", {"from_phase": src, "to_phase": dst}
    )
    return value or 0.0


def test_the_tables_cover_every_state() -> None:
    assert set(ROLLOUT_TRANSITIONS) == set(P)
    assert all(targets <= set(P) for targets in ROLLOUT_TRANSITIONS.values())
    assert set(ASSIGNMENT_TRANSITIONS) == set(A)
    assert all(targets <= set(A) for targets in ASSIGNMENT_TRANSITIONS.values())
    # No state lists itself: a transition always changes something.
    assert all(s not in ROLLOUT_TRANSITIONS[s] for s in P)
    assert all(s not in ASSIGNMENT_TRANSITIONS[s] for s in A)
    # A finished rollout only starts again (re-apply, retry) or is undone.
    for phase in TERMINAL_PHASES:
        assert ROLLOUT_TRANSITIONS[phase] <= {P.PENDING, P.ROLLED_BACK}


@pytest.mark.parametrize(("src", "dst"), pairs(ROLLOUT_PHASES))
def test_rollout_transition(session: Session, src: str, dst: str) -> None:
    rollout = make_rollout(session, P(src))
    before = counted(src, dst)
    if (src, dst) in LEGAL_ROLLOUT:
        transition(session, rollout, P(dst), reason="Tested", message="by a test", data={"k": 1})
        assert rollout.phase == dst
        assert rollout.message == "by a test"
        (event,) = events_of(session, rollout)
        assert (event.object_kind, event.object_name) == ("Rollout", "r")
        assert (event.reason, event.message) == ("Tested", "by a test")
        assert event.data == {"from": src, "to": dst, "k": 1}
        assert counted(src, dst) == before + 1
        assert (rollout.started_at is not None) == (dst == "Progressing")
        assert (rollout.finished_at is not None) == (dst in FINISHED)
    else:
        with pytest.raises(IllegalTransition) as info:
            transition(session, rollout, P(dst), reason="Tested", message="by a test")
        assert info.value.status_code == 409
        assert info.value.code == "conflict"
        assert f"rollout r is {src}: it cannot become {dst}" in info.value.message
        assert rollout.phase == src
        assert rollout.message is None
        assert events_of(session, rollout) == []
        assert counted(src, dst) == before


def test_started_at_is_kept_when_progressing_again(session: Session) -> None:
    rollout = make_rollout(session)
    transition(session, rollout, P.PROGRESSING, reason="Started", message="go")
    first = rollout.started_at
    transition(session, rollout, P.PAUSED, reason="Paused", message="wait")
    transition(session, rollout, P.PROGRESSING, reason="Resumed", message="go on")
    assert rollout.started_at == first
    assert [e.reason for e in events_of(session, rollout)] == ["Started", "Paused", "Resumed"]


@pytest.mark.parametrize(("src", "dst"), pairs(ASSIGNMENT_STATES))
def test_assignment_move(session: Session, src: str, dst: str) -> None:
    rollout = make_rollout(session)
    batch = make_assignments(session, rollout, [A(src)])
    ((assignment, key),) = batch
    if src == dst:
        # Already there: a no-op, so a level-triggered reconciler can repeat itself.
        assert move(session, rollout, batch, A(dst), reason="Tested") == 0
        assert assignment.state == src
        assert events_of(session, rollout) == []
    elif (src, dst) in LEGAL_ASSIGNMENT:
        moved = move(
            session, rollout, batch, A(dst), reason="Tested", messages={assignment.id: "why"}
        )
        assert moved == 1
        assert assignment.state == dst
        assert assignment.message == "why"
        (event,) = events_of(session, rollout)
        assert (event.object_kind, event.object_name, event.reason) == ("Rollout", "r", "Tested")
        assert event.message == f"1 node(s) → {dst}"
        assert event.data["to"] == dst
        assert event.data["from"] == {src: 1}
        assert event.data["nodes"] == [key]
        assert list(event.data["reasons"].values()) == ["why"]
    else:
        with pytest.raises(IllegalTransition) as info:
            move(session, rollout, batch, A(dst), reason="Tested", messages={assignment.id: "why"})
        assert info.value.status_code == 409
        assert f"assignment of node {key} is {src}: it cannot become {dst}" in info.value.message
        assert assignment.state == src
        assert assignment.message is None
        assert events_of(session, rollout) == []


def test_move_writes_one_event_for_a_batch(session: Session) -> None:
    rollout = make_rollout(session)
    batch = make_assignments(session, rollout, [A.PENDING] * 60)
    assert move(session, rollout, batch, A.APPLYING, reason="Applying") == 60
    (event,) = events_of(session, rollout)
    assert event.message == "60 node(s) → Applying"
    assert event.data == {
        "to": "Applying",
        "from": {"Pending": 60},
        "nodes": sorted(key for _, key in batch),
    }
    assert {a.state for a, _ in batch} == {A.APPLYING}


def test_move_counts_each_source_state_and_skips_nodes_already_there(session: Session) -> None:
    rollout = make_rollout(session)
    states = [A.RUNNING] * 20 + [A.HEALTHY] * 30 + [A.FAILED] * 5
    batch = make_assignments(session, rollout, states)
    assert move(session, rollout, batch, A.FAILED, reason="GateFailed") == 50
    (event,) = events_of(session, rollout)
    assert event.data["from"] == {"Running": 20, "Healthy": 30}
    assert event.data["nodes"] == sorted(key for _, key in batch[:50])
    assert event.message == "50 node(s) → Failed"


def test_move_caps_the_node_list_of_its_event(session: Session) -> None:
    rollout = make_rollout(session)
    batch = make_assignments(session, rollout, [A.PENDING] * 520)
    assert move(session, rollout, batch, A.DEFERRED, reason="NodeOffline") == 520
    (event,) = events_of(session, rollout)
    assert event.data["from"] == {"Pending": 520}
    assert event.data["nodes"] == sorted(key for _, key in batch)[:500]


def test_move_of_nothing_writes_nothing(session: Session) -> None:
    rollout = make_rollout(session)
    assert move(session, rollout, [], A.APPLYING, reason="Applying") == 0
    assert events_of(session, rollout) == []


def test_an_illegal_node_in_a_batch_moves_no_node(session: Session) -> None:
    """All or nothing, like the transition of a rollout (a fixed bug: the legal nodes
    before the illegal one used to be moved, without an event, before the error)."""
    rollout = make_rollout(session)
    batch = make_assignments(session, rollout, [A.PENDING, A.PENDING, A.HEALTHY])
    with pytest.raises(IllegalTransition):
        move(session, rollout, batch, A.APPLYING, reason="Applying")
    assert [a.state for a, _ in batch] == [A.PENDING, A.PENDING, A.HEALTHY]
    assert events_of(session, rollout) == []


# What each rollout's nodes would be doing in that phase, so retry and undo find rows to
# work on.
NODES_IN = {
    "Pending": "Pending",
    "Progressing": "Running",
    "Paused": "Running",
    "Succeeded": "Healthy",
    "Failed": "Pending",
    "RolledBack": "RolledBack",
    "Aborted": "RolledBack",
}


@pytest.mark.parametrize("action", list(COMMANDS))
@pytest.mark.parametrize("phase", ROLLOUT_PHASES)
def test_command(session: Session, phase: str, action: str) -> None:
    rollout = make_rollout(session, P(phase))
    make_assignments(session, rollout, [A(NODES_IN[phase])])
    expected = COMMANDS[action].get(phase)
    if expected is not None:
        assert commands.command(session, "r", action).phase == expected
        rollout_moves = [e.data for e in events_of(session, rollout) if "nodes" not in e.data]
        assert rollout_moves == [{"from": phase, "to": expected}]
    else:
        with pytest.raises(Conflict) as info:
            commands.command(session, "r", action)
        assert info.value.status_code == 409
        assert rollout.phase == phase
        assert events_of(session, rollout) == []


def test_the_wave_table_is_the_documented_one() -> None:
    assert set(WavePhase) == set(WAVE_PHASES)
    assert set(WAVE_TRANSITIONS) == set(WavePhase)
    for src in WAVE_PHASES:
        for dst in WAVE_PHASES:
            assert (dst in WAVE_TRANSITIONS[WavePhase(src)]) == ((src, dst) in LEGAL_WAVE), (
                f"{src} -> {dst}"
            )


@pytest.mark.parametrize(("src", "dst"), pairs(WAVE_PHASES))
def test_advance_wave(session: Session, src: str, dst: str) -> None:
    rollout = make_rollout(session, P.PROGRESSING)
    wave = Wave(rollout_id=rollout.id, index=2, phase=src, node_count=1)
    if src == dst or (src, dst) in LEGAL_WAVE:
        advance_wave(rollout, wave, WavePhase(dst))
        assert wave.phase == dst
    else:
        with pytest.raises(IllegalTransition) as info:
            advance_wave(rollout, wave, WavePhase(dst))
        assert info.value.status_code == 409
        assert f"wave 2 of rollout r is {src}: it cannot become {dst}" in info.value.message
        assert wave.phase == src
