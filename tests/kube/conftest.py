"""Fixtures that start real Kubernetes control planes (see controlplane.py).

Without the binaries from scripts/kube-control-plane.sh the tests that use these fixtures
are skipped on a developer machine and FAIL under CI=true: CI must build them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kube.controlplane import ControlPlane, kube_binaries, start_control_plane


def require_kube_binaries() -> Path:
    """The binaries' directory; pytest.fail under CI=true, pytest.skip elsewhere."""
    try:
        return kube_binaries()
    except RuntimeError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{exc} (CI=true: the control-plane tests must not be skipped)")
        pytest.skip(f"{exc} (skipped outside CI; run the script to enable these tests)")


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
