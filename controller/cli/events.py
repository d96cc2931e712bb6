"""``edgefleet events KIND/NAME [--watch]``: the audit log of one object, newest last, as
``kubectl events --for`` shows it; ``--watch`` then follows it as ``kubectl get -w`` does."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

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


def _rows(found: list[dict[str, Any]], *, header: bool) -> None:
    table = plain_table(
        ("AGE", "REASON", "BY", "MESSAGE"),
        ((age(e["time"]), e["reason"], e.get("actor") or "", e["message"]) for e in found),
    )
    table.show_header = header
    console.print(table)


def _follow(
    client: ApiClient, kind: str, name: str, after: int, output: Output, interval: float
) -> None:
    """Ask for the events past the last one shown, every ``interval`` seconds, until
    Ctrl-C: each new one a table row, or one JSON object (``-o json``) or YAML document
    per event."""
    try:
        while True:
            time.sleep(interval)
            new = client.get("/v1/events", kind=kind, name=name, after=after, limit=1000)
            if not new:
                continue
            after = new[-1]["id"]
            if output is Output.table:
                _rows(new, header=False)
            for e in new if output is not Output.table else ():
                if output is Output.json:
                    console.print(json.dumps(e), markup=False, highlight=False, soft_wrap=True)
                else:
                    console.print("---", markup=False)
                    emit(e, Output.yaml)
    except KeyboardInterrupt:
        return


def events(
    target: Annotated[str, typer.Argument(help="KIND/NAME: cluster/berlin, node/berlin/n0, ...")],
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="Last N events.")] = 50,
    watch: Annotated[
        bool,
        typer.Option("--watch", "-w", help="Then follow new events until Ctrl-C."),
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.5, max=60, help="Seconds between polls of --watch.")
    ] = 2.0,
    output: OutputOpt = Output.table,
    api_url: ApiUrl = None,
) -> None:
    """Show the events of a cluster, node, model version or rollout, oldest first."""
    kind, name = parse_target(target)
    client = ApiClient(api_url)
    try:
        found = client.get("/v1/events", kind=kind, name=name, limit=limit)
        found = list(reversed(found))  # the API lists the newest first
        if output is not Output.table:
            emit(found, output)
        elif found:
            _rows(found, header=True)
        else:
            console.print(f"No events for {kind} {name}.")
        if watch:
            _follow(client, kind, name, found[-1]["id"] if found else 0, output, interval)
    except ApiError as exc:
        raise fail(exc) from exc
    finally:
        client.close()
