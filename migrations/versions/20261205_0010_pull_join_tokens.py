"""Per-cluster join tokens of pull clusters: the sha256 of the one unused token and when
it expires (both null: none to enrol with).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 15:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("pull_clusters") as batch:
        batch.add_column(sa.Column("join_token_hash", sa.String(length=64), nullable=True))
        batch.add_column(
            sa.Column("join_token_expires_at", sa.DateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("pull_clusters") as batch:
        batch.drop_column("join_token_expires_at")
        batch.drop_column("join_token_hash")
