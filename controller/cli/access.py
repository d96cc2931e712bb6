"""Access commands: ``login``, ``tokens create|list|revoke``, ``nodes reset`` and
``clusters join-token|reset`` (a pull cluster's agent).

``tokens create`` writes the database directly, like ``edgefleet db upgrade``: it is how
the first admin token comes to be, so it runs where the controller's settings are
(``EDGEFLEET_DATABASE_URL``, ...). Everything else goes through the REST API."""

from __future__ import annotations

import getpass
import os
from typing import Annotated, Any

import typer

from controller.cli.client import ApiClient, ApiError
from controller.cli.config import save_context
from controller.cli.errors import fail
from controller.cli.format import make_table
from controller.cli.options import ApiUrl
from controller.cli.output import Output, console, emit, err_console
from controller.errors import EdgefleetError

tokens_app = typer.Typer(help="API tokens: create (on the database), list, revoke.")
nodes_app = typer.Typer(help="Fleet nodes: reset an agent's enrolment.")
clusters_app = typer.Typer(
    help="Pull clusters: issue a join token for the cluster agent, reset its enrolment."
)

ROLES = ("viewer", "operator", "admin")


def login(
    token: Annotated[
        str, typer.Option(envvar="EDGEFLEET_TOKEN", prompt=True, hide_input=True, help="API token.")
    ],
    api_url: ApiUrl = None,
    context: Annotated[str, typer.Option(help="Name of the context to save.")] = "default",
) -> None:
    """Check a token against the controller and save it (with the URL) as the current
    context of the CLI config file."""
    client = ApiClient(api_url, token=token)
    try:
        me = client.get("/v1/whoami")
    except ApiError as exc:
        raise fail(exc) from exc
    finally:
        client.close()
    path = save_context(context, server=client.base_url, token=token)
    console.print(
        f"logged in to {client.base_url} as {me['actor']} ({me['role']}); saved to {path}"
    )


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Option(help="Unique name of the token.")],
    role: Annotated[str, typer.Option(help="viewer, operator or admin.")],
    expires: Annotated[
        str | None, typer.Option(help="Lifetime (90d, 12h); default: never expires.")
    ] = None,
) -> None:
    """Create an API token on the database directly (for the first admin: run it where
    the controller's settings are). The token is printed once, as the last line."""
    # Lazy, for start-up time: the database layer takes ~0.3 s that API commands skip.
    from controller.audit import acting_as
    from controller.auth.service import create_token
    from controller.db.models import Role
    from controller.db.session import session_scope

    if role not in ROLES:
        err_console.print(f"[red]error:[/red] --role {role!r}: expected one of {', '.join(ROLES)}")
        raise typer.Exit(code=2)
    actor = f"cli:{_user()}"
    try:
        with acting_as(actor), session_scope() as session:
            row, token = create_token(
                session, name=name, role=Role(role), expires=expires, created_by=actor
            )
            expires_at = row.expires_at
    except EdgefleetError as exc:
        err_console.print(f"[red]error:[/red] {exc.message}", highlight=False)
        raise typer.Exit(code=1) from exc
    until = f"until {expires_at:%Y-%m-%d %H:%M} UTC" if expires_at else "with no expiry"
    err_console.print(f"created token {name!r} (role {role}) {until}; it is shown only now:")
    print(token)  # noqa: T201 - the last line of stdout is the token, for scripts


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _tokens_table(rows: list[dict[str, Any]]) -> Any:
    return make_table(
        ["NAME", "ROLE", "ACTIVE", "CREATED", "EXPIRES", "LAST USED", "CREATED BY"],
        [
            [
                r["name"],
                r["role"],
                "yes" if r["active"] else ("revoked" if r["revoked_at"] else "expired"),
                (r["created_at"] or "")[:19],
                (r["expires_at"] or "never")[:19],
                (r["last_used_at"] or "")[:19],
                r.get("created_by") or "",
            ]
            for r in rows
        ],
    )


@tokens_app.command("list")
def tokens_list(
    output: Annotated[Output, typer.Option("--output", "-o")] = Output.table,
    api_url: ApiUrl = None,
) -> None:
    """List API tokens (admin). Token values are never shown again."""
    client = ApiClient(api_url)
    try:
        rows = client.get("/v1/tokens")
    except ApiError as exc:
        raise fail(exc) from exc
    finally:
        client.close()
    emit(rows, output, table=_tokens_table)


@tokens_app.command("revoke")
def tokens_revoke(name: str, api_url: ApiUrl = None) -> None:
    """Revoke an API token at once (admin)."""
    client = ApiClient(api_url)
    try:
        client.request("DELETE", f"/v1/tokens/{name}")
    except ApiError as exc:
        raise fail(exc) from exc
    finally:
        client.close()
    console.print(f"token {name!r} revoked")


@nodes_app.command("reset")
def nodes_reset(
    node: Annotated[str, typer.Argument(metavar="CLUSTER/NODE")], api_url: ApiUrl = None
) -> None:
    """Revoke a node's agent credential so that it may enrol again (admin): after a
    reinstall, or when the credential leaked."""
    cluster, sep, name = node.partition("/")
    if not sep or not cluster or not name:
        err_console.print(f"[red]error:[/red] {node!r}: expected CLUSTER/NODE")
        raise typer.Exit(code=2)
    client = ApiClient(api_url)
    try:
        client.post(f"/v1/clusters/{cluster}/nodes/{name}/reset")
    except ApiError as exc:
        raise fail(exc) from exc
    finally:
        client.close()
    console.print(f"node {cluster}/{name} reset: its agent may enrol again")


@clusters_app.command("join-token")
def clusters_join_token(
    cluster: str,
    expires: Annotated[str | None, typer.Option(help="Lifetime, 1m to 7d (default 24h).")] = None,
    api_url: ApiUrl = None,
) -> None:
    """Issue a join token for a pull cluster's agent (admin): it enrols that cluster
    only, once, before it expires. Printed once, as the last line (put it in the
    cluster's Secret); a new one replaces any unused one."""
    client = ApiClient(api_url)
    try:
        got = client.post(
            f"/v1/clusters/{cluster}/pull/join-token",
            json={"expires": expires} if expires else {},
        )
    except ApiError as exc:
        raise fail(exc) from exc
    finally:
        client.close()
    err_console.print(
        f"join token for cluster {cluster} (single use, until {got['expires_at'][:16]} UTC); "
        "it is shown only now:"
    )
    print(got["token"])  # noqa: T201 - the last line of stdout is the token, for scripts


@clusters_app.command("reset")
def clusters_reset(cluster: str, api_url: ApiUrl = None) -> None:
    """Revoke a pull cluster agent's credential (admin): after a reinstall, or when the
    credential leaked. The agent enrols again with a new join token."""
    client = ApiClient(api_url)
    try:
        client.post(f"/v1/clusters/{cluster}/pull/reset")
    except ApiError as exc:
        raise fail(exc) from exc
    finally:
        client.close()
    console.print(f"cluster {cluster} reset: issue a join token for its agent to enrol again")
