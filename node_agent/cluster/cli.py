"""``edgefleet-cluster-agent``: read the settings, run the cluster agent until SIGTERM
or SIGINT. Configured by environment variables only; ``--help`` lists them."""

from __future__ import annotations

import logging
import sys

from node_agent.cluster.kube import KubeError
from node_agent.cluster.loop import ClusterAgent
from node_agent.cluster.settings import ClusterAgentSettings
from node_agent.envhelp import start

log = logging.getLogger("edgefleet.cluster-agent")


INTRO = (
    "Runs once per edge cluster in pull mode: fetches the desired state from the\n"
    "controller, applies it in-cluster and reports the cluster's pods and nodes back."
)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    settings, stop = start("edgefleet-cluster-agent", ClusterAgentSettings, INTRO, args, log)
    try:
        agent = ClusterAgent(settings)
    except (OSError, KubeError) as exc:  # an unwritable state directory, no API server
        log.error("cannot start: %s", exc)
        raise SystemExit(2) from None
    try:
        agent.run(stop)
    finally:
        agent.close()
