"""Fixtures that start real Kubernetes control planes (see controlplane.py).

Without the binaries from scripts/kube-control-plane.sh (and, for the real node,
scripts/kube-node.sh and scripts/build-images.sh) the tests that use these fixtures
fail with a message saying how to build them, like a missing Postgres or Redis does:
a missing dependency is never a silent pass (scripts/test builds them).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from controller.kube.client import KubernetesDriver
from tests.kube.controlplane import ControlPlane, credentials, kube_binaries, start_control_plane
from tests.kube.node import (
    BuiltImage,
    Node,
    built_images,
    machine_problems,
    node_binaries,
    running_node,
)


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


# --- a real node (node.py): containerd and a kubelet running real containers ------------


def require_real_node() -> None:
    """Root and cgroup v1, or a skip; under CI=true a failure, never a skip. Missing
    binaries or images always fail, saying how to build them."""
    problems = machine_problems()
    if problems:
        message = "; ".join(problems)
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the real-node tests: {message}", pytrace=False)
        pytest.skip(message)
    try:
        node_binaries()
    except RuntimeError as exc:
        pytest.fail(f"{exc} (bash scripts/test builds them on first use)", pytrace=False)


@pytest.fixture(scope="session")
def shipped_images() -> dict[str, BuiltImage]:
    """The images of docker/*.Dockerfile that the real-node tests run."""
    require_real_node()
    try:
        return built_images("inference", "agent")
    except RuntimeError as exc:
        pytest.fail(f"{exc} (bash scripts/test builds them on first use)", pytrace=False)


@pytest.fixture(scope="session")
def node_control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """The control plane of the real node: its own, because the node lifecycle controller
    that a real node needs would mark the other tests' stand-in nodes NotReady."""
    require_real_node()
    yield from _control_plane(tmp_path_factory, "kube-node")


@pytest.fixture(scope="session")
def real_node(
    node_control_plane: ControlPlane,
    shipped_images: dict[str, BuiltImage],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Node]:
    """containerd and a kubelet named ``localhost``, Ready, with the shipped images
    imported. Its teardown fails the run when anything is left behind."""
    archives = tuple(image.archive for image in shipped_images.values())
    with running_node(node_control_plane, tmp_path_factory.mktemp("node"), images=archives) as node:
        yield node


# --- a namespace, the core API and a driver on the session's control plane --------------
# (tests/kube/test_driver.py and test_objects_apply.py; a module may define its own)


@pytest.fixture
def ns() -> str:
    return f"ef-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def core(control_plane: ControlPlane) -> Any:
    api: Any = k8s.CoreV1Api(control_plane.api_client())
    return api


@pytest.fixture
def driver(control_plane: ControlPlane, ns: str, core: Any) -> Iterator[KubernetesDriver]:
    d = KubernetesDriver(
        "a",
        server=control_plane.server,
        namespace=ns,
        credentials=credentials(control_plane),
        image="ghcr.io/edgefleet/inference:test",
        port=8500,
        backoff=(0.1, 0.2),
    )
    d.ensure_namespace()
    yield d
    d.close()
    core.delete_namespace(ns)
