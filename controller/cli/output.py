from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


class Output(StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


def emit(
    data: Any,
    output: Output,
    *,
    table: Callable[[Any], Table | str] | None = None,
) -> None:
    if output is Output.json:
        console.print_json(json.dumps(data))
    elif output is Output.yaml:
        console.print(yaml.safe_dump(data, sort_keys=False), end="", markup=False, highlight=False)
    elif table is not None:
        rendered = table(data)
        if isinstance(rendered, str):  # plain text: shapes like [batch, 3] are not markup
            console.print(rendered, markup=False, highlight=False)
        else:
            console.print(rendered)
    else:
        console.print(yaml.safe_dump(data, sort_keys=False), end="", markup=False, highlight=False)


def make_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    t = Table(show_edge=False, box=None, header_style="bold", pad_edge=False)
    for col in columns:
        t.add_column(col)
    for row in rows:
        t.add_row(*("" if v is None else str(v) for v in row))
    return t


def human_bytes(n: int | None) -> str:
    if n is None:
        return ""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
