"""Assignments by wave: the index a rollout's page reads its nodes wave by wave with (a
wave of one node is found at once, not by reading the rollout's 100,000), and the one
deleting a rollout's waves needs for its ``ON DELETE SET NULL``.

On a large fleet, build it first with ``CREATE INDEX CONCURRENTLY ix_assignments_wave_id
ON assignments (wave_id)`` to keep the table writable meanwhile; this migration finds it.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05 19:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_assignments_wave_id", "assignments", ["wave_id"], if_not_exists=True)


def downgrade() -> None:
    op.drop_index("ix_assignments_wave_id", table_name="assignments")
