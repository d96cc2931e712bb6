"""Clusters keep their applied spec and a generation.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

JSON_DOC = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("clusters") as batch:
        batch.add_column(sa.Column("generation", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("spec", JSON_DOC, nullable=False, server_default="{}"))
    with op.batch_alter_table("clusters") as batch:
        batch.alter_column("generation", server_default=None)
        batch.alter_column("spec", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("clusters") as batch:
        batch.drop_column("spec")
        batch.drop_column("generation")
