"""Fixtures that start real Kubernetes control planes (see controlplane.py).

Without the binaries from scripts/kube-control-plane.sh the tests that use these fixtures
fail with a message saying how to build them, like a missing Postgres or Redis does:
a missing dependency is never a silent pass (scripts/test builds them).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kube.controlplane import ControlPlane, kube_binaries, start_control_plane


def require_kube_binaries() -> Path:
    """The binaries' directory, or a failure that says how to build them."""
    try:
        return kube_binaries()
    except RuntimeError as exc:
        pytest.fail(f"{exc} (bash scripts/test builds them on first use)", pytrace=False)


def _control_plane(factory: pytest.TempPathFactory, name: str) -> Iterator[ControlPlane]:
    require_kube_binaries()
    cp = start_control_plane(factory.mktemp(name), name=name)
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    yield from _control_plane(tmp_path_factory, "kube-a")


@pytest.fixture(scope="session")
def second_control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    yield from _control_plane(tmp_path_factory, "kube-b")
