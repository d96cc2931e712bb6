"""Where the commands write: stdout and stderr consoles, and ``-o table|json|yaml``."""

from __future__ import annotations

import json
from collections.abc import Callable
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
