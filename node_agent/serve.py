"""``edgefleet-serve``: the inference server (issue 5 builds it)."""

from __future__ import annotations

import sys


def main() -> None:
    sys.stderr.write(
        "edgefleet-serve is not implemented yet: the HTTP inference server arrives with "
        "the node agent issue (#5).\n"
    )
    raise SystemExit(2)
