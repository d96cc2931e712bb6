"""``edgefleet-agent``: read the settings, run the agent until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import signal
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
        # A field read through aliases is located by its first alias, not its name.
        if name in ("node_name", "EDGEFLEET_NODE_NAME"):
            env = "NODE_NAME"  # as the chart sets it
        else:
            env = f"EDGEFLEET_{name.upper()}"
        lines.append(f"  {env}: {err['msg']}")
    return "\n".join(lines)


def main() -> None:
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
