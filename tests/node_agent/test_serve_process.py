"""The real ``edgefleet-serve`` console script as a subprocess: refuses a bad artifact
with exit code 3, serves after a download, drains on SIGTERM, and restarts from the
node cache with the origin gone."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from controller.registry import samples
from tests.node_agent.test_serve_helpers import Origin, sha256

SCRIPT = Path(sys.executable).with_name("edgefleet-serve")
ARTIFACT = "/v1/models/cnn/versions/1/artifact"


class Served:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            self._queue.put(line)

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"no {pattern!r} in the server's log:\n{''.join(self.lines)}")

    @property
    def log(self) -> str:
        return "".join(self.lines)


@contextmanager
def serve(*args: str, env: dict[str, str] | None = None) -> Iterator[Served]:
    assert SCRIPT.exists(), f"console script missing: {SCRIPT}"
    proc = subprocess.Popen(
        [str(SCRIPT), "--host", "127.0.0.1", "--port", "0", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        yield Served(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def from_origin(url: str, sha: str, cache: Path) -> list[str]:
    """The flags that serve the CNN from ``url``, cached in ``cache``."""
    return [
        "--model-url",
        url,
        "--sha256",
        sha,
        "--format",
        "onnx",
        "--model-name",
        "cnn",
        "--model-version",
        "1",
        "--cache-dir",
        str(cache),
    ]


def wait_ready(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} never turned ready")


@pytest.fixture(scope="module")
def cnn() -> bytes:
    return samples.build_cnn()


def test_sha256_mismatch_refuses_to_start(tmp_path: Path, cnn: bytes) -> None:
    promised = sha256(b"the bytes the controller registered")
    cache = tmp_path / "cache"
    with (
        Origin() as origin,
        serve(*from_origin(origin.add(ARTIFACT, cnn), promised, cache)) as served,
    ):
        code = served.proc.wait(60)
    assert code == 3, served.log
    assert "refusing to start: sha256 mismatch" in served.log
    assert f"expected {promised}, got {sha256(cnn)}" in served.log
    files = [p for p in cache.rglob("*") if p.is_file() and p.suffix != ".lock"]
    assert files == []  # the bad download is gone, nothing unverified is cached


def test_download_serve_drain_and_restart_offline(tmp_path: Path, cnn: bytes) -> None:
    cache = tmp_path / "cache"
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    session = ort.InferenceSession(cnn, providers=["CPUExecutionProvider"])
    want = session.run(None, {"image": x})[0]
    with Origin() as origin:
        origin.gate = threading.Event()  # hold the download: the server is up, not ready
        url = origin.add(ARTIFACT, cnn)
        args = from_origin(url, sha256(cnn), cache)
        with serve(*args, env={"EDGEFLEET_CPU_LIMIT": "1500"}) as served:
            base = served.wait_for(r"listening on (http://127\.0\.0\.1:\d+)").group(1)
            assert httpx.get(f"{base}/healthz").status_code == 200
            assert httpx.get(f"{base}/readyz").status_code == 503
            assert httpx.get(f"{base}/v1/model").status_code == 503
            origin.gate.set()
            wait_ready(base)
            model = httpx.get(f"{base}/v1/model").json()
            assert model["threads"] == 2  # 1500m -> 2 intra-op threads
            assert model["sha256"] == sha256(cnn)
            out = httpx.post(f"{base}/v1/infer", json={"inputs": {"image": x.tolist()}}).json()
            np.testing.assert_allclose(out["outputs"]["probabilities"], want, rtol=1e-6)
            served.proc.send_signal(signal.SIGTERM)
            assert served.proc.wait(30) == 0, served.log
            assert "SIGTERM received: draining" in served.log
        assert len(origin.requests) == 1
    assert (cache / "sha256" / sha256(cnn)[:2] / sha256(cnn)).read_bytes() == cnn

    # The origin is gone (its port closed): the node restarts from its cache.
    with serve(*args) as served:
        base = served.wait_for(r"listening on (http://127\.0\.0\.1:\d+)").group(1)
        wait_ready(base)
        assert "found in the cache" in served.log
        out = httpx.post(f"{base}/v1/infer", json={"inputs": {"image": x.tolist()}}).json()
        np.testing.assert_allclose(out["outputs"]["probabilities"], want, rtol=1e-6)
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(30) == 0


def test_unreachable_artifact_exits_4(tmp_path: Path, cnn: bytes) -> None:
    with Origin() as origin:
        url = origin.url("/nothing-here")
        with serve(
            "--model-url",
            url,
            "--sha256",
            sha256(cnn),
            "--format",
            "onnx",
            "--cache-dir",
            str(tmp_path / "cache"),
        ) as served:
            assert served.proc.wait(60) == 4, served.log
    assert "HTTP 404" in served.log
