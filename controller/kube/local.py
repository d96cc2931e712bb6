"""The local driver: every assigned workload runs as a real ``edgefleet-serve`` process
on this machine, one loopback port per node. For development and the end-to-end tests:
real downloads from the controller, real sha256 checks, real inference, real /metrics
that real agents read. Nodes are declared like the simulated driver's.

One model at a time per node (the port is the node's); process handles live in this
process, so the reconciler must run where the driver was used (tests, the demo)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from controller.kube.driver import NodeInventory, ObservedWorkload, WorkloadSpec
from controller.kube.objects import ARTIFACT_TOKEN_ENV
from controller.kube.simulated import expand_nodes

_lock = threading.Lock()
_running: dict[tuple[str, str, str], tuple[subprocess.Popen[bytes], WorkloadSpec]] = {}


def node_ports(spec: Mapping[str, Any]) -> dict[str, int]:
    base = int(spec.get("basePort", 18500))
    return {n.name: base + i for i, n in enumerate(expand_nodes(spec))}


class LocalDriver:
    def __init__(
        self,
        cluster: str,
        spec: Mapping[str, Any],
        *,
        artifact_token: Callable[[], str] | None = None,
    ) -> None:
        self.cluster = cluster
        self._artifact_token = artifact_token
        self._spec = spec
        self._ports = node_ports(spec)
        self._cache = Path(str(spec.get("cacheDir", "/tmp/edgefleet-local")))

    def check(self) -> None:
        return None

    def list_nodes(self) -> list[NodeInventory]:
        return expand_nodes(self._spec)

    def apply(self, model: str, desired: Mapping[str, WorkloadSpec | None]) -> None:
        with _lock:
            for node, workload in desired.items():
                key = (self.cluster, model, node)
                current = _running.get(key)
                if current is not None:
                    proc, running = current
                    if (
                        workload is not None
                        and running.sha256 == workload.sha256
                        and proc.poll() is None
                    ):
                        continue
                    _stop(proc)
                    del _running[key]
                if workload is not None:
                    _running[key] = (self._start(node, workload), workload)

    def _start(self, node: str, w: WorkloadSpec) -> subprocess.Popen[bytes]:
        cache = self._cache / self.cluster / node
        cache.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable,
            "-m",
            "node_agent.serve",
            "--model-url",
            w.artifact_url,
            "--sha256",
            w.sha256,
            "--format",
            w.format,
            "--model-name",
            w.model,
            "--model-version",
            w.version,
            "--cache-dir",
            str(cache),
            "--host",
            "127.0.0.1",
            "--port",
            str(self._ports[node]),
            "--threads",
            "1",
            "--warmup-runs",
            "1",
        ]
        log = (cache / "serve.log").open("ab")
        # The controller's own settings (its secret key above all) stay out of a process
        # that loads untrusted models.
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
        if self._artifact_token is not None:
            env[ARTIFACT_TOKEN_ENV] = self._artifact_token()
        return subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )

    def observe(self, model: str, nodes: Sequence[str]) -> dict[str, ObservedWorkload]:
        out: dict[str, ObservedWorkload] = {}
        for node in nodes:
            current = _running.get((self.cluster, model, node))
            if current is None:
                out[node] = ObservedWorkload("Absent")
                continue
            proc, w = current
            code = proc.poll()
            if code is not None:
                out[node] = ObservedWorkload(
                    "Failed", w.version, w.sha256, f"edgefleet-serve exited {code}"
                )
                continue
            try:
                ready = (
                    httpx.get(f"http://127.0.0.1:{self._ports[node]}/readyz", timeout=1).status_code
                    == 200
                )
            except httpx.HTTPError:
                ready = False
            out[node] = ObservedWorkload("Ready" if ready else "Running", w.version, w.sha256)
        return out


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_all() -> None:
    with _lock:
        for proc, _ in _running.values():
            _stop(proc)
        _running.clear()
