"""``edgefleet-cluster-agent``: read the settings, run the cluster agent until SIGTERM
or SIGINT. Configured by environment variables only; ``--help`` lists them."""

from __future__ import annotations

import logging
import signal
import sys
import threading

from pydantic import ValidationError

from node_agent.cluster.kube import KubeError
from node_agent.cluster.loop import ClusterAgent
from node_agent.cluster.settings import ClusterAgentSettings
from node_agent.envhelp import explain, parse_help

log = logging.getLogger("edgefleet.cluster-agent")


INTRO = (
    "Runs once per edge cluster in pull mode: fetches the desired state from the\n"
    "controller, applies it in-cluster and reports the cluster's pods and nodes back."
)


def main(argv: list[str] | None = None) -> None:
    parse_help(
        "edgefleet-cluster-agent",
        ClusterAgentSettings,
        INTRO,
        sys.argv[1:] if argv is None else argv,
    )
    try:
        settings = ClusterAgentSettings()
    except ValidationError as exc:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        log.error("invalid cluster agent configuration:\n%s", explain(exc))
        raise SystemExit(2) from None
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        agent = ClusterAgent(settings)
    except (OSError, KubeError) as exc:  # an unwritable state directory, no API server
        log.error("cannot start: %s", exc)
        raise SystemExit(2) from None
    try:
        agent.run(stop)
    finally:
        agent.close()
