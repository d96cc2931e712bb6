"""How light is edgefleet-agent? One real agent process against a tiny fake controller
and a fake inference server (the tests' stand-in of its /metrics), both in this process.

It measures the agent's resident memory and the CPU time one heartbeat cycle costs
(read /proc and /sys, scrape /metrics, build the heartbeat, one SQLite transaction, one
HTTPS-less POST, trim the outbox), running many cycles at a short interval and
extrapolating to the production interval of 10 s. Goals: RSS <= 60 MiB, < 1 % of a core.

Run: python bench/bench_agent.py [--cycles 60] [--interval 0.1]"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import _env  # noqa: F401  (first: this checkout on sys.path, for the tests' stand-ins)

from tests.agents.fakes import FakeInferenceServer
from tests.http_fake import FakeHTTPServer, read_json, reply_json

GOAL_RSS_MIB = 60.0
GOAL_CPU_PERCENT = 1.0
PRODUCTION_INTERVAL_S = 10.0
TICKS = os.sysconf("SC_CLK_TCK")


class FakeController:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.beats = 0
        self.last_seq = 0
        self.requests = 0

    def handle(self, path: str, body: Any) -> dict[str, Any]:
        with self.lock:
            self.requests += 1
            if path == "/v1/agents/enroll":
                return {
                    "node": body["node"],
                    "cluster": body["cluster"],
                    "credential": "bench-credential",
                    "heartbeat_interval_s": PRODUCTION_INTERVAL_S,
                    "last_seq": 0,
                }
            beats = body if isinstance(body, list) else [body]
            fresh = [b for b in beats if b["seq"] > self.last_seq]
            self.beats += len(fresh)
            self.last_seq = max([self.last_seq, *(b["seq"] for b in beats)])
            return {
                "accepted": len(fresh),
                "duplicates": len(beats) - len(fresh),
                "last_seq": self.last_seq,
            }


def controller_server(fake: FakeController) -> FakeHTTPServer:
    def handle(h: BaseHTTPRequestHandler) -> None:
        if h.command == "POST":
            reply_json(h, 200, fake.handle(h.path, read_json(h)))
            return
        with fake.lock:  # GET /v1/agents/benchmarks, once after the start: none
            fake.requests += 1
        reply_json(h, 200, [])

    return FakeHTTPServer(handle, keep_alive=True)  # keep-alive, as the agent's client uses it


def inference_server() -> FakeInferenceServer:
    """The model's /metrics, with 20 inferences of 4 ms between scrapes."""
    server = FakeInferenceServer(on_scrape=lambda s: s.serve(20, 0.004), keep_alive=True)
    server.set_model("detector", "1.0.0", "a" * 64)
    return server


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def memory_mib(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.005)


def heavy_imports() -> str:
    """What importing the agent pulls in, checked in a clean interpreter."""
    code = (
        "import sys, node_agent.agent.cli; "
        "print(','.join(m for m in ('numpy', 'onnxruntime', 'sqlalchemy', 'fastapi', "
        "'celery', 'controller') if m in sys.modules) or 'none')"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=60)
    parser.add_argument("--interval", type=float, default=0.1)
    args = parser.parse_args()

    fake = FakeController()
    controller = controller_server(fake)
    inference = inference_server()
    state = tempfile.mkdtemp(prefix="edgefleet-agent-bench-")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "NODE_NAME": "bench-node",
        "EDGEFLEET_CLUSTER": "bench",
        "EDGEFLEET_CONTROLLER_URL": controller.url,
        "EDGEFLEET_JOIN_TOKEN": "bench-token",
        "EDGEFLEET_STATE_DIR": state,
        "EDGEFLEET_HEARTBEAT_INTERVAL_S": str(args.interval),
        "EDGEFLEET_INFERENCE_URLS": inference.url,
        "EDGEFLEET_LOG_LEVEL": "WARNING",
    }
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "node_agent.agent"], env=env)
    try:
        wait_for(lambda: fake.beats >= 1, 30, "the first heartbeat")
        startup_s = time.perf_counter() - started
        startup_cpu = cpu_seconds(proc.pid)
        # A few cycles to warm up (connections, the first scrape's baseline).
        wait_for(lambda: fake.beats >= 5, 30, "warm-up")
        beats0, cpu0, wall0 = fake.beats, cpu_seconds(proc.pid), time.perf_counter()
        wait_for(lambda: fake.beats >= beats0 + args.cycles, 60 + args.cycles, "the cycles")
        beats1, cpu1, wall1 = fake.beats, cpu_seconds(proc.pid), time.perf_counter()
        mem = memory_mib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(15)
        controller.close()
        inference.close()
        shutil.rmtree(state, ignore_errors=True)

    cycles = beats1 - beats0
    per_cycle_ms = (cpu1 - cpu0) / cycles * 1000
    cpu_percent = per_cycle_ms / 1000 / PRODUCTION_INTERVAL_S * 100
    rss = mem["VmRSS"]
    print(f"\nedgefleet-agent bench: {cycles} cycles at {args.interval} s, fake controller")
    print(f"  startup to first heartbeat      : {startup_s * 1000:8.0f} ms wall")
    print(f"  startup CPU (imports, enrolment): {startup_cpu * 1000:8.0f} ms")
    print(f"  heavy modules imported          : {heavy_imports()}")
    print(
        f"  CPU per heartbeat cycle         : {per_cycle_ms:8.2f} ms "
        f"(over {(wall1 - wall0):.1f} s wall, {TICKS} ticks/s)"
    )
    print(
        f"  CPU at a {PRODUCTION_INTERVAL_S:.0f} s interval          : {cpu_percent:8.3f} % of a "
        f"core   goal < {GOAL_CPU_PERCENT} %   {'OK' if cpu_percent < GOAL_CPU_PERCENT else 'OVER'}"
    )
    print(
        f"  RSS                             : {rss:8.1f} MiB (peak {mem['VmHWM']:.1f})   "
        f"goal <= {GOAL_RSS_MIB:.0f} MiB   {'OK' if mem['VmHWM'] <= GOAL_RSS_MIB else 'OVER'}"
    )
    print(f"  requests to the controller      : {fake.requests} (exit code {code} on SIGTERM)")


if __name__ == "__main__":
    main()
