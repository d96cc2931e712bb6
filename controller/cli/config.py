"""The CLI's own config file: named contexts (controller URL and API token), like a
kubeconfig. ``$EDGEFLEET_CONFIG`` or ``~/.config/edgefleet/config.yaml``; written with
mode 0600 since it holds tokens. Environment variables win over it:
``EDGEFLEET_API_URL``, ``EDGEFLEET_TOKEN`` and ``EDGEFLEET_CONTEXT``."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class Context:
    name: str
    server: str | None
    token: str | None


def config_path() -> Path:
    override = os.environ.get("EDGEFLEET_CONFIG")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "edgefleet" / "config.yaml"


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with current-context and contexts")
    return data


def current_context(path: Path | None = None) -> Context | None:
    """The context named by $EDGEFLEET_CONTEXT, else the file's current-context."""
    path = path or config_path()
    data = _read(path)
    wanted = os.environ.get("EDGEFLEET_CONTEXT") or data.get("current-context")
    for item in data.get("contexts") or []:
        if isinstance(item, dict) and item.get("name") == wanted:
            return Context(str(wanted), item.get("server"), item.get("token"))
    return None


def save_context(
    name: str, *, server: str, token: str, make_current: bool = True, path: Path | None = None
) -> Path:
    """Add or replace a context; the file and its folder are private to the user."""
    path = path or config_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = _read(path)
    contexts = [
        c for c in data.get("contexts") or [] if isinstance(c, dict) and c.get("name") != name
    ]
    contexts.append({"name": name, "server": server, "token": token})
    data["contexts"] = contexts
    if make_current or not data.get("current-context"):
        data["current-context"] = name
    # A fresh, private file beside the target (mkstemp: O_EXCL, mode 0600), renamed over it.
    fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yaml.safe_dump(data, fh, sort_keys=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
