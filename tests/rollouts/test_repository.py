"""The rollout's read paths that grow with its nodes: the dashboard's list of a
rollout's nodes (``rollout_workloads``: wave by wave, each bounded by the rows still
wanted, a small wave found by ``ix_assignments_wave_id``), and its counts in one pass
(``tally``, as ``state_counts``, ``target_counts`` and ``pending_counts`` tell them).
Row counts from Postgres's plans (tests/plans.py), never times."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from controller.db.models import (
    AssignmentState,
    Cluster,
    Model,
    ModelVersion,
    Rollout,
    RolloutPhase,
    Wave,
)
from controller.rollouts import repository as repo
from tests.plans import captured
from tests.rollouts.helpers import pending_oracle, state_counts, stored_version, target_counts

CLUSTERS = ("west", "east", "central")  # created in this order: ids and names differ
PER_CLUSTER = 400
WAVES = (1, 119, 480, 600)  # 1 node, then 10 %, 50 %, 100 % of 1,200 (cumulative)

_NODES = text(
    """
    INSERT INTO nodes (cluster_id, name, labels, architecture, capacity, allocatable,
                       runtimes, health, last_seq, benchmarks_pending, created_at, updated_at)
    SELECT :cluster_id, :cluster || '-n' || lpad(CAST(i AS text), 4, '0'), '{}', 'amd64',
           '{}', '{}', '[]', 'Ready', 0, 0, now(), now()
    FROM generate_series(1, :count) AS i
    """
)

# Each node's wave by its place in a shuffled order (ids scattered over the clusters and
# their names): the first node in wave 0, the next 119 in wave 1, and so on.
_ASSIGN = text(
    """
    INSERT INTO assignments (node_id, model_id, rollout_id, wave_id, desired_version_id,
                             state, metrics, updated_at)
    SELECT s.id, :model_id, :rollout_id,
           (SELECT w.id FROM waves w WHERE w.rollout_id = :rollout_id AND w.index =
               CASE WHEN s.rank < 1 THEN 0 WHEN s.rank < 120 THEN 1
                    WHEN s.rank < 600 THEN 2 ELSE 3 END),
           :version_id,
           CASE WHEN s.rank < 120 THEN 'Healthy' WHEN s.rank < 600 THEN 'Running'
                ELSE 'Pending' END,
           '{}', now()
    FROM (SELECT id, row_number() OVER (ORDER BY md5(CAST(id AS text))) - 1 AS rank
          FROM nodes) AS s
    """
)


@dataclass
class Fleet:
    rollout: Rollout
    nodes: int
    # (wave index, cluster, node) of every assignment, in the page's order.
    order: list[tuple[int, str, str]]


@pytest.fixture
def fleet(session: Session) -> Fleet:
    """1,200 nodes in three clusters, one rollout over all of them in four waves."""
    for name in CLUSTERS:
        cluster = Cluster(name=name, driver="simulated")
        session.add(cluster)
        session.flush()
        session.execute(_NODES, {"cluster_id": cluster.id, "cluster": name, "count": PER_CLUSTER})
    version = stored_version(session, "listed")
    rollout = Rollout(name="everywhere", spec={}, model_version_id=version.id, phase="Progressing")
    session.add(rollout)
    session.flush()
    session.add_all(Wave(rollout_id=rollout.id, index=i, node_count=n) for i, n in enumerate(WAVES))
    session.flush()
    session.execute(
        _ASSIGN, {"model_id": version.model_id, "rollout_id": rollout.id, "version_id": version.id}
    )
    session.execute(text("ANALYZE nodes"))
    session.execute(text("ANALYZE assignments"))
    session.refresh(rollout)
    order = sorted(
        (int(w), str(c), str(n))
        for w, c, n in session.execute(
            text(
                "SELECT w.index, c.name, n.name FROM assignments a JOIN waves w"
                " ON w.id = a.wave_id JOIN nodes n ON n.id = a.node_id"
                " JOIN clusters c ON c.id = n.cluster_id WHERE a.rollout_id = :r"
            ),
            {"r": rollout.id},
        ).all()
    )
    return Fleet(rollout, len(CLUSTERS) * PER_CLUSTER, order)


def _listed(session: Session, rollout: Rollout, limit: int) -> list[tuple[int, str, str]]:
    rows = repo.rollout_workloads(session, rollout, limit=limit)
    return [(int(r.wave or 0), r.cluster, r.node) for r in rows]


def test_the_rollouts_nodes_are_listed_by_wave_then_name_cut_at_the_limit(
    session: Session, fleet: Fleet
) -> None:
    assert [sum(1 for o in fleet.order if o[0] == i) for i in range(4)] == list(WAVES)
    for limit in (1, 2, 119, 120, 121, 200, 600, 601, 1200, 1500):
        assert _listed(session, fleet.rollout, limit) == fleet.order[:limit], limit


def test_a_small_wave_is_found_by_its_index_and_a_page_reads_its_rows_only(
    session: Session, fleet: Fleet
) -> None:
    """The first 120 (wave 0's one node and wave 1's 119) read 120 assignment rows, the
    one-node wave by ``ix_assignments_wave_id``: one query over the rollout joined and
    sorted all 1,200 of them to keep 120. Scans are ruled out, as a fleet's size would
    rule them out (a few pages of a test table are cheaper to read whole)."""
    session.execute(text("SET LOCAL enable_seqscan = off"))
    session.refresh(fleet.rollout, ["waves"])
    with captured(session) as captured_statements:
        assert _listed(session, fleet.rollout, 120) == fleet.order[:120]
    counts, *statements = captured_statements  # the waves' sizes first, from the counts
    assert counts.rows_read("assignments") == 0, counts.plan
    read = [s.rows_read("assignments") for s in statements]
    assert len(statements) == 2, [s.sql for s in statements]  # waves 0 and 1, no more
    assert "ix_assignments_wave_id" in statements[0].indexes(), statements[0].plan
    assert read[0] <= 1, statements[0].plan
    assert sum(read) <= 120, read


def test_a_large_wave_is_walked_in_name_order_whatever_the_planner_estimates(
    session: Session, fleet: Fleet
) -> None:
    """Waves 0 and 1 fill 120 rows; the other 80 come from wave 2 (480 of the 1,200
    nodes), walked cluster by cluster, node by node in name order: about 80 / 0.4 node
    rows read, and never a join over every node, even with statistics that make one
    look cheap (nodes' estimated rows inflated a hundredfold, as dead row versions
    left by heartbeats inflate them). Scans are ruled out, as a fleet's size would
    rule them out (a few pages of a test table are cheaper to read whole)."""
    session.execute(text("UPDATE pg_class SET reltuples = 120000 WHERE relname = 'nodes'"))
    session.execute(text("SET LOCAL enable_seqscan = off"))  # as a fleet's size would
    session.refresh(fleet.rollout, ["waves"])
    with captured(session) as statements:
        assert _listed(session, fleet.rollout, 200) == fleet.order[:200]
    walk = next(s for s in statements if "LATERAL" in s.sql)
    assert "uq_nodes_cluster_id_name" in walk.indexes(), walk.plan
    assert walk.rows_read("nodes") <= 400, walk.plan
    # (The small waves' reads are the other tests' subject: under these inflated
    # statistics their plans are the planner's choice, not the walk's.)
    assert walk.rows_read("assignments") <= 400, walk.plan


@pytest.mark.parametrize(
    "phase", [RolloutPhase.PROGRESSING, RolloutPhase.SUCCEEDED, RolloutPhase.ROLLED_BACK]
)
def test_the_tally_is_what_the_three_counts_say(
    session: Session, fleet: Fleet, phase: RolloutPhase
) -> None:
    """A rollout with a variant on some nodes, nodes in every state (some Failed back on
    their previous version, some Failed on another), in each phase that counts pending
    nodes differently."""
    r = fleet.rollout
    variant = ModelVersion(
        model_id=session.scalar(select(Model.id).where(Model.name == "listed")),
        version="1.0.0-int8",
        format="onnx",
        sha256="b" * 64,
        size_bytes=1,
    )
    session.add(variant)
    session.flush()
    states = list(AssignmentState)
    session.execute(
        text(
            "UPDATE assignments SET state = (CAST(:states AS text[]))[1 + id % :n],"
            " target_version_id = CASE WHEN id % 3 = 0 THEN :variant END,"
            " previous_version_id = CASE WHEN id % 5 < 2 THEN desired_version_id"
            " WHEN id % 5 = 2 THEN :variant END WHERE rollout_id = :r"
        ),
        {"states": [str(s) for s in states], "n": len(states), "variant": variant.id, "r": r.id},
    )
    r.phase = phase
    session.flush()
    session.expire_all()
    tally = repo.tally(session, r)
    assert tally.states == state_counts(session, r.id)
    assert tally.versions == target_counts(session, r)
    assert tally.versions == {"1.0.0": 800, "1.0.0-int8": 400}
    assert tally.pending == pending_oracle(session, r)
    assert tally.pending == repo.pending_counts(session, [r.id]).get(r.id, 0)
    if phase != RolloutPhase.PROGRESSING:
        assert tally.pending > 0
    totals = repo.state_totals(session, [r.id])
    assert totals == {
        r.id: {
            s: sum(w.get(s, 0) for w in tally.states.values())
            for s in {s for w in tally.states.values() for s in w}
        }
    }


def test_pages_of_the_rollouts_nodes_add_up_whichever_way_each_wave_is_read(
    session: Session, fleet: Fleet
) -> None:
    """Pages at any offset, of every node, of one state, of one wave, are the slices of
    the one order: waves before a page skipped by their counts, a large wave walked
    (early pages of waves 2 and 3), the others read and sorted."""
    session.refresh(fleet.rollout, ["waves"])
    waves = [w.id for w in fleet.rollout.waves]

    def page(limit: int, offset: int, **only: Any) -> list[tuple[int, str, str]]:
        rows, total = repo.rollout_nodes(
            session,
            fleet.rollout,
            limit=limit,
            offset=offset,
            **({"state": None, "wave_id": None} | only),
        )
        assert total == len(expected(**only))
        return [(int(r.wave or 0), r.cluster, r.node) for r in rows]

    def expected(**only: Any) -> list[tuple[int, str, str]]:
        wave = only.get("wave_id")
        state = {"Healthy": (0, 1), "Running": (2,), "Pending": (3,)}.get(only.get("state") or "")
        return [
            o
            for o in fleet.order
            if (wave is None or waves[o[0]] == wave) and (state is None or o[0] in state)
        ]

    for limit, offset in ((50, 0), (100, 100), (80, 150), (300, 600), (1000, 900), (10, 1195)):
        assert page(limit, offset) == fleet.order[offset : offset + limit], (limit, offset)
    for only in ({"state": "Running"}, {"state": "Pending"}, {"wave_id": waves[3]}):
        for limit, offset in ((40, 0), (100, 60), (500, 300)):
            want = expected(**only)[offset : offset + limit]
            assert page(limit, offset, **only) == want, (only, limit, offset)
