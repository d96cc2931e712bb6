"""Engine and sessions. Services only flush; whoever opened the session (the request
dependency, a task's ``session_scope``) commits or rolls back.

Work that must happen only once a transaction is durable (sending a Celery task) is
registered with :func:`after_commit` and dropped if the transaction rolls back."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from controller.db import notify
from controller.settings import Settings, get_settings

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


def get_engine(settings: Settings | None = None) -> Engine:
    settings = settings or get_settings()
    with _lock:
        engine = _engines.get(settings.database_url)
        if engine is None:
            engine = make_engine(settings.database_url, pool_size=settings.database_pool_size)
            _engines[settings.database_url] = engine
        return engine


def dispose_engines() -> None:
    notify.stop_listeners()
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _factories.clear()


def forget_inherited_connections() -> None:
    """In a forked child: drop the pooled connections the parent opened without closing
    them (they are the parent's; a child using one would interleave its queries with the
    parent's on one socket). The child opens its own on first use."""
    with _lock:
        for engine in _engines.values():
            engine.dispose(close=False)


_factory_override: sessionmaker[Session] | None = None
# One sessionmaker per configured engine: each sessionmaker makes a Session subclass of
# its own, and the first session of a new class builds that class's event dispatch (the
# after_commit hooks below): about 1 ms of CPU, per request were a maker made each time.
_factories: dict[Engine, sessionmaker[Session]] = {}


def session_factory(engine: Engine | None = None) -> sessionmaker[Session]:
    if engine is not None:
        return sessionmaker(bind=engine, expire_on_commit=False)
    if _factory_override is not None:
        return _factory_override
    engine = get_engine()
    factory = _factories.get(engine)
    if factory is None:
        with _lock:
            factory = _factories.setdefault(
                engine, sessionmaker(bind=engine, expire_on_commit=False)
            )
    return factory


@contextmanager
def override_session_factory(factory: sessionmaker[Session]) -> Iterator[None]:
    """Route every session this process opens through ``factory`` (tests bind it to
    one connection whose outer transaction is rolled back afterwards)."""
    global _factory_override
    previous, _factory_override = _factory_override, factory
    try:
        yield
    finally:
        _factory_override = previous


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """A unit of work for tasks and commands: commit on success, roll back on error."""
    session = session_factory(engine)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# SQLSTATE classes of a database that went away rather than a statement that was wrong:
# 08 connection exception, 57P operator intervention (admin or crash shutdown, "the
# database system is starting up"). A client-side connection failure has no SQLSTATE.
_UNAVAILABLE_SQLSTATES = ("08", "57P")
_SQLITE_BUSY = frozenset({"SQLITE_BUSY", "SQLITE_LOCKED"})


def database_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` says the database could not be reached, went away mid-statement
    or had no free connection: a retry later can succeed (the API answers 503, a task
    retries). False for errors a retry would repeat (a constraint, a bad statement)."""
    if isinstance(exc, sa_exc.TimeoutError):  # the pool had no connection to hand out
        return True
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    if not isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
        return False
    if isinstance(exc.orig, sqlite3.Error):
        return getattr(exc.orig, "sqlite_errorname", None) in _SQLITE_BUSY
    sqlstate = getattr(exc.orig, "sqlstate", None)
    return sqlstate is None or str(sqlstate).startswith(_UNAVAILABLE_SQLSTATES)


# SQLSTATEs of a transaction Postgres aborted to resolve a conflict with another one:
# 40001 serialization failure, 40P01 deadlock detected.
_CONFLICT_SQLSTATES = frozenset({"40001", "40P01"})


def lock_conflict(exc: BaseException) -> bool:
    """True when ``exc`` is Postgres aborting the transaction over a deadlock or a
    serialization failure: the same transaction run again can succeed."""
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    return str(getattr(exc.orig, "sqlstate", None)) in _CONFLICT_SQLSTATES
