"""database_unavailable: which database errors are an outage (the API answers 503, a
task retries) and which are bugs that a retry would only repeat."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, exc, text

from controller.db.session import database_unavailable
from tests.live import free_port


def wrapped(
    orig: Exception,
    cls: type[exc.DBAPIError] = exc.OperationalError,
    *,
    connection_invalidated: bool = False,
) -> exc.DBAPIError:
    return cls("SELECT 1", {}, orig, connection_invalidated=connection_invalidated)


@pytest.mark.parametrize(
    ("error", "outage"),
    [
        (wrapped(psycopg.OperationalError("connection failed: Connection refused")), True),
        (wrapped(psycopg.errors.AdminShutdown("terminating connection")), True),
        (wrapped(psycopg.errors.CannotConnectNow("the database system is starting up")), True),
        (wrapped(psycopg.errors.ConnectionFailure("connection failure")), True),
        (wrapped(psycopg.InterfaceError("the connection is closed"), exc.InterfaceError), True),
        (exc.TimeoutError("QueuePool limit of size 10 overflow 10 reached"), True),
        (wrapped(psycopg.errors.QueryCanceled("canceling statement due to timeout")), False),
        (wrapped(psycopg.errors.UniqueViolation("duplicate key"), exc.IntegrityError), False),
        (
            wrapped(
                psycopg.errors.UniqueViolation("duplicate key"),
                exc.IntegrityError,
                connection_invalidated=True,
            ),
            True,
        ),
        (exc.InvalidRequestError("This session is in 'committed' state"), False),
        (ValueError("not a database error"), False),
    ],
    ids=lambda v: (
        type(getattr(v, "orig", None) or v).__name__
        if isinstance(v, Exception)
        else ("outage" if v else "bug")
    ),
)
def test_outages_and_bugs(error: Exception, outage: bool) -> None:
    assert database_unavailable(error) is outage


def test_a_refused_connection_is_an_outage() -> None:
    engine = create_engine(f"postgresql+psycopg://edgefleet:pw@127.0.0.1:{free_port()}/none")
    with pytest.raises(exc.OperationalError) as caught, engine.connect():
        pass
    assert database_unavailable(caught.value)


def test_a_wrong_statement_is_not(engine: Engine) -> None:
    with pytest.raises(exc.ProgrammingError) as caught, engine.connect() as conn:
        conn.execute(text("SELECT * FROM no_such_table"))
    assert not database_unavailable(caught.value)
    sqlite = create_engine("sqlite://")
    with pytest.raises(exc.OperationalError) as caught_sqlite, sqlite.connect() as conn:
        conn.execute(text("SELECT * FROM no_such_table"))  # SQLite's OperationalError
    assert not database_unavailable(caught_sqlite.value)
