"""The wire contract between node agents and the controller: heartbeats and the metric
names both sides use. Both import this module; nothing else defines these shapes."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

# Prometheus names the inference server exports and the agent reads back.
INFERENCE_LATENCY = "edgefleet_inference_latency_seconds"
REQUEST_LATENCY = "edgefleet_request_latency_seconds"
REQUESTS_TOTAL = "edgefleet_inference_requests_total"
ERRORS_TOTAL = "edgefleet_inference_errors_total"
# Info metric with labels model, version, sha256, runtime, provider (value 1).
MODEL_INFO = "edgefleet_model_info"
# 1 once the model is loaded and warmed up, 0 before (and while draining).
MODEL_READY = "edgefleet_model_ready"


class InferenceMetrics(BaseModel):
    """One workload's inference performance over the agent's last window."""

    model_config = ConfigDict(extra="forbid")

    window_s: float = Field(gt=0, description="length of the window these numbers cover")
    samples: int = Field(ge=0, description="inferences observed in the window")
    errors: int = Field(0, ge=0)
    p50_ms: float | None = Field(None, ge=0)
    p95_ms: float | None = Field(None, ge=0)
    p99_ms: float | None = Field(None, ge=0)
    rate_per_s: float | None = Field(None, ge=0)

    @property
    def error_rate(self) -> float:
        return self.errors / self.samples if self.samples else 0.0


class WorkloadReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    version: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    state: str = Field(description="Starting, Ready, Failed")
    metrics: InferenceMetrics | None = None


class NodeStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cpu_percent: float | None = Field(None, ge=0)
    memory_used_bytes: int | None = Field(None, ge=0)
    memory_total_bytes: int | None = Field(None, ge=0)
    disk_free_bytes: int | None = Field(None, ge=0)
    temperature_c: float | None = None
    agent_version: str | None = None


class Heartbeat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cluster: str
    node: str
    seq: int = Field(ge=1, description="per-node sequence number; replays are ignored")
    sent_at: datetime
    status: NodeStatus = Field(default_factory=NodeStatus)
    workloads: list[WorkloadReport] = Field(default_factory=list)
