"""A rollout's assignments counted as they change, so that its page, ``describe rollout``
and the fleet page read a handful of rows instead of aggregating all its assignments
(100,000 rows for a rollout over the fleet: 46 ms, and growing with the fleet).

Triggers on ``assignments`` append, for every row whose counted key changes (rollout,
wave, state, planned version, moved off its previous version), a -1 for the old key
and a +1 for the new one to ``assignment_count_deltas``: an append, so concurrent
transactions never wait on a shared counter row, and however a row changes (the ORM,
a cascade from a deleted node, model or wave, an operator's SQL) it is counted. Reads
sum ``assignment_counts`` and the deltas not yet folded into it; the reconciler folds a
rollout's deltas into its counts under the rollout's row lock (repository.fold_counts),
beat's tick those of rollouts without a step. A heartbeat's metric window changes no
counted column and fires nothing.

Keys: ``wave_id`` 0 is "in no wave", ``target_version_id`` 0 "the rollout's own
version". The deltas have no foreign key: the trigger of a rollout's deletion (its
assignments' ``rollout_id`` set null) writes deltas of a rollout already gone, which
folding drops.

On a large fleet the backfill reads every assignment once, in this migration's
transaction (about a second per 100,000 rows).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05 21:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
KEY = ("rollout_id", "wave_id", "state", "target_version_id", "moved")


def _key(row: str, distinct: str = "IS DISTINCT FROM") -> str:
    """The counted key of ``row`` (OLD or NEW), as the columns of a delta. ``distinct``:
    the null-safe inequality (SQLite's is ``IS NOT``)."""
    return (
        f"{row}.rollout_id, coalesce({row}.wave_id, 0), {row}.state, "
        f"coalesce({row}.target_version_id, 0), "
        f"{row}.desired_version_id {distinct} {row}.previous_version_id"
    )


_CHANGED_PG = (
    "(OLD.rollout_id, OLD.wave_id, OLD.state, OLD.target_version_id, "
    "OLD.desired_version_id IS DISTINCT FROM OLD.previous_version_id) IS DISTINCT FROM "
    "(NEW.rollout_id, NEW.wave_id, NEW.state, NEW.target_version_id, "
    "NEW.desired_version_id IS DISTINCT FROM NEW.previous_version_id)"
)
_CHANGED_SQLITE = " OR ".join(
    [
        *(f"OLD.{c} IS NOT NEW.{c}" for c in ("rollout_id", "wave_id", "state")),
        "OLD.target_version_id IS NOT NEW.target_version_id",
        "(OLD.desired_version_id IS NOT OLD.previous_version_id) "
        "IS NOT (NEW.desired_version_id IS NOT NEW.previous_version_id)",
    ]
)
_COUNTED = "rollout_id, wave_id, state, target_version_id, desired_version_id, previous_version_id"
_DELTAS = "assignment_count_deltas (rollout_id, wave_id, state, target_version_id, moved, n)"

_POSTGRES = [
    f"""
    CREATE FUNCTION edgefleet_count_assignments() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF TG_OP <> 'INSERT' AND OLD.rollout_id IS NOT NULL THEN
        INSERT INTO {_DELTAS} VALUES ({_key("OLD")}, -1);
      END IF;
      IF TG_OP <> 'DELETE' AND NEW.rollout_id IS NOT NULL THEN
        INSERT INTO {_DELTAS} VALUES ({_key("NEW")}, 1);
      END IF;
      RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER assignments_count_insert AFTER INSERT ON assignments
    FOR EACH ROW WHEN (NEW.rollout_id IS NOT NULL)
    EXECUTE FUNCTION edgefleet_count_assignments()
    """,
    """
    CREATE TRIGGER assignments_count_delete AFTER DELETE ON assignments
    FOR EACH ROW WHEN (OLD.rollout_id IS NOT NULL)
    EXECUTE FUNCTION edgefleet_count_assignments()
    """,
    f"""
    CREATE TRIGGER assignments_count_update AFTER UPDATE OF {_COUNTED} ON assignments
    FOR EACH ROW WHEN ({_CHANGED_PG})
    EXECUTE FUNCTION edgefleet_count_assignments()
    """,
]
_SQLITE = [
    f"""
    CREATE TRIGGER assignments_count_insert AFTER INSERT ON assignments
    FOR EACH ROW WHEN NEW.rollout_id IS NOT NULL BEGIN
      INSERT INTO {_DELTAS} VALUES ({_key("NEW", "IS NOT")}, 1);
    END
    """,
    f"""
    CREATE TRIGGER assignments_count_delete AFTER DELETE ON assignments
    FOR EACH ROW WHEN OLD.rollout_id IS NOT NULL BEGIN
      INSERT INTO {_DELTAS} VALUES ({_key("OLD", "IS NOT")}, -1);
    END
    """,
    f"""
    CREATE TRIGGER assignments_count_update AFTER UPDATE OF {_COUNTED} ON assignments
    FOR EACH ROW WHEN {_CHANGED_SQLITE} BEGIN
      INSERT INTO {_DELTAS} SELECT {_key("OLD", "IS NOT")}, -1 WHERE OLD.rollout_id IS NOT NULL;
      INSERT INTO {_DELTAS} SELECT {_key("NEW", "IS NOT")}, 1 WHERE NEW.rollout_id IS NOT NULL;
    END
    """,
]


def _key_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("rollout_id", BIG_ID, nullable=False),
        sa.Column("wave_id", BIG_ID, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("target_version_id", BIG_ID, nullable=False),
        sa.Column("moved", sa.Boolean(), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "assignment_counts",
        *_key_columns(),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name=op.f("fk_assignment_counts_rollout_id_rollouts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(*KEY, name=op.f("pk_assignment_counts")),
    )
    op.create_table(
        "assignment_count_deltas",
        *_key_columns(),
        sa.Column("n", sa.Integer(), nullable=False),
    )
    op.create_index(
        "ix_assignment_count_deltas_rollout_id", "assignment_count_deltas", ["rollout_id"]
    )
    postgres = op.get_bind().dialect.name == "postgresql"
    for ddl in _POSTGRES if postgres else _SQLITE:
        op.execute(ddl)
    # What the triggers would have counted, had they been there all along.
    key = _key("a", "IS DISTINCT FROM" if postgres else "IS NOT")
    op.execute(
        f"""
        INSERT INTO assignment_counts ({", ".join(KEY)}, n)
        SELECT {key}, count(*) FROM assignments a WHERE a.rollout_id IS NOT NULL
        GROUP BY 1, 2, 3, 4, 5
        """
    )


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for trigger in ("insert", "delete", "update"):
        on = " ON assignments" if postgres else ""
        op.execute(f"DROP TRIGGER IF EXISTS assignments_count_{trigger}{on}")
    if postgres:
        op.execute("DROP FUNCTION IF EXISTS edgefleet_count_assignments()")
    op.drop_index("ix_assignment_count_deltas_rollout_id", table_name="assignment_count_deltas")
    op.drop_table("assignment_count_deltas")
    op.drop_table("assignment_counts")
