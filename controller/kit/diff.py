from __future__ import annotations

from typing import Any


def diff(old: Any, new: Any, path: str = "") -> list[dict[str, Any]]:
    """Changed paths between two JSON documents, e.g.
    ``[{"path": "spec.strategy.steps[1].bake", "old": "10m", "new": "5m"}]``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[dict[str, Any]] = []
        for key in sorted(set(old) | set(new), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in old:
                out.append({"path": sub, "old": None, "new": new[key]})
            elif key not in new:
                out.append({"path": sub, "old": old[key], "new": None})
            else:
                out.extend(diff(old[key], new[key], sub))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        out = []
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            out.extend(diff(a, b, f"{path}[{i}]"))
        return out
    return [] if old == new else [{"path": path, "old": old, "new": new}]
