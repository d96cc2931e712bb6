"""Agents authenticate by their node credential: look nodes up by its hash.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Unique: a credential is 256 random bits, so two equal hashes can only be a bug.
    # NULLs (nodes without an agent yet) do not collide.
    op.create_index("ix_nodes_credential_hash", "nodes", ["credential_hash"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_nodes_credential_hash", table_name="nodes")
