"""Events by age: the index retention's batched DELETE reads.

A plain CREATE INDEX blocks writes to events while it builds: on a large audit log,
build it first with ``CREATE INDEX CONCURRENTLY ix_events_created_at ON events
(created_at)``, and this migration finds it there.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05 16:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_events_created_at", "events", ["created_at"], if_not_exists=True)


def downgrade() -> None:
    op.drop_index("ix_events_created_at", table_name="events")
