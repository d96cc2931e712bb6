"""Options that the client commands share."""

from __future__ import annotations

from typing import Annotated

import typer

from controller.cli.output import Output

ApiUrl = Annotated[
    str | None,
    typer.Option("--api-url", envvar="EDGEFLEET_API_URL", help="Controller URL."),
]
OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="Output format.")]
EventsOpt = Annotated[int, typer.Option("--events", min=1, max=1000, help="Last N events.")]
