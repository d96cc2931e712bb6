"""Inference server overhead: one CNN at concurrency 1.

  (a) bare ``session.run`` in this process: the baseline, what the runtime costs;
  (a2) the same model run in this process through an ``OnnxBinding`` set up once (input
       read in place, output array allocated once), as the server runs a raw request
       whose headers it has seen: the runtime's own floor, and the baseline of the
       server's overhead alone (the "/(a2)" column);
  (b) ``POST /v1/infer`` with an npz body and npz answer, ``http.client`` keep-alive;
  (c) ``POST /v1/infer`` with JSON in and out, ``http.client`` keep-alive;
  (b2) the same npz request from a minimal raw-socket HTTP/1.1 client (one ``sendall``
       per request, Content-Length framing): separates the server from http.client;
  (e) ``POST /v1/infer`` with the raw-tensor form: ``application/octet-stream`` with
      ``X-Tensor-Dtype`` / ``X-Tensor-Shape`` headers, answered as raw bytes too (the
      cheapest form: ``np.frombuffer`` on the body, no archive), ``http.client``;
  (e2) the same raw-tensor request from the minimal raw-socket client: the fastest path;
  (e3) (e2) against a second server started with ``--busy-poll-us 0``: what busy polling
       (on by default, 250 us) buys, and (in the CPU column) what it costs;
  (d) a bare TCP round trip of the same size to a socket echo in another process: the
      floor any out-of-process server pays (loopback + waking the other process);
  (d2) the same round trip to an echo that first busy-waits p50(a) (measured before the
      rounds), as a server runs the model: p50(a) + p50(d2) - that wait is the floor for
      this model. It is higher than (a) + (d) where waking a process that has been blocked
      for a while costs more than in a tight ping-pong (a VM whose idle vCPUs halt at once,
      for example);
  (d3) (d2) with an echo that busy-polls for the next request as the server does: the
      floor for a server that polls (the client's own wake-up remains);
  (d4) an echo that polls and runs the model itself on the received bytes (as (a2) does),
      then answers with its output: the floor of any out-of-process server of this model,
      in any language. It is above (d3) because the inference evicts the kernel's
      loopback and wake-up paths from the caches: the answer's send costs about twice
      what it does after a busy wait (measured here: 58 us against 30 us).

The server is the real ``edgefleet-serve`` console script in a child process (its own
GIL, as on a node); both it and (a) use 1 intra-op thread. Modes run interleaved in
rounds, so load from elsewhere on a shared host hits them alike. Printed: p50/p95 per
mode and as a ratio to (a), the server's CPU time per request (from /proc), where the
time goes (the server's own /metrics split its handler time into runtime and the rest),
and the server's RSS after the load.

Run: python bench/bench_serve.py [--seconds 3] [--small-only | --large-only]"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import _env  # noqa: F401  (first: this checkout on sys.path)
import numpy as np
import onnxruntime as ort
from prometheus_client.parser import text_string_to_metric_families

from controller.registry import samples
from node_agent import contract
from node_agent.runtimes import OnnxRunner

SCRIPT = Path(sys.executable).with_name("edgefleet-serve")
NPZ = "application/x-npz"
RAW = "application/octet-stream"
ROUNDS = 10


@dataclass
class Result:
    name: str
    ms: list[float] = field(default_factory=list)
    rounds: list[float] = field(default_factory=list)  # p50 of each round

    def q(self, quantile: float) -> float:
        return float(np.percentile(np.asarray(self.ms), quantile))

    def mean(self) -> float:
        return float(np.mean(self.ms))

    def add_round(self, ms: list[float]) -> None:
        self.ms += ms
        self.rounds.append(float(np.median(ms)))

    def ratios(self, base: Result) -> np.ndarray:
        """p50 over ``base``'s p50, round by round: a host whose speed drifts (a shared
        VM) moves both alike within a round."""
        ratios: np.ndarray = np.asarray(self.rounds) / np.asarray(base.rounds)
        return ratios


def timed(
    fn: Callable[[], object], seconds: float, warmup: int = 3, cap: int = 20000
) -> list[float]:
    for _ in range(warmup):
        fn()
    out: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end and len(out) < cap:
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


# ---------------------------------------------------------------------- the server
def start_server(model: Path, *extra: str) -> tuple[subprocess.Popen[str], int]:
    argv = [str(SCRIPT), "--model-path", str(model), "--host", "127.0.0.1", "--port", "0"]
    argv += extra
    # The port is read from the "listening on" log line.
    argv += ["--threads", "1", "--log-level", "INFO"]
    proc = subprocess.Popen(
        argv,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    port = None
    while time.monotonic() < deadline and port is None:
        line = proc.stderr.readline()
        if not line:
            break
        if match := re.search(r"listening on http://127\.0\.0\.1:(\d+)", line):
            port = int(match.group(1))
    if port is None:
        proc.kill()
        raise SystemExit(f"edgefleet-serve did not start: {proc.stderr.read()}")
    # Keep draining its log so that a full pipe never blocks the server.
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/readyz")
        if conn.getresponse().status == 200:
            conn.close()
            return proc, port
        conn.close()
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("edgefleet-serve never turned ready")


def server_totals(conn: http.client.HTTPConnection) -> tuple[float, float, float]:
    """(inference requests, handler seconds, runtime seconds) so far, from /metrics."""
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = sample.value
    return (
        values[contract.REQUEST_LATENCY + "_count"],
        values[contract.REQUEST_LATENCY + "_sum"],
        values[contract.INFERENCE_LATENCY + "_sum"],
    )


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0])
    return out


class RawClient:
    """A minimal HTTP/1.1 keep-alive client, as a C/Go/Rust client on the device would be:
    the head formatted once per (type, headers, length), head and body in one
    ``sendmsg``, the answer received into one buffer and framed by its Content-Length."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray(1 << 20)
        self.view = memoryview(self.buffer)
        self.heads: dict[tuple[str, str, int], bytes] = {}

    def post(self, body: bytes, content_type: str, headers: str = "") -> bytes:
        """``headers``: more header lines, each ending in CRLF."""
        key = (content_type, headers, len(body))
        head = self.heads.get(key)
        if head is None:
            head = self.heads[key] = (
                f"POST /v1/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: {content_type}\r\n{headers}Content-Length: {len(body)}\r\n\r\n"
            ).encode()
        self.sock.sendmsg([head, body])
        buffer, have = self.buffer, 0
        while (end := buffer.find(b"\r\n\r\n", 0, have)) < 0:
            have += self._recv(have)
        at = buffer.find(b"\r\nContent-Length: ", 0, end)
        assert at > 0, bytes(buffer[:end])
        length = int(buffer[at + 18 : buffer.find(b"\r\n", at + 2, end + 2)])
        while have < end + 4 + length:
            have += self._recv(have)
        assert buffer.startswith(b"HTTP/1.1 200 "), bytes(buffer[:300])
        assert have == end + 4 + length, "an answer longer than its Content-Length"
        return bytes(self.view[end + 4 : have])

    def _recv(self, have: int) -> int:
        n = self.sock.recv_into(self.view[have:])
        if not n:
            raise ConnectionError("the server closed the connection")
        return n

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------------- the floor
_ECHO = """
import socket, struct, sys, time
delay, poll, model = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
buffer = bytearray(1 << 21)
view = memoryview(buffer)
if model:  # the model, run in place on the received bytes as edgefleet-serve runs it
    import ctypes, pathlib
    import numpy as np
    from node_agent.runtimes import OnnxRunner
    runner = OnnxRunner(pathlib.Path(model), threads=1)
    (spec,), (out,) = runner.inputs, runner.outputs
    shape = tuple(int(d) if isinstance(d, int) else 1 for d in spec.shape)
    x = np.zeros(shape, spec.dtype)
    want = runner.run({spec.name: x})[out.name]
    binding = runner.bind(spec.name, x.dtype, x.shape, {out.name: (want.dtype, want.shape)})
    start = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    at = -start % 64  # an aligned body
    address = start + at
    payload = binding.outputs[out.name].data.cast("B")
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
reply = b"r" * 300
while True:
    head = b""
    end = time.perf_counter() + poll
    while poll and time.perf_counter() < end:
        try:
            head = conn.recv(4, socket.MSG_DONTWAIT)
            break
        except BlockingIOError:
            pass
    head += conn.recv(4 - len(head), socket.MSG_WAITALL) if len(head) < 4 else b""
    if len(head) < 4:
        break
    (n,) = struct.unpack("<I", head)
    if model:
        got = 0
        while got < n:
            got += conn.recv_into(view[at + got : at + n])
        binding.run(address)
        conn.sendmsg([reply[: 300 - len(payload)], payload])
        continue
    while n:
        n -= len(conn.recv(min(n, 1 << 20)))
    end = time.perf_counter() + delay
    while delay and time.perf_counter() < end:
        pass
    conn.sendall(reply)
"""


class Echo:
    """Round trips of ``size`` bytes out and 300 back over loopback TCP to a bare socket
    echo in another process, which busy-waits ``delay_s`` (or runs ``model`` on the bytes,
    through a binding as the server does) before it answers and, with ``poll_s``, polls
    that long for the next message before it blocks."""

    def __init__(
        self, size: int, delay_s: float = 0.0, poll_s: float = 0.0, model: Path | None = None
    ) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ECHO, repr(delay_s), repr(poll_s), str(model or "")],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        port = int(self.proc.stdout.readline())
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.message = struct.pack("<I", size) + b"q" * size

    def ping(self) -> None:
        self.sock.sendall(self.message)
        got = 0
        while got < 300:
            got += len(self.sock.recv(65536))

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(10)


# ---------------------------------------------------------------------- one model
def bench(label: str, model_bytes: bytes, size: int, seconds: float, tmp: Path) -> None:
    path = tmp / f"{label.split()[0]}.onnx"
    path.write_bytes(model_bytes)
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    want = session.run(["probabilities"], {"image": x})[0]
    binding = OnnxRunner(path, threads=1).bind(
        "image", x.dtype, x.shape, {"probabilities": (want.dtype, want.shape)}
    )
    x_address = x.ctypes.data
    np.testing.assert_allclose(binding.run(x_address)["probabilities"], want, rtol=1e-6)

    body_npz = npz(image=x)
    body_json = json.dumps({"inputs": {"image": x.tolist()}}).encode()
    body_raw = x.tobytes()
    raw_headers = {"X-Tensor-Dtype": "float32", "X-Tensor-Shape": ",".join(map(str, x.shape))}
    raw_head = "".join(f"{k}: {v}\r\n" for k, v in raw_headers.items())
    proc, port = start_server(path)
    proc_off, port_off = start_server(path, "--busy-poll-us", "0")
    run_p50_s = float(np.median(timed(lambda: session.run(None, {"image": x}), 0.5))) / 1000
    echo = Echo(len(body_npz))
    busy_echo = Echo(len(body_npz), delay_s=run_p50_s)
    polling_echo = Echo(len(body_npz), delay_s=run_p50_s, poll_s=250e-6)
    model_echo = Echo(len(body_raw), poll_s=250e-6, model=path)
    raw_client, raw_client_off = RawClient(port), RawClient(port_off)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn_off = http.client.HTTPConnection("127.0.0.1", port_off, timeout=30)
    try:

        def post(body: bytes, ctype: str, headers: dict[str, str] | None = None) -> bytes:
            conn.request(
                "POST", "/v1/infer", body=body, headers={"Content-Type": ctype, **(headers or {})}
            )
            resp = conn.getresponse()
            data = resp.read()
            assert resp.status == 200, data[:200]
            return data

        with np.load(io.BytesIO(post(body_npz, NPZ))) as got:
            np.testing.assert_allclose(got["probabilities"], want, rtol=1e-6)
        with np.load(io.BytesIO(raw_client.post(body_npz, NPZ))) as got:
            np.testing.assert_allclose(got["probabilities"], want, rtol=1e-6)
        got_json = json.loads(post(body_json, "application/json"))["outputs"]["probabilities"]
        np.testing.assert_allclose(got_json, want, rtol=1e-6)
        for got_raw in (
            post(body_raw, RAW, raw_headers),
            raw_client.post(body_raw, RAW, raw_head),
            raw_client_off.post(body_raw, RAW, raw_head),
        ):
            got = np.frombuffer(got_raw, np.float32).reshape(want.shape)
            np.testing.assert_allclose(got, want, rtol=1e-6)

        modes: dict[str, Callable[[], object]] = {
            "(a) session.run, in-process": lambda: session.run(None, {"image": x}),
            "(a2) bound run, in-process": lambda: binding.run(x_address),
            "(b) HTTP npz, http.client": lambda: post(body_npz, NPZ),
            "(c) HTTP JSON, http.client": lambda: post(body_json, "application/json"),
            "(b2) HTTP npz, raw client": lambda: raw_client.post(body_npz, NPZ),
            "(e) HTTP raw, http.client": lambda: post(body_raw, RAW, raw_headers),
            "(e2) HTTP raw, raw client": lambda: raw_client.post(body_raw, RAW, raw_head),
            "(e3) (e2), no busy polling": lambda: raw_client_off.post(body_raw, RAW, raw_head),
            "(d) bare TCP round trip": echo.ping,
            "(d2) TCP, echo busy p50(a)": busy_echo.ping,
            "(d3) (d2), echo polls": polling_echo.ping,
            "(d4) TCP, echo runs the model": model_echo.ping,
        }
        results = {name: Result(name) for name in modes}
        servers = {name: (conn, proc.pid) for name in modes if "HTTP" in name}
        servers["(e3) (e2), no busy polling"] = (conn_off, proc_off.pid)
        split = {name: [0.0, 0.0, 0.0, 0.0] for name in servers}  # n, handler, runtime, CPU
        for fn in modes.values():  # warm every path before measuring any
            for _ in range(30):
                fn()
        for _ in range(ROUNDS):
            for name, fn in modes.items():
                server, pid = servers.get(name, (None, 0))
                before = (*server_totals(server), cpu_s(pid)) if server else None
                results[name].add_round(timed(fn, seconds / ROUNDS))
                if server is not None and before is not None:
                    after = (*server_totals(server), cpu_s(pid))
                    split[name] = [
                        s + a - b for s, a, b in zip(split[name], after, before, strict=True)
                    ]
        memory = rss_kib(proc.pid)
    finally:
        for closing in (conn, conn_off, raw_client, raw_client_off):
            closing.close()
        for echoing in (echo, busy_echo, polling_echo, model_echo):
            echoing.close()
        for server_proc in (proc, proc_off):
            server_proc.terminate()
            server_proc.wait(30)

    raw, floor = results["(a) session.run, in-process"], results["(d) bare TCP round trip"]
    bound = results["(a2) bound run, in-process"]
    base = raw.q(50)
    print(
        f"\n{label}: input float32 {list(x.shape)} "
        f"(raw {len(body_raw)} B, npz {len(body_npz)} B, JSON {len(body_json)} B)"
    )
    print(
        f"  {'mode':<30} {'n':>6} {'p50 ms':>8} {'p95 ms':>8} {'p50/p50(a) [rounds]':>22} "
        f"{'p95/p95(a)':>11} {'p50/p50(a2)':>12} {'server CPU/req':>15}"
    )
    for r in results.values():
        cpu = ""
        if r.name in split:
            n, _, _, cpu_total = split[r.name]
            cpu = f"{cpu_total / n * 1000:>12.3f} ms"
        ratios = r.ratios(raw)
        spread = f"{np.median(ratios):.3f}x [{ratios.min():.2f}-{ratios.max():.2f}]"
        print(
            f"  {r.name:<30} {len(r.ms):>6} {r.q(50):>8.3f} {r.q(95):>8.3f} {spread:>22} "
            f"{r.q(95) / raw.q(95):>10.2f}x {np.median(r.ratios(bound)):>11.3f}x {cpu:>15}"
        )
    print(
        "  (p50/p50(a): the median of the rounds' ratios, each round's p50 over (a)'s in the "
        f"same round; [their range] over {ROUNDS} rounds)"
    )
    wait_ms = run_p50_s * 1000
    busy = base + results["(d2) TCP, echo busy p50(a)"].q(50) - wait_ms
    polled = base + results["(d3) (d2), echo polls"].q(50) - wait_ms
    print(
        f"  floors of an out-of-process server: p50(a) + p50(d) {base + floor.q(50):.3f} ms "
        f"= {(base + floor.q(50)) / base:.2f}x; after p50(a) of work, p50(a) + p50(d2) - wait "
        f"{busy:.3f} ms = {busy / base:.2f}x, polling as the server does (d3) "
        f"{polled:.3f} ms = {polled / base:.2f}x; running the model itself (d4) "
        f"{np.median(results['(d4) TCP, echo runs the model'].ratios(raw)):.3f}x"
    )
    e2, d4 = results["(e2) HTTP raw, raw client"], results["(d4) TCP, echo runs the model"]
    print(
        f"  the HTTP server's own cost over (d4), (e2) - (d4): "
        f"{(e2.q(50) - d4.q(50)) * 1000:.0f} us at p50 "
        f"({np.median(e2.ratios(d4)):.3f}x, rounds {e2.ratios(d4).min():.3f}-"
        f"{e2.ratios(d4).max():.3f}x)"
    )
    print("  where a request's time goes, means (the server's side from its /metrics):")
    for name, (n, handler_s, runtime_s, _) in split.items():
        r = results[name]
        handler, runtime = handler_s / n * 1000, runtime_s / n * 1000
        print(
            f"    {name:<28} {r.mean():7.3f} ms "
            f"= runtime {runtime:6.3f} + read/decode/validate/encode {handler - runtime:6.3f} "
            f"+ HTTP parse, client, transport {r.mean() - handler:6.3f}"
        )
    print(
        f"  server RSS after the load: {memory['VmRSS'] / 1024:.1f} MiB "
        f"(peak {memory['VmHWM'] / 1024:.1f} MiB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help=f"per mode, in {ROUNDS} rounds")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--small-only", action="store_true")
    group.add_argument("--large-only", action="store_true")
    args = parser.parse_args()
    print(
        f"edgefleet-serve overhead: concurrency 1, 1 intra-op thread, onnxruntime {ort.__version__}"
    )
    print(
        f"host: {os.cpu_count()} CPUs; each mode runs {args.seconds:g} s "
        f"in {ROUNDS} interleaved rounds"
    )
    with tempfile.TemporaryDirectory() as tmp:
        if not args.large_only:
            bench("small CNN (8 ch, 32x32)", samples.build_cnn(), 32, args.seconds, Path(tmp))
        if not args.small_only:
            bench(
                "larger CNN (48 ch, 96x96)",
                samples.build_cnn(channels=48, size=96),
                96,
                args.seconds,
                Path(tmp),
            )


if __name__ == "__main__":
    main()
