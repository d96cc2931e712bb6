"""Test fixtures: real Postgres (one database per run, migrated once, a transaction
rolled back per test) and real Redis. A missing service fails the run, never skips it.

The environment is set before any controller module is imported, so every process the
tests start (the Celery worker, the server) reads the same settings."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

_RUN = uuid.uuid4().hex[:10]
PG_ROOT = os.environ.get("EDGEFLEET_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("EDGEFLEET_TEST_REDIS", "redis://127.0.0.1:6379/0")
TEST_DB = f"edgefleet_test_{_RUN}"
ARTIFACTS = Path(os.environ.get("TMPDIR", "/tmp")) / f"edgefleet-test-{_RUN}" / "artifacts"

# API tokens of each role, seeded (committed) into the test database once per run.
TOKENS = {role: f"eft_test-{role}-{_RUN}" for role in ("viewer", "operator", "admin")}
ADMIN_TOKEN = TOKENS["admin"]


def bearer(role: str) -> dict[str, str]:
    """The Authorization header of the run's token of ``role``."""
    return {"Authorization": f"Bearer {TOKENS[role]}"}


# The CLI's rich console takes its width from COLUMNS when it is created, at import: the
# CLI tests set COLUMNS per invocation instead (an xdist worker starts with COLUMNS=80).
os.environ.pop("COLUMNS", None)
os.environ.update(
    {
        # The CLI (and every process the tests start) calls the API as the run's admin,
        # and never reads the developer's own CLI config file.
        "EDGEFLEET_TOKEN": ADMIN_TOKEN,
        "EDGEFLEET_CONFIG": str(
            Path(os.environ.get("TMPDIR", "/tmp")) / f"edgefleet-test-{_RUN}" / "cli.yaml"
        ),
        "EDGEFLEET_ENVIRONMENT": "test",
        "EDGEFLEET_SECRET_KEY": f"test-secret-{_RUN}",
        "EDGEFLEET_DATABASE_URL": f"{PG_ROOT}/{TEST_DB}",
        "EDGEFLEET_REDIS_URL": REDIS_URL,
        "EDGEFLEET_TASKS_EAGER": "true",
        "EDGEFLEET_CELERY_QUEUE": f"edgefleet-test-{_RUN}",
        # Simulated clusters of this run only: parallel runs on one Redis stay apart.
        "EDGEFLEET_SIM_STATE_PREFIX": f"edgefleet-test-{_RUN}:sim",
        "EDGEFLEET_ARTIFACT_DIR": str(ARTIFACTS),
        "EDGEFLEET_BENCHMARK_RUNS": "20",
        "EDGEFLEET_BENCHMARK_WARMUP_RUNS": "2",
        "EDGEFLEET_COMPARISON_RUNS": "10",
    }
)

from fastapi.testclient import TestClient  # noqa: E402
from sqlalchemy import Connection, Engine, create_engine, text  # noqa: E402
from sqlalchemy.exc import DBAPIError  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

from controller.api.app import create_app  # noqa: E402
from controller.db import migrate  # noqa: E402
from controller.db.session import (  # noqa: E402
    dispose_engines,
    get_engine,
    lock_conflict,
    override_session_factory,
)
from controller.settings import Settings, get_settings  # noqa: E402
from controller.tasks.celery_app import configure  # noqa: E402

# scripts/test runs pytest on several xdist workers (--dist loadgroup). Each worker imports
# this module, so each has its own run id above: its own database, Celery queue, simulated
# clusters' Redis keys and artifact directory. What exists once per machine is not per
# worker: the tests of each group below, found by the fixtures they use, run on one worker,
# one after another. The real node is one kubelet and containerd; the stand-in control
# planes would otherwise start again on every worker.
XDIST_GROUPS = {
    "real-node": {"real_node", "node_control_plane", "shipped_images"},
    "kube": {"control_plane", "second_control_plane"},
}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        uses = set(getattr(item, "fixturenames", ()))
        group = next((g for g, fixtures in XDIST_GROUPS.items() if uses & fixtures), None)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(trylast=True)  # after xdist has put each group into its tests' ids
def pytest_collection_finish(session: pytest.Session) -> None:
    """On a loadgroup worker every grouped test's id ends in ``@group``: that suffix is
    all xdist's scheduler sees. Without it two workers would start the one real node."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    lost = [
        item.nodeid
        for item in session.items
        if item.get_closest_marker("xdist_group") and "@" not in item.nodeid
    ]
    if lost:
        raise pytest.UsageError(
            f"pytest-xdist lost the group of {len(lost)} tests ({lost[0]}): this pytest "
            "and pytest-xdist disagree on where a test's id is kept (see pyproject.toml)"
        )


# A test marked `alone` (one that compares latencies it measures) runs while no other
# test of the run does: every test holds a shared lock on TURNS/tests, an `alone` test
# an exclusive one. Whoever waits for a lock holds TURNS/gate meanwhile, so the tests
# that keep starting on the other workers cannot starve a waiting `alone` test. The
# first process of the run (xdist's controller) makes the directory; its workers inherit
# the variable.
TURNS_VAR = "PYTEST_EDGEFLEET_TURNS"  # not EDGEFLEET_*: no setting of the controller
_turns_owned = pytest.StashKey[bool]()


def pytest_configure(config: pytest.Config) -> None:
    if TURNS_VAR not in os.environ:
        os.environ[TURNS_VAR] = tempfile.mkdtemp(prefix="edgefleet-test-turns-")
        config.stash[_turns_owned] = True


def pytest_unconfigure(config: pytest.Config) -> None:
    if config.stash.get(_turns_owned, False):
        shutil.rmtree(os.environ.pop(TURNS_VAR), ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    turns = Path(os.environ[TURNS_VAR])
    alone = item.get_closest_marker("alone") is not None
    with contextlib.ExitStack() as stack:
        gate = stack.enter_context((turns / "gate").open("a"))
        tests = stack.enter_context((turns / "tests").open("a"))
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(tests, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        fcntl.flock(gate, fcntl.LOCK_UN)
        return (yield)


def _admin_engine() -> Engine:
    return create_engine(f"{PG_ROOT}/postgres", isolation_level="AUTOCOMMIT")


def create_database(name: str) -> None:
    engine = _admin_engine()
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        pytest.fail(
            f"PostgreSQL is required at {PG_ROOT} (set EDGEFLEET_TEST_POSTGRES): {exc}",
            pytrace=False,
        )
    finally:
        engine.dispose()


def drop_database(name: str) -> None:
    engine = _admin_engine()
    try:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def settings() -> Iterator[Settings]:
    get_settings.cache_clear()
    settings = get_settings()
    create_database(TEST_DB)
    migrate.upgrade(settings)
    _seed_tokens(get_engine(settings))
    configure(settings)
    yield settings
    dispose_engines()
    drop_database(TEST_DB)


def _seed_tokens(engine: Engine) -> None:
    from controller.auth.service import hash_token
    from controller.db.models import ApiToken

    with sessionmaker(bind=engine)() as session, session.begin():
        for role, token in TOKENS.items():
            session.add(ApiToken(name=f"test-{role}", role=role, token_hash=hash_token(token)))


@pytest.fixture(scope="session")
def engine(settings: Settings) -> Engine:
    return get_engine(settings)


@pytest.fixture(scope="session")
def redis_available(settings: Settings) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except Exception as exc:
        pytest.fail(
            f"Redis is required at {REDIS_URL} (EDGEFLEET_TEST_REDIS): {exc}", pytrace=False
        )
    finally:
        client.close()


@pytest.fixture
def connection(engine: Engine) -> Iterator[Connection]:
    """One connection whose outer transaction is rolled back after the test. Every
    session opened meanwhile (request, eager task) joins it through savepoints."""
    with engine.connect() as conn:
        outer = conn.begin()
        factory = sessionmaker(
            bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False
        )
        with override_session_factory(factory):
            yield conn
        outer.rollback()


@pytest.fixture
def session(connection: Connection) -> Iterator[Session]:
    from controller.db.session import session_factory

    with session_factory()() as s:
        yield s


@pytest.fixture
def client(
    settings: Settings, connection: Connection, redis_available: None
) -> Iterator[TestClient]:
    """The API as the run's admin (``bearer(role)`` per request for another role,
    ``headers={"Authorization": ""}`` for none)."""
    with TestClient(
        create_app(settings), raise_server_exceptions=False, headers=bearer("admin")
    ) as c:
        yield c


@pytest.fixture
def artifact_files(settings: Settings) -> set[Path]:
    """The artifact files present before the test (compare after it)."""
    root = settings.artifact_dir
    return set(root.rglob("*")) if root.exists() else set()


@pytest.fixture
def join_token(settings: Settings) -> Iterator[str]:
    """Agent enrollment on, for this test only (the settings object is shared)."""
    from pydantic import SecretStr

    from tests.agents.fakes import JOIN_TOKEN

    saved = settings.agent_join_token
    settings.agent_join_token = SecretStr(JOIN_TOKEN)
    try:
        yield JOIN_TOKEN
    finally:
        settings.agent_join_token = saved


@pytest.fixture
def scratch_database(settings: Settings) -> Iterator[str]:
    """An empty Postgres database of its own, dropped afterwards."""
    name = f"edgefleet_scratch_{uuid.uuid4().hex[:10]}"
    create_database(name)
    try:
        yield f"{PG_ROOT}/{name}"
    finally:
        dispose_engines()
        drop_database(name)


@pytest.fixture
def committed(engine: Engine) -> Iterator[None]:
    """For tests whose data must really commit (another process reads it): every table
    is emptied afterwards."""
    yield
    from controller.db.base import Base

    # The run's API tokens stay: they were committed once, before any test.
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables if t.name != "api_tokens")
    # A worker of the test (or of its module) may still be in a transaction of its last
    # task, holding one table while wanting another that TRUNCATE, locking table after
    # table, already holds: Postgres aborts one of the two. When it picks the TRUNCATE,
    # the worker's transaction has gone on by then, and the TRUNCATE run again succeeds.
    for attempt in range(5):
        try:
            with engine.begin() as conn:
                conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
            return
        except DBAPIError as exc:
            if attempt == 4 or not lock_conflict(exc):
                raise


@pytest.fixture
def committed_client(
    settings: Settings, committed: None, redis_available: None
) -> Iterator[TestClient]:
    """The API (as the run's admin, tasks eager) on real, separately committed
    transactions: each session has a connection of its own, so row locks, SKIP LOCKED
    and lock order really conflict, across threads and processes. Tables are emptied
    afterwards (``committed``)."""
    with TestClient(
        create_app(settings), raise_server_exceptions=False, headers=bearer("admin")
    ) as c:
        yield c


@pytest.fixture
def sim_fleet(settings: Settings, redis_available: None) -> Iterator[None]:
    """Simulated clusters keep their workloads in Redis: start and end each test with
    none (the database side is rolled back by the transaction fixtures)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)

    def wipe() -> None:
        keys = list(client.scan_iter(f"{settings.sim_state_prefix}:*"))
        if keys:
            client.delete(*keys)

    wipe()
    yield
    wipe()
    client.close()
