"""``edgefleet delete``: remove a resource by name, kubectl-style."""

from __future__ import annotations

from typing import Annotated

import typer

from controller.cli.client import ApiClient, ApiError
from controller.cli.errors import fail
from controller.cli.options import ApiUrl
from controller.cli.output import console

delete_app = typer.Typer(help="Delete resources: freeze periods.", no_args_is_help=True)


@delete_app.command("freeze")
def delete_freeze(
    name: Annotated[str, typer.Argument(help="Name of the freeze period.")],
    api_url: ApiUrl = None,
) -> None:
    """Delete a freeze period (operator). The rollouts it held may start their nodes from
    their next step on."""
    client = ApiClient(api_url)
    try:
        client.request("DELETE", f"/v1/freezes/{name}")
    except ApiError as exc:
        raise fail(exc) from exc
    finally:
        client.close()
    console.print(f"freezeperiod.edgefleet.io/{name} deleted")
