"""The agent itself: enrolment, the heartbeat outbox, on-node benchmarks, the loop."""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
from pydantic import ValidationError

from node_agent.agent.backoff import Backoff
from node_agent.agent.client import ControllerClient, Refused, Unreachable, artifact_url
from node_agent.agent.clock import SYSTEM_CLOCK, Clock
from node_agent.agent.credentials import ControllerAuth, write_secret
from node_agent.agent.metrics import AgentMetrics, MetricsServer, failure_reason
from node_agent.agent.settings import AgentSettings, discovery_for
from node_agent.benchmarks import BenchmarkWorker, Finished, failed
from node_agent.cache import ArtifactCache
from node_agent.contract import BenchmarkJob, Heartbeat
from node_agent.discovery import PodDiscovery
from node_agent.metrics_reader import MetricsReader
from node_agent.probe_launcher import ProbeLimits
from node_agent.queue import Entry, HeartbeatQueue
from node_agent.sysinfo import SystemProbe

log = logging.getLogger("edgefleet.agent")


@dataclass
class Stats:
    accepted: int = 0
    duplicates: int = 0
    batches: int = 0
    failures: int = 0
    enrollments: int = 0
    benchmark_results_posted: int = 0


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
        clock: Clock = SYSTEM_CLOCK,
        proc_root: Path = Path("/proc"),
        sys_root: Path = Path("/sys"),
    ) -> None:
        self.settings = settings
        self.clock = clock
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
        self.discovery = discovery_for(settings, clock.monotonic)
        self.metrics = MetricsReader(
            self.discovery, client=self._scrape_http, clock=clock.monotonic
        )
        self.system = SystemProbe(
            settings.state_dir, agent_version=self.version, proc_root=proc_root, sys_root=sys_root
        )
        self.interval_s = self._interval()
        self.backoff = Backoff(self.interval_s, settings.retry_max_s, clock)
        self.stats = Stats()
        self.own_metrics = AgentMetrics()
        # The outbox's newest entry, built this cycle: any other one it acknowledges
        # waited for a later cycle (a replay).
        self._fresh_seq = 0
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
        self._observe_outbox()
        # Last: its socket is bound here (a port in use stops the start, like an
        # unwritable state directory), and nothing above can fail after it.
        self.metrics_server = (
            MetricsServer(self.own_metrics.registry, settings.metrics_host, settings.metrics_port)
            if settings.metrics_port
            else None
        )

    def close(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
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
        sent_at = self.clock.now()
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
        self._fresh_seq = seq
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
                self.own_metrics.failures.labels(failure_reason(None)).inc()
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
                self.own_metrics.failures.labels(failure_reason(exc.status)).inc()
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
            self._count_acknowledged(entries, ack.last_seq)
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

    def _count_acknowledged(self, entries: list[Entry], last_seq: int) -> None:
        m = self.own_metrics
        acked = [e.seq for e in entries if e.seq <= last_seq]
        m.sent.inc(len(acked))
        m.replayed.inc(sum(1 for seq in acked if seq != self._fresh_seq))
        m.last_success.set(self.clock.now().timestamp())

    def _observe_outbox(self) -> None:
        self.own_metrics.queued.set(len(self.queue))
        self.own_metrics.dropped.set(self.queue.dropped)

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
            self._next_jobs_fetch_at = self.clock.monotonic() + self.settings.retry_max_s
            return
        except Refused as exc:  # e.g. a controller without on-node benchmarks
            log.log(
                logging.INFO if self._jobs_checked else logging.WARNING,
                "benchmark jobs refused: %s",
                exc,
            )
            self._jobs_checked = True
            self._next_jobs_fetch_at = self.clock.monotonic() + self.settings.retry_max_s
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
            self._next_jobs_fetch_at = self.clock.monotonic() + self.settings.retry_max_s

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
            and self.clock.monotonic() >= self._next_jobs_fetch_at
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
        flushed = self.backoff.ready() and self.flush()
        self._observe_outbox()
        if flushed:
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
        next_at = self.clock.monotonic()
        while not stop.is_set():
            try:
                self.cycle()
            except Exception:  # a bug in one cycle must not end the agent
                log.exception("heartbeat cycle failed")
            next_at += self.interval_s
            delay = next_at - self.clock.monotonic()
            if delay < 0:  # fell behind (suspended, slow disk): no burst to catch up
                next_at, delay = self.clock.monotonic(), 0.0
            self.clock.wait(stop, delay)
        # Shutting down (SIGTERM): a running benchmark is killed, not waited for (the
        # controller lists it again, and the next start fetches it); one last attempt to
        # empty the outbox and to post the results that are ready.
        if not self.benchmarks.stop(SHUTDOWN_GRACE_S):
            log.warning("benchmark thread still busy after %.0f s; leaving it", SHUTDOWN_GRACE_S)
        if len(self.queue) and self.credential is not None:
            self.flush()
            self._observe_outbox()
        if self.credential is not None and self.backoff.ready():
            self.post_benchmark_results()
