"""``edgefleet-agent``: read the settings, run the agent until SIGTERM or SIGINT.

It is configured by environment variables only (the agent chart sets them); ``--help``
lists them, with their defaults and what each does, and needs none of them set."""

from __future__ import annotations

import logging
import sys

from node_agent.agent.loop import Agent
from node_agent.agent.settings import AgentSettings
from node_agent.discovery import DiscoveryError
from node_agent.envhelp import start

log = logging.getLogger("edgefleet.agent")


# The node's name comes from the Downward API as NODE_NAME (the chart sets it).
ALIASES = {"node_name": "NODE_NAME"}
INTRO = (
    "Runs on every edge node: enrols with the controller, scrapes the node's inference\n"
    "servers and sends heartbeats."
)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    settings, stop = start("edgefleet-agent", AgentSettings, INTRO, args, log, ALIASES)
    try:
        agent = Agent(settings)
    except (OSError, DiscoveryError) as exc:  # an unwritable state directory, typically
        log.error("cannot start: %s", exc)
        raise SystemExit(2) from None
    try:
        agent.run(stop)
    finally:
        agent.close()
