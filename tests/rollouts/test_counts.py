"""A rollout's assignments counted as they change (migration 0014): the triggers append
a delta for every change of a counted column, however it is made (the ORM, Core, a
cascade from a deleted node or wave, a rollout deleted), never for a heartbeat's metric
window; folding adds them into the counts; reads sum both. Checked against the
aggregate over the assignments themselves (``counted_oracle``), on Postgres and on the
embedded SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.orm import Session

from controller.db import migrate
from controller.db.models import (
    Assignment,
    AssignmentState,
    Cluster,
    Model,
    ModelVersion,
    Node,
    Rollout,
    Wave,
    assignment_count_deltas,
)
from controller.db.session import dispose_engines, get_engine, session_scope
from controller.rollouts import repository as repo
from controller.settings import Settings
from tests.rollouts.helpers import assert_counts_agree, counted_oracle

A = AssignmentState


def _deltas(session: Session) -> int:
    session.flush()
    return int(session.scalar(select(func.count()).select_from(assignment_count_deltas)) or 0)


def _fleet(
    session: Session, versions: tuple[str, ...] = ("1",), nodes: int = 1
) -> tuple[Model, list[ModelVersion], list[Node]]:
    """A cluster of ``nodes`` nodes and a model with ``versions``, as rows only."""
    cluster = Cluster(name="west", driver="simulated")
    model = Model(name="counted")
    session.add_all([cluster, model])
    session.flush()
    stored = [
        ModelVersion(model_id=model.id, version=v, format="onnx", sha256=v * 64, size_bytes=1)
        for v in versions
    ]
    made = [Node(cluster_id=cluster.id, name=f"n{i}") for i in range(nodes)]
    session.add_all([*stored, *made])
    session.flush()
    return model, stored, made


def _every_kind_of_change(session: Session) -> None:
    """Assignments of two rollouts changed every way the product (or an operator) can
    change them, the counts checked against the oracle after each."""
    model, (v1, v2), nodes = _fleet(session, ("a", "b"), nodes=4)
    first = Rollout(name="first", spec={}, model_version_id=v2.id, phase="Progressing")
    second = Rollout(name="second", spec={}, model_version_id=v2.id, phase="Pending")
    session.add_all([first, second])
    session.flush()
    w0, w1 = (Wave(rollout_id=first.id, index=i, node_count=2) for i in range(2))
    session.add_all([w0, w1])
    session.flush()

    def agree() -> None:
        session.flush()
        assert_counts_agree(session, first.id, second.id)

    rows = [
        Assignment(
            node_id=n.id,
            model_id=model.id,
            rollout_id=first.id if i < 3 else None,
            wave_id=(w0.id, w0.id, w1.id, None)[i],
            desired_version_id=v1.id,
            previous_version_id=v1.id,
        )
        for i, n in enumerate(nodes)
    ]
    session.add_all(rows)
    agree()
    assert {c.n for c in repo.counted(session, [first.id])} == {2, 1}

    rows[0].state, rows[0].desired_version_id = A.APPLYING, v2.id  # moved off v1
    rows[1].state = A.APPLYING
    agree()

    before = _deltas(session)  # a heartbeat's metric window: no counted column
    session.execute(update(Assignment).values(metrics={"p95_ms": 12.0}))
    rows[2].message = "a message is not counted either"
    assert _deltas(session) == before

    repo.fold_counts(session, first.id)
    assert _deltas(session) == 0
    agree()

    rows[3].rollout_id, rows[3].wave_id = second.id, None  # claimed by another rollout
    rows[2].rollout_id = second.id
    rows[1].target_version_id = v1.id  # a variant picked for its class
    agree()
    session.execute(delete(Wave).where(Wave.id == w1.id))  # ON DELETE SET NULL
    session.expire_all()
    agree()
    session.execute(delete(Node).where(Node.id == nodes[0].id))  # cascades to its row
    agree()
    repo.fold_counts(session, first.id)
    repo.fold_counts(session, second.id)
    agree()
    assert counted_oracle(session, [first.id]), "the first rollout keeps a node"

    session.execute(delete(Rollout).where(Rollout.id == second.id))  # SET NULL, CASCADE
    session.expire_all()
    assert repo.unfolded(session) == [], "the deleted rollout's deltas are dropped"
    assert repo.counted(session, [second.id]) == []
    agree()


def test_every_change_is_counted_on_postgres(session: Session) -> None:
    _every_kind_of_change(session)


def test_every_change_is_counted_on_sqlite(tmp_path: Path, settings: Settings) -> None:
    local = settings.model_copy(update={"database_url": f"sqlite:///{tmp_path}/embedded.db"})
    migrate.upgrade(local)
    try:
        with session_scope(get_engine(local)) as s:
            _every_kind_of_change(s)
    finally:
        dispose_engines()


def test_a_delta_committed_while_a_fold_runs_is_kept(
    engine: Engine, settings: Settings, committed: None
) -> None:
    """An apply taking a rollout's node writes a delta of that rollout in its own
    transaction: a fold running before it commits neither sees nor deletes it, and the
    count stays exact once both committed."""
    with session_scope() as s:
        model, (version,), (node,) = _fleet(s)
        held = Rollout(name="held", spec={}, model_version_id=version.id, phase="Succeeded")
        taker = Rollout(name="taker", spec={}, model_version_id=version.id, phase="Pending")
        s.add_all([held, taker])
        s.flush()
        s.add(Assignment(node_id=node.id, model_id=model.id, rollout_id=held.id))
        ids = held.id, taker.id
    with Session(engine) as apply, Session(engine) as fold:
        claimed = apply.execute(
            update(Assignment).where(Assignment.rollout_id == ids[0]).values(rollout_id=ids[1])
        )
        assert claimed.rowcount == 1  # type: ignore[attr-defined]
        assert repo.try_lock(fold, ids[0]) is not None
        repo.fold_counts(fold, ids[0])  # sees the insert's delta, not the claim's
        fold.commit()
        apply.commit()
    with session_scope() as s:
        assert_counts_agree(s, *ids)
        assert {c.rollout_id: c.n for c in repo.counted(s, ids)} == {ids[1]: 1}
        assert sorted(repo.unfolded(s)) == sorted(ids)  # the claim's -1 and +1 wait


@pytest.mark.parametrize("unfolded_left", [True, False])
def test_tick_folds_the_counts_of_rollouts_without_a_step(
    settings: Settings, committed: None, unfolded_left: bool
) -> None:
    """Deltas of a settled rollout (nodes another rollout took) are folded by beat's
    tick, under the rollout's lock; a rollout locked meanwhile (a command) waits for the
    next tick."""
    from controller.rollouts import reconciler

    with session_scope() as s:
        model, (version,), (node,) = _fleet(s)
        done = Rollout(name="done", spec={}, model_version_id=version.id, phase="Succeeded")
        s.add(done)
        s.flush()
        s.add(Assignment(node_id=node.id, model_id=model.id, rollout_id=done.id, state="Healthy"))
        rollout_id = done.id
    with session_scope() as holder:
        if unfolded_left:
            assert repo.try_lock(holder, rollout_id) is not None
        assert reconciler.tick(settings) == []
    with session_scope() as s:
        assert repo.unfolded(s) == ([rollout_id] if unfolded_left else [])
        assert_counts_agree(s, rollout_id)
