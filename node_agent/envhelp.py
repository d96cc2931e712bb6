"""``--help`` and configuration errors of the programs configured by environment
variables only (``edgefleet-agent``, ``edgefleet-cluster-agent``): every setting named as
it must be set, whether it is required or its default, and what it does."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Mapping, Sequence
from typing import TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings

S = TypeVar("S", bound=BaseSettings)


def env_name(field: str, aliases: Mapping[str, str]) -> str:
    """The environment variable a setting is read from (its alias, as a chart sets it)."""
    return aliases.get(field, f"EDGEFLEET_{field.upper()}")


def settings_help(settings: type[BaseSettings], intro: str, aliases: Mapping[str, str]) -> str:
    lines = [intro, "", "Configured by environment variables:", ""]
    for name, field in settings.model_fields.items():
        value = None if field.is_required() else field.get_default(call_default_factory=True)
        if field.is_required():
            default = "required"
        elif value is None:
            default = "unset"
        else:
            default = f"default {value!r}"  # a SecretStr default shows as '**********'
        lines.append(f"  {env_name(name, aliases)}  ({default})")
        if field.description:
            lines.append(f"      {field.description}")
    return "\n".join(lines)


def parse_help(
    prog: str,
    settings: type[BaseSettings],
    intro: str,
    argv: Sequence[str],
    aliases: Mapping[str, str] | None = None,
) -> None:
    """``--help`` prints the settings and exits 0, needing none of them; any argument is
    an error (exit 2): the program takes its configuration from the environment."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=settings_help(settings, intro, aliases or {}),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(list(argv))


def explain(exc: ValidationError, aliases: Mapping[str, str] | None = None) -> str:
    """One line per invalid or missing setting, named by its variable. A field read
    through an alias is located by that alias, which is then its name."""
    known = aliases or {}
    by_alias = {alias: alias for alias in known.values()} | {
        f"EDGEFLEET_{field.upper()}": env_name(field, known) for field in known
    }
    lines = []
    for err in exc.errors():
        loc = str(err["loc"][0]) if err["loc"] else "?"
        env = by_alias.get(loc) or env_name(loc, known)
        lines.append(f"  {env}: {err['msg']}")
    return "\n".join(lines)


def start(
    prog: str,
    settings: type[S],
    intro: str,
    argv: Sequence[str],
    log: logging.Logger,
    aliases: Mapping[str, str] | None = None,
) -> tuple[S, threading.Event]:
    """What both programs do before their loop: ``--help``, the settings read from the
    environment (exit 2 naming every bad one), logging at the settings' ``log_level``, and
    an Event that SIGTERM and SIGINT set."""
    parse_help(prog, settings, intro, argv, aliases)
    try:
        loaded = settings()
    except ValidationError as exc:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        log.error("invalid %s configuration:\n%s", prog, explain(exc, aliases))
        raise SystemExit(2) from None
    logging.basicConfig(
        level=str(getattr(loaded, "log_level", "info")).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return loaded, stop
