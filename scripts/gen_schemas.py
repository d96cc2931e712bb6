"""Write the JSON Schemas of the manifest kinds to ``schemas/<Kind>.json``, for editors
and CI linters that cannot reach a controller. The files are generated from the pydantic
models (``controller.manifests.service.json_schema``); a test fails when they drift.

    python scripts/gen_schemas.py            # rewrite schemas/
    python scripts/gen_schemas.py --check    # exit 1 if schemas/ is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from controller.manifests.schemas import KINDS
from controller.manifests.service import json_schema

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "schemas"


def render(kind: str) -> str:
    """The published form: sorted keys, two-space indent, one trailing newline."""
    return json.dumps(json_schema(kind), sort_keys=True, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=OUT, help="directory (default: schemas/)")
    parser.add_argument("--check", action="store_true", help="compare only, write nothing")
    args = parser.parse_args(argv)
    out: Path = args.out
    stale: list[str] = []
    for kind in KINDS:
        path = out / f"{kind}.json"
        text = render(kind)
        if path.exists() and path.read_text() == text:
            continue
        stale.append(f"{'out of date' if args.check else 'wrote'}: {path}")
        if not args.check:
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    # The directory holds generated files only: a schema of a kind that no longer exists goes.
    extra = sorted(p for p in out.glob("*.json") if p.stem not in KINDS) if out.exists() else []
    for path in extra:
        stale.append(f"{'not a kind' if args.check else 'removed'}: {path}")
        if not args.check:
            path.unlink()
    for line in stale:
        print(line)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
