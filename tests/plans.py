"""What a repository function's statements read, from Postgres's own plans: every
statement it runs is captured and run again under ``EXPLAIN (ANALYZE, FORMAT JSON)`` in
the same transaction, and the rows each plan node read (returned, times its loops, plus
those its filter removed) are added up per table. Row counts, not times: a test can
hold a read path to the rows of its page, whatever the machine's speed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session


@dataclass
class Statement:
    sql: str
    params: Any
    plan: dict[str, Any] = field(default_factory=dict)

    def rows_read(self, table: str) -> int:
        """Rows the plan read from ``table``: each scan's rows returned over all its
        loops plus the rows its filter (or join filter) removed."""
        return _rows(self.plan, table)

    def indexes(self) -> set[str]:
        return _indexes(self.plan)


def _walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _walk(child)


def _rows(plan: dict[str, Any], table: str) -> int:
    total = 0
    for node in _walk(plan):
        if node.get("Relation Name") == table:
            loops = int(node.get("Actual Loops", 1))
            returned = float(node.get("Actual Rows", 0)) * loops
            removed = float(node.get("Rows Removed by Filter", 0)) + float(
                node.get("Rows Removed by Index Recheck", 0)
            )
            total += round(returned + removed)
    return total


def _indexes(plan: dict[str, Any]) -> set[str]:
    return {str(n["Index Name"]) for n in _walk(plan) if "Index Name" in n}


@contextmanager
def captured(session: Session) -> Iterator[list[Statement]]:
    """The SELECT statements run on the session's connection meanwhile; on exit, each
    is explained (ANALYZE: run again, read only) in the same transaction."""
    conn: Connection = session.connection()
    seen: list[Statement] = []

    def before(_c: Any, _cursor: Any, sql: str, params: Any, _ctx: Any, _many: bool) -> None:
        if sql.lstrip().upper().startswith("SELECT"):
            seen.append(Statement(sql, params))

    event.listen(conn, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(conn, "before_cursor_execute", before)
    for st in seen:
        raw = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + st.sql, st.params)
        doc = raw.scalar_one()
        st.plan = (json.loads(doc) if isinstance(doc, str) else doc)[0]["Plan"]
