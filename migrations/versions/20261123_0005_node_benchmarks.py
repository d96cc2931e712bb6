"""On-node benchmarks per (model version, node class); per-node variant targets.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 13:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

JSON_DOC = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "node_benchmarks",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("model_version_id", BIG_ID, nullable=False),
        sa.Column("node_class", sa.String(length=300), nullable=False),
        sa.Column("node_id", BIG_ID, nullable=True),
        sa.Column("node_name", sa.String(length=253), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("runs", sa.Integer(), nullable=False),
        sa.Column("result", JSON_DOC, nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_node_benchmarks_model_version_id_model_versions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["node_id"],
            ["nodes.id"],
            name=op.f("fk_node_benchmarks_node_id_nodes"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_node_benchmarks")),
        sa.UniqueConstraint(
            "model_version_id",
            "node_class",
            name=op.f("uq_node_benchmarks_model_version_id_node_class"),
        ),
    )
    op.create_index(
        "ix_node_benchmarks_node_id_status", "node_benchmarks", ["node_id", "status"], unique=False
    )
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("cpu_model", sa.String(length=200), nullable=True))
        batch.add_column(
            sa.Column("benchmarks_pending", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("assignments") as batch:
        batch.add_column(sa.Column("target_version_id", BIG_ID, nullable=True))
        batch.create_foreign_key(
            op.f("fk_assignments_target_version_id_model_versions"),
            "model_versions",
            ["target_version_id"],
            ["id"],
        )


def downgrade() -> None:
    with op.batch_alter_table("assignments") as batch:
        batch.drop_constraint(
            op.f("fk_assignments_target_version_id_model_versions"), type_="foreignkey"
        )
        batch.drop_column("target_version_id")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("benchmarks_pending")
        batch.drop_column("cpu_model")
    op.drop_index("ix_node_benchmarks_node_id_status", table_name="node_benchmarks")
    op.drop_table("node_benchmarks")
