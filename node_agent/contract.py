"""The wire contract between node agents and the controller: heartbeats and the metric
names both sides use. Both import this module; nothing else defines these shapes."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

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
    # The CPU model string (/proc/cpuinfo), part of the node class benchmarks are kept per.
    cpu_model: str | None = Field(None, max_length=200)


class Heartbeat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cluster: str
    node: str
    seq: int = Field(
        ge=1, le=2**63 - 1, description="per-node sequence number; replays are ignored"
    )
    sent_at: datetime
    status: NodeStatus = Field(default_factory=NodeStatus)
    workloads: list[WorkloadReport] = Field(default_factory=list)


# --- on-node benchmarks ---------------------------------------------------------------
# The controller keeps benchmarks per (model version, node class) and asks one agent of
# each class to measure. The heartbeat's answer says how many jobs wait for the node
# (``benchmarks_pending``); the agent then fetches them (GET /v1/agents/benchmarks), runs
# each in a child process (node_agent.probe) and posts the result
# (POST /v1/agents/benchmarks/{id}).


class BenchmarkJob(BaseModel):
    # Unknown fields are ignored: a newer controller may add some, and an older agent
    # must still run the job rather than refuse it.
    model_config = ConfigDict(extra="ignore")

    id: int
    model: str
    version: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    format: Literal["onnx", "tflite"]
    artifact_url: str = Field(description="Where to download the artifact (Range supported).")
    runs: int = Field(50, ge=1, le=10_000)
    warmup_runs: int = Field(5, ge=0, le=1_000)
    threads: int = Field(1, ge=1, le=256)
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="The version's input hints (as at validation)."
    )


class BenchmarkResult(BaseModel):
    """One job's outcome: the latencies and peak memory the node measured, or why not."""

    model_config = ConfigDict(extra="forbid")

    ok: bool
    error: str | None = Field(None, max_length=4000)
    runs: int = Field(0, ge=0)
    p50_ms: float | None = Field(None, ge=0)
    p95_ms: float | None = Field(None, ge=0)
    p99_ms: float | None = Field(None, ge=0)
    mean_ms: float | None = Field(None, ge=0)
    peak_rss_bytes: int | None = Field(None, ge=0)
    model_peak_bytes: int | None = Field(None, ge=0)
    runtime: str | None = None
    machine: str | None = None
    cpu: str | None = None
    duration_s: float | None = Field(None, ge=0)
