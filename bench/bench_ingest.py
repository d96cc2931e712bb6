"""Heartbeat ingestion on Postgres: 2,000 simulated nodes, each with a model assignment,
every heartbeat carrying node status and one workload's inference metrics.

Measured in the same run:
  baseline       one transaction per heartbeat through ingest_heartbeats (what agents
                 each sending one heartbeat cost the database at minimum),
  batched        controller.fleet.service.ingest_heartbeats over batches of 500 (an
                 agent's replay), one transaction per batch,
  authenticated  the endpoint's database work when each request has a transaction of
                 its own: the node locked by its credential, the impersonation check,
                 ingest, commit,
  request        the controller's CPU per POST /v1/agents/heartbeat carrying one
                 heartbeat, measured in-process (time.process_time around the ASGI app:
                 routing, validation, authentication, the database work, the response;
                 no client, no socket), one agent at a time and ``--concurrency`` at a
                 time (concurrent requests share one ingest transaction),
  HTTP           POST /v1/agents/heartbeat on a real uvicorn (one worker process), 16
                 agents at a time, one heartbeat per request (CPU-bound on a small box).

  rate           (``--mode rate``) the fleet's rate, one heartbeat per request: ``--rate``
                 requests/s offered for ``--seconds`` by an open-loop load generator of
                 raw sockets (in this process) to a real uvicorn of one worker process,
                 then of two; what was stored (the nodes' sequence numbers in Postgres),
                 latency from each request's scheduled time, and the CPU per request of
                 the controller, its Postgres backends and the load generator.

Run: python bench/bench_ingest.py [--nodes 2000] [--batch 500] [--rounds 3]
                                  [--concurrency 16] [--mode all|request|rate]
                                  [--rate 1667] [--seconds 60] [--connections 64]
``--mode request`` runs only the in-process request measurement, ``--rounds`` times
(the machine is shared: compare medians of rounds, not single runs); with
``--profile FILE`` it writes a cProfile (CPU time) of the last round, every thread's
(the event loop's, the handlers' and the ingest worker's) merged.
Needs PostgreSQL on 127.0.0.1:5432 (EDGEFLEET_TEST_POSTGRES), as the tests do."""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import json
import os
import pstats
import statistics
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import _env
from sqlalchemy import func, insert, select, text

from controller.db import migrate
from controller.db.models import (
    Assignment,
    AssignmentState,
    Cluster,
    Model,
    ModelVersion,
    Node,
)
from controller.db.session import session_scope
from controller.fleet.service import ingest_heartbeats
from controller.settings import get_settings
from node_agent.contract import (
    Heartbeat,
    InferenceMetrics,
    NodeStatus,
    WorkloadReport,
)

SHA = "b" * 64
NODES_PER_CLUSTER = 500


def credential(name: str) -> str:
    return f"bench-credential-{name}"


def populate(nodes: int) -> list[tuple[str, str]]:
    """Clusters of 500 nodes, one model version, one Running assignment per node."""
    keys = [(f"site{i // NODES_PER_CLUSTER}", f"node{i:05d}") for i in range(nodes)]
    with session_scope() as s:
        clusters = {}
        for name in sorted({c for c, _ in keys}):
            clusters[name] = Cluster(name=name, driver="simulated", status="Ready")
            s.add(clusters[name])
        model = Model(name="detector")
        s.add(model)
        s.flush()
        version = ModelVersion(
            model_id=model.id, version="1.0.0", format="onnx", sha256=SHA, size_bytes=1
        )
        s.add(version)
        s.flush()
        s.execute(
            insert(Node),
            [
                {
                    "cluster_id": clusters[c].id,
                    "name": n,
                    "last_seq": 0,
                    "credential_hash": hashlib.sha256(credential(n).encode()).hexdigest(),
                }
                for c, n in keys
            ],
        )
        node_ids = s.scalars(select(Node.id)).all()
        s.execute(
            insert(Assignment),
            [
                {
                    "node_id": nid,
                    "model_id": model.id,
                    "desired_version_id": version.id,
                    "observed_version_id": version.id,
                    "state": AssignmentState.RUNNING,
                }
                for nid in node_ids
            ],
        )
    return keys


def beats(keys: list[tuple[str, str]], seq: int) -> list[Heartbeat]:
    now = datetime.now(UTC)
    return [
        Heartbeat(
            cluster=c,
            node=n,
            seq=seq,
            sent_at=now,
            status=NodeStatus(
                cpu_percent=23.5,
                memory_used_bytes=1 << 30,
                memory_total_bytes=4 << 30,
                disk_free_bytes=10 << 30,
                temperature_c=51.0,
                agent_version="0.1.0",
            ),
            workloads=[
                WorkloadReport(
                    model="detector",
                    version="1.0.0",
                    sha256=SHA,
                    state="Ready",
                    metrics=InferenceMetrics(
                        window_s=10, samples=120, errors=0, p50_ms=4.1, p95_ms=7.9, p99_ms=9.5
                    ),
                )
            ],
        )
        for c, n in keys
    ]


def per_heartbeat(batch: list[Heartbeat]) -> int:
    accepted = 0
    for beat in batch:
        with session_scope() as s:
            accepted += ingest_heartbeats(s, [beat]).accepted
    return accepted


def batched(batch: list[Heartbeat], size: int) -> int:
    accepted = 0
    for i in range(0, len(batch), size):
        with session_scope() as s:
            accepted += ingest_heartbeats(s, batch[i : i + size]).accepted
    return accepted


def via_service(batch: list[Heartbeat]) -> int:
    """The endpoint's database work per request when each request has a transaction of
    its own: the node locked by its credential, the impersonation check, ingest, commit;
    one heartbeat per transaction."""
    from controller.agents import service

    settings = get_settings()
    accepted = 0
    for beat in batch:
        request = service.HeartbeatRequest(service.hash_credential(credential(beat.node)), [beat])
        with session_scope() as s:
            (got,) = service.receive_heartbeats(s, settings, [request])
            assert isinstance(got, service.Receipt), got
            accepted += got.accepted
    return accepted


def _asgi_scope(body: bytes, credential: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/agents/heartbeat",
        "raw_path": b"/v1/agents/heartbeat",
        "root_path": "",
        "query_string": b"",
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
        "headers": [
            (b"host", b"controller"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"authorization", f"Bearer {credential}".encode()),
        ],
    }


async def _asgi_post(app: Any, body: bytes, credential: str) -> bytes:
    """One request through the ASGI app as a server would hand it over; the response
    body (a 200 is asserted)."""
    received = False
    finished = asyncio.Event()
    status = 0
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": body, "more_body": False}
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                finished.set()

    await app(_asgi_scope(body, credential), receive, send)
    assert status == 200, (status, b"".join(chunks))
    return b"".join(chunks)


@dataclass
class RequestCpu:
    accepted: int = 0
    alone_ms: list[float] = field(default_factory=list)
    """CPU of each request sent alone (one agent at a time)."""
    concurrent_ms: float = 0.0
    """CPU per request with ``concurrency`` requests in flight at once."""


class ThreadProfiles:
    """cProfile in every thread started while it is on (cProfile sees one thread):
    the event loop's, the handlers' thread pool, the coalescer's worker."""

    def __init__(self) -> None:
        self.profiles: list[cProfile.Profile] = []

    def _start(self, *_: object) -> None:
        sys.setprofile(None)
        profile = cProfile.Profile(time.thread_time)  # CPU, not waiting for the database
        self.profiles.append(profile)
        profile.enable()

    def __enter__(self) -> ThreadProfiles:
        threading.setprofile(self._start)
        self._start()
        return self

    def __exit__(self, *_: object) -> None:
        threading.setprofile(None)
        for profile in self.profiles:
            profile.disable()

    def dump(self, path: str) -> None:
        stats = pstats.Stats(self.profiles[0])
        for profile in self.profiles[1:]:
            stats.add(profile)
        stats.dump_stats(path)


def via_asgi(batch: list[Heartbeat], concurrency: int) -> RequestCpu:
    """The controller's CPU per one-heartbeat request, in this process: the ASGI app
    called directly (no client, no socket), so time.process_time counts the controller
    alone: the event loop, the thread the handler or the ingest runs in, the database
    driver. The first half of ``batch`` goes one request at a time, the second half
    ``concurrency`` requests at a time."""
    from controller.api.app import create_app

    app = create_app(get_settings())
    # Serialising is the agents' work: done beforehand.
    requests = [(f"[{b.model_dump_json()}]".encode(), credential(b.node)) for b in batch]
    half = len(requests) // 2
    out = RequestCpu()

    async def run() -> None:
        for body, cred in requests[:half]:
            t0 = time.process_time()
            ack = await _asgi_post(app, body, cred)
            out.alone_ms.append((time.process_time() - t0) * 1000)
            out.accepted += json.loads(ack)["accepted"]
        rest = requests[half:]
        t0 = time.process_time()
        for i in range(0, len(rest), concurrency):
            acks = await asyncio.gather(
                *(_asgi_post(app, b, c) for b, c in rest[i : i + concurrency])
            )
            out.accepted += sum(json.loads(a)["accepted"] for a in acks)
        out.concurrent_ms = (time.process_time() - t0) * 1000 / max(len(rest), 1)

    try:
        asyncio.run(run())
    finally:
        app.state.heartbeats.close()
    return out


def report_request_cpu(got: RequestCpu, concurrency: int) -> None:
    alone = sorted(got.alone_ms)
    p90 = alone[int(len(alone) * 0.9)]
    print(
        f"  POST /v1/agents/heartbeat in-process, controller CPU per one-heartbeat request: "
        f"alone median {statistics.median(alone):.2f} ms (p90 {p90:.2f}), "
        f"{concurrency} at a time {got.concurrent_ms:.2f} ms"
    )


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _keepalive() -> list[str]:
    """uvicorn's keep-alive as ``edgefleet server`` sets it: longer than an agent's
    heartbeat interval, so an agent's connection is reused."""
    return ["--timeout-keep-alive", str(get_settings().api_keepalive_timeout_s)]


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its children (uvicorn's workers)."""
    total = 0.0
    for p in [pid, *_env.children(pid)]:
        with suppress(FileNotFoundError):
            total += _cpu_s(p)
    return total


def via_http(batch: list[Heartbeat], concurrency: int) -> int:
    """POST /v1/agents/heartbeat on a real uvicorn, ``concurrency`` agents at a time
    (httpx clients in threads of this process), one heartbeat per request."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    local = threading.local()

    with _env.uvicorn_server(*_keepalive()) as (server, port):

        def post(beat: Heartbeat) -> int:
            if not hasattr(local, "client"):
                local.client = httpx.Client(base_url=f"http://127.0.0.1:{port}")
            resp = local.client.post(
                "/v1/agents/heartbeat",
                content=beat.model_dump_json(),
                headers={
                    "Authorization": f"Bearer {credential(beat.node)}",
                    "Content-Type": "application/json",
                },
            )
            assert resp.status_code == 200, resp.text
            accepted: int = resp.json()["accepted"]
            return accepted

        cpu0, client0 = _cpu_s(server.pid), time.process_time()
        with ThreadPoolExecutor(concurrency) as pool:
            accepted = sum(pool.map(post, batch))
        per_request_ms = (_cpu_s(server.pid) - cpu0) / len(batch) * 1000
        # The load generator (httpx in threads of this process) shares the two cores.
        client_ms = (time.process_time() - client0) / len(batch) * 1000
        print(
            f"    (CPU per request: controller process {per_request_ms:.1f} ms, "
            f"load generator {client_ms:.1f} ms)"
        )
        return accepted


def raw_request(beat: Heartbeat) -> bytes:
    """One agent's POST /v1/agents/heartbeat as it goes on the wire (HTTP/1.1, kept
    alive), built beforehand: building it is the agent's work."""
    body = beat.model_dump_json().encode()
    head = (
        "POST /v1/agents/heartbeat HTTP/1.1\r\nHost: controller\r\n"
        "Content-Type: application/json\r\n"
        f"Authorization: Bearer {credential(beat.node)}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class OpenLoop:
    elapsed_s: float
    sent: int
    accepted: int
    failed: int
    latencies_s: list[float]

    def percentile(self, q: float) -> float:
        return self.latencies_s[min(len(self.latencies_s) - 1, int(len(self.latencies_s) * q))]


async def open_loop(port: int, requests: list[bytes], rate: float, connections: int) -> OpenLoop:
    """Send ``requests`` at ``rate`` per second on a schedule fixed in advance (open
    loop: a slow answer does not slow the sending), over ``connections`` kept-alive
    sockets. A request's latency counts from its scheduled time, so time spent queued
    behind slow answers is counted too (no coordinated omission). Raw sockets: about
    0.05 ms of CPU a request, where httpx in threads costs 0.8-1.4 ms (the load generator
    shares the controller's cores)."""
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
    latencies: list[float] = []
    accepted = failed = 0

    async def connection() -> None:
        nonlocal accepted, failed
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while (item := await queue.get()) is not None:
            due, request = item
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            body = await reader.readexactly(length)
            latencies.append(time.monotonic() - due)
            if head.startswith(b"HTTP/1.1 200 "):
                accepted += json.loads(body)["accepted"]
            else:
                failed += 1
        writer.close()

    tasks = [asyncio.create_task(connection()) for _ in range(connections)]
    start = time.monotonic() + 0.1
    for i, request in enumerate(requests):
        due = start + i / rate
        if (wait := due - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        queue.put_nowait((due, request))
    for _ in tasks:
        queue.put_nowait(None)
    await asyncio.gather(*tasks)
    latencies.sort()
    return OpenLoop(time.monotonic() - start, len(requests), accepted, failed, latencies)


def _backend_pids() -> list[int]:
    """The Postgres backends of this run's database (the server's pooled connections);
    other databases on the same Postgres are other work."""
    with session_scope() as s:
        return list(
            s.scalars(
                text(
                    "select pid from pg_stat_activity "
                    "where datname = current_database() and pid <> pg_backend_pid()"
                )
            )
        )


def _machine_idle() -> tuple[int, int]:
    with open("/proc/stat") as f:
        ticks = [int(t) for t in f.readline().split()[1:]]
    return ticks[3] + ticks[4], sum(ticks)


def _stored() -> int:
    with session_scope() as s:
        return int(s.scalar(select(func.sum(Node.last_seq))) or 0)


def at_rate(
    keys: list[tuple[str, str]],
    seq: int,
    rate: float,
    seconds: float,
    connections: int,
    workers: int,
) -> tuple[OpenLoop, int]:
    """``rate`` one-heartbeat requests per second for ``seconds`` on a real uvicorn with
    ``workers`` processes; prints what was stored, the latencies and the CPU of every
    party per request. Returns the measurement and the next seq."""
    # One request per node first: every worker has its pool and prepared statements.
    warm = [raw_request(b) for b in beats(keys, seq)]
    seq += 1
    requests: list[bytes] = []
    total = int(rate * seconds)
    while len(requests) < total:
        requests += [raw_request(b) for b in beats(keys[: total - len(requests)], seq)]
        seq += 1
    with _env.uvicorn_server(*_keepalive(), workers=workers) as (server, port):
        asyncio.run(open_loop(port, warm, rate, connections))
        before = _stored()
        backends = _backend_pids()
        idle0, cpu0, pg0 = _machine_idle(), _tree_cpu_s(server.pid), _pids_cpu_s(backends)
        gen0 = time.process_time()
        got = asyncio.run(open_loop(port, requests, rate, connections))
        gen_ms = (time.process_time() - gen0) / total * 1000
        server_ms = (_tree_cpu_s(server.pid) - cpu0) / total * 1000
        pg_ms = (_pids_cpu_s(backends) - pg0) / total * 1000
        idle1 = _machine_idle()
    stored = _stored() - before
    assert got.accepted == stored, (got.accepted, stored)
    idle = (idle1[0] - idle0[0]) / max(idle1[1] - idle0[1], 1) * 100
    print(
        f"  uvicorn x{workers}, {rate:.0f}/s offered for {seconds:.0f} s over {connections} "
        f"connections: {got.sent / got.elapsed_s:6.0f}/s done in {got.elapsed_s:5.1f} s, stored "
        f"{stored}/{total} ({stored / total:.2%}), {got.failed} failed, latency p50 "
        f"{got.percentile(0.5) * 1000:.0f} ms p99 {got.percentile(0.99) * 1000:.0f} ms"
    )
    print(
        f"    CPU per request: controller {server_ms:.2f} ms, its Postgres backends "
        f"{pg_ms:.2f} ms, load generator {gen_ms:.2f} ms; machine idle {idle:.0f} %"
    )
    # Where the machine had no idle CPU left, the rate says how much CPU the run got, not
    # what the code can do; the CPU per request says the latter.
    print(
        f"    CPU-bound ceiling: {1000 / server_ms:.0f}/s per core of controller, "
        f"{2000 / (server_ms + pg_ms + gen_ms):.0f}/s with all three on two free cores"
    )
    return got, seq


def _pids_cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with suppress(FileNotFoundError):
            total += _cpu_s(pid)
    return total


def timed(label: str, run: Callable[[list[Heartbeat]], int], batch: list[Heartbeat]) -> float:
    t0 = time.perf_counter()
    accepted = run(batch)
    elapsed = time.perf_counter() - t0
    assert accepted == len(batch), f"{label}: {accepted} of {len(batch)} accepted"
    rate = len(batch) / elapsed
    print(f"  {label:<42} {len(batch):6} in {elapsed:6.2f} s  {rate:8.0f} /s")
    return rate


def request_rounds(
    keys: list[tuple[str, str]], seq: int, rounds: int, concurrency: int, profile: str | None = None
) -> int:
    """The in-process request measurement, ``rounds`` times; returns the next seq."""
    alone, together = [], []
    for r in range(rounds):
        batch = beats(keys, seq)
        if profile is not None and r == rounds - 1:
            with ThreadProfiles() as profiles:
                got = via_asgi(batch, concurrency)
            profiles.dump(profile)
        else:
            got = via_asgi(batch, concurrency)
        assert got.accepted == len(batch), f"{got.accepted} of {len(batch)} accepted"
        report_request_cpu(got, concurrency)
        alone.append(statistics.median(got.alone_ms))
        together.append(got.concurrent_ms)
        seq += 1
    if rounds > 1:
        print(
            f"  median of {rounds} rounds: alone {statistics.median(alone):.2f} ms, "
            f"{concurrency} at a time {statistics.median(together):.2f} ms"
        )
    return seq


def rate_mode(keys: list[tuple[str, str]], args: argparse.Namespace) -> None:
    """The issue's heartbeat goal, one heartbeat per request: first the baseline (16
    httpx agents at a time, as ``--mode all`` measures), then the offered rate on one
    uvicorn process and on two."""
    print(f"  baseline: {len(keys)} requests, 16 httpx agents at a time, uvicorn x1")
    t0 = time.perf_counter()
    assert via_http(beats(keys, 1), 16) == len(keys)
    base = len(keys) / (time.perf_counter() - t0)
    print(f"    {base:.0f}/s")
    seq = 2
    for workers in (1, 2):
        got, seq = at_rate(keys, seq, args.rate, args.seconds, args.connections, workers)
        done = got.sent / got.elapsed_s
        print(f"    rate / baseline: {done / base:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--mode", choices=["all", "request", "rate"], default="all")
    parser.add_argument("--rate", type=float, default=1667.0, help="--mode rate: offered /s")
    parser.add_argument("--seconds", type=float, default=60.0, help="--mode rate: how long")
    parser.add_argument("--connections", type=int, default=64, help="--mode rate: sockets")
    parser.add_argument("--profile", metavar="FILE", help="--mode request: cProfile to FILE")
    args = parser.parse_args()
    with _env.database():
        migrate.upgrade(get_settings())
        keys = populate(args.nodes)
        n = len(keys)
        print(f"\nedgefleet ingest bench: {n} nodes on Postgres, one workload each")
        if args.mode == "rate":
            rate_mode(keys, args)
            return
        if args.mode == "request":
            seq = request_rounds(keys, 1, args.rounds, args.concurrency, args.profile)
            with session_scope() as s:
                last = s.scalar(select(func.min(Node.last_seq)))
            assert last == seq - 1, (last, seq)
            return
        # Heartbeats are built beforehand: building them is the agents' work.
        base = timed("baseline: one transaction per heartbeat", per_heartbeat, beats(keys, 1))
        rates = [
            timed(
                f"ingest_heartbeats, batches of {args.batch}",
                lambda b: batched(b, args.batch),
                beats(keys, 2 + r),
            )
            for r in range(args.rounds)
        ]
        seq = 2 + args.rounds
        service = timed("auth + ingest, one transaction per request", via_service, beats(keys, seq))
        seq = request_rounds(keys, seq + 1, 1, args.concurrency)
        http = timed(
            f"POST /v1/agents/heartbeat x{args.concurrency} (uvicorn)",
            lambda b: via_http(b, args.concurrency),
            beats(keys, seq),
        )
        print(
            f"\n  batched / baseline          : {max(rates) / base:6.1f}x  (best of {args.rounds} "
            f"rounds; median {statistics.median(rates) / base:.1f}x)"
        )
        print(f"  authenticated / baseline    : {service / base:6.2f}x")
        print(f"  HTTP endpoint / baseline    : {http / base:6.2f}x")
        with session_scope() as s:
            last = s.scalar(select(func.min(Node.last_seq)))
        assert last == seq, (last, seq)


if __name__ == "__main__":
    main()
