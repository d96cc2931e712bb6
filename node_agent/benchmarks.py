"""On-node benchmarks for the agent: one background thread that takes the controller's
jobs in order, fetches each artifact into the node-local cache (verified against its
sha256) and measures it in a child process (:mod:`node_agent.probe_launcher`).

The thread only downloads and measures; the agent's own loop talks to the controller
(fetches the jobs, posts the results), so heartbeats never wait on a benchmark and every
request to the controller stays on one thread. Imports nothing heavy: the model runtime
is loaded by the child only."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from node_agent.cache import ArtifactCache, CacheError
from node_agent.contract import BenchmarkJob, BenchmarkResult
from node_agent.probe_launcher import (
    ProbeCancelled,
    ProbeFailed,
    ProbeLimits,
    ProbeRequest,
    probe_model,
)

log = logging.getLogger("edgefleet.agent.benchmarks")

ERROR_MAX = 4000  # BenchmarkResult.error's limit


def _error(text: str) -> str:
    return text if len(text) <= ERROR_MAX else text[: ERROR_MAX - 3] + "..."


def failed(error: str) -> BenchmarkResult:
    return BenchmarkResult(ok=False, error=_error(error))


def result_from_probe(probe: dict[str, Any], duration_s: float) -> BenchmarkResult:
    """The wire result from the child's output (:func:`node_agent.probe.execute`)."""
    validation = probe.get("validation") or {}
    bench = probe.get("benchmark")
    if not validation.get("passed"):
        return failed(str(validation.get("error") or "validation failed"))
    if not isinstance(bench, dict):
        return failed("the probe validated the model but returned no benchmark")
    return BenchmarkResult(
        ok=True,
        runs=bench["runs"],
        p50_ms=bench.get("p50_ms"),
        p95_ms=bench.get("p95_ms"),
        p99_ms=bench.get("p99_ms"),
        mean_ms=bench.get("mean_ms"),
        peak_rss_bytes=bench.get("peak_rss_bytes"),
        model_peak_bytes=bench.get("model_peak_bytes"),
        runtime=bench.get("runtime"),
        machine=bench.get("machine"),
        cpu=bench.get("cpu"),
        duration_s=round(duration_s, 3),
    )


@dataclass
class Finished:
    """A job's result waiting to be posted (kept across failed posts: never rerun)."""

    job_id: int
    label: str
    result: BenchmarkResult
    attempts: int = 0


class BenchmarkWorker:
    """At most one benchmark at a time, in one daemon thread started per list of jobs.

    ``resolve_url`` turns a job's ``artifact_url`` into an absolute URL (the controller
    may send it relative to itself); ``http_factory`` makes the client the artifacts are
    downloaded with, on the first job (a node never asked to measure does not pay for a
    second TLS context), used by the worker thread only. ``limits`` hold each probe
    child (the launcher's defaults when None)."""

    def __init__(
        self,
        cache: ArtifactCache,
        http_factory: Callable[[], httpx.Client],
        *,
        timeout_s: float,
        limits: ProbeLimits | None = None,
        resolve_url: Callable[[str], str] = lambda url: url,
    ) -> None:
        self.cache = cache
        self.http_factory = http_factory
        self._http: httpx.Client | None = None
        self.timeout_s = timeout_s
        self.limits = limits or ProbeLimits()
        self.resolve_url = resolve_url
        self.finished: queue.SimpleQueue[Finished] = queue.SimpleQueue()
        self.completed = 0  # jobs measured (or failed) and handed over
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, jobs: list[BenchmarkJob]) -> None:
        if self.busy():
            raise RuntimeError("a benchmark is already running")
        self._cancel.clear()
        self._thread = threading.Thread(
            target=self._run, args=(jobs,), name="edgefleet-benchmark", daemon=True
        )
        self._thread.start()

    def take_finished(self) -> list[Finished]:
        out = []
        while True:
            try:
                out.append(self.finished.get_nowait())
            except queue.Empty:
                return out

    def stop(self, grace_s: float) -> bool:
        """Cancel: the running probe's child is killed, the remaining jobs are left to
        the controller (they stay pending and are listed again after a restart). Waits
        ``grace_s`` at most; True when the thread has ended (a download still in
        progress may outlive the grace; the thread is a daemon)."""
        self._cancel.set()
        thread = self._thread
        if thread is None:
            return True
        thread.join(grace_s)
        return not thread.is_alive()

    def close(self) -> None:
        """Cancel (without waiting) and close the download client."""
        self.stop(0)
        if self._http is not None:
            self._http.close()

    def join(self, timeout_s: float | None = None) -> bool:
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        return not self.busy()

    def _run(self, jobs: list[BenchmarkJob]) -> None:
        for job in jobs:
            if self._cancel.is_set():
                return
            label = f"{job.model}:{job.version} (job {job.id})"
            try:
                result = self.run_one(job)
            except ProbeCancelled:
                log.info("benchmark of %s cancelled", label)
                return
            except Exception as exc:  # a bug here must not kill the thread silently
                log.exception("benchmark of %s failed", label)
                result = failed(f"agent error: {type(exc).__name__}: {exc}")
            if self._cancel.is_set() and not result.ok:
                return  # a failure caused by the shutdown is no verdict on the model
            self.completed += 1
            self.finished.put(Finished(job.id, label, result))

    def run_one(self, job: BenchmarkJob) -> BenchmarkResult:
        """Download (or find in the cache) and measure one job. Never raises for a
        problem with the job: the result says what went wrong."""
        label = f"{job.model}:{job.version} (job {job.id})"
        if self._http is None:
            self._http = self.http_factory()
        try:
            url = self.resolve_url(job.artifact_url)
            path = self.cache.fetch(url, job.sha256, client=self._http)
        except CacheError as exc:
            log.warning("benchmark of %s: artifact not available: %s", label, exc)
            return failed(f"artifact download failed: {exc}")
        except (httpx.HTTPError, OSError) as exc:
            log.warning("benchmark of %s: artifact not available: %s", label, exc)
            return failed(f"artifact download failed: {type(exc).__name__}: {exc}")
        return self.measure(job, path, label)

    def measure(self, job: BenchmarkJob, path: Path, label: str) -> BenchmarkResult:
        request = ProbeRequest(
            path=str(path),
            format=job.format,
            metadata=dict(job.metadata),
            runs=job.runs,
            warmup_runs=job.warmup_runs,
            threads=job.threads,
            benchmark=True,
            limits=self.limits,
        )
        log.info(
            "benchmarking %s: %d runs (+%d warm-up), %d thread(s)",
            label,
            job.runs,
            job.warmup_runs,
            job.threads,
        )
        started = time.monotonic()
        try:
            probe = probe_model(request, timeout_s=self.timeout_s, cancel=self._cancel)
        except ProbeCancelled:
            raise
        except ProbeFailed as exc:
            log.warning("benchmark of %s failed: %s", label, exc)
            return failed(str(exc))
        result = result_from_probe(probe, time.monotonic() - started)
        if result.ok:
            log.info(
                "benchmarked %s: p50 %s ms, p95 %s ms, p99 %s ms, peak RSS %s bytes",
                label,
                result.p50_ms,
                result.p95_ms,
                result.p99_ms,
                result.peak_rss_bytes,
            )
        else:
            log.warning("benchmark of %s: the model failed: %s", label, result.error)
        return result
