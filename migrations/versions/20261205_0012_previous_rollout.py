"""The rollout whose spec a node's previous version ran under, so that a rollback
restores that version's pods as they were (its resources), restarting none.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05 17:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("assignments") as batch:
        batch.add_column(sa.Column("previous_rollout_id", BIG_ID, nullable=True))
        batch.create_foreign_key(
            op.f("fk_assignments_previous_rollout_id_rollouts"),
            "rollouts",
            ["previous_rollout_id"],
            ["id"],
            ondelete="SET NULL",
        )


def downgrade() -> None:
    with op.batch_alter_table("assignments") as batch:
        batch.drop_constraint(
            op.f("fk_assignments_previous_rollout_id_rollouts"), type_="foreignkey"
        )
        batch.drop_column("previous_rollout_id")
