"""Does a command line that an image, a compose service or a chart runs name a real
command? The console scripts come from pyproject.toml; the ``edgefleet`` arguments are
parsed by the CLI's own click command tree (every option and value converted), without
running anything."""

from __future__ import annotations

import importlib
import sys
import tomllib
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import typer
import typer.main
from typer.core import TyperCommand, TyperGroup

from controller.settings import Settings

REPO = Path(__file__).resolve().parents[2]


@cache
def console_scripts() -> dict[str, str]:
    """[project.scripts]: name -> "module:function"."""
    with (REPO / "pyproject.toml").open("rb") as f:
        scripts: dict[str, str] = tomllib.load(f)["project"]["scripts"]
    return scripts


def script_package(name: str) -> str:
    """The top-level package a console script's code lives in."""
    return console_scripts()[name].split(":")[0].split(".")[0]


def installed_script(name: str) -> Path:
    """The console script as installed beside this interpreter (the venv's bin/)."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise AssertionError(f"console script {name} is not installed at {path}")
    return path


def check_command(argv: Sequence[str]) -> None:
    """Raise AssertionError unless ``argv`` runs a declared console script with arguments
    its parser accepts."""
    if not argv:
        raise AssertionError("empty command")
    name, *args = argv
    scripts = console_scripts()
    if name not in scripts:
        raise AssertionError(
            f"{name!r} is not a console script in pyproject.toml: {sorted(scripts)}"
        )
    module_name, _, attr = scripts[name].partition(":")
    target = getattr(importlib.import_module(module_name), attr)
    if not callable(target):
        raise AssertionError(f"{scripts[name]} is not callable")
    if name != "edgefleet":
        # The node scripts take no arguments (yet).
        if args:
            raise AssertionError(f"{name} takes no arguments, got {args}")
        return
    from controller.cli.main import app

    _parse(typer.main.get_command(app), list(args), name)


def _parse(command: Any, args: list[str], info_name: str) -> None:
    """Walk the command tree down to a leaf command, then parse its arguments exactly as a
    run would (typer's vendored click: TyperGroup/TyperCommand), without invoking it."""
    ctx: typer.Context | None = None
    path = [info_name]
    while isinstance(command, TyperGroup):
        if not args or args[0].startswith("-"):
            raise AssertionError(f"{' '.join(path)}: a subcommand is required, got {args}")
        ctx = typer.Context(command, info_name=path[-1], parent=ctx)
        sub = command.get_command(ctx, args[0])
        if sub is None:
            raise AssertionError(f"{' '.join(path)} has no command {args[0]!r}")
        path.append(args.pop(0))
        command = sub
    if not isinstance(command, TyperCommand):
        raise AssertionError(f"{' '.join(path)} is not a command: {command!r}")
    try:
        command.make_context(path[-1], list(args), parent=ctx)
    except typer.TyperException as exc:
        raise AssertionError(f"{' '.join(path)} {' '.join(args)}: {exc.format_message()}") from exc
    except typer.Exit as exc:  # --help, --version: valid, but not a service's command
        raise AssertionError(f"{' '.join(path)} {' '.join(args)} only prints and exits") from exc


def keepalive_settings(env: Mapping[str, str]) -> Settings:
    """The API's idle-connection timeout (which ``edgefleet server`` hands uvicorn) and the
    agents' suggested heartbeat interval, as a deployment's environment sets them (the
    default where it does not)."""
    return Settings(
        _env_file=None,
        api_keepalive_timeout_s=env["EDGEFLEET_API_KEEPALIVE_TIMEOUT_S"],
        agent_heartbeat_interval_s=env.get(
            "EDGEFLEET_AGENT_HEARTBEAT_INTERVAL_S",
            Settings.model_fields["agent_heartbeat_interval_s"].default,
        ),
    )
