"""``edgefleet get``: list rollouts, nodes, clusters and models, kubectl-style (``-o wide``
adds columns)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from controller.cli.client import ApiClient, ApiError
from controller.cli.errors import fail
from controller.cli.format import age, counts, plain_table, styled, wave_label
from controller.cli.options import ApiUrl
from controller.cli.output import Output, emit, err_console

get_app = typer.Typer(
    help="List resources: rollouts, nodes, clusters, models.", no_args_is_help=True
)


class ListOutput(StrEnum):
    table = "table"
    wide = "wide"
    json = "json"
    yaml = "yaml"


ListOutputOpt = Annotated[
    ListOutput,
    typer.Option("--output", "-o", help="Output format (wide: the table with more columns)."),
]


def collect_pages(client: ApiClient, path: str, limit: int | None, **params: Any) -> list[Any]:
    """Every item of a paged list (or the first ``limit``)."""
    query = {k: v for k, v in params.items() if v is not None}
    items: list[Any] = []
    while limit is None or len(items) < limit:
        size = 1000 if limit is None else min(1000, limit - len(items))
        page = client.get(path, limit=size, offset=len(items), **query)
        items.extend(page["items"])
        if not page["items"] or len(items) >= page["total"]:
            break
    return items


def show_listing(
    fetch: Callable[[ApiClient], list[Any]],
    output: ListOutput,
    api_url: str | None,
    table: Callable[[list[Any], bool], Table],
) -> None:
    client = ApiClient(api_url)
    try:
        items = fetch(client)
    except ApiError as exc:
        raise fail(exc) from exc
    finally:
        client.close()
    tabular = output in (ListOutput.table, ListOutput.wide)
    if tabular and not items:
        err_console.print("No resources found.")
        return
    wide = output is ListOutput.wide
    emit(items, Output.table if tabular else Output(output.value), table=lambda i: table(i, wide))


def _phase(r: dict[str, Any]) -> Text:
    """The phase, and for a Succeeded rollout with nodes that were offline while it ran
    and have not yet converged, how many: ``Succeeded (2 pending)``; for a RolledBack
    one, its nodes not yet seen back on their previous version: ``RolledBack (1 pending)``."""
    text = styled(r["phase"])
    pending = int((r.get("status") or {}).get("pending") or 0)
    if pending:
        text.append(f" ({pending} pending)")
    return text


def _labels(labels: dict[str, Any] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((labels or {}).items()))


def _rollouts_table(items: list[dict[str, Any]], wide: bool) -> Table:
    now = datetime.now(UTC)
    extra = ["GENERATION", "UPDATED"] if wide else []
    return plain_table(
        ["NAME", "PHASE", "MODEL", "VERSION", "WAVE", "AGE", *extra, "MESSAGE"],
        [
            [
                r["name"],
                _phase(r),
                r["model"],
                r["version"],
                wave_label(r),
                age(r.get("created_at"), now=now),
                *([r["generation"], age(r.get("updated_at"), now=now)] if wide else []),
                r.get("message") or "",
            ]
            for r in items
        ],
    )


def _runtimes(runtimes: list[Any] | None) -> str:
    return ",".join(
        str(r.get("name", r)) if isinstance(r, dict) else str(r) for r in runtimes or []
    )


def _nodes_table(items: list[dict[str, Any]], wide: bool) -> Table:
    now = datetime.now(UTC)
    extra = ["RUNTIMES", "LABELS"] if wide else []
    return plain_table(
        ["CLUSTER", "NAME", "HEALTH", "ARCH", "CPU", "MEMORY", "LAST-HEARTBEAT", *extra],
        [
            [
                n["cluster"],
                n["name"],
                n["health"],
                n.get("architecture") or "",
                (n.get("allocatable") or {}).get("cpu", ""),
                (n.get("allocatable") or {}).get("memory", ""),
                age(n.get("last_heartbeat_at"), now=now),
                *([_runtimes(n.get("runtimes")), _labels(n.get("labels"))] if wide else []),
            ]
            for n in items
        ],
    )


def _clusters_table(items: list[dict[str, Any]], wide: bool) -> Table:
    now = datetime.now(UTC)
    extra = ["MODE", "SERVER", "LAST-SYNC", "LABELS"] if wide else []
    return plain_table(
        ["NAME", "DRIVER", "STATUS", "NODES", "GENERATION", *extra],
        [
            [
                c["name"],
                c["driver"],
                c["status"],
                f"{sum((c.get('nodes') or {}).values())} ({counts(c.get('nodes'))})"
                if c.get("nodes")
                else "0",
                c["generation"],
                *(
                    [
                        c["mode"],
                        c.get("server") or "",
                        age(c.get("last_sync_at"), now=now) if c.get("last_sync_at") else "",
                        _labels(c.get("labels")),
                    ]
                    if wide
                    else []
                ),
            ]
            for c in items
        ],
    )


def _models_table(items: list[dict[str, Any]], wide: bool) -> Table:
    now = datetime.now(UTC)
    return plain_table(
        ["NAME", "VERSIONS", "LATEST", "AGE", *(["CREATED"] if wide else []), "DESCRIPTION"],
        [
            [
                m["name"],
                m["version_count"],
                m.get("latest_version") or "",
                age(m.get("created_at"), now=now),
                *([str(m["created_at"])[:19]] if wide else []),
                m.get("description") or "",
            ]
            for m in items
        ],
    )


LimitOpt = Annotated[
    int | None, typer.Option("--limit", min=1, help="At most this many (default: all).")
]


@get_app.command("rollouts")
def get_rollouts(
    limit: LimitOpt = None, output: ListOutputOpt = ListOutput.table, api_url: ApiUrl = None
) -> None:
    """List rollouts: phase, model version, current wave of all waves."""
    show_listing(
        lambda c: collect_pages(c, "/v1/rollouts", limit), output, api_url, _rollouts_table
    )


@get_app.command("nodes")
def get_nodes(
    cluster: Annotated[
        str | None, typer.Option("--cluster", "-c", help="Only this cluster.")
    ] = None,
    limit: LimitOpt = None,
    output: ListOutputOpt = ListOutput.table,
    api_url: ApiUrl = None,
) -> None:
    """List the fleet's nodes: health, architecture, allocatable resources, heartbeat."""
    show_listing(
        lambda c: collect_pages(c, "/v1/nodes", limit, cluster=cluster),
        output,
        api_url,
        _nodes_table,
    )


@get_app.command("clusters")
def get_clusters(output: ListOutputOpt = ListOutput.table, api_url: ApiUrl = None) -> None:
    """List clusters: driver, status, nodes by health."""
    show_listing(lambda c: list(c.get("/v1/clusters")), output, api_url, _clusters_table)


@get_app.command("models")
def get_models(
    limit: LimitOpt = None, output: ListOutputOpt = ListOutput.table, api_url: ApiUrl = None
) -> None:
    """List registered models."""
    show_listing(lambda c: collect_pages(c, "/v1/models", limit), output, api_url, _models_table)


# Singular forms, as kubectl accepts them.
get_app.command("rollout", hidden=True)(get_rollouts)
get_app.command("node", hidden=True)(get_nodes)
get_app.command("cluster", hidden=True)(get_clusters)
get_app.command("model", hidden=True)(get_models)
