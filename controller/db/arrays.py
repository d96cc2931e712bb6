"""A set of values bound as ONE parameter, on every backend.

``column.in_(ids)`` binds one parameter per value, and Postgres refuses a statement with
more than 65,535 of them (SQLite more than 32,766): a rollout over 100,000 nodes cannot
be planned that way. :func:`any_of` binds the whole collection as a single parameter:
on Postgres an array (``col = ANY(:p::BIGINT[])``), elsewhere a JSON document
read back by ``json_each`` (``col IN (SELECT value FROM json_each(:p))``). The statement's
text no longer depends on how many values there are, so it is compiled and prepared once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from sqlalchemy import ColumnElement, Dialect, String, any_, func, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import QueryableAttribute
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.type_api import TypeEngine
from sqlalchemy.sql.visitors import InternalTraversal
from sqlalchemy.types import Boolean, TypeDecorator


class ValueList(TypeDecorator[list[Any]]):
    """A list bound as one parameter: a Postgres array of ``item``, elsewhere JSON."""

    impl = String
    cache_ok = True

    def __init__(self, item: TypeEngine[Any]) -> None:
        super().__init__()
        self.item = item

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(ARRAY(self.item))
        return dialect.type_descriptor(String())

    def process_bind_param(self, value: list[Any] | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        values = list(value)
        return values if dialect.name == "postgresql" else json.dumps(values)


class AnyOf(ColumnElement[bool]):
    """``column`` equals one of the values bound to ``param`` (see the module)."""

    __visit_name__ = "any_of"
    inherit_cache = True
    _traverse_internals = [
        ("column", InternalTraversal.dp_clauseelement),
        ("param", InternalTraversal.dp_clauseelement),
    ]
    type = Boolean()
    _is_implicitly_boolean = True  # a predicate: never rendered as "(...) = 1"

    def __init__(self, column: ColumnElement[Any], param: BindParameter[list[Any]]) -> None:
        self.column = column
        self.param = param


def any_of(
    column: ColumnElement[Any] | QueryableAttribute[Any],
    values: Iterable[Any] | None = None,
    *,
    key: str | None = None,
) -> AnyOf:
    """``column IN values`` with one bind parameter whatever the number of values. With
    ``key`` instead of values, the parameter is named and its list given at execution
    (``conn.execute(stmt, {key: [...]})``), for statements built once."""
    clause = column.__clause_element__()
    item = clause.type
    if values is not None:
        param = BindParameter(key, list(values), type_=ValueList(item), unique=key is None)
    else:
        if key is None:
            raise TypeError("any_of needs values or a parameter key")
        param = BindParameter(key, type_=ValueList(item))
    return AnyOf(clause, param)


@compiles(AnyOf, "postgresql")
def _any_of_postgresql(element: AnyOf, compiler: SQLCompiler, **kw: Any) -> str:
    # psycopg's dialect renders the array type's cast on the parameter itself.
    return compiler.process(element.column == any_(element.param), **kw)


@compiles(AnyOf)
def _any_of_json(element: AnyOf, compiler: SQLCompiler, **kw: Any) -> str:
    values = func.json_each(element.param).table_valued("value")
    return compiler.process(element.column.in_(select(values.c.value)), **kw)
