"""``edgefleet-agent``: the node agent daemon, one per edge node (a DaemonSet pod).

Every interval it builds one heartbeat (node status, and per local inference server
the model it serves with that window's inference numbers), appends it to the durable
outbox (:mod:`node_agent.queue`) and sends the outbox, oldest first, in batches. The
controller acknowledges a sequence number and everything up to it leaves the outbox,
so an agent cut off for hours replays its backlog in order when the link comes back,
and a batch sent twice (a lost response) is counted once.

Identity: the agent enrols once with the fleet's join token and keeps the credential
of its own node (``<state_dir>/credential``, mode 0600). A credential the controller no
longer accepts (rotated, node re-created) makes it enrol again when it still has the
join token.

On-node benchmarks: the controller keeps model benchmarks per node class (architecture,
accelerator, CPU model: the heartbeat reports ``cpu_model``) and asks one node of each
class to measure. A heartbeat answer with ``benchmarks_pending > 0`` makes the agent,
when no benchmark is running, fetch its jobs (``GET /v1/agents/benchmarks``) and hand
them to one background thread (:mod:`node_agent.benchmarks`), so heartbeats keep their
schedule while a benchmark takes minutes. For each job in order the thread fetches the
artifact into the node-local cache (``EDGEFLEET_MODEL_CACHE_DIR``, the inference
servers' cache; sha256 verified) and measures it in a child process
(:mod:`node_agent.probe`, killed after ``EDGEFLEET_BENCHMARK_TIMEOUT_S``). The agent's
loop posts each result (``POST /v1/agents/benchmarks/{id}``; latencies and peak memory,
or ``ok: false`` with the download, validation or runtime error). A post that does not
get through is retried at the next heartbeat, never measured again; 404/409 (job
withdrawn or already answered) drops it. At most one benchmark runs at a time; on
shutdown the running one is killed after a short grace. After a start the agent fetches
its jobs once whatever the count says: the controller counts jobs handed out as fetched,
so one interrupted by a restart would otherwise wait forever.

Light on purpose: no numpy, no runtime, no server; a few file reads and two HTTP
requests per interval (bench/bench_agent.py measures it). The model runtime is loaded
only by a benchmark's child process, never by the agent."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
from pydantic import AliasChoices, BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from node_agent.benchmarks import BenchmarkWorker, Finished, failed
from node_agent.cache import ArtifactCache
from node_agent.contract import BenchmarkJob, BenchmarkResult, Heartbeat
from node_agent.discovery import (
    SERVICE_ACCOUNT_DIR,
    Discovery,
    DiscoveryError,
    PodDiscovery,
    StaticDiscovery,
    api_url_from_env,
)
from node_agent.metrics_reader import MetricsReader
from node_agent.probe_launcher import ProbeLimits
from node_agent.queue import HeartbeatQueue
from node_agent.sysinfo import SystemProbe

log = logging.getLogger("edgefleet.agent")


class AgentSettings(BaseSettings):
    """``EDGEFLEET_*`` environment variables (the agent reads no ``.env`` file)."""

    model_config = SettingsConfigDict(
        env_prefix="EDGEFLEET_", extra="ignore", validate_by_name=True, validate_by_alias=True
    )

    controller_url: str = Field(description="The controller as reachable from this node.")
    join_token: SecretStr | None = Field(
        None, description="Fleet join token; needed to enrol (and to re-enrol on a 401)."
    )
    # The chart sets NODE_NAME from the downward API (spec.nodeName).
    node_name: str = Field(
        min_length=1, validation_alias=AliasChoices("EDGEFLEET_NODE_NAME", "NODE_NAME")
    )
    cluster: str = Field(min_length=1, description="The cluster's name in the controller.")
    state_dir: Path = Path("/var/lib/edgefleet/agent")
    heartbeat_interval_s: float = Field(
        10.0, gt=0, description="Unless set, the controller's suggestion at enrolment wins."
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
    kubernetes_token_file: Path = SERVICE_ACCOUNT_DIR / "token"
    kubernetes_ca_file: Path | None = SERVICE_ACCOUNT_DIR / "ca.crt"
    request_timeout_s: float = Field(10.0, gt=0)
    scrape_timeout_s: float = Field(2.0, gt=0)
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
    log_level: str = "INFO"

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


# --- the controller's API -------------------------------------------------------------


class ControllerError(Exception):
    pass


class Unreachable(ControllerError):
    """Temporary: network, timeout, 5xx, 429. Try again later."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Refused(ControllerError):
    """The controller answered 4xx: retrying the same request will not help."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


class Enrollment(BaseModel):
    credential: str
    heartbeat_interval_s: float
    last_seq: int = 0


class Ack(BaseModel):
    accepted: int
    duplicates: int
    last_seq: int
    # Benchmark jobs waiting for this node (0 from controllers that predate them).
    benchmarks_pending: int = 0


class ControllerClient:
    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 10.0,
        verify: str | bool = True,
        user_agent: str = "edgefleet-agent",
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
            verify=verify,
            headers={"User-Agent": user_agent},
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, *, content: str, headers: dict[str, str]) -> Any:
        return self._request(
            "POST", path, content=content, headers={"Content-Type": "application/json", **headers}
        )

    def _request(
        self, method: str, path: str, *, content: str | None = None, headers: dict[str, str]
    ) -> Any:
        try:
            resp = self._http.request(method, path, content=content, headers=headers)
        except httpx.TransportError as exc:
            raise Unreachable(f"{type(exc).__name__}: {exc}") from exc
        if resp.status_code < 300:
            if not resp.content:  # 204
                return None
            try:
                return resp.json()
            except ValueError as exc:
                raise Unreachable(f"{resp.status_code} with a body that is not JSON") from exc
        try:
            detail = str(resp.json().get("detail", resp.text))
        except ValueError:
            detail = resp.text[:300]
        if resp.status_code >= 500 or resp.status_code in (408, 429):
            retry_after = resp.headers.get("Retry-After", "")
            raise Unreachable(
                f"{resp.status_code}: {detail}",
                retry_after_s=float(retry_after) if retry_after.isdigit() else None,
            )
        raise Refused(resp.status_code, detail)

    def enroll(self, *, cluster: str, node: str, join_token: str) -> Enrollment:
        body = json.dumps({"cluster": cluster, "node": node, "join_token": join_token})
        return Enrollment.model_validate(self._post("/v1/agents/enroll", content=body, headers={}))

    def heartbeats(self, credential: str, body: str) -> Ack:
        """``body``: a JSON list of heartbeats, oldest first."""
        got = self._post(
            "/v1/agents/heartbeat",
            content=body,
            headers={"Authorization": f"Bearer {credential}"},
        )
        return Ack.model_validate(got)

    def benchmark_jobs(self, credential: str) -> Any:
        """The benchmark jobs waiting for this node: a JSON list of ``BenchmarkJob``
        (returned unparsed: the agent reads them one by one)."""
        return self._request(
            "GET", "/v1/agents/benchmarks", headers={"Authorization": f"Bearer {credential}"}
        )

    def post_benchmark_result(self, credential: str, job_id: int, result: BenchmarkResult) -> None:
        self._post(
            f"/v1/agents/benchmarks/{job_id}",
            content=result.model_dump_json(exclude_none=True),
            headers={"Authorization": f"Bearer {credential}"},
        )


class ControllerAuth(httpx.Auth):
    """The node credential on artifact downloads, sent to the controller's own origin
    only: an artifact URL elsewhere (a CDN, an object store) never sees it. (httpx drops
    the header itself on a redirect to another origin.)"""

    def __init__(self, controller_url: str, credential: Callable[[], str | None]) -> None:
        self.origin = _origin(httpx.URL(controller_url))
        self.credential = credential

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        credential = self.credential()
        if credential and _origin(request.url) == self.origin:
            request.headers["Authorization"] = f"Bearer {credential}"
        yield request


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, url.port or default


def artifact_url(controller_url: str, url: str) -> str:
    """A job's artifact URL, absolute (the controller may send one relative to itself,
    under the same path prefix as its API)."""
    if httpx.URL(url).is_absolute_url:
        return url
    return controller_url.rstrip("/") + "/" + url.lstrip("/")


# --- the agent ------------------------------------------------------------------------


class Backoff:
    """When to try the controller next. Temporary failures wait longer each time (from
    the interval up to ``max_s``); a refusal that needs an operator waits ``max_s`` at
    once. Jitter spreads a fleet's reconnection after a controller outage."""

    def __init__(
        self,
        base_s: float,
        max_s: float,
        clock: Callable[[], float],
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.base_s, self.max_s, self.clock, self.rng = base_s, max_s, clock, rng
        self.failures = 0
        self.retry_at = 0.0

    def ready(self) -> bool:
        return self.clock() >= self.retry_at

    def success(self) -> None:
        self.failures, self.retry_at = 0, 0.0

    def failure(self, *, permanent: bool = False, at_least_s: float | None = None) -> float:
        self.failures += 1
        delay = self.max_s if permanent else min(self.max_s, self.base_s * 2 ** (self.failures - 1))
        delay *= 0.5 + self.rng() / 2
        if at_least_s is not None:
            delay = max(delay, at_least_s)
        self.retry_at = self.clock() + delay
        return delay


@dataclass
class Stats:
    accepted: int = 0
    duplicates: int = 0
    batches: int = 0
    failures: int = 0
    enrollments: int = 0
    benchmark_results_posted: int = 0


def write_secret(path: Path, value: str) -> None:
    """Write ``value`` to ``path`` readable by the owner only, atomically: the file is
    created with mode 0600 (never world-readable, not even for an instant) and renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(value)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def agent_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgefleet")
    except PackageNotFoundError:
        return "unknown"


# A benchmark's result is posted at most this many times (one per heartbeat) when the
# controller keeps failing on it (5xx): then it is dropped, so one result the controller
# cannot store does not block every later benchmark.
RESULT_POST_ATTEMPTS = 30
# How long a shutdown waits for the benchmark thread once its child process is killed.
SHUTDOWN_GRACE_S = 2.0


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        *,
        client: ControllerClient | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        proc_root: Path = Path("/proc"),
        sys_root: Path = Path("/sys"),
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.wall_clock = wall_clock
        self.version = agent_version()
        settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.credential_path = settings.state_dir / "credential"
        self.queue = HeartbeatQueue(settings.state_dir / "queue.db", max_entries=settings.queue_max)
        ca = settings.controller_ca_file
        self.client = client or ControllerClient(
            settings.controller_url,
            timeout_s=settings.request_timeout_s,
            verify=str(ca) if ca is not None else True,
            user_agent=f"edgefleet-agent/{self.version}",
        )
        # Local servers only: no proxy from the environment.
        self._scrape_http = httpx.Client(timeout=settings.scrape_timeout_s, trust_env=False)
        self.discovery = discovery_for(settings, clock)
        self.metrics = MetricsReader(self.discovery, client=self._scrape_http, clock=clock)
        self.system = SystemProbe(
            settings.state_dir, agent_version=self.version, proc_root=proc_root, sys_root=sys_root
        )
        self.interval_s = self._interval()
        self.backoff = Backoff(self.interval_s, settings.retry_max_s, clock)
        self.stats = Stats()
        self._credential: str | None = None
        self._dropped_logged = self.queue.dropped
        self.benchmarks = BenchmarkWorker(
            ArtifactCache(settings.model_cache_dir),
            self._download_client,
            timeout_s=settings.benchmark_timeout_s,
            limits=ProbeLimits(
                memory_mb=settings.benchmark_memory_limit_mb,
                cpu_s=settings.benchmark_cpu_limit_s,
                memory_setting="EDGEFLEET_BENCHMARK_MEMORY_LIMIT_MB",
                cpu_setting="EDGEFLEET_BENCHMARK_CPU_LIMIT_S",
            ),
            resolve_url=lambda url: artifact_url(settings.controller_url, url),
        )
        self.benchmarks_pending = 0  # as the last heartbeat answer said
        # Jobs are fetched once after a start whatever the count says: the controller
        # counts the jobs handed to this agent's previous run as fetched.
        self._jobs_checked = False
        self._unsent_results: list[Finished] = []
        self._next_jobs_fetch_at = 0.0

    def close(self) -> None:
        self.benchmarks.close()
        self.queue.close()
        self.client.close()
        self._scrape_http.close()
        if isinstance(self.discovery, PodDiscovery):
            self.discovery.close()

    def _download_client(self) -> httpx.Client:
        """For the benchmark thread's artifact downloads (made on its first job)."""
        ca = self.settings.controller_ca_file
        return httpx.Client(
            timeout=httpx.Timeout(30.0, connect=min(self.settings.request_timeout_s, 10.0)),
            verify=str(ca) if ca is not None else True,
            follow_redirects=True,
            headers={"User-Agent": f"edgefleet-agent/{self.version}"},
            auth=ControllerAuth(self.settings.controller_url, lambda: self.credential),
        )

    def _interval(self) -> float:
        """The configured interval; unless it was set, the controller's suggestion
        (remembered from enrolment across restarts)."""
        if "heartbeat_interval_s" in self.settings.model_fields_set:
            return self.settings.heartbeat_interval_s
        suggested_ms = self.queue.get_setting("interval_ms")
        return suggested_ms / 1000 if suggested_ms else self.settings.heartbeat_interval_s

    # -- identity -----------------------------------------------------------------------

    @property
    def credential(self) -> str | None:
        if self._credential is None:
            try:
                self._credential = self.credential_path.read_text(encoding="utf-8").strip() or None
            except FileNotFoundError:
                return None
        return self._credential

    def _forget_credential(self) -> None:
        self._credential = None
        with contextlib.suppress(FileNotFoundError):
            self.credential_path.unlink()

    def enroll(self) -> bool:
        """Exchange the join token for this node's credential. False (and a backoff)
        when that is not possible now."""
        token = self.settings.join_token
        if token is None:
            log.error(
                "no node credential in %s and no join token (EDGEFLEET_JOIN_TOKEN) to enrol with",
                self.credential_path,
            )
            self.backoff.failure(permanent=True)
            return False
        s = self.settings
        try:
            got = self.client.enroll(
                cluster=s.cluster, node=s.node_name, join_token=token.get_secret_value()
            )
        except Unreachable as exc:
            log.warning("cannot enrol, controller unreachable: %s", exc)
            self.backoff.failure(at_least_s=exc.retry_after_s)
            return False
        except Refused as exc:
            log.error("enrolment of %s/%s refused: %s", s.cluster, s.node_name, exc)
            # A wrong join token needs an operator; an unknown node may be synced soon.
            self.backoff.failure(permanent=exc.status in (401, 403))
            return False
        write_secret(self.credential_path, got.credential)
        self._credential = got.credential
        self.queue.put_setting("interval_ms", round(got.heartbeat_interval_s * 1000))
        self.interval_s = self._interval()
        # The controller may know a higher sequence number than this state directory
        # (the pod's volume was replaced): continue above it, or every heartbeat would
        # be ignored as a replay.
        self.queue.ack(got.last_seq)
        self.backoff.base_s = self.interval_s
        self.stats.enrollments += 1
        log.info("enrolled %s/%s (heartbeat every %.3g s)", s.cluster, s.node_name, self.interval_s)
        return True

    # -- heartbeats ---------------------------------------------------------------------

    def collect(self) -> int:
        """Build this interval's heartbeat and put it in the outbox. Returns its seq."""
        status = self.system.status()
        workloads = self.metrics.read()
        sent_at = self.wall_clock()
        s = self.settings

        def build(seq: int) -> str:
            return Heartbeat(
                cluster=s.cluster,
                node=s.node_name,
                seq=seq,
                sent_at=sent_at,
                status=status,
                workloads=workloads,
            ).model_dump_json(exclude_none=True)

        seq = self.queue.append(build)
        dropped = self.queue.dropped
        if dropped > self._dropped_logged:
            log.warning(
                "outbox full (%d heartbeats): %d oldest dropped unsent so far",
                self.queue.max_entries,
                dropped,
            )
            self._dropped_logged = dropped
        return seq

    def flush(self) -> bool:
        """Send the outbox, oldest first, until it is empty (True) or the controller
        cannot take more now (False, with a backoff)."""
        batch_size = self.settings.batch_size
        reenrolled = False
        while True:
            entries = self.queue.peek(batch_size)
            if not entries:
                return True
            if self.credential is None and not self.enroll():
                return False
            credential = self.credential
            assert credential is not None
            body = "[" + ",".join(e.body for e in entries) + "]"
            try:
                ack = self.client.heartbeats(credential, body)
            except Unreachable as exc:
                self.stats.failures += 1
                delay = self.backoff.failure(at_least_s=exc.retry_after_s)
                log.warning(
                    "controller unreachable (%s); %d heartbeat(s) queued, next try in %.0f s",
                    exc,
                    len(self.queue),
                    delay,
                )
                return False
            except Refused as exc:
                self.stats.failures += 1
                if exc.status == 401 and self.settings.join_token is not None and not reenrolled:
                    log.warning("node credential rejected (%s): enrolling again", exc.detail)
                    self._forget_credential()
                    reenrolled = True
                    continue
                if exc.status == 413 and batch_size > 1:
                    batch_size = max(1, batch_size // 2)
                    continue
                if exc.status == 422:
                    # Isolate the heartbeat the controller cannot read, then drop only it:
                    # one bad entry must not wedge the outbox forever.
                    if batch_size > 1:
                        batch_size = 1
                        continue
                    self.queue.discard(entries[0].seq)
                    log.error("heartbeat %d refused as invalid, dropped: %s", entries[0].seq, exc)
                    continue
                log.error("controller refused heartbeats: %s", exc)
                self.backoff.failure(permanent=True)
                return False
            self.queue.ack(ack.last_seq)
            self.backoff.success()
            self.benchmarks_pending = ack.benchmarks_pending
            self.stats.batches += 1
            self.stats.accepted += ack.accepted
            self.stats.duplicates += ack.duplicates
            if ack.last_seq < entries[-1].seq:  # never expected: do not spin on it
                log.error(
                    "controller acknowledged %d of a batch up to %d", ack.last_seq, entries[-1].seq
                )
                return False

    # -- benchmarks ---------------------------------------------------------------------

    def post_benchmark_results(self) -> bool:
        """Post the finished benchmarks' results, oldest first. One that does not get
        through stays (with the ones after it) for the next cycle. True when the
        controller answered at least one (so the last heartbeat's count is stale)."""
        self._unsent_results.extend(self.benchmarks.take_finished())
        answered = False
        while self._unsent_results and (credential := self.credential) is not None:
            item = self._unsent_results[0]
            item.attempts += 1
            try:
                self.client.post_benchmark_result(credential, item.job_id, item.result)
            except Unreachable as exc:
                if item.attempts < RESULT_POST_ATTEMPTS:
                    log.warning(
                        "cannot post the benchmark result of %s (%s): trying again next cycle",
                        item.label,
                        exc,
                    )
                    return answered
                log.error(
                    "benchmark result of %s dropped after %d attempts: %s",
                    item.label,
                    item.attempts,
                    exc,
                )
            except Refused as exc:
                if exc.status == 401:  # the next heartbeat enrols again
                    log.warning("benchmark result of %s: credential rejected", item.label)
                    return answered
                if exc.status in (404, 409):
                    log.info(
                        "benchmark %s was withdrawn or already answered (%s): result dropped",
                        item.label,
                        exc,
                    )
                else:
                    log.error("controller refused the benchmark result of %s: %s", item.label, exc)
            else:
                self.stats.benchmark_results_posted += 1
                log.info("benchmark result of %s posted (ok=%s)", item.label, item.result.ok)
            self._unsent_results.pop(0)
            answered = True
        return answered

    def fetch_benchmarks(self) -> None:
        """Fetch this node's jobs and start the worker on them."""
        credential = self.credential
        if credential is None:
            return
        try:
            raw = self.client.benchmark_jobs(credential)
        except Unreachable as exc:
            log.warning("cannot fetch the benchmark jobs: %s", exc)
            # Ask again later whatever the count says: a lost answer may have handed the
            # jobs out already (the controller then counts them fetched).
            self._jobs_checked = False
            self._next_jobs_fetch_at = self.clock() + self.settings.retry_max_s
            return
        except Refused as exc:  # e.g. a controller without on-node benchmarks
            log.log(
                logging.INFO if self._jobs_checked else logging.WARNING,
                "benchmark jobs refused: %s",
                exc,
            )
            self._jobs_checked = True
            self._next_jobs_fetch_at = self.clock() + self.settings.retry_max_s
            return
        self._jobs_checked = True
        jobs: list[BenchmarkJob] = []
        for item in raw if isinstance(raw, list) else [raw]:
            try:
                jobs.append(BenchmarkJob.model_validate(item))
            except ValidationError as exc:
                job_id = item.get("id") if isinstance(item, dict) else None
                if not isinstance(job_id, int) or isinstance(job_id, bool):
                    log.error("unreadable benchmark job ignored: %s", exc)
                    continue
                # Answer it, or the controller would keep it pending for this node forever.
                log.error("benchmark job %d cannot be read: %s", job_id, exc)
                self._unsent_results.append(
                    Finished(
                        job_id, f"job {job_id}", failed(f"the agent cannot read the job: {exc}")
                    )
                )
        if jobs:
            log.info("%d benchmark job(s) to run", len(jobs))
            self.benchmarks.start(jobs)
        elif self.benchmarks_pending > 0 and not self._unsent_results:
            # The heartbeat said some wait but there is none: do not ask every interval.
            self._next_jobs_fetch_at = self.clock() + self.settings.retry_max_s

    def benchmark_step(self) -> None:
        """After a heartbeat got through: post what finished, then, when the controller
        has jobs for this node (or this is the agent's first look since it started) and
        none is running or waiting to be posted, fetch them."""
        if self.post_benchmark_results():
            return  # the count in the last answer predates these results
        if (
            (self.benchmarks_pending > 0 or not self._jobs_checked)
            and not self.benchmarks.busy()
            and not self._unsent_results
            and self.clock() >= self._next_jobs_fetch_at
        ):
            self.fetch_benchmarks()

    # -- the loop -----------------------------------------------------------------------

    def cycle(self) -> None:
        """One interval: enrol if needed (before the heartbeat takes a sequence number,
        which enrolment may move), collect, and send if the backoff allows; then the
        benchmarks' part, which never waits for a benchmark."""
        if self.credential is None and self.backoff.ready():
            self.enroll()
        self.collect()
        if self.backoff.ready() and self.flush():
            self.benchmark_step()

    def run(self, stop: threading.Event) -> None:
        s = self.settings
        servers = (
            f"inference pods in {s.workload_namespace} found through the Kubernetes API"
            if s.discovery == "kubernetes"
            else f"{len(s.inference_urls)} inference server(s)"
        )
        log.info(
            "edgefleet-agent %s for %s/%s, controller %s, %s",
            self.version,
            s.cluster,
            s.node_name,
            s.controller_url,
            servers,
        )
        next_at = self.clock()
        while not stop.is_set():
            try:
                self.cycle()
            except Exception:  # a bug in one cycle must not end the agent
                log.exception("heartbeat cycle failed")
            next_at += self.interval_s
            delay = next_at - self.clock()
            if delay < 0:  # fell behind (suspended, slow disk): no burst to catch up
                next_at, delay = self.clock(), 0.0
            stop.wait(delay)
        # Shutting down (SIGTERM): a running benchmark is killed, not waited for (the
        # controller lists it again, and the next start fetches it); one last attempt to
        # empty the outbox and to post the results that are ready.
        if not self.benchmarks.stop(SHUTDOWN_GRACE_S):
            log.warning("benchmark thread still busy after %.0f s; leaving it", SHUTDOWN_GRACE_S)
        if len(self.queue) and self.credential is not None:
            self.flush()
        if self.credential is not None and self.backoff.ready():
            self.post_benchmark_results()


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else "?"
        env = "NODE_NAME" if name == "node_name" else f"EDGEFLEET_{name.upper()}"
        lines.append(f"  {env}: {err['msg']}")
    return "\n".join(lines)


def main() -> None:
    try:
        settings = AgentSettings()
    except ValidationError as exc:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        log.error("invalid agent configuration:\n%s", _explain(exc))
        raise SystemExit(2) from None
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        agent = Agent(settings)
    except (OSError, DiscoveryError) as exc:  # an unwritable state directory, typically
        log.error("cannot start: %s", exc)
        raise SystemExit(2) from None
    try:
        agent.run(stop)
    finally:
        agent.close()


if __name__ == "__main__":
    main()
