"""What every bench script starts with: ``import _env`` first, before any module of this
project (``python bench/bench_x.py`` puts bench/ on ``sys.path``, so it is found there).

- This checkout's root goes first on ``sys.path``: the bench measures the code beside it,
  not another installed copy, and may use the tests' stand-ins (``tests.http_fake``,
  ``tests.agents.fakes``).
- The controller's settings point at a database of the run's own on the test services
  (``EDGEFLEET_TEST_POSTGRES``, ``EDGEFLEET_TEST_REDIS``, as the tests read them), set
  here because importing ``controller.tasks.celery_app`` reads them. ``database()``
  creates that database and drops it afterwards; a bench that needs none ignores both.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PG = os.environ.get("EDGEFLEET_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432")
DB = f"edgefleet_bench_{uuid.uuid4().hex[:8]}"

os.environ.update(
    {
        "EDGEFLEET_ENVIRONMENT": "test",
        "EDGEFLEET_SECRET_KEY": "bench-secret",
        "EDGEFLEET_DATABASE_URL": f"{PG}/{DB}",
        "EDGEFLEET_REDIS_URL": os.environ.get("EDGEFLEET_TEST_REDIS", "redis://127.0.0.1:6379/0"),
        "EDGEFLEET_TASKS_EAGER": "true",
        "EDGEFLEET_ARTIFACT_DIR": f"/tmp/{DB}/artifacts",
        # Registry validation benchmarks every pushed version: 5 runs keep set-up short.
        "EDGEFLEET_BENCHMARK_RUNS": "5",
    }
)


def admin(sql: str) -> None:
    engine = create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(sql))
    engine.dispose()


@contextmanager
def database() -> Iterator[None]:
    """The run's database, created empty (``migrate.upgrade`` builds the schema), its
    connections closed and the database dropped at the end."""
    # Imported here, once this checkout is on sys.path and the settings above are set.
    from controller.db.session import dispose_engines

    admin(f'CREATE DATABASE "{DB}"')
    try:
        yield
    finally:
        dispose_engines()
        admin(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')


@contextmanager
def uvicorn_server(
    *args: str, workers: int = 1, env: Mapping[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A real uvicorn serving the controller in processes of its own (a load generator
    in the same interpreter would share its GIL), on a free port of 127.0.0.1, with
    uvicorn's extra ``args`` and ``env`` over this process's environment; yields the
    process and its port once it answers (and, with ``workers``, once every worker is
    up)."""
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = ["--factory", "controller.api.app:create_app", "--port", str(port), *args]
    command += ["--workers", str(workers), "--log-level", "warning", "--no-access-log"]
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", *command], env={**os.environ, **(env or {})}
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz")
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the controller did not start") from None
                time.sleep(0.1)
        if workers > 1:  # every worker up, not only the first
            while len(children(server.pid)) < workers and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(2.0)
        yield server, port
    finally:
        server.terminate()
        server.wait(30)


def children(pid: int) -> list[int]:
    """The process ids of ``pid``'s children."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]
