"""``edgefleet diff -f FILE``: what ``apply`` would change, from the server's own dry run
(the same checks and the same comparison as the apply), as ``kubectl diff`` shows it:
nothing for what is unchanged, exit code 1 when anything would change, 2 when the apply
would be refused."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.text import Text

from controller.cli.apply import apply_files
from controller.cli.options import ApiUrl, OutputOpt
from controller.cli.output import Output, console, emit


def _value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"), default=str)


def diff_lines(result: dict[str, Any]) -> list[Text]:
    """One object's difference: a head, then a - and a + line per changed field."""
    kind, name, action = result["kind"], result["name"], result["action"]
    lines = [Text(f"{kind.lower()}.edgefleet.io/{name} ({action})", style="bold")]
    if action == "created":
        lines.append(Text("+ (a new object)", style="green"))
    for change in result.get("changes", []):
        if change.get("old") is not None:
            lines.append(Text(f"- {change['path']}: {_value(change['old'])}", style="red"))
        if change.get("new") is not None:
            lines.append(Text(f"+ {change['path']}: {_value(change['new'])}", style="green"))
    return lines


def diff(
    filename: Annotated[
        list[str],
        typer.Option("--filename", "-f", help="Manifest FILE, DIR (its *.yaml/*.yml), or -."),
    ],
    output: OutputOpt = Output.table,
    api_url: ApiUrl = None,
) -> None:
    """Show what `edgefleet apply -f` would change; change nothing.

    The server's own dry run compares. Exit code 0: no difference; 1: differences; 2: an
    error (what apply would refuse), as `kubectl diff`."""
    reply = apply_files(filename, api_url, dry_run=True, refused_code=2)
    changed = [r for r in reply["results"] if r["action"] != "unchanged"]
    if output is not Output.table:
        emit(changed, output)
    else:
        for result in changed:
            for line in diff_lines(result):
                console.print(line, highlight=False)
    if changed:
        raise typer.Exit(code=1)
