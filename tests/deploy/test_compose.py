"""docker-compose.yml: valid against the Compose Specification, wired as documented, no
secret in it, and its entry commands really start: the migration against a fresh
PostgreSQL database, the API answering /healthz and /readyz, a Celery worker reaching
"ready.". No Docker engine is needed: the commands run here with the environment the
containers would get, service host names pointed at the local PostgreSQL and Redis."""

from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import redis
from sqlalchemy import create_engine, make_url, text

from controller.db.migrate import head_revision
from controller.settings import Settings
from tests.conftest import PG_ROOT, REDIS_URL, create_database, drop_database
from tests.deploy import compose
from tests.deploy.cli import check_command, installed_script, keepalive_settings
from tests.live import free_port

CONTROLLER_SERVICES = ("migrate", "api", "worker", "beat")
# uvicorn's own keep-alive timeout, which the API's setting must replace.
UVICORN_KEEPALIVE_S = 5
# What the operator exports before `docker compose up` (see the file's header).
VARIABLES = {
    "EDGEFLEET_SECRET_KEY": f"compose-test-{uuid.uuid4().hex}",
    "POSTGRES_PASSWORD": uuid.uuid4().hex,
}


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return compose.load()


@pytest.fixture(scope="module")
def services(raw: dict[str, Any]) -> dict[str, Any]:
    """The services as Compose sees them once the variables are set."""
    interpolated: dict[str, Any] = compose.interpolate_all(raw, VARIABLES)["services"]
    return interpolated


# ---------------------------------------------------------------- the file


def test_follows_the_compose_specification(raw: dict[str, Any]) -> None:
    validator = jsonschema.Draft202012Validator(compose.compose_spec_schema())
    for data in (raw, compose.interpolate_all(raw, VARIABLES)):
        errors = [
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(data)
        ]
        assert errors == []
    # And the schema does reject what is not Compose (it is not vacuous).
    broken = {"services": {"api": {"image": "x", "restart": "sometimes", "bogus": 1}}}
    assert len(list(validator.iter_errors(broken))) >= 1


def test_services_and_their_order(services: dict[str, Any]) -> None:
    assert set(services) == {"postgres", "redis", *CONTROLLER_SERVICES}
    assert services["postgres"]["image"] == "postgres:16"
    assert services["redis"]["image"] == "redis:7"
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["migrate"]["restart"] == "no"  # one-shot
    for name in ("api", "worker", "beat"):
        depends = services[name]["depends_on"]
        assert depends["migrate"] == {"condition": "service_completed_successfully"}, name
        assert depends["redis"] == {"condition": "service_healthy"}, name
    assert services["api"]["depends_on"]["postgres"] == {"condition": "service_healthy"}


def test_healthchecks(services: dict[str, Any]) -> None:
    assert services["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    # The API keeps the image's HEALTHCHECK (/healthz); the others run another command
    # than the server, so the inherited check would only ever fail.
    assert "healthcheck" not in services["api"]
    for name in ("migrate", "worker", "beat"):
        assert services[name]["healthcheck"] == {"disable": True}, name


def test_controller_services_share_one_image_and_the_env_anchor(raw: dict[str, Any]) -> None:
    anchor = raw["x-edgefleet-env"]
    images = set()
    for name in CONTROLLER_SERVICES:
        service = raw["services"][name]
        # The very same mapping object: YAML aliases of the one documented anchor.
        assert service["environment"] is anchor, name
        assert service["build"]["dockerfile"] == "docker/controller.Dockerfile"
        images.add(service["image"])
        assert service["read_only"] is True
        assert service["tmpfs"] == ["/tmp"]
        assert service["cap_drop"] == ["ALL"]
    assert len(images) == 1
    # Every variable is a setting the controller reads (pydantic ignores unknown ones).
    fields = set(Settings.model_fields)
    unknown = [k for k in anchor if k.removeprefix("EDGEFLEET_").lower() not in fields]
    assert unknown == []


def test_no_secret_is_committed(raw: dict[str, Any]) -> None:
    env = raw["x-edgefleet-env"]
    assert env["EDGEFLEET_SECRET_KEY"] == "${EDGEFLEET_SECRET_KEY:?set EDGEFLEET_SECRET_KEY}"
    assert "${POSTGRES_PASSWORD:?" in env["EDGEFLEET_DATABASE_URL"]
    assert raw["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith(
        "${POSTGRES_PASSWORD:?"
    )
    # Without the variables Compose refuses to start, naming what to set.
    with pytest.raises(compose.MissingVariable, match="set EDGEFLEET_SECRET_KEY"):
        compose.interpolate_all(raw, {"POSTGRES_PASSWORD": "x"})
    with pytest.raises(compose.MissingVariable, match="set POSTGRES_PASSWORD"):
        compose.interpolate_all(raw, {"EDGEFLEET_SECRET_KEY": "x"})
    # And the variables are the only source of secrets: with them set, every secret-like
    # value comes from one.
    for service in compose.interpolate_all(raw, VARIABLES)["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if any(word in key for word in ("SECRET", "PASSWORD")):
                assert value in VARIABLES.values(), key


def test_artifact_store_is_one_shared_volume(raw: dict[str, Any], services: dict[str, Any]) -> None:
    artifact_dir = raw["x-edgefleet-env"]["EDGEFLEET_ARTIFACT_DIR"]
    for name in ("api", "worker"):
        assert compose.named_volume_mounts(services[name]) == {"artifacts": artifact_dir}, name
    assert "artifacts" in raw["volumes"]


def test_beat_is_a_singleton(services: dict[str, Any]) -> None:
    beat = services["beat"]
    assert beat.get("deploy", {}).get("replicas", 1) == 1
    assert "scale" not in beat


def test_api_port_is_the_settings_default_on_loopback(services: dict[str, Any]) -> None:
    port = Settings.model_fields["api_port"].default
    assert services["api"]["ports"] == [f"127.0.0.1:{port}:{port}"]


def test_api_keeps_agent_connections_open(services: dict[str, Any]) -> None:
    """The API's idle-connection timeout outlasts the agents' heartbeat interval (the
    value the controller suggests at enrolment): an agent keeps its connection from one
    heartbeat to the next. test_api_answers_health_and_readiness checks that the running
    server really keeps one open past uvicorn's own default."""
    env = compose.service_environment(services["api"])
    settings = keepalive_settings(env)
    assert settings.api_keepalive_timeout_s > settings.agent_heartbeat_interval_s
    assert settings.api_keepalive_timeout_s > UVICORN_KEEPALIVE_S


@pytest.mark.parametrize("name", CONTROLLER_SERVICES)
def test_commands_are_cli_commands(services: dict[str, Any], name: str) -> None:
    check_command(compose.service_command(services[name]))


def test_commands_run_their_role(services: dict[str, Any]) -> None:
    commands = {name: compose.service_command(services[name]) for name in CONTROLLER_SERVICES}
    assert commands["migrate"] == ["edgefleet", "db", "upgrade"]
    assert commands["api"][:2] == ["edgefleet", "server"]
    assert commands["worker"][:2] == ["edgefleet", "worker"]
    assert commands["beat"] == ["edgefleet", "beat"]


# ---------------------------------------------------------------- the commands, run


@pytest.fixture(scope="module")
def celery_queue() -> Iterator[str]:
    """A queue of its own, so a worker started here never takes another run's tasks; its
    Redis keys are removed afterwards."""
    name = f"edgefleet-compose-{uuid.uuid4().hex[:8]}"
    yield name
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        keys = list(client.scan_iter(match=f"*{name}*"))
        if keys:
            client.delete(*keys)
    except redis.RedisError:
        pass  # Redis is down: the test that needed it has failed already
    finally:
        client.close()


def host_environment(
    service: dict[str, Any], root: Path, database_url: str, queue: str
) -> dict[str, str]:
    """The container's environment made to run on this machine: service host names point
    at the local PostgreSQL (a database of this test's own) and Redis, container paths at
    the repo files the image copies and at local directories for named volumes."""
    container = compose.service_environment(service)
    container.pop("PATH")  # the image's venv; here the console scripts are found directly
    dockerfile = compose.service_dockerfile(service)
    assert dockerfile is not None
    paths = {
        **compose.copied_paths(dockerfile),
        **{
            target: root / volume for volume, target in compose.named_volume_mounts(service).items()
        },
    }
    for key, value in container.items():
        if value in paths:
            container[key] = str(paths[value])

    db = make_url(container["EDGEFLEET_DATABASE_URL"])
    assert db.host == "postgres", "the database is the compose service"
    pg = make_url(PG_ROOT)
    target = make_url(database_url)
    # The local cluster trusts its postgres user; the compose file's own user and
    # password only exist in the container's database.
    container["EDGEFLEET_DATABASE_URL"] = db.set(
        host=pg.host,
        port=pg.port,
        username=pg.username,
        password=pg.password,
        database=target.database,
    ).render_as_string(hide_password=False)
    if "EDGEFLEET_REDIS_URL" in container:
        assert httpx.URL(container["EDGEFLEET_REDIS_URL"]).host == "redis"
        container["EDGEFLEET_REDIS_URL"] = REDIS_URL
    container["EDGEFLEET_CELERY_QUEUE"] = queue
    # Nothing of the test session's own settings (tests/conftest.py sets EDGEFLEET_*).
    base = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    return {**base, **container}


def host_argv(argv: list[str]) -> list[str]:
    return [str(installed_script(argv[0])), *argv[1:]]


@pytest.fixture(scope="module")
def compose_database() -> Iterator[str]:
    """A fresh, empty database, as the postgres container starts with."""
    name = f"edgefleet_compose_{uuid.uuid4().hex[:10]}"
    create_database(name)  # pytest.fail when PostgreSQL is not there
    try:
        yield f"{PG_ROOT}/{name}"
    finally:
        drop_database(name)


def run_migrate(services: dict[str, Any], root: Path, database_url: str, queue: str) -> str:
    service = services["migrate"]
    proc = subprocess.run(
        host_argv(compose.service_command(service)),
        env=host_environment(service, root, database_url, queue),
        cwd=root,  # like the container: no .env file, no source tree around
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@dataclass(frozen=True)
class Stack:
    database_url: str
    root: Path
    """The containers' stand-in filesystem: cwd, and a directory per named volume."""
    queue: str

    def env(self, service: dict[str, Any]) -> dict[str, str]:
        return host_environment(service, self.root, self.database_url, self.queue)


@pytest.fixture(scope="module")
def migrated(
    services: dict[str, Any],
    compose_database: str,
    celery_queue: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Stack:
    """What `docker compose up` does first: the one-shot migrate service."""
    stack = Stack(compose_database, tmp_path_factory.mktemp("compose"), celery_queue)
    run_migrate(services, stack.root, stack.database_url, stack.queue)
    return stack


def test_migrate_reaches_head_and_is_idempotent(services: dict[str, Any], migrated: Stack) -> None:
    # Compose runs it again on every `up`: a second run is a no-op.
    output = run_migrate(services, migrated.root, migrated.database_url, migrated.queue)
    head = head_revision()
    assert head is not None
    assert f"database at revision {head}" in " ".join(output.split())
    engine = create_engine(migrated.database_url)
    try:
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT version_num FROM alembic_version")) == head
    finally:
        engine.dispose()


class Process:
    """A service's command as a child process in its own process group."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 30) -> int:
        if self.running():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                pytest.fail(
                    f"{self.proc.args!r} ignored SIGTERM for {timeout_s} s:\n{self.output()}"
                )
        return self.proc.returncode


def keeps_connection_open(port: int, idle_s: float) -> bool:
    """Whether a second request, ``idle_s`` after the first, goes over the first one's
    connection (HTTP/1.1 keep-alive) instead of finding it closed by the server."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/healthz")
        first = conn.getresponse()
        first.read()
        assert first.status == 200
        sock = conn.sock
        assert sock is not None, "the server closed the connection after one request"
        time.sleep(idle_s)
        try:
            conn.request("GET", "/healthz")
            second = conn.getresponse()
            second.read()
        except (ConnectionError, http.client.HTTPException):
            return False
        return second.status == 200 and conn.sock is sock
    finally:
        conn.close()


def test_api_answers_health_and_readiness(
    services: dict[str, Any], migrated: Stack, redis_available: None
) -> None:
    service = services["api"]
    argv = compose.service_command(service)
    port = free_port()
    # The container binds 0.0.0.0 on its own network namespace; here, loopback only.
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv[argv.index("--port") + 1] = str(port)
    root = migrated.root
    server = Process(host_argv(argv), migrated.env(service), root, root / "api.log")
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        health = None
        while health is None:
            assert server.running(), f"the server exited:\n{server.output()}"
            assert time.monotonic() < deadline, f"no answer in 60 s:\n{server.output()}"
            try:
                health = httpx.get(f"{base}/healthz", timeout=5)
            except httpx.TransportError:
                time.sleep(0.2)
        assert health.status_code == 200, health.text
        assert health.json()["checks"]["database"]["ok"] is True
        assert health.json()["checks"]["redis"]["ok"] is True
        assert "latency_ms" in health.json()["checks"]["redis"]  # the broker, not embedded
        ready = httpx.get(f"{base}/readyz", timeout=5)
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["schema"]["current"] == head_revision()
        # /metrics wants a viewer token unless EDGEFLEET_METRICS_PUBLIC says otherwise;
        # an operator makes one as `docker compose run api edgefleet tokens create` would.
        assert httpx.get(f"{base}/metrics", timeout=5).status_code == 401
        made = subprocess.run(
            [*host_argv(["edgefleet", "tokens", "create", "--name", "prom", "--role", "viewer"])],
            env=migrated.env(service),
            cwd=root,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip().splitlines()[-1]
        metrics = httpx.get(
            f"{base}/metrics", timeout=5, headers={"Authorization": f"Bearer {token}"}
        )
        assert metrics.status_code == 200, metrics.text
        # An agent's connection survives the wait between two heartbeats: idle for
        # longer than uvicorn's default keep-alive, it is still open.
        assert keeps_connection_open(port, UVICORN_KEEPALIVE_S + 1.0)
    finally:
        code = server.stop()
    # A graceful stop: uvicorn finishes, then re-raises the SIGTERM it handled.
    assert code in (0, -signal.SIGTERM), server.output()
    assert "Application shutdown complete." in server.output()


def test_worker_gets_ready(
    services: dict[str, Any], migrated: Stack, redis_available: None
) -> None:
    service = services["worker"]
    env = migrated.env(service)
    argv = host_argv(compose.service_command(service))
    worker = Process(argv, env, migrated.root, migrated.root / "worker.log")
    try:
        deadline = time.monotonic() + 90
        while "ready." not in worker.output():
            assert worker.running(), f"the worker exited:\n{worker.output()}"
            assert time.monotonic() < deadline, f"not ready in 90 s:\n{worker.output()}"
            time.sleep(0.2)
        log = worker.output()
        assert env["EDGEFLEET_CELERY_QUEUE"] in log  # consuming the configured queue
        # Connected to the broker it was given (Celery masks the password: redis://:**@...).
        assert re.search(rf"Connected to redis://\S*{re.escape(httpx.URL(REDIS_URL).host)}", log)
    finally:
        code = worker.stop(60)
    assert code == 0, worker.output()
