"""Initial schema: the whole vocabulary of DESIGN.md.

Revision ID: 0001
Revises:
Create Date: 2026-11-23 09:23:30.597869
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# Spelled out here rather than imported from the models: a migration is a frozen record
# of the schema at its revision and must not change when the models do.
JSON_DOC = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "clusters",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("driver", sa.String(length=32), nullable=False),
        sa.Column("labels", JSON_DOC, nullable=False),
        sa.Column("api_server", sa.String(length=512), nullable=True),
        sa.Column("credentials", sa.LargeBinary(), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("last_sync_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_clusters")),
        sa.UniqueConstraint("name", name=op.f("uq_clusters_name")),
    )
    op.create_table(
        "models",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("name", name=op.f("uq_models_name")),
    )
    op.create_table(
        "model_versions",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("model_id", BIG_ID, nullable=False),
        sa.Column("version", sa.String(length=63), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("signature", JSON_DOC, nullable=False),
        sa.Column("metadata", JSON_DOC, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("status_message", sa.Text(), nullable=True),
        sa.Column("validation", JSON_DOC, nullable=True),
        sa.Column("benchmark", JSON_DOC, nullable=True),
        sa.Column("parent_id", BIG_ID, nullable=True),
        sa.Column("lineage", JSON_DOC, nullable=True),
        sa.Column("status_changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["models.id"],
            name=op.f("fk_model_versions_model_id_models"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["model_versions.id"],
            name=op.f("fk_model_versions_parent_id_model_versions"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
        sa.UniqueConstraint("model_id", "version", name=op.f("uq_model_versions_model_id_version")),
    )
    op.create_index("ix_model_versions_sha256", "model_versions", ["sha256"], unique=False)
    op.create_index("ix_model_versions_status", "model_versions", ["status"], unique=False)
    op.create_table(
        "nodes",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("cluster_id", BIG_ID, nullable=False),
        sa.Column("name", sa.String(length=253), nullable=False),
        sa.Column("labels", JSON_DOC, nullable=False),
        sa.Column("architecture", sa.String(length=32), nullable=True),
        sa.Column("capacity", JSON_DOC, nullable=False),
        sa.Column("allocatable", JSON_DOC, nullable=False),
        sa.Column("runtimes", JSON_DOC, nullable=False),
        sa.Column("health", sa.String(length=16), nullable=False),
        sa.Column("last_heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("credential_hash", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["cluster_id"],
            ["clusters.id"],
            name=op.f("fk_nodes_cluster_id_clusters"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_nodes")),
        sa.UniqueConstraint("cluster_id", "name", name=op.f("uq_nodes_cluster_id_name")),
    )
    op.create_index("ix_nodes_health", "nodes", ["health"], unique=False)
    op.create_table(
        "rollouts",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("spec", JSON_DOC, nullable=False),
        sa.Column("model_version_id", BIG_ID, nullable=False),
        sa.Column("phase", sa.String(length=16), nullable=False),
        sa.Column("current_wave", sa.Integer(), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_rollouts_model_version_id_model_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollouts")),
        sa.UniqueConstraint("name", name=op.f("uq_rollouts_name")),
    )
    op.create_index("ix_rollouts_phase", "rollouts", ["phase"], unique=False)
    op.create_table(
        "events",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("object_kind", sa.String(length=32), nullable=False),
        sa.Column("object_name", sa.String(length=253), nullable=False),
        sa.Column("rollout_id", BIG_ID, nullable=True),
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", JSON_DOC, nullable=False),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name=op.f("fk_events_rollout_id_rollouts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index(
        "ix_events_object", "events", ["object_kind", "object_name", "id"], unique=False
    )
    op.create_index("ix_events_rollout_id", "events", ["rollout_id", "id"], unique=False)
    op.create_table(
        "waves",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("rollout_id", BIG_ID, nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("node_count", sa.Integer(), nullable=False),
        sa.Column("bake_s", sa.Integer(), nullable=False),
        sa.Column("phase", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("baked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name=op.f("fk_waves_rollout_id_rollouts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_waves")),
        sa.UniqueConstraint("rollout_id", "index", name=op.f("uq_waves_rollout_id_index")),
    )
    op.create_table(
        "assignments",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("node_id", BIG_ID, nullable=False),
        sa.Column("model_id", BIG_ID, nullable=False),
        sa.Column("rollout_id", BIG_ID, nullable=True),
        sa.Column("wave_id", BIG_ID, nullable=True),
        sa.Column("desired_version_id", BIG_ID, nullable=True),
        sa.Column("previous_version_id", BIG_ID, nullable=True),
        sa.Column("observed_version_id", BIG_ID, nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("metrics", JSON_DOC, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["desired_version_id"],
            ["model_versions.id"],
            name=op.f("fk_assignments_desired_version_id_model_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["models.id"],
            name=op.f("fk_assignments_model_id_models"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["node_id"], ["nodes.id"], name=op.f("fk_assignments_node_id_nodes"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["observed_version_id"],
            ["model_versions.id"],
            name=op.f("fk_assignments_observed_version_id_model_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["previous_version_id"],
            ["model_versions.id"],
            name=op.f("fk_assignments_previous_version_id_model_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name=op.f("fk_assignments_rollout_id_rollouts"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["wave_id"],
            ["waves.id"],
            name=op.f("fk_assignments_wave_id_waves"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_assignments")),
        sa.UniqueConstraint("node_id", "model_id", name=op.f("uq_assignments_node_id_model_id")),
    )
    op.create_index(
        "ix_assignments_rollout_id_state", "assignments", ["rollout_id", "state"], unique=False
    )


def downgrade() -> None:

    op.drop_index("ix_assignments_rollout_id_state", table_name="assignments")
    op.drop_table("assignments")
    op.drop_table("waves")
    op.drop_index("ix_events_rollout_id", table_name="events")
    op.drop_index("ix_events_object", table_name="events")
    op.drop_table("events")
    op.drop_index("ix_rollouts_phase", table_name="rollouts")
    op.drop_table("rollouts")
    op.drop_index("ix_nodes_health", table_name="nodes")
    op.drop_table("nodes")
    op.drop_index("ix_model_versions_status", table_name="model_versions")
    op.drop_index("ix_model_versions_sha256", table_name="model_versions")
    op.drop_table("model_versions")
    op.drop_table("models")
    op.drop_table("clusters")
