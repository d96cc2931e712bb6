"""The node-local artifact cache against a real HTTP origin on 127.0.0.1 that speaks the
controller's artifact protocol (ETag = "sha256", Range, If-Range)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_agent.cache import (
    ArtifactCache,
    ArtifactUnavailable,
    ChecksumMismatch,
    RetryPolicy,
    sha256_file,
)
from tests.node_agent.test_serve_helpers import Origin, sha256

DATA = bytes(range(256)) * 4096  # 1 MiB, so a cut lands mid-file
SHA = sha256(DATA)
PATH = "/v1/models/cnn/versions/1/artifact"


@pytest.fixture
def origin() -> Iterator[Origin]:
    with Origin() as o:
        o.add(PATH, DATA)
        yield o


@pytest.fixture
def delays() -> list[float]:
    return []


@pytest.fixture
def cache(tmp_path: Path, delays: list[float]) -> ArtifactCache:
    return ArtifactCache(
        tmp_path / "models",
        retry=RetryPolicy(attempts=4, backoff_s=0.5, max_backoff_s=2.0),
        timeout_s=5,
        sleep=delays.append,  # record the backoff instead of sleeping
    )


def leftovers(cache: ArtifactCache) -> list[str]:
    partial = cache.root / ".partial"
    return (
        sorted(p.name for p in partial.iterdir() if p.suffix != ".lock") if partial.exists() else []
    )


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{PATH}"


def test_download_lands_content_addressed(cache: ArtifactCache, origin: Origin) -> None:
    path = cache.fetch(origin.url(PATH), SHA)
    assert path == cache.root / "sha256" / SHA[:2] / SHA
    assert path.read_bytes() == DATA
    assert leftovers(cache) == []
    assert [(r.range, r.if_range) for r in origin.requests] == [(None, None)]


def test_resume_after_an_interrupted_transfer(
    cache: ArtifactCache, origin: Origin, delays: list[float]
) -> None:
    cut = 300_000
    origin.cut_after = cut  # the first response dies after 300 kB
    path = cache.fetch(origin.url(PATH), SHA.upper())  # hex case does not matter
    assert path.read_bytes() == DATA
    first, second = origin.requests
    assert (first.range, first.if_range) == (None, None)
    assert second.range == f"bytes={cut}-"
    assert second.if_range == f'"{SHA}"'
    assert len(delays) == 1  # one backoff between the two attempts
    assert leftovers(cache) == []


def test_resume_a_partial_left_by_a_previous_process(cache: ArtifactCache, origin: Origin) -> None:
    cache.partial_path(SHA).parent.mkdir(parents=True)
    cache.partial_path(SHA).write_bytes(DATA[:1000])
    assert cache.fetch(origin.url(PATH), SHA).read_bytes() == DATA
    [only] = origin.requests
    assert only.range == "bytes=1000-"


def test_200_instead_of_206_starts_over(cache: ArtifactCache, origin: Origin) -> None:
    origin.ignore_range = True
    cache.partial_path(SHA).parent.mkdir(parents=True)
    cache.partial_path(SHA).write_bytes(DATA[:5000])
    assert cache.fetch(origin.url(PATH), SHA).read_bytes() == DATA  # not 5000 bytes twice
    [only] = origin.requests
    assert only.range == "bytes=5000-"


def test_a_corrupt_partial_is_redownloaded_once(cache: ArtifactCache, origin: Origin) -> None:
    cache.partial_path(SHA).parent.mkdir(parents=True)
    cache.partial_path(SHA).write_bytes(b"\xff" * 1000)  # right length, wrong bytes
    assert cache.fetch(origin.url(PATH), SHA).read_bytes() == DATA
    assert [r.range for r in origin.requests] == ["bytes=1000-", None]


def test_complete_partial_answered_416_is_verified(cache: ArtifactCache, origin: Origin) -> None:
    cache.partial_path(SHA).parent.mkdir(parents=True)
    cache.partial_path(SHA).write_bytes(DATA)  # killed between the last byte and the rename
    assert cache.fetch(origin.url(PATH), SHA).read_bytes() == DATA
    assert [r.range for r in origin.requests] == [f"bytes={len(DATA)}-"]


def test_sha256_mismatch_deletes_and_refuses(cache: ArtifactCache, origin: Origin) -> None:
    wrong = sha256(b"what the controller promised")
    with pytest.raises(ChecksumMismatch) as exc:
        cache.fetch(origin.url(PATH), wrong)
    assert exc.value.expected == wrong
    assert exc.value.actual == SHA
    assert "sha256 mismatch" in str(exc.value)
    assert not cache.path(wrong).exists()
    assert not cache.path(SHA).exists()
    assert leftovers(cache) == []


def test_network_errors_retry_with_bounded_backoff(
    cache: ArtifactCache, origin: Origin, delays: list[float]
) -> None:
    origin.fail_times = 2  # two 503s, then the file
    assert cache.fetch(origin.url(PATH), SHA).read_bytes() == DATA
    assert len(origin.requests) == 3
    assert len(delays) == 2
    assert 0.25 <= delays[0] <= 0.5
    assert 0.5 <= delays[1] <= 1.0
    origin.fail_times = 100
    other = sha256(b"x")
    with pytest.raises(ArtifactUnavailable, match="after 4 attempts"):
        cache.fetch(origin.url(PATH), other)
    assert len(origin.requests) == 3 + 4
    assert max(delays) <= 2.0


def test_unreachable_origin_gives_up(cache: ArtifactCache, delays: list[float]) -> None:
    with pytest.raises(ArtifactUnavailable, match="ConnectError"):
        cache.fetch(closed_port_url(), SHA)
    assert len(delays) == 3


def test_404_is_not_retried(cache: ArtifactCache, origin: Origin, delays: list[float]) -> None:
    with pytest.raises(ArtifactUnavailable, match="HTTP 404"):
        cache.fetch(origin.url("/missing"), SHA)
    assert len(origin.requests) == 1
    assert delays == []


def test_cache_hit_needs_no_origin(cache: ArtifactCache, origin: Origin) -> None:
    cache.fetch(origin.url(PATH), SHA)
    origin.stop()
    path = cache.fetch(closed_port_url(), SHA)
    assert path.read_bytes() == DATA
    assert cache.lookup(SHA) == path


def test_a_cached_file_that_no_longer_verifies_is_replaced(
    cache: ArtifactCache, origin: Origin
) -> None:
    path = cache.fetch(origin.url(PATH), SHA)
    path.write_bytes(b"bit rot")
    assert cache.lookup(SHA) is None
    assert not path.exists()
    assert cache.fetch(origin.url(PATH), SHA).read_bytes() == DATA
    assert sha256_file(path) == SHA
    assert len(origin.requests) == 2


def test_size_limit(tmp_path: Path, origin: Origin) -> None:
    small = ArtifactCache(tmp_path / "m", max_bytes=1000, sleep=lambda _: None)
    with pytest.raises(ArtifactUnavailable, match="limit"):
        small.fetch(origin.url(PATH), SHA)
    assert not small.path(SHA).exists()


def test_local_file_is_verified_not_deleted(tmp_path: Path, cache: ArtifactCache) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(DATA)
    assert cache.verify_local(model, SHA) == SHA
    assert cache.verify_local(model, None) == SHA
    with pytest.raises(ChecksumMismatch):
        cache.verify_local(model, sha256(b"other"))
    assert model.exists()


def test_rejects_a_malformed_digest(cache: ArtifactCache) -> None:
    with pytest.raises(ValueError, match="sha256"):
        cache.path("../../etc/passwd")
