from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class EnrollIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cluster: str = Field(min_length=1, max_length=63)
    node: str = Field(min_length=1, max_length=253)
    join_token: SecretStr = Field(min_length=1)


class EnrollOut(BaseModel):
    """The credential is shown here once; the controller keeps only its sha256."""

    node: str
    cluster: str
    credential: str
    heartbeat_interval_s: float
    last_seq: int = Field(
        description="Highest heartbeat sequence number already folded in for this node: an "
        "agent that lost its state continues above it instead of being ignored as a replay."
    )


class HeartbeatAck(BaseModel):
    accepted: int
    duplicates: int
    last_seq: int = Field(description="Every heartbeat at or below it is stored: drop them.")
    benchmarks_pending: int = Field(
        0,
        description="Benchmark jobs waiting for this node: fetch them from /v1/agents/benchmarks.",
    )
