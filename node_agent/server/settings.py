"""Settings of ``edgefleet-serve``: command-line flags first, then ``EDGEFLEET_SERVE_*``
environment variables, then the defaults below."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from node_agent.server.connection import BODY_MIN_BYTES_PER_S, BODY_TIMEOUT_S, HEAD_TIMEOUT_S

log = logging.getLogger(__name__)

DEFAULT_PORT = 8500
DEFAULT_CACHE_DIR = Path("/var/lib/edgefleet/models")
CPU_LIMIT_ENV = "EDGEFLEET_CPU_LIMIT"

ModelFormat = Literal["onnx", "tflite"]


def threads_from_cpu_limit(value: str | None) -> int:
    """Intra-op threads from the pod's CPU limit in millicores (the DaemonSet passes
    ``limits.cpu`` with divisor 1m): ceil(m / 1000), at least 1. Unset or unreadable: 1,
    never the host's core count, which oversubscribes a CPU quota on a shared node."""
    if not value:
        return 1
    try:
        millicores = float(value.strip().removesuffix("m"))
    except ValueError:
        log.warning("ignoring %s=%r: not a number of millicores", CPU_LIMIT_ENV, value)
        return 1
    if not math.isfinite(millicores) or millicores <= 0:
        return 1
    return max(1, math.ceil(millicores / 1000))


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_SERVE_", extra="ignore")

    # What to serve: a URL + sha256 (downloaded into the cache) or a local file.
    model_url: str | None = Field(
        None,
        description="Artifact URL of the model (the controller's /v1/models/.../artifact), "
        "downloaded into the cache and verified against sha256; or give model_path.",
    )
    sha256: str | None = Field(
        None, pattern=r"^[0-9a-fA-F]{64}$", description="Expected sha256 of the artifact (hex)."
    )
    format: ModelFormat | None = Field(
        None, description="Model format; unset: detected from the bytes."
    )
    model_path: Path | None = Field(
        None, description="Serve this local model file instead of downloading one."
    )
    model_name: str = Field("model", description="Reported in /v1/model, answers and metrics.")
    model_version: str = Field(
        "unversioned", description="Reported in /v1/model, answers and metrics."
    )
    cache_dir: Path = Field(
        DEFAULT_CACHE_DIR,
        description="The node-local, content-addressed artifact cache (shared with the agent).",
    )

    # Where to listen.
    host: str = Field("0.0.0.0", description="Listen address.")
    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="Listen port; 0 picks a free one.")

    # Runtime.
    threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Runtime intra-op threads; unset: from EDGEFLEET_CPU_LIMIT, the pod's CPU "
        "limit in millicores (rounded up to whole cores, at least 1), never the host's core "
        "count.",
    )
    providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        min_length=1,
        description="onnxruntime execution providers in order of preference (a JSON list), "
        'e.g. ["CUDAExecutionProvider", "CPUExecutionProvider"] on a GPU node.',
    )
    warmup_runs: int = Field(3, ge=0, description="Inferences run before turning ready.")
    warmup_dim: int = Field(
        64, ge=1, description="Size of a dynamic non-batch dimension in the warm-up inputs."
    )
    warmup_inputs: dict[str, Any] = Field(
        default_factory=dict,
        description="The version's validation hints as a JSON object (dims, shapes, values): "
        "the warm-up inputs' sizes and constant values, for a model that refuses generated "
        "ones (a recurrent state of a fixed size, a sample rate).",
    )

    # Requests.
    max_body_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest request body (413 above)."
    )
    max_npz_members: int = Field(64, ge=1, description="Most arrays an npz request body holds.")
    idle_timeout_s: float = Field(
        75.0, gt=0, description="Keep-alive idle timeout of a connection, in seconds."
    )
    max_connections: int = Field(
        256,
        ge=1,
        description="Open connections at a time (a thread and a receive buffer each); one "
        "more is answered 503 with Retry-After.",
    )
    max_connections_per_client: int = Field(
        64,
        ge=1,
        description=(
            "Open connections at a time from one client address; one more is answered 503 "
            "with Retry-After and closed, counted in "
            "edgefleet_serve_client_connections_refused_total. Keeps one client (a slow one, "
            "say) from taking every one of max_connections and with them the kubelet's "
            "probes. Behind source NAT (a Service with externalTrafficPolicy Cluster) a "
            "node's address stands for all its clients: raise it there."
        ),
    )
    # Slow clients: a slot each for as long as they take. Over a deadline: 408 and close,
    # counted in edgefleet_serve_request_timeouts_total{phase}.
    head_timeout_s: float = Field(
        HEAD_TIMEOUT_S,
        gt=0,
        description=(
            "Seconds a request head may take, from its first byte to its blank line (the "
            "wait before the first byte is idle_timeout_s's); 408 after."
        ),
    )
    body_timeout_s: float = Field(
        BODY_TIMEOUT_S,
        gt=0,
        description=(
            "Seconds any request body may take, plus one per body_min_bytes_per_s of it; "
            "from the first receive that leaves it incomplete; 408 after."
        ),
    )
    body_min_bytes_per_s: int = Field(
        BODY_MIN_BYTES_PER_S,
        ge=1,
        description=(
            "The slowest upload a body's deadline allows for (with the default 64 KiB/s, "
            "a 64 MiB body gets body_timeout_s + 1024 s)."
        ),
    )
    busy_poll_us: int = Field(
        250,
        ge=0,
        le=100_000,
        description="After an answer, poll the connection this many microseconds for the "
        "client's next request before sleeping (0: never). Saves the wake-up of a sleeping "
        "thread (tens of µs on a VM) for clients that come back at once; costs at most this "
        "much CPU per request, only while no other request is in flight and while the client "
        "keeps coming back within it. Counted in edgefleet_serve_busy_poll_seconds_total.",
    )

    # Admin endpoint: loopback callers always, others with this bearer token.
    admin_token: SecretStr | None = Field(
        None, description="Bearer token of /v1/admin/* for callers other than loopback."
    )
    admin_allow_loopback: bool = Field(
        True, description="Loopback callers may use /v1/admin/* without the token."
    )

    # Download.
    download_attempts: int = Field(
        5, ge=1, description="Attempts at downloading the artifact before giving up."
    )
    download_backoff_s: float = Field(
        0.5,
        ge=0,
        description="First wait between download attempts, in seconds; it doubles each "
        "time (at most 10 s, with jitter).",
    )
    artifact_token: SecretStr | None = Field(
        None,
        description="Bearer token for the model download (an inference pod gets its "
        "cluster's artifact token from the controller's Secret); sent to that URL's origin "
        "only.",
    )
    download_timeout_s: float = Field(
        30.0, gt=0, description="Timeout of the download's reads, in seconds."
    )
    max_artifact_bytes: int = Field(
        2 * 1024**3, ge=1, description="Largest artifact a download accepts."
    )

    shutdown_grace_s: float = Field(
        20.0, ge=0, description="On SIGTERM, how long requests in flight may finish, in seconds."
    )
    shutdown_delay_s: float = Field(
        0.0,
        ge=0,
        description="On SIGTERM, how long the server keeps accepting before it stops, in "
        "seconds: readiness off, every answer with Connection: close. The inference pods get "
        "5, the time kube-proxy takes to drop a replaced pod from the model's Service.",
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR.")

    @field_validator("sha256")
    @classmethod
    def _lower(cls, value: str | None) -> str | None:
        return value.lower() if value else value

    @model_validator(mode="after")
    def _source(self) -> ServeSettings:
        if self.model_path is None and not (self.model_url and self.sha256):
            raise ValueError("give --model-url with --sha256, or --model-path")
        return self

    def resolved_threads(self) -> int:
        if self.threads is not None:
            return self.threads
        return threads_from_cpu_limit(os.environ.get(CPU_LIMIT_ENV))
