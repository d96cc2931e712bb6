"""Clusters in pull mode: the cluster agent's credential, revision and last report, and
the desired workload per (cluster, model, node) that the agent fetches.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 13:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

JSON_DOC = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "pull_clusters",
        sa.Column("cluster_id", BIG_ID, nullable=False),
        sa.Column("credential_hash", sa.String(length=64), nullable=True),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("applied_revision", sa.BigInteger(), nullable=True),
        sa.Column("report", JSON_DOC, nullable=False),
        sa.Column("reported_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("polled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["cluster_id"],
            ["clusters.id"],
            name=op.f("fk_pull_clusters_cluster_id_clusters"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("cluster_id", name=op.f("pk_pull_clusters")),
    )
    op.create_index(
        "ix_pull_clusters_credential_hash", "pull_clusters", ["credential_hash"], unique=True
    )
    op.create_table(
        "pull_desired",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("cluster_id", BIG_ID, nullable=False),
        sa.Column("model", sa.String(length=63), nullable=False),
        sa.Column("node", sa.String(length=253), nullable=False),
        sa.Column("workload", JSON_DOC, nullable=True),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["cluster_id"],
            ["clusters.id"],
            name=op.f("fk_pull_desired_cluster_id_clusters"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pull_desired")),
        sa.UniqueConstraint(
            "cluster_id", "model", "node", name=op.f("uq_pull_desired_cluster_id_model_node")
        ),
    )


def downgrade() -> None:
    op.drop_table("pull_desired")
    op.drop_index("ix_pull_clusters_credential_hash", table_name="pull_clusters")
    op.drop_table("pull_clusters")
