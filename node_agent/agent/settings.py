"""The agent's configuration, from ``EDGEFLEET_*`` environment variables."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from node_agent.discovery import (
    SERVICE_ACCOUNT_DIR,
    Discovery,
    DiscoveryError,
    PodDiscovery,
    StaticDiscovery,
    api_url_from_env,
)


class AgentSettings(BaseSettings):
    """``EDGEFLEET_*`` environment variables (the agent reads no ``.env`` file)."""

    model_config = SettingsConfigDict(
        env_prefix="EDGEFLEET_", extra="ignore", validate_by_name=True, validate_by_alias=True
    )

    controller_url: str = Field(description="The controller as reachable from this node.")
    join_token: SecretStr | None = Field(
        None, description="Fleet join token; needed to enrol (and to re-enrol on a 401)."
    )
    node_name: str = Field(
        min_length=1,
        validation_alias=AliasChoices("EDGEFLEET_NODE_NAME", "NODE_NAME"),
        description="This node's name; the chart sets NODE_NAME from the downward API.",
    )
    cluster: str = Field(min_length=1, description="The cluster's name in the controller.")
    state_dir: Path = Field(
        Path("/var/lib/edgefleet/agent"),
        description="The agent's credential (mode 0600) and its heartbeat outbox.",
    )
    heartbeat_interval_s: float = Field(
        10.0,
        gt=0,
        description="How often to report, in seconds; unless set, the controller's "
        "suggestion at enrolment wins.",
    )
    queue_max: int = Field(
        10_000, ge=1, description="Heartbeats kept while offline (10,000 x 10 s = 27 h)."
    )
    batch_size: int = Field(500, ge=1, description="Heartbeats per request when replaying.")
    discovery: Literal["static", "kubernetes"] = Field(
        "static",
        description="static: the inference servers are EDGEFLEET_INFERENCE_URLS; kubernetes: "
        "this node's inference pods, listed through the cluster's API server.",
    )
    inference_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="The /metrics URLs of the local inference servers (comma-separated).",
    )
    workload_namespace: str = Field(
        "edgefleet-workloads", min_length=1, description="Where the inference pods run."
    )
    discovery_refresh_s: float = Field(
        60.0, gt=0, description="How often the pod list is read again (and on a failed scrape)."
    )
    kubernetes_api_url: str | None = Field(
        None,
        description="The API server; in a pod it defaults to KUBERNETES_SERVICE_HOST/PORT.",
    )
    kubernetes_token_file: Path = Field(
        SERVICE_ACCOUNT_DIR / "token",
        description="The service account token the pod list is read with (kubernetes discovery).",
    )
    kubernetes_ca_file: Path | None = Field(
        SERVICE_ACCOUNT_DIR / "ca.crt",
        description="The API server's CA bundle; unset: the system's CAs.",
    )
    request_timeout_s: float = Field(
        10.0, gt=0, description="Timeout of a request to the controller, in seconds."
    )
    scrape_timeout_s: float = Field(
        2.0,
        gt=0,
        description="Timeout of a scrape of an inference server's /metrics (and of the pod "
        "list), in seconds.",
    )
    retry_max_s: float = Field(
        60.0, gt=0, description="Longest wait between attempts to reach the controller."
    )
    controller_ca_file: Path | None = Field(
        None, description="CA bundle for a controller certificate of a private CA."
    )
    model_cache_dir: Path = Field(
        Path("/var/lib/edgefleet/models"),
        description="The node-local, content-addressed artifact cache (shared with the "
        "inference servers): benchmarked artifacts are downloaded into it.",
    )
    benchmark_timeout_s: float = Field(
        300.0, gt=0, description="A benchmark's child process is killed after this long."
    )
    benchmark_memory_limit_mb: int = Field(
        2048, ge=256, description="Memory (RLIMIT_DATA) a benchmark's child may map, in MiB."
    )
    benchmark_cpu_limit_s: int = Field(
        600, ge=1, description="CPU seconds (RLIMIT_CPU, all threads) of a benchmark's child."
    )
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Port of the agent's own GET /metrics (heartbeats sent, queued, "
        "replayed, failures by reason, the last acknowledged one's time); no credential, "
        "no secret in it. Unset: not served.",
    )
    # Open to whoever reaches it (docs/security.md): loopback unless an operator opens
    # it; the chart binds the pod's IP (status.podIP), where Prometheus scrapes.
    metrics_host: str = Field(
        "127.0.0.1",
        description="Bind address of the agent's /metrics: loopback unless set (it "
        "answers anyone who reaches it); the chart sets the pod's IP.",
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR.")

    @field_validator("inference_urls", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [u.strip() for u in value.split(",") if u.strip()]
        return value


def discovery_for(settings: AgentSettings, clock: Callable[[], float]) -> Discovery:
    if settings.discovery == "static":
        return StaticDiscovery(settings.inference_urls)
    api_url = settings.kubernetes_api_url or api_url_from_env(os.environ)
    if api_url is None:
        raise DiscoveryError(
            "EDGEFLEET_DISCOVERY=kubernetes needs the API server: EDGEFLEET_KUBERNETES_API_URL, "
            "or KUBERNETES_SERVICE_HOST as the kubelet sets it in a pod"
        )
    return PodDiscovery(
        api_url=api_url,
        namespace=settings.workload_namespace,
        node_name=settings.node_name,
        token_file=settings.kubernetes_token_file,
        ca_file=settings.kubernetes_ca_file,
        refresh_s=settings.discovery_refresh_s,
        timeout_s=settings.scrape_timeout_s,
        clock=clock,
    )
