"""Heartbeat ingestion on Postgres: 2,000 simulated nodes, each with a model assignment,
every heartbeat carrying node status and one workload's inference metrics.

Measured in the same run:
  baseline       one transaction per heartbeat through ingest_heartbeats (what agents
                 each sending one heartbeat cost the database at minimum),
  batched        controller.fleet.service.ingest_heartbeats over batches of 500 (an
                 agent's replay), one transaction per batch,
  authenticated  what the endpoint does per request: credential lookup (locked), the
                 impersonation check, ingest, commit,
  HTTP           POST /v1/agents/heartbeat on a real uvicorn (one worker process), 16
                 agents at a time, one heartbeat per request (CPU-bound on a small box).

Run: python bench/bench_ingest.py [--nodes 2000] [--batch 500] [--rounds 3]
Needs PostgreSQL on 127.0.0.1:5432 (EDGEFLEET_TEST_POSTGRES), as the tests do."""

from __future__ import annotations

import argparse
import hashlib
import os
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

PG = os.environ.get("EDGEFLEET_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432")
DB = f"edgefleet_bench_{uuid.uuid4().hex[:8]}"
os.environ.update(
    {
        "EDGEFLEET_ENVIRONMENT": "test",
        "EDGEFLEET_SECRET_KEY": "bench-secret",
        "EDGEFLEET_DATABASE_URL": f"{PG}/{DB}",
        "EDGEFLEET_TASKS_EAGER": "true",
        "EDGEFLEET_ARTIFACT_DIR": f"/tmp/{DB}/artifacts",
    }
)

from sqlalchemy import create_engine, func, insert, select, text  # noqa: E402

from controller.db import migrate  # noqa: E402
from controller.db.models import (  # noqa: E402
    Assignment,
    AssignmentState,
    Cluster,
    Model,
    ModelVersion,
    Node,
)
from controller.db.session import dispose_engines, session_scope  # noqa: E402
from controller.fleet.service import ingest_heartbeats  # noqa: E402
from controller.settings import get_settings  # noqa: E402
from node_agent.contract import (  # noqa: E402
    Heartbeat,
    InferenceMetrics,
    NodeStatus,
    WorkloadReport,
)

SHA = "b" * 64
NODES_PER_CLUSTER = 500


def admin(sql: str) -> None:
    engine = create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(sql))
    engine.dispose()


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
    """The endpoint's database work per request: credential lookup, impersonation
    check, ingest, commit; one heartbeat per transaction."""
    from controller.agents import service

    settings = get_settings()
    accepted = 0
    for beat in batch:
        with session_scope() as s:
            found = service.authenticate(s, credential(beat.node))
            assert found is not None
            node, cluster = found
            accepted += service.receive_heartbeats(s, settings, node, cluster, [beat]).accepted
    return accepted


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def via_http(batch: list[Heartbeat], concurrency: int) -> int:
    """POST /v1/agents/heartbeat on a real uvicorn (its own process: a load generator in
    the same interpreter would share its GIL), ``concurrency`` agents at a time, one
    heartbeat per request."""
    import socket
    import subprocess
    import sys
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["--factory", "controller.api.app:create_app", "--port", str(port)]
    quiet = ["--log-level", "warning", "--no-access-log"]
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", *args, *quiet])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"{url}/openapi.json")
            break
        except httpx.TransportError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the controller did not start") from None
            time.sleep(0.1)
    local = threading.local()

    def post(beat: Heartbeat) -> int:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url)
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

    try:
        cpu0 = _cpu_s(server.pid)
        with ThreadPoolExecutor(concurrency) as pool:
            accepted = sum(pool.map(post, batch))
        per_request_ms = (_cpu_s(server.pid) - cpu0) / len(batch) * 1000
        print(f"    (controller process CPU per request: {per_request_ms:.1f} ms)")
        return accepted
    finally:
        server.terminate()
        server.wait(10)


def timed(label: str, run: Callable[[list[Heartbeat]], int], batch: list[Heartbeat]) -> float:
    t0 = time.perf_counter()
    accepted = run(batch)
    elapsed = time.perf_counter() - t0
    assert accepted == len(batch), f"{label}: {accepted} of {len(batch)} accepted"
    rate = len(batch) / elapsed
    print(f"  {label:<42} {len(batch):6} in {elapsed:6.2f} s  {rate:8.0f} /s")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    admin(f'CREATE DATABASE "{DB}"')
    try:
        migrate.upgrade(get_settings())
        keys = populate(args.nodes)
        n = len(keys)
        print(f"\nedgefleet ingest bench: {n} nodes on Postgres, one workload each")
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
        seq += 1
        http = timed(
            f"POST /v1/agents/heartbeat x{args.concurrency} (uvicorn)",
            lambda b: via_http(b, args.concurrency),
            beats(keys, seq),
        )
        best = max(rates)
        print(
            f"\n  batched / baseline          : {best / base:6.1f}x  (best of {args.rounds} rounds)"
        )
        print(f"  authenticated / baseline    : {service / base:6.2f}x")
        print(f"  HTTP endpoint / baseline    : {http / base:6.2f}x")
        with session_scope() as s:
            last = s.scalar(select(func.min(Node.last_seq)))
        assert last == seq, (last, seq)
    finally:
        dispose_engines()
        admin(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')


if __name__ == "__main__":
    main()
