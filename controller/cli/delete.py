"""``edgefleet delete KIND/NAME...`` and ``delete -f FILE``: what ``kubectl delete`` does,
for rollouts, model versions, clusters and freeze periods. The server refuses what is
still in use (409, naming it), except a cluster's workloads with ``--cascade``; a prompt
asks first unless ``--yes`` (required when stdin is no terminal)."""

from __future__ import annotations

import sys
from typing import Annotated, Any
from urllib.parse import quote

import typer

from controller.cli.apply import ManifestError, read_manifests
from controller.cli.client import ApiClient, ApiError
from controller.cli.errors import client_error, fail
from controller.cli.options import ApiUrl, OutputOpt
from controller.cli.output import Output, console, emit

KINDS = {
    "rollout": "Rollout",
    "rollouts": "Rollout",
    "model": "ModelVersion",
    "modelversion": "ModelVersion",
    "cluster": "Cluster",
    "clusters": "Cluster",
    "freeze": "FreezePeriod",
    "freezes": "FreezePeriod",
    "freezeperiod": "FreezePeriod",
}
# The kinds named by metadata.name (a ModelVersion is named by spec.model and spec.version).
NAMED = {"Rollout": "rollouts", "Cluster": "clusters", "FreezePeriod": "freezes"}


def _path(kind: str, name: str) -> str:
    if kind in NAMED:
        return f"/v1/{NAMED[kind]}/{quote(name, safe='')}"
    model, _, version = name.partition(":")
    return f"/v1/models/{quote(model, safe='')}/versions/{quote(version, safe='')}"


def parse_target(target: str) -> tuple[str, str]:
    """``rollout/NAME``, ``model/MODEL:VERSION``, ``cluster/NAME``, ``freeze/NAME`` ->
    (kind, name)."""
    kind, sep, name = target.partition("/")
    kind = KINDS.get(kind.lower(), "")
    model, colon, version = name.partition(":")
    whole = bool(model and colon and version)
    if not sep or not kind or not name or (kind == "ModelVersion" and not whole):
        raise client_error(
            f"{target!r} is not KIND/NAME: KIND is rollout, model, cluster or freeze "
            "(e.g. rollout/detector-1-2, model/detector:1.2.0, cluster/berlin, freeze/xmas)"
        )
    return kind, name


def _from_document(doc: Any, index: int) -> tuple[str, str]:
    if isinstance(doc, dict):
        kind, meta, spec = doc.get("kind"), doc.get("metadata"), doc.get("spec")
        if kind in NAMED and isinstance(meta, dict) and meta.get("name"):
            return kind, str(meta["name"])
        named = isinstance(spec, dict) and spec.get("model") and spec.get("version")
        if kind == "ModelVersion" and isinstance(spec, dict) and named:
            return kind, f"{spec['model']}:{spec['version']}"
    raise client_error(
        f"document {index} names no Rollout, Cluster or FreezePeriod (metadata.name) or "
        "ModelVersion (spec.model, spec.version)"
    )


def delete(
    targets: Annotated[
        list[str] | None,
        typer.Argument(
            help="KIND/NAME: rollout/NAME, model/MODEL:VERSION, cluster/NAME, freeze/NAME."
        ),
    ] = None,
    filename: Annotated[
        list[str] | None,
        typer.Option("--filename", "-f", help="Delete what these manifests describe."),
    ] = None,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Do not ask (needed without a terminal).")
    ] = False,
    cascade: Annotated[
        bool,
        typer.Option(
            "--cascade",
            help="Clusters: remove their workloads from their nodes first, then the cluster.",
        ),
    ] = False,
    output: OutputOpt = Output.table,
    api_url: ApiUrl = None,
) -> None:
    """Delete rollouts, model versions and clusters that nothing uses, and freeze periods.

    A rollout once it is over; a model version no rollout and no node uses; a cluster
    whose nodes run nothing (with --cascade: its workloads are removed first, once no
    rollout in progress holds its nodes); a freeze period at any time (the rollouts it held start
    their nodes from their next step on). A manifest's objects are deleted last first: its rollouts
    before the versions they ship, before their clusters."""
    wanted = [parse_target(t) for t in targets or []]
    if filename:
        try:
            docs, _ = read_manifests(filename)
        except (ManifestError, OSError) as exc:
            raise client_error(str(exc)) from exc
        wanted += [_from_document(d, i) for i, d in reversed(list(enumerate(docs)))]
    if not wanted:
        raise client_error("name what to delete: KIND/NAME arguments or -f FILE")
    if not yes:
        if not sys.stdin.isatty():
            raise client_error("not a terminal: add --yes to delete without being asked")
        listed = ", ".join(f"{k.lower()}/{n}" for k, n in wanted)
        typer.confirm(f"Delete {listed}?", abort=True)
    client = ApiClient(api_url)
    done: list[dict[str, Any]] = []
    try:
        for kind, name in wanted:
            params = {"cascade": "true"} if cascade and kind == "Cluster" else None
            done.append(client.request("DELETE", _path(kind, name), params=params))
            if output is Output.table:
                console.print(f"{kind.lower()}.edgefleet.io/{name} deleted", highlight=False)
    except ApiError as exc:
        raise fail(exc) from exc
    finally:
        client.close()
    if output is not Output.table:
        emit(done, output)
