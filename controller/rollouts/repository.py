"""All SQL of rollouts, waves and assignments, and the retention of their events."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    delete,
    func,
    literal,
    or_,
    select,
    text,
    tuple_,
    union_all,
)
from sqlalchemy.orm import Session, aliased, load_only, selectinload

from controller.db.arrays import any_of
from controller.db.models import (
    Assignment,
    AssignmentState,
    Cluster,
    Event,
    Model,
    ModelVersion,
    Node,
    NodeHealth,
    Rollout,
    RolloutPhase,
    Wave,
    assignment_count_deltas,
    assignment_counts,
)
from controller.errors import NotFound
from controller.rollouts.state import ACTIVE_PHASES


@dataclass
class Row:
    """An assignment with what the reconciler needs of its node."""

    assignment: Assignment
    node: Node
    cluster: str

    @property
    def key(self) -> str:
        return f"{self.cluster}/{self.node.name}"


def get(session: Session, name: str) -> Rollout | None:
    return session.scalar(select(Rollout).where(Rollout.name == name))


def require(session: Session, name: str) -> Rollout:
    """The rollout named ``name``, or a 404 naming it."""
    rollout = get(session, name)
    if rollout is None:
        raise NotFound(f"rollout {name!r} not found")
    return rollout


def lock(session: Session, name: str) -> Rollout | None:
    """Row lock, waiting: commands and applies serialize with the reconciler. The row is
    read again under the lock, even if the session had loaded it before."""
    stmt = select(Rollout).where(Rollout.name == name).with_for_update()
    return session.scalar(stmt.execution_options(populate_existing=True))


def try_lock(session: Session, rollout_id: int) -> Rollout | None:
    """Row lock or nothing: a second reconciler of the same rollout steps aside."""
    stmt = select(Rollout).where(Rollout.id == rollout_id).with_for_update(skip_locked=True)
    return session.scalar(stmt)


def list_rollouts(session: Session, *, limit: int, offset: int) -> tuple[Sequence[Rollout], int]:
    total = session.scalar(select(func.count()).select_from(Rollout)) or 0
    rows = session.scalars(
        select(Rollout)
        .options(selectinload(Rollout.waves))  # one query for every listed rollout's
        .order_by(Rollout.created_at.desc(), Rollout.id.desc())
        .limit(limit)
        .offset(offset)
    ).all()
    return rows, total


def spec_of(session: Session, rollout_id: int) -> dict[str, Any] | None:
    """A rollout's stored spec by id (None: deleted)."""
    return session.scalar(select(Rollout.spec).where(Rollout.id == rollout_id))


def rows_of(session: Session, rollout_id: int) -> list[Row]:
    # Only the node columns a step reads: labels, capacity and the like are JSON documents
    # that would otherwise be parsed for every node of the rollout on every step.
    stmt = (
        select(Assignment, Node, Cluster.name)
        .options(load_only(Node.id, Node.name, Node.health, Node.cluster_id))
        .join(Node, Node.id == Assignment.node_id)
        .join(Cluster, Cluster.id == Node.cluster_id)
        .where(Assignment.rollout_id == rollout_id)
        .order_by(Assignment.id)
    )
    return [Row(r[0], r[1], r[2]) for r in session.execute(stmt)]


def assignments_for_nodes(
    session: Session, model_id: int, node_ids: Sequence[int]
) -> dict[int, Assignment]:
    if not node_ids:
        return {}
    stmt = select(Assignment).where(
        Assignment.model_id == model_id, any_of(Assignment.node_id, node_ids)
    )
    return {a.node_id: a for a in session.scalars(stmt)}


def owners(
    session: Session, model_id: int, node_ids: Sequence[int], *, exclude: str
) -> dict[str, list[str]]:
    """Active rollouts (other than ``exclude``) holding any of these nodes for the model.
    Every node the other rollouts hold is read and the selection filtered here: the
    selection (the whole fleet, maybe) is not sent to the database, while what other
    active rollouts hold of one model is usually nothing."""
    wanted = set(node_ids)
    if not wanted:
        return {}
    stmt = (
        select(Rollout.name, Assignment.node_id, Cluster.name, Node.name)
        .select_from(Assignment)
        .join(Rollout, Rollout.id == Assignment.rollout_id)
        .join(Node, Node.id == Assignment.node_id)
        .join(Cluster, Cluster.id == Node.cluster_id)
        .where(
            Assignment.model_id == model_id,
            Rollout.phase.in_(ACTIVE_PHASES),
            Rollout.name != exclude,
        )
    )
    out: dict[str, list[str]] = {}
    for owner, node_id, cluster, node in session.execute(stmt):
        if node_id in wanted:
            out.setdefault(owner, []).append(f"{cluster}/{node}")
    return out


def version_of(session: Session, model: str, version: str) -> tuple[ModelVersion, Model] | None:
    row = session.execute(
        select(ModelVersion, Model)
        .join(Model)
        .where(Model.name == model, ModelVersion.version == version)
    ).first()
    return (row[0], row[1]) if row else None


def variants_of(session: Session, version_id: int) -> list[ModelVersion]:
    """The versions derived from this one (edgefleet models optimize), oldest first."""
    stmt = select(ModelVersion).where(ModelVersion.parent_id == version_id)
    return list(session.scalars(stmt.order_by(ModelVersion.id)))


def versions_by_id(session: Session, ids: set[int]) -> dict[int, ModelVersion]:
    if not ids:
        return {}
    return {
        v.id: v for v in session.scalars(select(ModelVersion).where(any_of(ModelVersion.id, ids)))
    }


def delete_waves(session: Session, rollout_id: int) -> None:
    session.execute(delete(Wave).where(Wave.rollout_id == rollout_id))


def release(session: Session, rollout_id: int, keep_node_ids: set[int]) -> None:
    for a in session.scalars(select(Assignment).where(Assignment.rollout_id == rollout_id)):
        if a.node_id not in keep_node_ids:
            a.rollout_id = None
            a.wave_id = None


def events(session: Session, rollout_id: int, *, limit: int) -> Sequence[Event]:
    """The rollout's newest ``limit`` events, read backwards along
    ``ix_events_rollout_id``. The rollout is bounded as a range of that index's whole
    key, ``(rollout_id, id)``, not by ``rollout_id =``: with the equality Postgres takes
    the ORDER BY to be ``id`` alone, which the primary key gives too, and it walked the
    primary key back from the newest event, filtering, as though a rollout's events were
    spread evenly over the log; they are together in time, so for a rollout of 90 days
    ago that read every later event (bench/bench_reads.py)."""
    key = tuple_(Event.rollout_id, Event.id)
    return session.scalars(
        select(Event)
        .where(key > tuple_(literal(rollout_id), literal(0)))
        .where(key < tuple_(literal(rollout_id + 1), literal(0)))
        .order_by(Event.rollout_id.desc(), Event.id.desc())
        .limit(limit)
    ).all()


def trailing_data(
    session: Session, rollout_id: int, reason: str, *, limit: int = 20
) -> list[dict[str, Any]]:
    """The data of the rollout's latest events of ``reason``, newest first, up to the
    first event of another reason (at most ``limit`` read, as :func:`events` reads)."""
    out: list[dict[str, Any]] = []
    for e in events(session, rollout_id, limit=limit):
        if e.reason != reason:
            break
        out.append(e.data or {})
    return out


def to_reconcile(session: Session) -> Sequence[int]:
    """Rollouts with work left: progressing, or reverted phases with nodes not yet back."""
    progressing = select(Rollout.id).where(
        Rollout.phase.in_([RolloutPhase.PENDING, RolloutPhase.PROGRESSING])
    )
    reverting = (
        select(Rollout.id)
        .join(Assignment, Assignment.rollout_id == Rollout.id)
        .join(Node, Node.id == Assignment.node_id)
        .where(
            Rollout.phase.in_(_REVERTED),
            _not_back(),
            # An offline node's revert is seen once it is back: no work until then.
            or_(Assignment.state != AssignmentState.REVERTING, Node.health == NodeHealth.READY),
        )
        .distinct()
    )
    return session.scalars(progressing.union(reverting, _converging())).all()


_REVERTED = (RolloutPhase.ROLLED_BACK, RolloutPhase.ABORTED)


def _not_back() -> ColumnElement[bool]:
    """A reverted rollout's node not yet back on its previous version (step.py
    reverting_left): neither RolledBack nor Failed there after its revert landed."""
    return and_(
        Assignment.state != AssignmentState.ROLLED_BACK,
        or_(
            Assignment.state != AssignmentState.FAILED,
            Assignment.desired_version_id.is_distinct_from(Assignment.previous_version_id),
        ),
    )


# A Succeeded rollout's nodes still on their way to its version (convergence.py
# Convergence): back and switching, or offline while it ran and now back. The ones
# still offline are no work yet: a step would only look at them.
_ON_THEIR_WAY = (AssignmentState.PENDING, AssignmentState.APPLYING)
PENDING_STATES = (AssignmentState.DEFERRED, *_ON_THEIR_WAY)


def _converging() -> Select[int]:
    return (
        select(Rollout.id)
        .join(Assignment, Assignment.rollout_id == Rollout.id)
        .join(Node, Node.id == Assignment.node_id)
        .where(
            Rollout.phase == RolloutPhase.SUCCEEDED,
            or_(
                Assignment.state.in_(_ON_THEIR_WAY),
                and_(
                    # Offline while it ran and back now; or one that failed its check,
                    # on its way back to its previous version and reachable.
                    Assignment.state.in_([AssignmentState.DEFERRED, AssignmentState.REVERTING]),
                    Node.health == NodeHealth.READY,
                ),
            ),
        )
        .distinct()
    )


def pending_counts(session: Session, rollout_ids: Sequence[int]) -> dict[int, int]:
    """Per rollout (by id), its nodes not yet where it leaves them (status.pending): of
    a Succeeded one, not yet on its version (offline while it ran, or back and
    converging); of a RolledBack or Aborted one, not yet seen back on their previous
    version (being reverted, or offline until they are back). From the rollouts' counts
    (``counted``): the rows of a rollout over 100,000 nodes are never read."""
    if not rollout_ids:
        return {}
    phases = dict(
        session.execute(
            select(Rollout.id, Rollout.phase).where(any_of(Rollout.id, rollout_ids))
        ).all()
    )
    out: dict[int, int] = {}
    for c in counted(session, [i for i, p in phases.items() if p in _SETTLED]):
        if _pending(phases[c.rollout_id], c.state, c.moved):
            out[c.rollout_id] = out.get(c.rollout_id, 0) + c.n
    return out


_SETTLED = (RolloutPhase.SUCCEEDED, *_REVERTED)


def _pending(phase: str, state: str, moved: bool) -> bool:
    """Whether a node of a rollout in ``phase``, in ``state``, is not yet where the
    rollout leaves it: a Succeeded one's not yet on its version; a reverted one's not
    back on its previous version (``_not_back``: not RolledBack, and not Failed there)."""
    if phase == RolloutPhase.SUCCEEDED:
        return state in PENDING_STATES
    if phase in _REVERTED:
        return state != AssignmentState.ROLLED_BACK and (state != AssignmentState.FAILED or moved)
    return False


@dataclass(frozen=True)
class Count:
    """How many of a rollout's assignments share a counted key."""

    rollout_id: int
    wave_id: int | None
    """None: in no wave."""
    state: str
    target_version_id: int | None
    """None: the rollout's own version."""
    moved: bool
    """Desired differs from previous: the node is (to be) off its previous version."""
    n: int


_COUNTS, _DELTAS = assignment_counts, assignment_count_deltas
_KEY = ("wave_id", "state", "target_version_id", "moved")


def counted(session: Session, rollout_ids: Sequence[int]) -> list[Count]:
    """The rollouts' assignments counted by key: each key's folded count plus its deltas
    not yet folded (the triggers of migration 0014 keep both). A few rows per wave and
    state, however many nodes: not an aggregate over the assignments."""
    if not rollout_ids:
        return []
    parts = [
        select(t.c.rollout_id, *(t.c[k] for k in _KEY), t.c.n).where(
            any_of(t.c.rollout_id, rollout_ids)
        )
        for t in (_COUNTS, _DELTAS)
    ]
    both = union_all(*parts).subquery()
    key = [both.c.rollout_id, *(both.c[k] for k in _KEY)]
    total = func.sum(both.c.n)
    rows = session.execute(select(*key, total).group_by(*key).having(total != 0))
    return [Count(int(r[0]), r[1] or None, r[2], r[3] or None, bool(r[4]), int(r[5])) for r in rows]


def fold_counts(session: Session, rollout_id: int) -> None:
    """Add the rollout's deltas into its counts and delete them, so that reads sum a
    handful of rows. Only under the rollout's row lock (a step's, a command's, the
    tick's): two folds of one rollout never run at once. On Postgres in one statement,
    one snapshot: a delta committed meanwhile by another transaction (an apply taking
    the rollout's nodes) is either folded and deleted, or left for the next fold."""
    session.flush()  # text() statements do not autoflush: the step's last moves first
    params = {"r": rollout_id}
    if session.get_bind().dialect.name == "postgresql":
        session.execute(_FOLD_POSTGRES, params)
    else:  # SQLite: one writer at a time, so two statements see the same deltas
        session.execute(_FOLD_SQLITE, params)
        session.execute(delete(_DELTAS).where(_DELTAS.c.rollout_id == rollout_id))
    session.execute(delete(_COUNTS).where(_COUNTS.c.rollout_id == rollout_id, _COUNTS.c.n == 0))


_COLUMNS = ", ".join(_KEY)
_UPSERT = f"""
    INSERT INTO assignment_counts (rollout_id, {_COLUMNS}, n)
    SELECT :r, {_COLUMNS}, sum(n) FROM {{source}}
    GROUP BY {_COLUMNS} HAVING sum(n) <> 0 ORDER BY {_COLUMNS}
    ON CONFLICT (rollout_id, {_COLUMNS}) DO UPDATE SET n = assignment_counts.n + excluded.n
"""
_FOLD_POSTGRES = text(
    f"WITH folded AS (DELETE FROM assignment_count_deltas WHERE rollout_id = :r "
    f"RETURNING {_COLUMNS}, n) " + _UPSERT.format(source="folded")
)
_FOLD_SQLITE = text(_UPSERT.format(source="assignment_count_deltas WHERE rollout_id = :r"))


def unfolded(session: Session) -> list[int]:
    """The rollouts with deltas not yet folded (by id), and deltas of deleted rollouts
    dropped."""
    gone = ~select(Rollout.id).where(Rollout.id == _DELTAS.c.rollout_id).exists()
    session.execute(delete(_DELTAS).where(gone))
    return [int(i) for i in session.scalars(select(_DELTAS.c.rollout_id).distinct())]


@dataclass
class Tally:
    """A rollout's assignments counted in one pass (``tally``)."""

    # Per wave id (None: in no wave) and state.
    states: dict[int | None, dict[str, int]]
    # Per version the rollout plans (its own, or a variant), by version name.
    versions: dict[str, int]
    # Its nodes not yet where it leaves them (as ``pending_counts``).
    pending: int

    @property
    def totals(self) -> dict[str, int]:
        """The rollout's assignments per state, over all its waves."""
        out: dict[str, int] = {}
        for per_wave in self.states.values():
            for state, n in per_wave.items():
                out[state] = out.get(state, 0) + n
        return out


def tally(session: Session, rollout: Rollout) -> Tally:
    """A rollout's assignments per wave and state, per planned version and pending, from
    its counts (``counted``; tests/rollouts/helpers.py keeps the aggregates over its
    assignments as the oracle)."""
    states: dict[int | None, dict[str, int]] = {}
    by_target: dict[int, int] = {}
    pending = 0
    for c in counted(session, [rollout.id]):
        per_wave = states.setdefault(c.wave_id, {})
        per_wave[c.state] = per_wave.get(c.state, 0) + c.n
        version_id = c.target_version_id or rollout.model_version_id
        by_target[version_id] = by_target.get(version_id, 0) + c.n
        if _pending(rollout.phase, c.state, c.moved):
            pending += c.n
    names = versions_by_id(session, set(by_target))
    versions: dict[str, int] = {}
    for version_id, n in by_target.items():
        if version_id in names:  # a version since deleted is not counted
            name = names[version_id].version
            versions[name] = versions.get(name, 0) + n
    return Tally(states, dict(sorted(versions.items())), pending)


def state_totals(session: Session, rollout_ids: Sequence[int]) -> dict[int, dict[str, int]]:
    """Assignment counts per state of each rollout (by id), from their counts: the fleet
    page's rows, one statement for all."""
    out: dict[int, dict[str, int]] = {}
    for c in counted(session, rollout_ids):
        mine = out.setdefault(c.rollout_id, {})
        mine[c.state] = mine.get(c.state, 0) + c.n
    return out


def phase_counts(session: Session) -> dict[str, int]:
    return {
        row[0]: row[1]
        for row in session.execute(select(Rollout.phase, func.count()).group_by(Rollout.phase))
    }


def model_version_labels(
    session: Session, version_ids: Sequence[int]
) -> dict[int, tuple[str, str]]:
    """(model, version) of each version id, in one query: a listing's rows."""
    if not version_ids:
        return {}
    rows = session.execute(
        select(ModelVersion.id, Model.name, ModelVersion.version)
        .join(Model)
        .where(any_of(ModelVersion.id, set(version_ids)))
    )
    return {int(i): (str(m), str(v)) for i, m, v in rows.all()}


def model_version_label(session: Session, version_id: int) -> tuple[str, str]:
    row = session.execute(
        select(Model.name, ModelVersion.version)
        .join(ModelVersion)
        .where(ModelVersion.id == version_id)
    ).one()
    return row[0], row[1]


@dataclass
class WorkloadRow:
    """An assignment with the names a page shows for it."""

    assignment: Assignment
    cluster: str
    node: str
    model: str
    rollout: str | None
    wave: int | None
    desired: str | None
    observed: str | None


def _workloads() -> Select[Assignment, str, str, str, str, int, str, str]:
    desired, observed = aliased(ModelVersion), aliased(ModelVersion)
    return (
        select(
            Assignment,
            Cluster.name,
            Node.name,
            Model.name,
            Rollout.name,
            Wave.index,
            desired.version,
            observed.version,
        )
        .join(Node, Node.id == Assignment.node_id)
        .join(Cluster, Cluster.id == Node.cluster_id)
        .join(Model, Model.id == Assignment.model_id)
        .outerjoin(Rollout, Rollout.id == Assignment.rollout_id)
        .outerjoin(Wave, Wave.id == Assignment.wave_id)
        .outerjoin(desired, desired.id == Assignment.desired_version_id)
        .outerjoin(observed, observed.id == Assignment.observed_version_id)
    )


def rollout_workloads(session: Session, rollout: Rollout, *, limit: int) -> list[WorkloadRow]:
    """The first ``limit`` of a rollout's assignments by wave, then cluster and node name
    (the rollout's page): ``rollout_nodes``' first page."""
    rows, _ = rollout_nodes(session, rollout, state=None, wave_id=None, limit=limit, offset=0)
    return rows


def rollout_nodes(
    session: Session,
    rollout: Rollout,
    *,
    state: str | None,
    wave_id: int | None,
    limit: int,
    offset: int,
) -> tuple[list[WorkloadRow], int]:
    """A page of the rollout's nodes (the rollout's page, ``GET
    /v1/rollouts/{name}/nodes``) by wave, then cluster and node name, optionally only
    those in ``state`` or in the wave ``wave_id``, with how many there are in all.

    Read wave by wave, each read asking only for the rows the page still wants: the
    counts (``counted``) say how many each wave holds, so the waves before the page are
    skipped unread; a small wave is read by ``ix_assignments_wave_id`` (0013), its rows
    sorted; a large one by walking the clusters and their nodes in name order
    (``_walk``), which reads about the rows wanted times the nodes per node of the wave.
    One query over the whole rollout joined and sorted all its assignments for every
    page: 270 ms at 100,000 nodes. Waves, counts and offsets are rendered into the
    statements, not bound: a wave of one node and one of 50,000 need different plans,
    and a prepared statement's generic plan would give both the one planned for an
    average wave."""
    per_wave: dict[int | None, int] = {}
    for c in counted(session, [rollout.id]):
        if (state is None or c.state == state) and (wave_id is None or c.wave_id == wave_id):
            per_wave[c.wave_id] = per_wave.get(c.wave_id, 0) + c.n
    total = sum(per_wave.values())
    planned = sum(w.node_count for w in rollout.waves)
    walks = session.get_bind().dialect.name == "postgresql"
    found: list[WorkloadRow] = []
    skip = offset
    for wave in [*(w.id for w in rollout.waves), None]:
        size, left = per_wave.get(wave, 0), limit - len(found)
        if left <= 0:
            break
        if skip >= size:  # before the page, or none of its nodes wanted
            skip -= size
            continue
        if wave is not None and walks and size * size > (skip + left) * planned:
            found += _walk(session, rollout, wave, state, skip, left)
        else:
            found += _sorted(session, rollout, wave, state, skip, left)
        skip = 0
    return found, total


def _sorted(
    session: Session, rollout: Rollout, wave_id: int | None, state: str | None, skip: int, left: int
) -> list[WorkloadRow]:
    """``left`` rows of one wave (None: in no wave) from its ``skip``-th, all its rows
    read and sorted."""
    where = [
        Assignment.rollout_id == rollout.id,
        Assignment.wave_id.is_(None)
        if wave_id is None
        else Assignment.wave_id == literal(wave_id, literal_execute=True),
    ]
    if state is not None:
        where.append(Assignment.state == state)
    rows = session.execute(
        _workloads()
        .where(*where)
        .order_by(Cluster.name, Node.name)
        .limit(literal(left, literal_execute=True))
        .offset(literal(skip, literal_execute=True))
    )
    return [WorkloadRow(a, c, n, m, r, w, d, o) for a, c, n, m, r, w, d, o in rows]


# A large wave's rows in cluster and node name order, as a walk Postgres cannot plan
# otherwise: clusters by name, each cluster's nodes by ``(cluster_id, name)``, each
# node's assignment looked up by ``(node_id, model_id)`` (the LIMIT 1 keeps the lookup a
# nested loop: a join it could turn into a hash join over a scan of every node, as it
# did for the plain query once heartbeats had left dead row versions in nodes, 71 ms for
# 199 rows of a 10,000-node wave at 100,000 nodes; the walk, 5-25 ms). Each cluster
# stops at ``skip + left`` rows, the clusters once that many are found. It reads about
# that many times the nodes per node of the wave: chosen when that is fewer than the
# wave's rows (``rollout_nodes``). Postgres only (LATERAL); the numbers are integers
# from the rows, the state a bound parameter.
_WALK = """
SELECT x.id FROM clusters c CROSS JOIN LATERAL (
  SELECT n.name, a.id FROM nodes n CROSS JOIN LATERAL (
    SELECT a.id FROM assignments a
    WHERE a.node_id = n.id AND a.model_id = {model} AND a.rollout_id = {rollout}
      AND a.wave_id = {wave}{state}
    LIMIT 1) AS a
  WHERE n.cluster_id = c.id ORDER BY n.name LIMIT {upto}) AS x
ORDER BY c.name, x.name LIMIT {left} OFFSET {skip}
"""


def _walk(
    session: Session, rollout: Rollout, wave_id: int, state: str | None, skip: int, left: int
) -> list[WorkloadRow]:
    model_id = session.scalar(
        select(ModelVersion.model_id).where(ModelVersion.id == rollout.model_version_id)
    )
    sql = _WALK.format(
        model=int(model_id or 0),
        rollout=int(rollout.id),
        wave=int(wave_id),
        state="" if state is None else " AND a.state = :state",
        upto=int(skip + left),
        left=int(left),
        skip=int(skip),
    )
    ids = list(session.scalars(text(sql), {"state": state} if state is not None else {}))
    rows = session.execute(_workloads().where(any_of(Assignment.id, ids)))
    by_id = {a.id: WorkloadRow(a, c, n, m, r, w, d, o) for a, c, n, m, r, w, d, o in rows}
    return [by_id[i] for i in ids if i in by_id]


def node_workloads(session: Session, node_id: int) -> list[WorkloadRow]:
    """Every model a node is assigned, by model name."""
    rows = session.execute(_workloads().where(Assignment.node_id == node_id).order_by(Model.name))
    return [WorkloadRow(a, c, n, m, r, w, d, o) for a, c, n, m, r, w, d, o in rows]


def delete_events_before(session: Session, before: datetime, *, limit: int) -> int:
    """Delete up to ``limit`` events older than ``before``, oldest first, except an active
    rollout's (its audit trail stays whole until it ends); how many were deleted. One
    bounded batch: the caller commits between batches."""
    active = select(Rollout.id).where(Rollout.phase.in_(ACTIVE_PHASES))
    oldest = (
        select(Event.id)
        .where(
            Event.created_at < before,
            or_(Event.rollout_id.is_(None), Event.rollout_id.not_in(active)),
        )
        .order_by(Event.created_at)
        .limit(limit)
    )
    result = session.execute(delete(Event).where(Event.id.in_(oldest)))
    return int(result.rowcount)  # type: ignore[attr-defined]
