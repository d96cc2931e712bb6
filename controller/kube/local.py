"""The local driver: every assigned workload runs as a real ``edgefleet-serve`` process
on this machine. For development and the end-to-end tests: real downloads from the
controller, real sha256 checks, real inference, real /metrics that real agents read.
Nodes are declared like the simulated driver's.

Versions change make before break, as on Kubernetes (see :mod:`controller.kube.objects`):
each version's workload on a node is a process of its own on a port of its own, and the
node's port (``basePort`` + its index) is the model's Service there, a small TCP proxy
(:mod:`controller.kube.local_proxy`) that sends each new connection to the version
serving on the node. A
version change starts the new process beside the old one, which serves until the new one
is Ready; the proxy switches as soon as it is (a thread here waits for it, as the
Service needs no controller call), and the next ``apply`` or ``observe`` (where the kube
driver drops the previous label) stops the old process: SIGTERM, it answers what still
reaches it with ``Connection: close`` and exits after its requests in flight. A rollback
is the same handover backwards.

One model at a time per node (the port is the node's); processes and proxies live in
this process, so the reconciler must run where the driver was used (tests, the demo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from controller.kube.driver import NodeInventory, ObservedWorkload, WorkloadSpec
from controller.kube.objects import ARTIFACT_TOKEN_ENV, SHUTDOWN_DELAY_ENV
from controller.kube.simulated import expand_nodes

# The proxy switches before the old process hears SIGTERM, so no new connection reaches
# it: a short delay is enough (the pods on Kubernetes wait for kube-proxy).
SHUTDOWN_DELAY_S = 0.2


def node_ports(spec: Mapping[str, Any]) -> dict[str, int]:
    base = int(spec.get("basePort", 18500))
    return {n.name: base + i for i, n in enumerate(expand_nodes(spec))}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Service:
    """The node's stable endpoint: :mod:`controller.kube.local_proxy` on the node's port,
    sending each new connection to ``backend`` (the port of the version serving; None
    while no version is Ready)."""

    def __init__(self, port: int, state_dir: Path) -> None:
        self.port = port
        self._backend: int | None = None
        state_dir.mkdir(parents=True, exist_ok=True)
        self._file = state_dir / f"service-{port}"
        self._file.write_text("")
        listener = socket.create_server(("127.0.0.1", port))
        fd = listener.fileno()
        argv = [sys.executable, "-m", "controller.kube.local_proxy", str(fd), str(self._file)]
        try:
            self._proc = subprocess.Popen(
                argv,
                pass_fds=[fd],
                start_new_session=True,
                stdout=subprocess.DEVNULL,
            )
        finally:
            listener.close()  # (the proxy has its own copy)

    @property
    def backend(self) -> int | None:
        return self._backend

    @backend.setter
    def backend(self, port: int | None) -> None:
        if port == self._backend:
            return
        staged = self._file.with_suffix(".new")
        staged.write_text(str(port or ""))
        staged.replace(self._file)  # atomic: a connection reads the old port or the new
        self._backend = port

    def close(self) -> None:
        _stop(self._proc)


@dataclass
class Pod:
    """One version's ``edgefleet-serve`` process on a node."""

    spec: WorkloadSpec
    port: int
    proc: subprocess.Popen[bytes]
    watched: bool = False  # a thread waits for it to turn Ready

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            return False
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False


@dataclass
class Workload:
    """A model on a node: its Service and its pods by sha256, ``wanted`` the one it
    should run."""

    service: Service
    wanted: str
    pods: dict[str, Pod] = field(default_factory=dict)
    closed: bool = False


_lock = threading.Lock()
_workloads: dict[tuple[str, str, str], Workload] = {}
_stopping: list[threading.Thread] = []


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
                current = _workloads.get(key)
                if workload is None:
                    if current is not None:
                        del _workloads[key]
                        current.closed = True
                        current.service.close()
                        for gone in current.pods.values():
                            _stop_later(gone)
                    continue
                if current is None:
                    service = Service(self._ports[node], self._cache / self.cluster / node)
                    current = _workloads[key] = Workload(service, workload.sha256)
                pod = current.pods.get(workload.sha256)
                if pod is None or pod.proc.poll() is not None:
                    current.pods[workload.sha256] = self._start(node, workload)
                current.wanted = workload.sha256
                _hand_over(current)
                _watch(current)

    def _start(self, node: str, w: WorkloadSpec) -> Pod:
        cache = self._cache / self.cluster / node
        cache.mkdir(parents=True, exist_ok=True)
        port = _free_port()
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
            str(port),
            "--threads",
            "1",
            "--warmup-runs",
            "1",
        ]
        if w.warmup_inputs:
            argv += ["--warmup-inputs", json.dumps(dict(w.warmup_inputs), sort_keys=True)]
        log = (cache / "serve.log").open("ab")
        # The controller's own settings (its secret key above all) stay out of a process
        # that loads untrusted models.
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
        env[SHUTDOWN_DELAY_ENV] = str(SHUTDOWN_DELAY_S)
        if self._artifact_token is not None:
            env[ARTIFACT_TOKEN_ENV] = self._artifact_token()
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        return Pod(w, port, proc)

    def observe(self, model: str, nodes: Sequence[str]) -> dict[str, ObservedWorkload]:
        """The version each node should run, as its process is: a node in a handover
        reports the new version (Running, then Ready), never the one serving meanwhile,
        and the handover finishes here when the new one is Ready."""
        out: dict[str, ObservedWorkload] = {}
        with _lock:
            for node in nodes:
                current = _workloads.get((self.cluster, model, node))
                if current is None:
                    out[node] = ObservedWorkload("Absent")
                    continue
                _hand_over(current)
                pod = current.pods[current.wanted]
                w = pod.spec
                code = pod.proc.poll()
                if code is not None:
                    out[node] = ObservedWorkload(
                        "Failed", w.version, w.sha256, f"edgefleet-serve exited {code}"
                    )
                    continue
                ready = current.service.backend == pod.port
                out[node] = ObservedWorkload("Ready" if ready else "Running", w.version, w.sha256)
        return out


def _hand_over(workload: Workload) -> None:
    """Send the node's traffic to the wanted version once it is Ready, and stop the
    others; until then stop only what neither serves nor is wanted (a change in the
    middle of a change keeps the version serving, not the one still starting)."""
    wanted = workload.pods[workload.wanted]
    service = workload.service
    if wanted.ready():
        service.backend = wanted.port
    serving = next((p for p in workload.pods.values() if p.port == service.backend), None)
    if serving is not None and serving.proc.poll() is not None:
        service.backend = None  # it died: nothing serves until the wanted one is Ready
    for sha, pod in list(workload.pods.items()):
        if sha != workload.wanted and pod.port != service.backend:
            del workload.pods[sha]
            _stop_later(pod)


def _watch(workload: Workload) -> None:
    """Until the wanted version turns Ready, wait for it in the background, and move the
    traffic to it when it does, as the Service does on Kubernetes: with no driver call
    (the process it replaces stays until the next one, as the old pod does there)."""
    pod = workload.pods[workload.wanted]
    if pod.watched or workload.service.backend == pod.port:
        return
    pod.watched = True

    def wait() -> None:
        try:
            while not workload.closed and workload.pods.get(workload.wanted) is pod:
                if pod.proc.poll() is not None:
                    return
                if pod.ready():
                    with _lock:
                        if not workload.closed and workload.pods.get(workload.wanted) is pod:
                            workload.service.backend = pod.port
                    return
                time.sleep(0.05)
        finally:
            pod.watched = False

    threading.Thread(target=wait, name=f"ready-{pod.port}", daemon=True).start()


def _stop_later(pod: Pod) -> None:
    """SIGTERM now, wait for the exit in the background (the server drains first)."""
    thread = threading.Thread(target=_stop, args=(pod.proc,), daemon=True)
    thread.start()
    _stopping.append(thread)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_all() -> None:
    with _lock:
        for workload in _workloads.values():
            workload.closed = True
            workload.service.close()
            for pod in workload.pods.values():
                _stop_later(pod)
        _workloads.clear()
        stopping = list(_stopping)
        _stopping.clear()
    for thread in stopping:
        thread.join()
