"""``edgefleet-agent``: the node agent daemon (issue 5 builds it)."""

from __future__ import annotations

import sys


def main() -> None:
    sys.stderr.write(
        "edgefleet-agent is not implemented yet: enrollment, heartbeats and the offline "
        "queue arrive with the node agent issue (#5).\n"
    )
    raise SystemExit(2)
