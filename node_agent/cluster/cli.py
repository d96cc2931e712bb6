"""``edgefleet-cluster-agent``: read the settings, run the cluster agent until SIGTERM
or SIGINT."""

from __future__ import annotations

import logging
import signal
import threading

from pydantic import ValidationError

from node_agent.cluster.kube import KubeError
from node_agent.cluster.loop import ClusterAgent
from node_agent.cluster.settings import ClusterAgentSettings

log = logging.getLogger("edgefleet.cluster-agent")


def main() -> None:
    try:
        settings = ClusterAgentSettings()
    except ValidationError as exc:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        problems = "\n".join(
            f"  EDGEFLEET_{str(e['loc'][0]).upper() if e['loc'] else '?'}: {e['msg']}"
            for e in exc.errors()
        )
        log.error("invalid cluster agent configuration:\n%s", problems)
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
