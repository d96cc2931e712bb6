from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect

from controller.db import migrate
from controller.db.base import Base
from controller.settings import Settings


def test_models_and_migrations_agree(engine: Engine) -> None:
    """The test database was built by ``alembic upgrade head``: autogenerate against it
    must find nothing to do."""
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == []


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_and_downgrade_on_empty_postgres(scratch_database: str, settings: Settings) -> None:
    scratch = settings.model_copy(update={"database_url": scratch_database})
    migrate.upgrade(scratch)
    expected = {t.name for t in Base.metadata.sorted_tables}
    assert expected <= _tables(scratch_database)
    assert migrate.current_revision(scratch) == migrate.head_revision()
    migrate.downgrade(scratch, "base")
    assert _tables(scratch_database) <= {"alembic_version"}
    migrate.upgrade(scratch)  # and back up again: downgrades leave nothing behind
    assert expected <= _tables(scratch_database)


def test_sqlite_embedded_schema(tmp_path: Path, settings: Settings) -> None:
    url = f"sqlite:///{tmp_path}/edgefleet.db"
    local = settings.model_copy(update={"database_url": url})
    migrate.upgrade(local)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
    finally:
        engine.dispose()
    migrate.downgrade(local, "base")
    assert _tables(url) <= {"alembic_version"}
