"""Every (from, to) pair of the two state machines: legal transitions happen and write
exactly one Event; illegal ones raise IllegalTransition (409) and write nothing."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.db.models import (
    Assignment,
    AssignmentState,
    Cluster,
    Event,
    Model,
    ModelVersion,
    Node,
    Rollout,
    RolloutPhase,
)
from controller.rollouts.state import (
    ASSIGNMENT_TRANSITIONS,
    ROLLOUT_TRANSITIONS,
    TERMINAL_PHASES,
    IllegalTransition,
    move,
    transition,
)

P, A = RolloutPhase, AssignmentState


def make_rollout(session: Session, phase: RolloutPhase = P.PENDING) -> Rollout:
    model = Model(name="detector")
    session.add(model)
    session.flush()
    version = ModelVersion(
        model_id=model.id, version="1.0.0", format="onnx", sha256="a" * 64, size_bytes=1
    )
    session.add(version)
    session.flush()
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


ROLLOUT_PAIRS = [pytest.param(src, dst, id=f"{src}->{dst}") for src in P for dst in P]


@pytest.mark.parametrize(("src", "dst"), ROLLOUT_PAIRS)
def test_rollout_transition(session: Session, src: RolloutPhase, dst: RolloutPhase) -> None:
    rollout = make_rollout(session, src)
    before = counted(src, dst)
    if dst in ROLLOUT_TRANSITIONS[src]:
        transition(session, rollout, dst, reason="Tested", message="by a test", data={"k": 1})
        assert rollout.phase == dst
        assert rollout.message == "by a test"
        (event,) = events_of(session, rollout)
        assert (event.object_kind, event.object_name) == ("Rollout", "r")
        assert (event.reason, event.message) == ("Tested", "by a test")
        assert event.data == {"from": src, "to": dst, "k": 1}
        assert counted(src, dst) == before + 1
        assert (rollout.started_at is not None) == (dst == P.PROGRESSING)
        assert (rollout.finished_at is not None) == (dst in TERMINAL_PHASES)
    else:
        with pytest.raises(IllegalTransition) as info:
            transition(session, rollout, dst, reason="Tested", message="by a test")
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


ASSIGNMENT_PAIRS = [pytest.param(src, dst, id=f"{src}->{dst}") for src in A for dst in A]


@pytest.mark.parametrize(("src", "dst"), ASSIGNMENT_PAIRS)
def test_assignment_move(session: Session, src: AssignmentState, dst: AssignmentState) -> None:
    rollout = make_rollout(session)
    batch = make_assignments(session, rollout, [src])
    ((assignment, key),) = batch
    if src == dst:
        # Already there: a no-op, so a level-triggered reconciler can repeat itself.
        assert move(session, rollout, batch, dst, reason="Tested") == 0
        assert assignment.state == src
        assert events_of(session, rollout) == []
    elif dst in ASSIGNMENT_TRANSITIONS[src]:
        moved = move(session, rollout, batch, dst, reason="Tested", messages={assignment.id: "why"})
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
            move(session, rollout, batch, dst, reason="Tested", messages={assignment.id: "why"})
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
