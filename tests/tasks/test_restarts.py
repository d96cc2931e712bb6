"""Redis and PostgreSQL restarted under a running rollout, with real processes: a
private redis-server and a private PostgreSQL cluster on free loopback ports (never the
shared ones the rest of the suite uses), a real Celery worker (and beat), a real uvicorn
API. Redis is killed with SIGKILL and Postgres shut down in immediate mode (no
checkpoint, as a crash) in the middle of a rollout; the worker must outlive both, the
API must say 503 while the database is away, and the rollout must finish with every
step recorded exactly once."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import sessionmaker

from controller.db import migrate
from controller.db.models import ModelVersion, Rollout, VersionStatus
from controller.db.session import make_engine, override_session_factory, session_scope
from controller.manifests.service import apply_documents
from controller.registry import samples
from controller.registry.service import push_version
from controller.registry.store import artifact_store
from controller.settings import Settings
from controller.tasks.celery_app import LIVENESS_FILE_NAME, configure
from node_agent.contract import Heartbeat
from tests.deploy import kube
from tests.deploy.test_controller_chart import probe_passes, worker_liveness_command
from tests.live import free_port, repeating, stop_process_group
from tests.rollouts.helpers import (
    cluster_doc,
    report,
    rollout_doc,
    rollout_events,
    running_versions,
)
from tests.tasks.test_worker import wait_for, worker

# Production's persistence (docker-compose.yml runs --appendonly yes), every write
# fsynced before Redis answers: what was queued and the simulated clusters' state
# survive the SIGKILL.
REDIS_OPTIONS = {
    "bind": "127.0.0.1",
    "appendonly": "yes",
    "appendfsync": "always",
    "save": "",
}
# Waves: 1 node, then half the fleet (baking 2 s, so the rollout is surely still
# Progressing when the fault lands just after that wave starts), then the rest.
STEPS = [{"nodes": 1}, {"percent": 50, "bake": "2s"}, {"percent": 100}]
STRATEGY = {"steps": STEPS, "maxUnavailable": "50%"}
CLUSTERS = (("east", 3), ("west", 3))
FAST = {"EDGEFLEET_RECONCILE_INTERVAL_S": "0.2"}


# ---------------------------------------------------------------- private servers


class PrivateRedis:
    """A redis-server of this test alone, on a free loopback port."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is required (Debian package redis-server)", pytrace=False)
        self.binary = binary
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        with (self.dir / f"redis-{self.starts}.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    *_flags(REDIS_OPTIONS),
                    "--port",
                    str(self.port),
                    "--dir",
                    str(self.dir),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._answers, 15, f"redis-server on port {self.port}")

    def _answers(self) -> bool:
        assert self.proc is not None
        assert self.proc.poll() is None, (self.dir / f"redis-{self.starts}.log").read_text()
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False
        finally:
            client.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class PrivatePostgres:
    """A PostgreSQL cluster of this test alone (Debian's initdb and pg_ctl), in a
    directory owned by the postgres user, trusting loopback connections."""

    def __init__(self) -> None:
        found = sorted(
            glob.glob("/usr/lib/postgresql/*/bin/initdb"),
            key=lambda p: int(Path(p).parent.parent.name),
        )
        if not found:
            pytest.fail(
                "PostgreSQL server binaries are required in /usr/lib/postgresql/*/bin",
                pytrace=False,
            )
        self.bin = Path(found[-1]).parent
        self.root = Path(tempfile.mkdtemp(prefix="edgefleet-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        # initdb refuses to run as root: the server runs as postgres, in its own directory.
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/edgefleet"

    def _run(self, *argv: str) -> None:
        done = subprocess.run(
            [*self.as_postgres, str(self.bin / argv[0]), *argv[1:]],
            capture_output=True,
            timeout=90,
        )
        assert done.returncode == 0, (
            f"{argv[0]} failed:\n{done.stdout.decode()}{done.stderr.decode()}"
            f"{self.log.read_text() if self.log.exists() else ''}"
        )

    def init(self) -> None:
        self._run(
            "initdb",
            "--pgdata",
            str(self.data),
            "--auth=trust",
            "--username=postgres",
            "--encoding=UTF8",
            "--no-sync",
        )
        self.start()
        admin = create_engine(
            f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres",
            isolation_level="AUTOCOMMIT",
        )
        with admin.connect() as conn:
            conn.execute(text("CREATE DATABASE edgefleet"))
        admin.dispose()

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off"
        )
        self._run(
            "pg_ctl",
            "start",
            "--pgdata",
            str(self.data),
            f"--log={self.log}",
            f"--options={options}",
            "--wait",
            "--timeout=60",
        )

    def crash(self) -> None:
        """Immediate shutdown: every backend is killed, no checkpoint; the next start
        replays the WAL, as after a crash."""
        self._run("pg_ctl", "stop", "--pgdata", str(self.data), "--mode=immediate", "--wait")

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                self.crash()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        server.init()
        yield server
    finally:
        server.destroy()


# ---------------------------------------------------------------- processes


@contextlib.contextmanager
def process(
    argv: list[str], log: Path, env: dict[str, str], ready: str
) -> Iterator[subprocess.Popen[bytes]]:
    """A control plane process (``edgefleet beat``, ``edgefleet server``), in its own
    process group, ready once ``ready`` appears in its log."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "controller.cli.main", *argv],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(lambda: ready in log.read_text() or proc.poll() is not None, 60, argv[0])
        assert proc.poll() is None, log.read_text()
        yield proc
    finally:
        stop_process_group(proc)


@contextlib.contextmanager
def agents() -> Iterator[None]:
    """Stand-ins for the node agents: healthy numbers every 0.2 s, written to whatever
    database this process's sessions reach; like a real agent, one that fails (the
    database is down) tries again at the next beat."""
    with repeating(report, 0.2, ignore=(Exception,)):
        yield


def _flags(options: dict[str, str]) -> list[str]:
    return [arg for key, value in options.items() for arg in (f"--{key}", value)]


def use_broker(settings: Settings, url: str) -> Settings:
    """This process sends its tasks to ``url`` (not eager) until the test ends."""
    private = settings.model_copy(update={"redis_url": url, "tasks_eager": False})
    configure(private)
    return private


# ---------------------------------------------------------------- the rollout


def push_and_validate(settings: Settings) -> None:
    """Push the version; the worker validates it (the task goes through the broker)."""
    with session_scope() as session:
        push_version(
            session,
            artifact_store(settings),
            name="detector",
            version="1.0.0",
            chunks=[samples.build_cnn()],
            metadata={},
        )

    def status() -> str | None:
        with session_scope() as session:
            return session.scalar(select(ModelVersion.status))

    wait_for(lambda: status() == VersionStatus.READY, 60, "the worker to validate the version")


def start_rollout(settings: Settings, name: str) -> None:
    clusters = [cluster_doc(c, n, applyLatency="300ms") for c, n in CLUSTERS]
    with session_scope() as session:
        apply_documents(
            session,
            [
                *clusters,
                rollout_doc(name, "1.0.0", strategy=STRATEGY),
            ],
            settings,
            artifact_store(settings),
            dry_run=False,
            may_apply_clusters=True,
        )


def phase(name: str) -> str | None:
    with session_scope() as session:
        return session.scalar(select(Rollout.phase).where(Rollout.name == name))


def events(name: str) -> list[tuple[str, object]]:
    """The rollout's events as (reason, wave)."""
    return [(reason, data.get("wave")) for reason, data in rollout_events(name)]


def assert_recorded_once(name: str, before_fault: list[tuple[str, object]]) -> None:
    """What was committed before the fault is still there, unchanged, and every step
    of the rollout was recorded exactly once: nothing was lost, half-written or
    written twice by a step that ran again."""
    after = events(name)
    assert after[: len(before_fault)] == before_fault
    counts = Counter(after)
    for wave in range(len(STEPS)):
        assert counts[("WaveStarted", wave)] == 1, after
        assert counts[("GatePassed", wave)] == 1, after
    assert counts[("Started", None)] == 1, after
    assert counts[("Succeeded", None)] == 1, after


def assert_fleet_runs(settings: Settings, version: str) -> None:
    running = running_versions(settings, [c for c, _ in CLUSTERS])
    assert len(running) == sum(n for _, n in CLUSTERS)
    assert set(running.values()) == {version}


def worker_env(redis_url: str, tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a control plane process: tasks through ``redis_url``; TMPDIR
    gives a worker a liveness file of its own, beat a schedule file of its own."""
    tmp.mkdir(parents=True, exist_ok=True)
    return {
        "EDGEFLEET_REDIS_URL": redis_url,
        "EDGEFLEET_TASKS_EAGER": "false",  # (the suite's default is eager)
        "TMPDIR": str(tmp),
        **FAST,
        **extra,
    }


def assert_survived(proc: subprocess.Popen[bytes], log: Path) -> None:
    output = log.read_text()
    assert proc.poll() is None, f"the process exited:\n{output[-4000:]}"
    assert "Unrecoverable error" not in output, output[-4000:]


def reconnected(proc: subprocess.Popen[bytes], log: Path) -> bool:
    assert_survived(proc, log)  # fail at once, with the worker's last words
    return log.read_text().count("Connected to redis://") >= 2


# ---------------------------------------------------------------- tests


def test_worker_survives_a_redis_restart_mid_rollout(
    settings: Settings, committed: None, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    private = use_broker(settings, private_redis.url)
    name = "redis-restart"
    env = worker_env(private_redis.url, tmp_path / "worker-tmp")
    worker_log, beat_log = tmp_path / "worker.log", tmp_path / "beat.log"
    try:
        with (
            worker(worker_log, **env) as proc,
            # Beat as production runs it: its tick queues a step for every rollout whose
            # follow-up the restart lost (the worker held it, unacknowledged).
            process(
                ["beat"],
                beat_log,
                worker_env(private_redis.url, tmp_path / "beat-tmp"),
                "beat: Starting",
            ) as beat,
        ):
            pid = proc.pid
            push_and_validate(private)
            with agents():
                start_rollout(private, name)
                wait_for(lambda: ("WaveStarted", 1) in events(name), 60, "wave 1 to start")
                before_fault = events(name)

                private_redis.kill()
                assert phase(name) == "Progressing"
                wait_for(
                    lambda: "Connection to broker lost" in worker_log.read_text(),
                    30,
                    "the worker to notice",
                )
                assert_survived(proc, worker_log)
                private_redis.start()  # same port, same data directory
                restarted_at = time.time()

                wait_for(lambda: reconnected(proc, worker_log), 60, "the worker to reconnect")
                wait_for(lambda: phase(name) == "Succeeded", 60, "Succeeded after the restart")

            assert proc.pid == pid
            assert_survived(proc, worker_log)
            assert_survived(beat, beat_log)
            # The worker says it is alive after the restart, and the chart's probe agrees.
            alive = Path(env["TMPDIR"]) / LIVENESS_FILE_NAME
            wait_for(
                lambda: alive.exists() and alive.stat().st_mtime > restarted_at,
                30,
                "a liveness touch after the restart",
            )
            objs = kube.objects(kube.render_scenario("edgefleet", "default"))
            assert probe_passes(worker_liveness_command(objs, alive))
        assert_recorded_once(name, before_fault)
        assert_fleet_runs(private, "1.0.0")
    finally:
        configure(settings)


def test_postgres_restart_mid_rollout(
    settings: Settings,
    private_postgres: PrivatePostgres,
    private_redis: PrivateRedis,
    tmp_path: Path,
) -> None:
    db_url = private_postgres.url
    private = use_broker(settings, private_redis.url).model_copy(update={"database_url": db_url})
    migrate.upgrade(private)
    engine: Engine = make_engine(db_url, pool_size=4)
    name = "postgres-restart"
    port = free_port()
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    env = worker_env(private_redis.url, tmp_path / "worker-tmp", EDGEFLEET_DATABASE_URL=db_url)
    api_env = {**env, "EDGEFLEET_API_PORT": str(port)}
    worker_log, api_log = tmp_path / "worker.log", tmp_path / "api.log"
    try:
        with (
            override_session_factory(sessionmaker(bind=engine, expire_on_commit=False)),
            worker(worker_log, **env) as proc,
            process(
                ["server", "--host", "127.0.0.1"], api_log, api_env, "Application startup complete"
            ),
        ):
            pid = proc.pid
            assert api.get("/readyz").status_code == 200
            push_and_validate(private)
            with agents():
                start_rollout(private, name)
                wait_for(lambda: ("WaveStarted", 1) in events(name), 60, "wave 1 to start")
                before_fault = events(name)
                assert phase(name) == "Progressing"

                private_postgres.crash()

                # The API: 503 in our error shape, with Retry-After, naming no server.
                assert api.get("/readyz").status_code == 503
                beat = Heartbeat(cluster="east", node="east-n0", seq=1, sent_at=datetime.now(UTC))
                resp = api.post(
                    "/v1/agents/heartbeat",
                    json=beat.model_dump(mode="json"),
                    headers={"Authorization": "Bearer not-a-node-credential"},
                )
                assert resp.status_code == 503, resp.text
                assert resp.json()["error"] == "service_unavailable"
                assert resp.headers["Retry-After"].isdigit()
                for secret in (str(private_postgres.port), "postgres", "127.0.0.1", "psycopg"):
                    assert secret not in resp.text
                # A write meanwhile fails whole.
                with pytest.raises(OperationalError), session_scope() as session:
                    apply_documents(
                        session,
                        [rollout_doc("during-outage", "1.0.0")],
                        private,
                        artifact_store(private),
                        dry_run=False,
                        may_apply_clusters=True,
                    )
                # The worker's steps fail and are retried, not dropped.
                wait_for(
                    lambda: "database unavailable, step retried" in worker_log.read_text(),
                    30,
                    "the worker to retry a step",
                )
                assert_survived(proc, worker_log)

                private_postgres.start()  # same port, same data directory

                # No beat runs here: only the task's own retries can finish the rollout.
                wait_for(lambda: phase(name) == "Succeeded", 60, "Succeeded after the restart")
            assert api.get("/readyz").status_code == 200
            resp = api.post(
                "/v1/agents/heartbeat",
                json=beat.model_dump(mode="json"),
                headers={"Authorization": "Bearer not-a-node-credential"},
            )
            assert resp.status_code == 401, resp.text  # the database answers again
            assert proc.pid == pid
            assert_survived(proc, worker_log)
            assert_recorded_once(name, before_fault)
            assert phase("during-outage") is None
        assert_fleet_runs(private, "1.0.0")
        assert "database unavailable on POST /v1/agents/heartbeat" in api_log.read_text()
    finally:
        api.close()
        engine.dispose()
        configure(settings)
