"""A real uvicorn server on a loopback port, in a thread of the test process."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def free_port_run(count: int, low: int = 21000, high: int = 29000) -> int:
    """The first of ``count`` consecutive loopback ports that are all free now (a
    service of the machine may hold one anywhere: RabbitMQ's 25672, say)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randint(low, high - count)
        with contextlib.ExitStack() as held:
            try:
                for port in range(base, base + count):
                    s = held.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return base
    raise RuntimeError(f"no {count} consecutive free ports between {low} and {high}")


class LiveController:
    """The app under uvicorn, on a port that stays the same across ``stop()`` and
    ``start()`` (an agent keeps its controller URL). Give ``port`` when the app must
    know its own URL before it starts (``EDGEFLEET_PUBLIC_URL``), ``host`` for another
    address than loopback (the real node's pods reach the host on their bridge only)."""

    def __init__(self, app: FastAPI, *, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.app = app
        self.host = host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        config = uvicorn.Config(
            self.app,
            host=self.host,
            port=self.port,
            # As `edgefleet server` runs it: agents keep their connection between beats.
            timeout_keep_alive=self.app.state.settings.api_keepalive_timeout_s,
            log_level="warning",
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self._server, self._thread = server, thread

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)
        self._server = self._thread = None


@contextmanager
def live_controller(
    app: FastAPI, *, port: int | None = None, host: str = "127.0.0.1"
) -> Iterator[LiveController]:
    controller = LiveController(app, port=port, host=host)
    controller.start()
    try:
        yield controller
    finally:
        controller.stop()


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    with live_controller(app) as controller:
        yield controller.url


def stop_process_group(proc: subprocess.Popen[Any], *, grace_s: float = 20) -> None:
    """SIGTERM a process started with ``start_new_session=True`` and its children, then
    SIGKILL them if they are still there after ``grace_s``."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextmanager
def repeating(
    action: Callable[[], object], every_s: float, *, ignore: tuple[type[Exception], ...] = ()
) -> Iterator[None]:
    """Run ``action`` now and every ``every_s`` in a thread of its own while the block
    runs (stand-in agents, beat's tick). Errors of the ``ignore`` types are dropped, as a
    real agent drops a heartbeat that failed and sends the next one."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            with contextlib.suppress(*ignore):
                action()
            stop.wait(every_s)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
