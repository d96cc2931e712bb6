"""The cluster agent's configuration, from ``EDGEFLEET_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from node_agent.discovery import SERVICE_ACCOUNT_DIR


class ClusterAgentSettings(BaseSettings):
    """``EDGEFLEET_*`` environment variables (no ``.env`` file)."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_", extra="ignore")

    controller_url: str = Field(description="The controller as reachable from the cluster.")
    cluster: str = Field(min_length=1, max_length=63, description="The cluster's name.")
    join_token: SecretStr | None = Field(
        None,
        description="This cluster's own join token (an admin's `edgefleet clusters "
        "join-token NAME`: single use, expiring); needed to enrol, and a new one to enrol "
        "again after an admin reset.",
    )
    state_dir: Path = Field(
        Path("/var/lib/edgefleet/cluster-agent"),
        description="Where the credential and the last desired state are kept: a restart "
        "while the controller is unreachable still applies the last desired state.",
    )
    kubernetes_api_url: str | None = Field(
        None,
        description="The API server; in a pod it defaults to KUBERNETES_SERVICE_HOST/PORT.",
    )
    kubernetes_token_file: Path = SERVICE_ACCOUNT_DIR / "token"
    kubernetes_ca_file: Path | None = SERVICE_ACCOUNT_DIR / "ca.crt"
    controller_ca_file: Path | None = Field(
        None, description="CA bundle for a controller certificate of a private CA."
    )
    request_timeout_s: float = Field(10.0, gt=0)
    poll_wait_s: float | None = Field(
        None,
        gt=0,
        le=300,
        description="How long one long poll may wait (default: the controller's timeout).",
    )
    report_interval_s: float = Field(
        10.0, gt=0, description="How often the nodes and inference pods are reported."
    )
    resync_interval_s: float = Field(
        30.0,
        gt=0,
        description="How often the last desired state is applied again, changed or not: "
        "drift (a DaemonSet deleted, a label removed) is repaired within it, with or "
        "without the controller.",
    )
    retry_max_s: float = Field(
        60.0, gt=0, description="Longest wait between attempts to reach the controller."
    )
    log_level: str = "INFO"
