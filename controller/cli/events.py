"""``edgefleet events KIND/NAME``: the audit log of one object, newest last, as
``kubectl events --for`` shows it."""

from __future__ import annotations

from typing import Annotated

import typer

from controller.cli.client import ApiClient, ApiError
from controller.cli.errors import client_error, fail
from controller.cli.format import age, plain_table
from controller.cli.options import ApiUrl, OutputOpt
from controller.cli.output import Output, console, emit

KINDS = {
    "cluster": "Cluster",
    "node": "Node",
    "modelversion": "ModelVersion",
    "model": "ModelVersion",
    "rollout": "Rollout",
}


def parse_target(target: str) -> tuple[str, str]:
    """``cluster/berlin``, ``node/berlin/berlin-n0``, ``model/detector:1.2.0``,
    ``rollout/detector-1-2`` -> (kind, name) as the API names them."""
    kind, sep, name = target.partition("/")
    if not sep or not name or kind.lower() not in KINDS:
        raise client_error(
            f"{target!r} is not KIND/NAME: KIND is one of cluster, node, model, rollout "
            "(e.g. node/berlin/berlin-n0, model/detector:1.2.0)"
        )
    return KINDS[kind.lower()], name


def events(
    target: Annotated[str, typer.Argument(help="KIND/NAME: cluster/berlin, node/berlin/n0, ...")],
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="Last N events.")] = 50,
    output: OutputOpt = Output.table,
    api_url: ApiUrl = None,
) -> None:
    """Show the events of a cluster, node, model version or rollout, oldest first."""
    kind, name = parse_target(target)
    client = ApiClient(api_url)
    try:
        found = client.get("/v1/events", kind=kind, name=name, limit=limit)
    except ApiError as exc:
        raise fail(exc) from exc
    finally:
        client.close()
    found = list(reversed(found))  # the API lists the newest first
    if output is not Output.table:
        emit(found, output)
        return
    if not found:
        console.print(f"No events for {kind} {name}.")
        return
    console.print(
        plain_table(
            ("AGE", "REASON", "BY", "MESSAGE"),
            ((age(e["time"]), e["reason"], e.get("actor") or "", e["message"]) for e in found),
        )
    )
