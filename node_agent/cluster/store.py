"""The cluster agent's state on disk: its credential and the last desired state it
received. Written atomically (a temporary file renamed over the old one), so a crash
mid-write leaves the previous state, never half of one."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

from pydantic import ValidationError

from node_agent.cluster.contract import DesiredState

log = logging.getLogger(__name__)


class Store:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._credential = directory / "credential"
        self._desired = directory / "desired.json"

    def _write(self, path: Path, text: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def credential(self) -> str | None:
        try:
            return self._credential.read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None

    def save_credential(self, credential: str | None) -> None:
        if credential is None:
            with contextlib.suppress(FileNotFoundError):
                self._credential.unlink()
        else:
            self._write(self._credential, credential)

    def desired(self) -> DesiredState | None:
        try:
            return DesiredState.model_validate_json(self._desired.read_bytes())
        except FileNotFoundError:
            return None
        except (ValidationError, ValueError) as exc:
            # Not ours to guess at: the next poll (without a revision) brings it all.
            log.warning("ignoring unreadable desired state %s: %s", self._desired, exc)
            return None

    def save_desired(self, state: DesiredState) -> None:
        self._write(self._desired, json.dumps(state.model_dump(mode="json"), sort_keys=True))
