"""Content-addressed artifact store on a local directory.

Uploads are staged: streamed into a temp file beside the store while hashing, checked,
then moved into place with an atomic rename. A crash at any instant leaves either no
artifact or a whole one; a staged file that is never promoted is deleted."""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from controller.errors import NotFound, PayloadTooLarge
from controller.settings import Settings

CHUNK = 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class StagedArtifact:
    path: Path
    sha256: str
    size: int


class ArtifactStore:
    def __init__(self, root: Path, *, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._tmp = root / ".staging"

    def path_for(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / "sha256" / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def require(self, sha256: str) -> Path:
        path = self.path_for(sha256)
        if not path.is_file():
            raise NotFound(f"artifact sha256:{sha256} is missing from the artifact store")
        return path

    @contextmanager
    def stage(self, chunks: Iterable[bytes]) -> Iterator[StagedArtifact]:
        """Stream ``chunks`` to a temp file, hashing and enforcing the size limit. The
        temp file is removed on exit unless :meth:`promote` moved it into the store."""
        self._tmp.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp / f"{uuid.uuid4().hex}.part"
        digest = hashlib.sha256()
        size = 0
        try:
            with tmp.open("wb") as out:
                for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise PayloadTooLarge(
                            f"artifact exceeds the size limit of {self.max_bytes} bytes "
                            "(EDGEFLEET_MAX_ARTIFACT_BYTES)"
                        )
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            yield StagedArtifact(tmp, digest.hexdigest(), size)
        finally:
            tmp.unlink(missing_ok=True)

    def promote(self, staged: StagedArtifact) -> Path:
        """Move a staged artifact to its content address (a no-op if already there)."""
        final = self.path_for(staged.sha256)
        if final.is_file():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged.path, final)
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
        return final


def artifact_store(settings: Settings) -> ArtifactStore:
    return ArtifactStore(settings.artifact_dir, max_bytes=settings.max_artifact_bytes)


def iter_file(fileobj: BinaryIO, chunk_size: int = CHUNK) -> Iterator[bytes]:
    while chunk := fileobj.read(chunk_size):
        yield chunk
