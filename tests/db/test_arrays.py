"""any_of: a set of values as one bind parameter, on Postgres and on SQLite, past the
65,535 parameters a Postgres statement can carry (32,766 on SQLite)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    insert,
    select,
)

from controller.db.arrays import any_of

N = 70_000  # more values than either backend takes as separate parameters

_META = MetaData()
_ROWS = Table(
    "any_of_rows",
    _META,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    Column("name", String(32)),
)


@pytest.fixture(params=["postgresql", "sqlite"])
def db(request: pytest.FixtureRequest, tmp_path: Path, scratch_database: str) -> Iterator[Engine]:
    url = scratch_database if request.param == "postgresql" else f"sqlite:///{tmp_path}/a.db"
    engine = create_engine(url)
    _META.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(_ROWS), [{"id": i, "name": f"n{i}"} for i in range(1, 21)])
    yield engine
    engine.dispose()


def test_more_values_than_bind_parameters(db: Engine) -> None:
    with db.connect() as conn:
        ids = conn.scalars(select(_ROWS.c.id).where(any_of(_ROWS.c.id, range(N, 5, -1)))).all()
        assert sorted(ids) == list(range(6, 21))
        names = [f"n{i}" for i in range(6, N + 6)]
        got = conn.scalars(select(_ROWS.c.id).where(any_of(_ROWS.c.name, names))).all()
        assert sorted(got) == list(range(6, 21))


def test_empty_and_single_values(db: Engine) -> None:
    with db.connect() as conn:
        assert conn.scalars(select(_ROWS.c.id).where(any_of(_ROWS.c.id, []))).all() == []
        assert conn.scalars(select(_ROWS.c.id).where(any_of(_ROWS.c.id, [7]))).all() == [7]


def test_a_statement_built_once_takes_each_execution_s_values(db: Engine) -> None:
    """Named parameters (any_of(col, key=...)) and the compiled-statement cache: each
    execution sees its own values, never those the statement was first compiled with."""
    stmt = select(_ROWS.c.id).where(any_of(_ROWS.c.id, key="ids")).order_by(_ROWS.c.id)
    with db.connect() as conn:
        assert conn.scalars(stmt, {"ids": [3, 1, 2]}).all() == [1, 2, 3]
        assert conn.scalars(stmt, {"ids": [9]}).all() == [9]
        for value in (4, 5):  # the same statement shape with inline values, cached
            assert conn.scalars(select(_ROWS.c.id).where(any_of(_ROWS.c.id, [value]))).all() == [
                value
            ]


def test_the_sql_has_one_parameter_whatever_the_count(db: Engine) -> None:
    few = select(_ROWS.c.id).where(any_of(_ROWS.c.id, [1, 2]))
    many = select(_ROWS.c.id).where(any_of(_ROWS.c.id, range(N)))
    assert str(few.compile(db)) == str(many.compile(db))
    assert len(many.compile(db).params) == 1
