"""How a command fails: the message on stderr, exit code 1."""

from __future__ import annotations

import typer
from rich.text import Text

from controller.cli.client import ApiError
from controller.cli.output import err_console


def fail(exc: ApiError) -> typer.Exit:
    """The error rendering of every client command; a detail object with a ``message``
    (409s about owners) is shown as that message."""
    if isinstance(exc.detail, dict) and isinstance(exc.detail.get("message"), str):
        exc = ApiError(exc.status, exc.error, exc.detail["message"])
    err_console.print(f"[red]error:[/red] {exc.render()}", highlight=False)
    return typer.Exit(code=1)


def client_error(message: str) -> typer.Exit:
    """A problem found before anything is sent (the message is not rich markup)."""
    err_console.print(Text.assemble(("error:", "red"), " ", message))
    return typer.Exit(code=1)
