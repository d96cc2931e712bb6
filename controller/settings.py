"""Controller settings: one class, read from ``EDGEFLEET_*`` environment variables or ``.env``.

The defaults are the embedded setup (SQLite, in-process tasks, artifacts under
``./.edgefleet``), so ``edgefleet demo`` needs no server. Production sets
``EDGEFLEET_ENVIRONMENT=production`` with a Postgres URL, a Redis URL and a real secret;
a default secret outside development refuses to start.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from controller.faults import parse as parse_faults

DEV_SECRET = "edgefleet-development-secret-do-not-use"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="EDGEFLEET_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    environment: Literal["development", "test", "production"] = Field(
        "development",
        description="Where this process runs: outside development the default secret key is "
        "refused, and production also refuses armed fault points.",
    )
    database_url: str = Field(
        "sqlite:///.edgefleet/edgefleet.db",
        description="SQLAlchemy URL of the database; production: "
        "postgresql+psycopg://user@host/db.",
    )
    database_pool_size: int = Field(
        10, ge=1, description="Connections each process keeps in its database pool."
    )
    # Redis is the Celery broker and the lock service. None means the embedded setup:
    # no broker, Celery tasks run eagerly in the calling process.
    redis_url: str | None = Field(
        None,
        description="Redis URL: the Celery broker, the lock service and the simulated "
        "clusters' state. Unset: the embedded setup, with tasks run in-process.",
    )
    tasks_eager: bool | None = Field(
        None, description="Run Celery tasks in-process; defaults to true when redis_url is unset."
    )
    celery_queue: str = Field(
        "edgefleet", description="Celery queue name (workers and senders must agree)."
    )
    secret_key: SecretStr = Field(
        SecretStr(DEV_SECRET),
        description="Required outside development. Encrypts cluster credentials at rest and "
        "signs dashboard sessions and artifact tokens (rotating it revokes every artifact "
        "token).",
    )

    api_host: str = Field("127.0.0.1", description="Bind address of edgefleet server.")
    api_port: int = Field(8080, ge=1, le=65535, description="Port of edgefleet server.")
    # Above the agents' heartbeat interval (agent_heartbeat_interval_s), so an agent
    # keeps its connection (and TLS session) from one heartbeat to the next instead of
    # opening a new one every time; above 60 s, so a load balancer's idle timeout (AWS,
    # GCP, nginx: 60 s) closes an idle connection before the server does.
    api_keepalive_timeout_s: int = Field(
        75,
        ge=1,
        description="Seconds uvicorn keeps an idle HTTP connection open (timeout_keep_alive): "
        "above the agents' heartbeat interval, so each agent keeps its connection, and above "
        "a load balancer's usual 60 s idle timeout.",
    )

    artifact_dir: Path = Field(
        Path(".edgefleet/artifacts"),
        description="Content-addressed artifact store, shared by the API and the workers.",
    )
    max_artifact_bytes: int = Field(
        512 * 1024 * 1024, ge=1, description="Largest model upload (413 above it)."
    )

    # Request bounds. A body over its route's limit is refused (413) as it arrives
    # (controller/web/body_limits.py): uploads have max_artifact_bytes, /v1/apply
    # max_manifest_bytes, every other route max_request_bytes. A batch of agent_max_batch
    # heartbeats of 16 workloads each, every name 63 characters long, is 5.9 MiB.
    max_request_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1,
        description="Largest request body of the routes other than uploads and /v1/apply "
        "(413 above it).",
    )
    max_manifest_bytes: int = Field(
        4 * 1024 * 1024, ge=1, description="Largest /v1/apply body (413 above it)."
    )
    max_manifest_documents: int = Field(
        500, ge=1, description="Most documents one apply holds (422 above it)."
    )
    # At most 200: parsers and validators recurse per level, within Python's 1000 frames.
    max_nesting_depth: int = Field(
        64, ge=1, le=200, description="Deepest nesting of a JSON or YAML value in a request."
    )
    max_input_nodes: int = Field(
        1_000_000,
        ge=1,
        description="Most values in one request's JSON or YAML, YAML aliases counted expanded.",
    )

    # Validation and benchmark run the model in a child process, so a runtime that
    # crashes or hangs on a hostile artifact cannot take the worker down with it.
    probe_timeout_s: float = Field(
        300.0, gt=0, description="Wall-clock limit of a validation or benchmark child, in seconds."
    )
    # The child's limits (node_agent/probe.py, apply_limits): a model that needs more
    # is Invalid, with the setting named in the reason.
    probe_memory_limit_mb: int = Field(
        2048,
        ge=256,
        description="Memory (RLIMIT_DATA) a validation or benchmark child may map, in MiB; "
        "a model over it is Invalid.",
    )
    probe_cpu_limit_s: int = Field(
        600,
        ge=1,
        description="CPU seconds (RLIMIT_CPU, all threads) of a validation or benchmark "
        "child; a model over it is Invalid.",
    )
    probe_default_dim: int = Field(
        64, ge=1, description="Size used for a dynamic non-batch dimension with no hint."
    )
    benchmark_runs: int = Field(
        50, ge=1, description="Timed runs of the registry benchmark (p50/p95/p99)."
    )
    benchmark_warmup_runs: int = Field(
        5, ge=0, description="Untimed runs before the registry benchmark."
    )
    benchmark_threads: int = Field(1, ge=1, description="Runtime threads while benchmarking.")
    comparison_runs: int = Field(
        30,
        ge=1,
        description="Timed runs of each model, parent and variant alternating, in a variant's "
        "comparison report (its latency ratios).",
    )
    # Variants: what a variant must meet to roll out where a Rollout's spec.comparison
    # says nothing (controller/rollouts/planner.py), so one that disagrees with its
    # parent is not shipped because a manifest forgot to ask.
    variant_min_agreement: float = Field(
        0.99,
        ge=0,
        le=1,
        description="Top-1 agreement with its parent a variant needs to roll out (and to be "
        "recommended by its comparison report) where a Rollout's spec.comparison sets no "
        "minAgreement; a variant without classifier outputs must stay within its report's "
        "tolerances instead.",
    )
    variant_max_abs_error: float | None = Field(
        None,
        ge=0,
        description="Max absolute output error from its parent a variant may have to roll "
        "out where a Rollout's spec.comparison sets no maxAbsError; unset: no limit.",
    )
    # Versions stuck in Pending/Validating longer than this (a worker died, the broker
    # lost the message) are queued again by the beat sweeper.
    stuck_validation_s: float = Field(
        900.0,
        gt=0,
        description="Seconds a version may stay Pending or Validating before beat's sweeper "
        "queues its validation again.",
    )

    # Fleet.
    public_url: str = Field(
        "http://127.0.0.1:8080", description="How edge nodes reach this controller (artifact URLs)."
    )
    node_stale_s: float = Field(
        60.0, gt=0, description="Seconds without a heartbeat before a node is Stale."
    )
    node_offline_s: float = Field(
        300.0, gt=0, description="Seconds without a heartbeat before a node is Offline."
    )
    inference_architectures: list[str] = Field(
        default_factory=lambda: ["amd64", "arm64"],
        description="CPU architectures the inference image is built for; pre-flight refuses "
        "nodes of any other.",
    )
    # Kubernetes driver.
    inference_image: str = Field(
        "ghcr.io/edgefleet/inference:0.1.0", description="Image of edgefleet-serve (multi-arch)."
    )
    inference_port: int = Field(
        8500, ge=1, le=65535, description="Port of edgefleet-serve in the workload pods."
    )
    kube_request_timeout_s: float = Field(
        15.0, gt=0, description="Timeout of one Kubernetes API call, in seconds."
    )
    kube_retry_backoff_s: list[float] = Field(
        default_factory=lambda: [0.2, 0.5, 1.0, 2.0],
        description="Waits between retries of transient Kubernetes errors (Retry-After wins).",
    )
    sim_state_prefix: str = Field(
        "edgefleet:sim", description="Redis key prefix of the simulated clusters' state."
    )
    # Rollouts.
    reconcile_interval_s: float = Field(
        5.0, gt=0, description="Follow-up delay of an active rollout's next reconcile step."
    )
    # Node agents. The join token is the one secret an agent needs to enrol; each node
    # then gets its own credential. None turns enrolment off (503).
    agent_join_token: SecretStr | None = Field(
        None, description="Shared secret node agents enrol with; unset disables enrolment (503)."
    )
    pull_poll_timeout_s: float = Field(
        25.0,
        gt=0,
        le=300,
        description="How long GET /v1/clusters/NAME/pull/desired waits for a new revision "
        "before it answers 'unchanged' (the cluster agent's long poll); keep it below "
        "the idle timeout of proxies in between.",
    )
    pull_silent_s: float = Field(
        90.0,
        gt=0,
        description="Seconds after the last report of a pull cluster's agent before the "
        "cluster counts as unreachable (its observations are too old to judge a wave).",
    )
    agent_heartbeat_interval_s: float = Field(
        10.0, gt=0, description="Heartbeat interval suggested to agents at enrolment."
    )
    agent_max_batch: int = Field(
        1000, ge=1, description="Most heartbeats one request may carry (an agent's replay)."
    )
    # Heartbeat requests arriving together share one ingest transaction (each still gets
    # its own answer): those that arrive while one is being written, and those within
    # this window of the oldest waiting one. 0: no waiting.
    agent_coalesce_window_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="How long a heartbeat request waits for others to share its ingest "
        "transaction, each still with its own answer (those arriving while one is written "
        "share it too); 0: no waiting.",
    )
    agent_coalesce_max_heartbeats: int = Field(
        2000, ge=1, description="Most heartbeats in one shared ingest transaction."
    )

    # Retention. Heartbeats are not kept as history (each updates its node's and
    # assignments' rows in place); the audit log is what grows with time.
    event_retention_days: float = Field(
        90.0,
        ge=0,
        description="Days an event (the audit log) is kept before beat's hourly purge deletes "
        "it; an active rollout's events stay until it ends. 0: keep every event.",
    )
    retention_batch_rows: int = Field(
        5000,
        ge=1,
        description="Rows one retention DELETE removes, each batch its own transaction (short "
        "locks, bounded WAL).",
    )

    # Access control. Every API route needs a token of a role (viewer, operator, admin);
    # these two open a read-only surface to callers that cannot send one.
    metrics_public: bool = Field(
        False, description="Serve /metrics without a token (for scrapers that send none)."
    )
    dashboard_public: bool = Field(
        False, description="Serve the dashboard without signing in (a trusted network only)."
    )
    # A Celery worker's counters (transitions, gate decisions, validations, pushes) are
    # incremented in its pool's child processes: they reach Prometheus only through an
    # exporter in the worker's main process that sums every child's (multiprocess mode).
    worker_metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Port of a Celery worker's Prometheus exporter (GET /metrics, served by "
        "the worker's main process and summed over its pool's child processes; a viewer "
        "token is required unless EDGEFLEET_METRICS_PUBLIC). Unset or 0: no exporter, and "
        "the worker keeps no counters.",
    )
    worker_metrics_host: str = Field(
        "127.0.0.1", description="Bind address of a Celery worker's Prometheus exporter."
    )
    # Live dashboard pages hold a connection each (server-sent events): bounded in number
    # per process and in length (the browser reconnects, and is authorized again). A
    # stopping server waits for open streams like any request: their length bounds that.
    dashboard_live_streams: int = Field(
        32, ge=0, description="Most live dashboard pages one API process streams to at once."
    )
    dashboard_live_stream_s: float = Field(
        60.0,
        gt=0,
        description="Seconds one live dashboard stream lasts before it closes (the page "
        "reconnects); also how long a stopping API process may wait for its open streams.",
    )
    dashboard_live_interval_s: float = Field(
        2.0, gt=0, description="Seconds between two renders of a live dashboard page."
    )
    # Cluster credentials are applied by admins but still untrusted input: only what a
    # remote API server needs is accepted (see controller/fleet/kubeconfig.py).
    cluster_allow_insecure_tls: bool = Field(
        False,
        description="Accept insecure-skip-tls-verify and plain http:// API servers in "
        "Cluster manifests.",
    )
    cluster_server_allowlist: list[str] = Field(
        default_factory=list,
        description="Hosts (exact like k3s.lab, or *.edge.example) and networks (CIDR) a "
        "Cluster's API server may be at; empty allows any.",
    )
    local_driver: bool = Field(
        False,
        description="Accept Clusters with driver 'local', which run edgefleet-serve processes "
        "on the controller's own host (development and end-to-end tests only).",
    )
    # Inference pods download their model with a cluster-scoped, expiring artifact token
    # (a Kubernetes Secret the driver keeps fresh; pods read it at start).
    artifact_token_ttl_s: float = Field(
        7 * 24 * 3600.0,
        ge=600,
        description="Lifetime in seconds of a cluster's artifact download token (a token is "
        "valid for half to all of it).",
    )

    # Crash tests: named fault points to arm (controller/faults.py reads the variable
    # itself, at import). Checked here too, so a typo or an armed fault outside
    # development and test stops the process at startup.
    faults: str = Field(
        "",
        description="Fault points to arm for crash tests (controller/faults.py), as "
        "point=[N*]kill|exit|raise|hang,...; refused in production.",
    )

    @model_validator(mode="after")
    def _check_faults(self) -> Settings:
        if parse_faults(self.faults) and self.environment == "production":
            raise ValueError("EDGEFLEET_FAULTS arms fault points: never in production")
        return self

    @model_validator(mode="after")
    def _refuse_default_secret(self) -> Settings:
        if self.environment != "development" and self.secret_key.get_secret_value() == DEV_SECRET:
            raise ValueError(
                "EDGEFLEET_SECRET_KEY must be set to a real secret outside development "
                f"(environment is {self.environment!r})"
            )
        return self

    @property
    def eager_tasks(self) -> bool:
        return self.tasks_eager if self.tasks_eager is not None else self.redis_url is None


@lru_cache
def get_settings() -> Settings:
    return Settings()
