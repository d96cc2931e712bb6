"""The node-local, content-addressed model cache: ``<root>/sha256/<ab>/<sha256>``.

A file under ``sha256/`` is only ever the verified bytes of its name: downloads stream
into ``<root>/.partial/<sha256>`` while being hashed and are renamed into place only
after the digest matches. An interrupted download resumes from the partial file with
``Range: bytes=<have>-`` and ``If-Range: "<sha256>"`` (the controller's ETag is the
sha256); a ``200`` instead of a ``206`` means the origin sent the whole file again, so
the partial is discarded. A second process fetching the same artifact waits on a
per-artifact lock instead of writing the same partial file.

Stdlib + httpx only: this runs on edge nodes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

log = logging.getLogger(__name__)

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20

# Statuses worth retrying: the origin is overloaded or restarting.
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class CacheError(RuntimeError):
    """Base class: the artifact could not be made available."""


class ChecksumMismatch(CacheError):
    """The bytes do not hash to the expected sha256. Never retried into success: the
    origin serves something else than what the controller promised."""

    def __init__(self, expected: str, actual: str, source: str) -> None:
        super().__init__(
            f"sha256 mismatch for {source}: expected {expected}, got {actual}; the file was deleted"
        )
        self.expected = expected
        self.actual = actual


class ArtifactUnavailable(CacheError):
    """The download failed after the allowed retries (or with a permanent HTTP error)."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 10.0

    def delay(self, attempt: int) -> float:
        """Exponential backoff with full jitter; ``attempt`` counts from 1."""
        ceiling = min(self.max_backoff_s, self.backoff_s * (2 ** (attempt - 1)))
        return random.uniform(ceiling / 2, ceiling)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_sha(sha256: str) -> str:
    value = sha256.strip().lower()
    if not SHA256_RE.match(value):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return value


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _Restart(Exception):
    """The partial file is unusable: drop it and download from byte 0."""


class ArtifactCache:
    def __init__(
        self,
        root: Path,
        *,
        retry: RetryPolicy | None = None,
        timeout_s: float = 30.0,
        max_bytes: int | None = None,
        sleep: Callable[[float], None] = time.sleep,
        bearer_token: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.retry = retry or RetryPolicy()
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self._sleep = sleep
        # Sent to each download URL's own origin only (httpx drops it on a redirect to
        # another): the inference pod's artifact token for the controller.
        self._bearer_token = bearer_token

    # ------------------------------------------------------------------ layout
    def path(self, sha256: str) -> Path:
        sha = _check_sha(sha256)
        return self.root / "sha256" / sha[:2] / sha

    def partial_path(self, sha256: str) -> Path:
        return self.root / ".partial" / _check_sha(sha256)

    # ------------------------------------------------------------------ lookup
    def lookup(self, sha256: str) -> Path | None:
        """The cached file if present and its bytes still hash to ``sha256``. A file
        that no longer verifies (disk corruption, tampering) is deleted."""
        path = self.path(sha256)
        if not path.is_file():
            return None
        actual = sha256_file(path)
        if actual == _check_sha(sha256):
            return path
        log.warning("cached %s does not verify (sha256 %s): deleting it", path, actual)
        path.unlink(missing_ok=True)
        return None

    def verify_local(self, path: Path, sha256: str | None) -> str:
        """The sha256 of a local model file; ``ChecksumMismatch`` if it is not
        ``sha256`` (a local file is never deleted)."""
        actual = sha256_file(path)
        if sha256 is not None and actual != _check_sha(sha256):
            raise ChecksumMismatch(_check_sha(sha256), actual, str(path))
        return actual

    # ------------------------------------------------------------------ fetch
    def fetch(self, url: str, sha256: str, *, client: httpx.Client | None = None) -> Path:
        """The verified artifact: from the cache, else downloaded (resuming a partial
        download) and renamed into place. Raises ``ChecksumMismatch`` or
        ``ArtifactUnavailable``."""
        sha = _check_sha(sha256)
        cached = self.lookup(sha)
        if cached is not None:
            log.info("artifact %s found in the cache", sha)
            return cached
        with self._lock(sha):
            # Another process may have finished the download while we waited.
            cached = self.lookup(sha)
            if cached is not None:
                return cached
            owns_client = client is None
            http = client or httpx.Client(
                timeout=httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0)),
                follow_redirects=True,
                headers={"Authorization": f"Bearer {self._bearer_token}"}
                if self._bearer_token
                else None,
            )
            try:
                return self._download(http, url, sha)
            finally:
                if owns_client:
                    http.close()

    @contextlib.contextmanager
    def _lock(self, sha: str) -> Iterator[None]:
        partial_dir = self.root / ".partial"
        partial_dir.mkdir(parents=True, exist_ok=True)
        with (partial_dir / f"{sha}.lock").open("a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _download(self, client: httpx.Client, url: str, sha: str) -> Path:
        partial = self.partial_path(sha)
        attempt = 0
        restarted_after_mismatch = False
        while True:
            attempt += 1
            resumed = partial.exists() and partial.stat().st_size > 0
            try:
                digest = self._transfer(client, url, sha, partial)
            except _Restart as exc:
                log.info("restarting the download of %s from byte 0: %s", sha, exc)
                partial.unlink(missing_ok=True)
                attempt -= 1  # not a network failure
                continue
            except (httpx.TransportError, _RetryableStatus) as exc:
                if attempt >= self.retry.attempts:
                    raise ArtifactUnavailable(
                        f"download of {url} failed after {attempt} attempts: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                delay = self.retry.delay(attempt)
                have = partial.stat().st_size if partial.exists() else 0
                log.warning(
                    "download of %s failed (%s: %s), %d bytes kept; retry %d/%d in %.1fs",
                    url,
                    type(exc).__name__,
                    exc,
                    have,
                    attempt,
                    self.retry.attempts - 1,
                    delay,
                )
                self._sleep(delay)
                continue
            if digest != sha:
                partial.unlink(missing_ok=True)
                if resumed and not restarted_after_mismatch:
                    # The kept prefix may be what is wrong (a partial from other bytes):
                    # one clean download decides.
                    log.warning("resumed download of %s does not verify; starting over", sha)
                    restarted_after_mismatch = True
                    continue
                raise ChecksumMismatch(sha, digest, url)
            final = self.path(sha)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial, final)
            _fsync_dir(final.parent)
            log.info("artifact %s downloaded and verified", sha)
            return final

    def _transfer(self, client: httpx.Client, url: str, sha: str, partial: Path) -> str:
        """One HTTP exchange; returns the sha256 of the complete partial file."""
        have = partial.stat().st_size if partial.exists() else 0
        headers = {"Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
            headers["If-Range"] = f'"{sha}"'
        with client.stream("GET", url, headers=headers) as response:
            status = response.status_code
            if status == 416 and have:
                # Nothing after our last byte: the partial is already complete (or
                # longer than the file, then it is wrong and the hash says so).
                return sha256_file(partial)
            if status in _RETRY_STATUS:
                raise _RetryableStatus(f"HTTP {status} from {url}")
            if status == 206 and have:
                start = _content_range_start(response.headers.get("content-range"))
                if start != have:
                    raise _Restart(f"asked for bytes {have}-, got Content-Range {start}")
                mode = "ab"
                log.info("resuming %s at byte %d", sha, have)
            elif status == 200:
                mode = "wb"
                have = 0
            else:
                raise ArtifactUnavailable(f"HTTP {status} from {url}")
            length = response.headers.get("content-length")
            total = have + int(length) if length is not None and length.isdigit() else None
            if self.max_bytes is not None and total is not None and total > self.max_bytes:
                raise ArtifactUnavailable(
                    f"{url} is {total} bytes, over the {self.max_bytes} limit"
                )
            digest = hashlib.sha256()
            if mode == "ab":
                with partial.open("rb") as fh:
                    while chunk := fh.read(CHUNK):
                        digest.update(chunk)
            partial.parent.mkdir(parents=True, exist_ok=True)
            written = have
            with partial.open(mode) as out:
                try:
                    for chunk in response.iter_raw():  # as received: no re-chunking buffer
                        out.write(chunk)
                        digest.update(chunk)
                        written += len(chunk)
                        if self.max_bytes is not None and written > self.max_bytes:
                            partial.unlink(missing_ok=True)
                            raise ArtifactUnavailable(
                                f"{url} exceeds the {self.max_bytes}-byte artifact limit"
                            )
                finally:
                    out.flush()
                    os.fsync(out.fileno())
            return digest.hexdigest()


class _RetryableStatus(Exception):
    pass


def _content_range_start(value: str | None) -> int | None:
    match = re.match(r"^\s*bytes\s+(\d+)-\d+/(?:\d+|\*)\s*$", value or "")
    return int(match.group(1)) if match else None
