"""Where the commands write: stdout and stderr consoles, and ``-o table|json|yaml``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
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


# Progress goes to stderr and only to a terminal: a pipe, a log or `-o json` gets the
# result alone, with no bar drawn into it.


@contextmanager
def upload_progress(path: Path) -> Iterator[Callable[[int], None] | None]:
    """A transfer bar over the upload of ``path`` (told each chunk sent), or None."""
    if not err_console.is_terminal:
        yield None
        return
    with Progress(
        TextColumn("uploading {task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task(path.name, total=path.stat().st_size)
        yield lambda n: bar.advance(task, n)


@contextmanager
def waiting(what: str) -> Iterator[Callable[[str], None]]:
    """A spinner with the job's status while the command waits for it: the returned
    function takes each status seen."""
    if not err_console.is_terminal:
        yield lambda status: None
        return
    with err_console.status(what) as spinner:
        yield lambda status: spinner.update(f"{what}: {status}")
