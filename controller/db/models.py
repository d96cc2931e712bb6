"""The whole vocabulary of DESIGN.md as tables. Postgres is the source of truth: every
decision is a row here before it is an action anywhere else.

States are stored as short strings (not native enums) so a new state is a code change,
not a type migration; the Python enums below are the only place they are spelled.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from controller.db.base import Base, BigId, TimestampMixin, utcnow


class ModelFormat(StrEnum):
    ONNX = "onnx"
    TFLITE = "tflite"


class VersionStatus(StrEnum):
    PENDING = "Pending"
    VALIDATING = "Validating"
    READY = "Ready"
    INVALID = "Invalid"


class NodeHealth(StrEnum):
    UNKNOWN = "Unknown"
    READY = "Ready"
    NOT_READY = "NotReady"
    STALE = "Stale"
    OFFLINE = "Offline"


class RolloutPhase(StrEnum):
    PENDING = "Pending"
    PROGRESSING = "Progressing"
    PAUSED = "Paused"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    ROLLED_BACK = "RolledBack"
    ABORTED = "Aborted"


# A rollout not over yet: it still acts on its nodes (rollouts/state.py ACTIVE_PHASES;
# defined here so the fleet, below the rollouts, reads the same set).
ACTIVE_ROLLOUT_PHASES = (
    RolloutPhase.PENDING,
    RolloutPhase.PROGRESSING,
    RolloutPhase.PAUSED,
    RolloutPhase.FAILED,
)


class WavePhase(StrEnum):
    PENDING = "Pending"
    APPLYING = "Applying"
    BAKING = "Baking"
    PASSED = "Passed"
    FAILED = "Failed"


class AssignmentState(StrEnum):
    PENDING = "Pending"
    APPLYING = "Applying"
    RUNNING = "Running"
    HEALTHY = "Healthy"
    FAILED = "Failed"
    DEFERRED = "Deferred"
    # Told to return to its previous version, not yet seen running it (a revert).
    REVERTING = "Reverting"
    ROLLED_BACK = "RolledBack"


class Cluster(TimestampMixin, Base):
    __tablename__ = "clusters"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    driver: Mapped[str] = mapped_column(String(32))
    generation: Mapped[int] = mapped_column(Integer, default=1)
    # The applied spec without credentials (those are only in ``credentials``).
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    api_server: Mapped[str | None] = mapped_column(String(512))
    # Encrypted at rest with a key derived from the controller secret; never returned.
    credentials: Mapped[bytes | None] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(String(32), default="Unknown")
    message: Mapped[str | None] = mapped_column(Text)
    last_sync_at: Mapped[datetime | None]

    nodes: Mapped[list[Node]] = relationship(back_populates="cluster", passive_deletes=True)


class PullCluster(TimestampMixin, Base):
    """A cluster in pull mode, as its cluster agent sees it: the hash of the agent's
    credential, the hash and expiry of the one join token it may enrol with (single use:
    cleared by the enrolment), the revision of the desired state (bumped by every change
    of it, under this row's lock, so revisions follow commit order), and the agent's last
    report (its node inventory and the workloads it observed)."""

    __tablename__ = "pull_clusters"
    __table_args__ = (Index("ix_pull_clusters_credential_hash", "credential_hash", unique=True),)

    cluster_id: Mapped[int] = mapped_column(
        ForeignKey("clusters.id", ondelete="CASCADE"), primary_key=True
    )
    credential_hash: Mapped[str | None] = mapped_column(String(64))
    join_token_hash: Mapped[str | None] = mapped_column(String(64))
    join_token_expires_at: Mapped[datetime | None]
    revision: Mapped[int] = mapped_column(BigInteger, default=0)
    # The revision the agent had applied when it last reported (None: not yet).
    applied_revision: Mapped[int | None] = mapped_column(BigInteger)
    report: Mapped[dict[str, Any]] = mapped_column(default=dict)
    reported_at: Mapped[datetime | None]
    polled_at: Mapped[datetime | None]


class PullDesired(Base):
    """The workload one node of a pull cluster should run for one model (``workload``
    null: none), and the revision that last changed it."""

    __tablename__ = "pull_desired"
    __table_args__ = (UniqueConstraint("cluster_id", "model", "node"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    cluster_id: Mapped[int] = mapped_column(ForeignKey("clusters.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(63))
    node: Mapped[str] = mapped_column(String(253))
    workload: Mapped[dict[str, Any] | None]
    revision: Mapped[int] = mapped_column(BigInteger)


class Node(TimestampMixin, Base):
    __tablename__ = "nodes"
    __table_args__ = (
        UniqueConstraint("cluster_id", "name"),
        Index("ix_nodes_health", "health"),
        # Heartbeats authenticate by looking the node credential's hash up (0003).
        Index("ix_nodes_credential_hash", "credential_hash", unique=True),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    cluster_id: Mapped[int] = mapped_column(ForeignKey("clusters.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(253))
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    architecture: Mapped[str | None] = mapped_column(String(32))
    capacity: Mapped[dict[str, Any]] = mapped_column(default=dict)
    allocatable: Mapped[dict[str, Any]] = mapped_column(default=dict)
    runtimes: Mapped[list[Any]] = mapped_column(default=list)
    health: Mapped[str] = mapped_column(String(16), default=NodeHealth.UNKNOWN)
    last_heartbeat_at: Mapped[datetime | None]
    # Highest heartbeat sequence number folded in: replays at or below it are duplicates.
    last_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    # sha256 of the node's own credential (the credential itself is never stored).
    credential_hash: Mapped[str | None] = mapped_column(String(64))
    # The CPU model the agent reports: part of the node class benchmarks are kept per.
    cpu_model: Mapped[str | None] = mapped_column(String(200))
    # On-node benchmark jobs waiting for this node's agent (told in the heartbeat answer,
    # so the hot path needs no extra query).
    benchmarks_pending: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    cluster: Mapped[Cluster] = relationship(back_populates="nodes")


class Model(TimestampMixin, Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    description: Mapped[str | None] = mapped_column(Text)

    versions: Mapped[list[ModelVersion]] = relationship(
        back_populates="model", order_by="ModelVersion.id", passive_deletes=True
    )


class ModelVersion(TimestampMixin, Base):
    """An immutable artifact plus what the controller learned about it."""

    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("model_id", "version"),
        Index("ix_model_versions_sha256", "sha256"),
        Index("ix_model_versions_status", "status"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    version: Mapped[str] = mapped_column(String(63))
    format: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    # Inputs/outputs with names, dtypes and shapes (dynamic dims kept as names or null),
    # opset or schema version, parameter count.
    signature: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # User metadata from the push (free-form labels, validation hints).
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    status: Mapped[str] = mapped_column(String(16), default=VersionStatus.PENDING)
    status_message: Mapped[str | None] = mapped_column(Text)
    validation: Mapped[dict[str, Any] | None]
    benchmark: Mapped[dict[str, Any] | None]
    # Lineage of optimized variants: parent version, method and its parameters.
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL")
    )
    lineage: Mapped[dict[str, Any] | None]
    status_changed_at: Mapped[datetime] = mapped_column(default=utcnow)

    model: Mapped[Model] = relationship(back_populates="versions")


class Rollout(TimestampMixin, Base):
    __tablename__ = "rollouts"
    __table_args__ = (Index("ix_rollouts_phase", "phase"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    spec: Mapped[dict[str, Any]]
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    phase: Mapped[str] = mapped_column(String(16), default=RolloutPhase.PENDING)
    current_wave: Mapped[int] = mapped_column(Integer, default=0)
    message: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # When the follow-up step queued last is due: a step that finds one still ahead
    # queues none, so extra steps (beat's tick, commands) never start a second chain.
    next_step_at: Mapped[datetime | None]
    # The instant the reconciler last read the rollout's schedule: a window that opened
    # since is acted on (and reported) once, however long the controller was down.
    schedule_evaluated_at: Mapped[datetime | None]

    waves: Mapped[list[Wave]] = relationship(
        back_populates="rollout", order_by="Wave.index", passive_deletes=True
    )


class Wave(Base):
    __tablename__ = "waves"
    __table_args__ = (UniqueConstraint("rollout_id", "index"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    node_count: Mapped[int] = mapped_column(Integer)
    bake_s: Mapped[int] = mapped_column(Integer, default=0)
    phase: Mapped[str] = mapped_column(String(16), default=WavePhase.PENDING)
    started_at: Mapped[datetime | None]
    baked_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    rollout: Mapped[Rollout] = relationship(back_populates="waves")


class Assignment(Base):
    """One node's desired and observed workload for one model."""

    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("node_id", "model_id"),
        Index("ix_assignments_rollout_id_state", "rollout_id", "state"),
        # A rollout's page lists its nodes wave by wave (0013).
        Index("ix_assignments_wave_id", "wave_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"))
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    rollout_id: Mapped[int | None] = mapped_column(ForeignKey("rollouts.id", ondelete="SET NULL"))
    wave_id: Mapped[int | None] = mapped_column(ForeignKey("waves.id", ondelete="SET NULL"))
    desired_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    # The version the rollout plans for this node: its model version, or the variant it
    # picked for the node's class (spec.model.variants). Null: the rollout's version.
    target_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    previous_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    # The rollout whose spec (resources) the previous version ran under (0012). Null:
    # unknown (it was deleted, or the row is older): the claiming rollout's then.
    previous_rollout_id: Mapped[int | None] = mapped_column(
        ForeignKey("rollouts.id", ondelete="SET NULL")
    )
    observed_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    state: Mapped[str] = mapped_column(String(16), default=AssignmentState.PENDING)
    message: Mapped[str | None] = mapped_column(Text)
    # Rolling inference metrics reported by the node agent (window, p95, error rate...).
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    @property
    def shipped_by(self) -> int | None:
        """The rollout whose spec the node's desired version runs under: the claiming
        rollout's, unless the node is (back) on its previous version."""
        if (
            self.desired_version_id is not None
            and self.desired_version_id == self.previous_version_id
        ):
            return self.previous_rollout_id
        return self.rollout_id


# A rollout's assignments counted per (wave, state, planned version, moved off its
# previous version), kept by triggers on assignments (migration 0014): every change of a
# counted column appends -1 for the old key and +1 for the new one to the deltas, which
# rollouts/repository.fold_counts adds into the counts under the rollout's row lock. The
# count of a key is its row plus its deltas not yet folded. wave_id 0: in no wave;
# target_version_id 0: the rollout's own version.
_COUNT_KEY = (
    ("wave_id", BigId),
    ("state", String(16)),
    ("target_version_id", BigId),
    ("moved", Boolean()),
)
assignment_counts = Table(
    "assignment_counts",
    Base.metadata,
    Column(
        "rollout_id",
        BigId,
        ForeignKey("rollouts.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    *(Column(name, type_, primary_key=True) for name, type_ in _COUNT_KEY),
    Column("n", BigInteger, nullable=False),
)
# No foreign key: deleting a rollout sets its assignments' rollout_id null, and the
# trigger writes deltas of a rollout already gone (folding drops them).
assignment_count_deltas = Table(
    "assignment_count_deltas",
    Base.metadata,
    Column("rollout_id", BigId, nullable=False, index=True),
    *(Column(name, type_, nullable=False) for name, type_ in _COUNT_KEY),
    Column("n", Integer, nullable=False),
)


class Event(Base):
    """The audit log: every transition, with its reason and the evidence behind it."""

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_object", "object_kind", "object_name", "id"),
        Index("ix_events_rollout_id", "rollout_id", "id"),
        # Retention deletes by age (0011).
        Index("ix_events_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    object_kind: Mapped[str] = mapped_column(String(32))
    object_name: Mapped[str] = mapped_column(String(253))
    rollout_id: Mapped[int | None] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    reason: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Who caused it: "token:<name>" for an API call, "node:<cluster>/<node>" for an agent,
    # "cli:<user>" for a command run on the database, null for the controller itself.
    actor: Mapped[str | None] = mapped_column(String(128))


class OptimizationStatus(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class Optimization(TimestampMixin, Base):
    """A request to derive a variant of a model version. The variant itself becomes a
    ModelVersion only when the whole job succeeded: a failure leaves no half-made version."""

    __tablename__ = "optimizations"
    __table_args__ = (Index("ix_optimizations_status", "status"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    parent_version_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE")
    )
    target_version: Mapped[str] = mapped_column(String(63))
    method: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    calibration_sha256: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default=OptimizationStatus.PENDING)
    stage: Mapped[str | None] = mapped_column(String(64))
    message: Mapped[str | None] = mapped_column(Text)
    result_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL")
    )
    report: Mapped[dict[str, Any] | None]


class BenchmarkStatus(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class NodeBenchmark(TimestampMixin, Base):
    """A model version measured on one node class (architecture, accelerator, CPU model)
    by the agent of one node of that class. One row per (version, class): measuring again
    replaces it."""

    __tablename__ = "node_benchmarks"
    __table_args__ = (
        UniqueConstraint("model_version_id", "node_class"),
        Index("ix_node_benchmarks_node_id_status", "node_id", "status"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    model_version_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE")
    )
    node_class: Mapped[str] = mapped_column(String(300))
    # The node asked to measure (null once it is deleted; the result stays).
    node_id: Mapped[int | None] = mapped_column(ForeignKey("nodes.id", ondelete="SET NULL"))
    node_name: Mapped[str] = mapped_column(String(253))
    status: Mapped[str] = mapped_column(String(16), default=BenchmarkStatus.PENDING)
    runs: Mapped[int] = mapped_column(Integer, default=50)
    result: Mapped[dict[str, Any] | None]
    message: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class Role(StrEnum):
    """What an API token may do; each role may do everything of the ones before it."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return list(Role).index(self)

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


class ApiToken(TimestampMixin, Base):
    """An API token: only its sha256 is stored (the token is 256 random bits, so a fast
    hash is as good as a slow one and the lookup is an index probe)."""

    __tablename__ = "api_tokens"
    __table_args__ = (Index("ix_api_tokens_token_hash", "token_hash", unique=True),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
    created_by: Mapped[str | None] = mapped_column(String(128))


class FreezePeriod(TimestampMixin, Base):
    """A named freeze (controller/schedules/spec.py): no wave starts on the nodes it
    selects while it lasts. ``spec`` is the manifest's spec, as applied."""

    __tablename__ = "freeze_periods"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    spec: Mapped[dict[str, Any]]
