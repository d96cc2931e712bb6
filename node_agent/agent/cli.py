"""``edgefleet-agent``: read the settings, run the agent until SIGTERM or SIGINT.

It is configured by environment variables only (the agent chart sets them); ``--help``
lists them, with their defaults and what each does, and needs none of them set."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from pydantic import ValidationError

from node_agent.agent.loop import Agent
from node_agent.agent.settings import AgentSettings
from node_agent.discovery import DiscoveryError

log = logging.getLogger("edgefleet.agent")


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else "?"
        # A field read through aliases is located by its alias (NODE_NAME, as the
        # chart sets it, and its long form).
        env = "NODE_NAME" if name in ("node_name", "EDGEFLEET_NODE_NAME") else env_name(name)
        lines.append(f"  {env}: {err['msg']}")
    return "\n".join(lines)


def env_name(field: str) -> str:
    """The environment variable a setting is read from."""
    return "NODE_NAME" if field == "node_name" else f"EDGEFLEET_{field.upper()}"


def usage() -> str:
    """Every setting: its variable, whether it is required or its default, and what it does."""
    lines = [
        "Runs on every edge node: enrols with the controller, scrapes the node's inference",
        "servers and sends heartbeats. Configured by environment variables:",
        "",
    ]
    for name, field in AgentSettings.model_fields.items():
        value = None if field.is_required() else field.get_default(call_default_factory=True)
        if field.is_required():
            default = "required"
        elif value is None:
            default = "unset"
        else:
            default = f"default {value!r}"  # a SecretStr default shows as '**********'
        lines.append(f"  {env_name(name)}  ({default})")
        if field.description:
            lines.append(f"      {field.description}")
    return "\n".join(lines)


def _parse_args(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="edgefleet-agent",
        description=usage(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = AgentSettings()
    except ValidationError as exc:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        log.error("invalid agent configuration:\n%s", _explain(exc))
        raise SystemExit(2) from None
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        agent = Agent(settings)
    except (OSError, DiscoveryError) as exc:  # an unwritable state directory, typically
        log.error("cannot start: %s", exc)
        raise SystemExit(2) from None
    try:
        agent.run(stop)
    finally:
        agent.close()
