"""Issue #5's done-when, end to end on loopback: a controller on Postgres, three nodes
whose workloads run as real edgefleet-serve processes (the local driver), three real
edgefleet-agent processes reading those servers' /metrics, and real inference traffic.
The agents' measurements drive the gates: a light version rolls out, a heavy one breaks
the p95 gate on its canary and is rolled back."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydantic import SecretStr

from controller.api.app import create_app
from controller.kube.local import stop_all
from controller.registry import samples
from controller.rollouts import reconciler
from controller.settings import Settings, get_settings
from tests.conftest import bearer
from tests.live import LiveController, free_port, free_port_run
from tests.rollouts.helpers import apply, rollout_id

NODES = 3
GATE_MS = 8.0


class Controller(LiveController):
    """The controller, knowing its own URL (artifact downloads) and a join token."""

    def __init__(self, settings: Settings) -> None:
        port = free_port()
        self.settings = settings.model_copy(
            update={
                "public_url": f"http://127.0.0.1:{port}",
                "agent_join_token": SecretStr("join-me"),
                "local_driver": True,
            }
        )
        super().__init__(create_app(self.settings), port=port)
        self.start()
        self.http = httpx.Client(base_url=self.url, timeout=30, headers=bearer("admin"))

    def stop(self) -> None:
        self.http.close()
        super().stop()


class Traffic:
    """Clients sending inferences to every node's server, shaped by its /v1/model."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.loop, args=(p,), daemon=True) for p in ports]
        for t in self.threads:
            t.start()

    def loop(self, port: int) -> None:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
        body, sha = b"", None
        while not self.stop.is_set():
            try:
                model = client.get("/v1/model").json()
                if model.get("sha256") != sha:
                    sha = model["sha256"]
                    (spec,) = model["inputs"]
                    shape = [d if isinstance(d, int) else 1 for d in spec["shape"]]
                    buf = io.BytesIO()
                    arrays: dict[str, Any] = {spec["name"]: np.zeros(shape, dtype=np.float32)}
                    np.savez(buf, **arrays)
                    body = buf.getvalue()
                client.post(
                    "/v1/infer", content=body, headers={"content-type": "application/x-npz"}
                )
            except (httpx.HTTPError, KeyError, ValueError):
                time.sleep(0.1)
        client.close()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


@pytest.fixture
def fleet(
    settings: Settings,
    committed: None,
    redis_available: None,
    tmp_path: Path,
) -> Iterator[dict[str, Any]]:
    controller = Controller(settings)
    with task_settings(controller.settings):
        yield from _fleet(controller, tmp_path)


@contextlib.contextmanager
def task_settings(settings: Settings) -> Iterator[None]:
    """Tasks run in-process (eager) take ``get_settings()``, from the environment: it must
    know the controller's URL too, or a wave such a task starts points its nodes at the
    default URL for their artifact (seen: a node that never turned ready)."""
    env = {
        "EDGEFLEET_PUBLIC_URL": settings.public_url,
        "EDGEFLEET_AGENT_JOIN_TOKEN": "join-me",
        "EDGEFLEET_LOCAL_DRIVER": "true",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    get_settings.cache_clear()
    try:
        assert get_settings().public_url == settings.public_url
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        get_settings.cache_clear()


def _fleet(controller: Controller, tmp_path: Path) -> Iterator[dict[str, Any]]:
    base = free_port_run(NODES)
    ports = [base + i for i in range(NODES)]
    agents: list[subprocess.Popen[bytes]] = []
    traffic = Traffic(ports)
    try:
        cluster = {
            "apiVersion": "edgefleet.io/v1",
            "kind": "Cluster",
            "metadata": {"name": "loop"},
            "spec": {
                "driver": "local",
                "local": {
                    "count": NODES,
                    "prefix": "edge",
                    "template": {"labels": {"tier": "retail"}},
                    "basePort": base,
                    "cacheDir": str(tmp_path / "nodes"),
                },
            },
        }
        resp = apply(controller.http, cluster)
        assert resp.status_code == 200, resp.text
        for i in range(NODES):
            env = {
                **os.environ,
                "EDGEFLEET_CONTROLLER_URL": controller.url,
                "EDGEFLEET_JOIN_TOKEN": "join-me",
                "EDGEFLEET_CLUSTER": "loop",
                "NODE_NAME": f"edge-{i}",
                "EDGEFLEET_STATE_DIR": str(tmp_path / f"agent-{i}"),
                "EDGEFLEET_MODEL_CACHE_DIR": str(tmp_path / f"agent-{i}" / "models"),
                "EDGEFLEET_INFERENCE_URLS": f"http://127.0.0.1:{ports[i]}/metrics",
                "EDGEFLEET_HEARTBEAT_INTERVAL_S": "0.5",
            }
            log = (tmp_path / f"agent-{i}.log").open("wb")
            agents.append(
                subprocess.Popen(
                    [sys.executable, "-m", "node_agent.agent"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        yield {"controller": controller, "ports": ports, "tmp": tmp_path}
    finally:
        traffic.close()
        for proc in agents:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
        stop_all()
        controller.stop()


def push(http: httpx.Client, version: str, data: bytes) -> None:
    resp = http.post(
        "/v1/models/detector/versions",
        data={"version": version},
        files={"file": ("m.onnx", data, "application/octet-stream")},
    )
    assert resp.status_code == 201, resp.text
    assert http.get(f"/v1/models/detector/versions/{version}").json()["status"] == "Ready"


def rollout(name: str, version: str) -> dict[str, Any]:
    return {
        "apiVersion": "edgefleet.io/v1",
        "kind": "Rollout",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "detector", "version": version},
            "selector": {"matchLabels": {"tier": "retail"}},
            "strategy": {
                "steps": [{"nodes": 1, "bake": "2s"}, {"percent": 100, "bake": "2s"}],
                "maxUnavailable": "100%",
                "progressDeadline": "90s",
            },
            "gates": {"maxP95LatencyMs": GATE_MS, "maxErrorRate": 0.05, "minSamples": 5},
        },
    }


def drive(controller: Controller, name: str, timeout_s: float = 150) -> str:
    rid = rollout_id(name)
    deadline = time.monotonic() + timeout_s
    phase = "Pending"
    while time.monotonic() < deadline:
        phase = reconciler.reconcile(rid, controller.settings) or phase
        if phase not in ("Pending", "Progressing"):
            return phase
        time.sleep(0.5)
    raise AssertionError(
        f"{name} still {phase}: {controller.http.get(f'/v1/rollouts/{name}').json()}"
    )


def serving(ports: list[int]) -> list[str | None]:
    out = []
    for port in ports:
        try:
            out.append(
                httpx.get(f"http://127.0.0.1:{port}/v1/model", timeout=2).json().get("version")
            )
        except httpx.HTTPError:
            out.append(None)
    return out


def story(fleet: dict[str, Any], name: str) -> str:
    """What happened, for a failed assertion: the rollout's events, oldest first, and the
    end of every node's edgefleet-serve log."""
    http = fleet["controller"].http
    events = http.get(f"/v1/rollouts/{name}/events", params={"limit": 200}).json()
    lines = [f"{e['reason']}: {e['message']} {e['data'].get('gate') or ''}" for e in events]
    for log in sorted((fleet["tmp"] / "nodes").rglob("serve.log")):
        tail = log.read_text(errors="replace").splitlines()[-15:]
        lines += [f"--- {log.parent.name}/serve.log", *tail]
    return "\n".join(["", *reversed(lines[: len(events)]), *lines[len(events) :]])


def test_agents_measurements_drive_the_gates(fleet: dict[str, Any]) -> None:
    controller: Controller = fleet["controller"]
    http = controller.http
    push(http, "1.0.0", samples.build_cnn(seed=0))  # about 0.1 ms per inference
    push(http, "2.0.0", samples.build_cnn(seed=1, channels=96, size=160))  # tens of ms

    assert apply(http, rollout("light", "1.0.0")).status_code == 200
    phase = drive(controller, "light")
    assert phase == "Succeeded", story(fleet, "light")
    assert serving(fleet["ports"]) == ["1.0.0"] * NODES
    events = http.get("/v1/rollouts/light/events", params={"limit": 200}).json()
    passed = [e for e in events if e["reason"] == "GatePassed"]
    assert len(passed) == 2
    for e in passed:  # the evidence: real latencies, measured on the nodes
        assert e["data"]["gate"]["healthy"] == e["data"]["gate"]["nodes"]
        assert 0 < e["data"]["gate"]["max_p95_ms"] < GATE_MS
    nodes = http.get("/v1/nodes", params={"cluster": "loop"}).json()["items"]
    assert all(n["last_heartbeat_at"] for n in nodes)  # every agent enrolled and reports

    assert apply(http, rollout("heavy", "2.0.0")).status_code == 200
    assert drive(controller, "heavy") == "RolledBack", story(fleet, "heavy")
    failed = next(
        e
        for e in http.get("/v1/rollouts/heavy/events", params={"limit": 200}).json()
        if e["reason"] == "GateFailed"
    )
    assert failed["data"]["wave"] == 0  # caught on the canary
    assert failed["data"]["gate"]["max_p95_ms"] > GATE_MS
    deadline = time.monotonic() + 60
    while serving(fleet["ports"]) != ["1.0.0"] * NODES and time.monotonic() < deadline:
        time.sleep(0.5)
    assert serving(fleet["ports"]) == ["1.0.0"] * NODES  # the canary is back on 1.0.0


def wait_benchmarks(http: httpx.Client, version: str, timeout_s: float = 120) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    rows: list[Any] = []
    while time.monotonic() < deadline:
        rows = http.get(f"/v1/models/detector/versions/{version}/benchmarks").json()
        if rows and all(r["status"] in ("Succeeded", "Failed") for r in rows):
            return rows
        time.sleep(0.5)
    raise AssertionError(f"benchmarks of {version} unfinished: {rows}")


def test_agents_benchmark_on_the_node_and_the_rollout_picks_per_class(
    fleet: dict[str, Any],
) -> None:
    """Issue #6's per-node choice with real parts: the agents measure an fp32 model and
    its int8 variant on their node (a child process each), the numbers are stored per
    node class, and a rollout with ``variants: auto`` ships, per class, the faster one."""
    controller: Controller = fleet["controller"]
    http = controller.http
    push(http, "1.0.0", samples.build_cnn(seed=0, channels=64))
    made = http.post(
        "/v1/models/detector/versions/1.0.0/variants",
        data={"method": "dynamic-int8", "version": "1.0.0-int8"},
    )
    assert made.status_code == 202, made.text
    job = http.get(f"/v1/models/detector/optimizations/{made.json()['id']}").json()
    assert job["status"] == "Succeeded", job
    # Every agent has enrolled and reports its CPU: one node class (one machine).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        nodes = http.get("/v1/nodes", params={"cluster": "loop"}).json()["items"]
        if all(n["last_heartbeat_at"] for n in nodes):
            break
        time.sleep(0.3)

    measured: dict[str, dict[str, Any]] = {}
    for version in ("1.0.0", "1.0.0-int8"):
        resp = http.post(f"/v1/models/detector/versions/{version}/benchmarks", json={"runs": 30})
        assert resp.status_code == 202, resp.text
        (row,) = wait_benchmarks(http, version)
        assert row["status"] == "Succeeded", row
        result = row["result"]
        assert result["runs"] == 30
        assert 0 < result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"]
        assert result["peak_rss_bytes"] > 0
        assert result["cpu"]
        measured[version] = row
    classes = {row["node_class"] for row in measured.values()}
    assert len(classes) == 1
    (cls,) = classes
    faster = min(measured, key=lambda v: (measured[v]["result"]["p50_ms"], v != "1.0.0"))

    doc = rollout("pick", "1.0.0")
    doc["spec"]["model"]["variants"] = "auto"
    doc["spec"]["gates"]["maxP95LatencyMs"] = 1000.0
    dry = apply(http, doc, dry_run=True)
    assert dry.status_code == 200, dry.text
    plan = dry.json()["results"][0]["plan"]
    assert plan["variants"][cls]["version"] == faster
    assert plan["variants"][cls]["nodes"] == NODES
    table = {c["version"]: c for c in plan["variants"][cls]["candidates"]}
    for version, row in measured.items():
        assert table[version]["p50_ms"] == row["result"]["p50_ms"]

    assert apply(http, doc).status_code == 200
    assert drive(controller, "pick") == "Succeeded"
    assert serving(fleet["ports"]) == [faster] * NODES
