"""The handover's objects against a real kube-apiserver, controller-manager and scheduler:
they server-side apply, each version's DaemonSet starts its pod beside the serving one,
the model's Service (its Endpoints, made by the real endpoints controller) selects the
Ready pods of every version and only those, and the old pod goes once the new one is
Ready; a rollback is the same backwards. tests/kube/kubelet.py plays the kubelet."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
from kubernetes import client as k8s

from controller.kube import objects
from controller.kube.client import KubernetesDriver
from node_agent.cluster import handover
from tests.kube.controlplane import make_node, mark_pods_ready
from tests.kube.kubelet import eventually, start_pods
from tests.kube.test_driver import spec

log = logging.getLogger(__name__)


@pytest.fixture
def nodes(core: Any) -> Iterator[list[str]]:
    names = [f"edge-{uuid.uuid4().hex[:6]}-{i}" for i in range(2)]
    for name in names:
        make_node(core, name, labels={"tier": "retail"})
    yield names
    for name in names:
        core.delete_node(name)


def pods(core: Any, ns: str) -> set[tuple[str, str]]:
    """(node, version) of every pod not being deleted."""
    return {
        (p.spec.node_name, p.metadata.labels["edgefleet.io/version"])
        for p in core.list_namespaced_pod(ns).items
        if p.spec.node_name and p.metadata.deletion_timestamp is None
    }


def endpoints(core: Any, ns: str) -> set[tuple[str, str]]:
    """(node, version) of the pods the model's Service sends traffic to: its Endpoints'
    ready addresses."""
    try:
        ep = core.read_namespaced_endpoints(objects.service_name("detector"), ns)
    except k8s.ApiException as exc:
        if exc.status == 404:
            return set()
        raise
    found = set()
    for subset in ep.subsets or []:
        for address in subset.addresses or []:
            pod = core.read_namespaced_pod(address.target_ref.name, ns)
            found.add((address.node_name, pod.metadata.labels["edgefleet.io/version"]))
    return found


class EndpointWatch:
    """Every 10 ms, the (node, version) pairs the model's Service sends traffic to: its
    Endpoints' ready addresses, made by the real endpoints controller from the pods'
    readiness. There is no kube-proxy here; it sends a node's requests to exactly these
    (``internalTrafficPolicy: Local``: the node's own), so a sample in which a node has
    none is a request that fails there."""

    def __init__(self, core: Any, namespace: str, versions: list[str]) -> None:
        self.core, self.ns = core, namespace
        self.by_prefix = {objects.workload_name("detector", v): v for v in versions}
        self.samples: list[tuple[float, dict[str, set[str]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def now(self) -> dict[str, set[str]]:
        try:
            ep = self.core.read_namespaced_endpoints(objects.service_name("detector"), self.ns)
        except k8s.ApiException as exc:
            if exc.status == 404:  # not made yet by the endpoints controller
                return {}
            raise
        out: dict[str, set[str]] = {}
        for subset in ep.subsets or []:
            for address in subset.addresses or []:
                prefix = address.target_ref.name.rsplit("-", 1)[0]  # <daemonset>-<suffix>
                out.setdefault(address.node_name, set()).add(self.by_prefix[prefix])
        return out

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.now()))
            self._stop.wait(0.010)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


# An update: (started, done, the version nodes leave, the one they move to).
Update = tuple[float, float, str, str]


def assert_every_node_served(watch: EndpointWatch, nodes: list[str], updates: list[Update]) -> int:
    """Every sample from the first update on (ten at least during each) gives each node
    a Ready endpoint of the version it leaves or the one it moves to; returns the
    node-samples with both."""
    samples = [(t, seen) for t, seen in watch.samples if t >= updates[0][0]]
    for started, done, old, new in updates:  # each handover sampled throughout
        assert sum(started <= t <= done for t, _ in samples) >= 10, (old, new)
    overlap = 0
    for t, seen in samples:
        update = [u for u in updates if u[0] <= t][-1]
        for node in nodes:
            assert seen.get(node), f"{node} had no Ready endpoint at {t - update[0]:.2f} s"
            assert seen[node] <= {update[2], update[3]}, (node, seen[node], update)
            overlap += len(seen[node]) == 2
    assert overlap, "the old and new versions never served together: break before make"
    log.warning(
        "handovers: %d Endpoints samples over %d updates (%.1f s), every node served in "
        "each; %d node-samples with both versions Ready",
        len(samples),
        len(updates),
        updates[-1][1] - updates[0][0],
        overlap,
    )
    return overlap


def labels(core: Any, node: str) -> tuple[str | None, str | None]:
    got = core.read_node(node).metadata.labels or {}
    return got.get(handover.node_label("detector")), got.get(handover.previous_label("detector"))


def test_handover_and_rollback_through_the_service(
    driver: KubernetesDriver, nodes: list[str], core: Any, ns: str
) -> None:
    a, b = nodes
    driver.apply("detector", {a: spec("1.0.0"), b: spec("1.0.0")})
    svc = core.read_namespaced_service(objects.service_name("detector"), ns)
    assert svc.spec.selector == objects.model_selector("detector")
    (managed,) = svc.metadata.managed_fields
    assert (managed.manager, managed.operation) == ("edgefleet", "Apply")
    # Kubernetes 1.20 has no internalTrafficPolicy (the driver leaves it out there).
    assert "internalTrafficPolicy" not in (svc.to_dict()["spec"] or {})
    eventually(
        lambda: endpoints(core, ns) == {(a, "1.0.0"), (b, "1.0.0")},
        what="the Service on both v1 pods",
        beat=lambda: start_pods(core, ns),
    )

    # Node a moves to 2.0.0: its 1.0.0 pod stays, and serves, until 2.0.0 is Ready.
    driver.apply("detector", {a: spec("2.0.0")})
    assert labels(core, a) == ("2.0.0", "1.0.0")
    eventually(lambda: (a, "2.0.0") in pods(core, ns), what="a v2 pod beside v1")
    assert pods(core, ns) == {(a, "1.0.0"), (a, "2.0.0"), (b, "1.0.0")}
    observed = driver.observe("detector", nodes)
    assert (observed[a].phase, observed[a].version) == ("Pending", "2.0.0")  # not v1, Ready
    assert (observed[b].phase, observed[b].version) == ("Ready", "1.0.0")
    assert labels(core, a) == ("2.0.0", "1.0.0")  # not Ready yet: the handover waits
    assert endpoints(core, ns) == {(a, "1.0.0"), (b, "1.0.0")}  # v2 gets no traffic yet
    (inventory,) = [n for n in driver.list_nodes() if n.name == a]
    assert not [k for k in inventory.labels if "model.edgefleet.io/" in k]  # ours, not the node's

    # The kubelet starts v2: the Service sends traffic to it as soon as it is Ready.
    eventually(
        lambda: endpoints(core, ns) == {(a, "1.0.0"), (a, "2.0.0"), (b, "1.0.0")},
        what="the Service on v2 too",
        beat=lambda: start_pods(core, ns),
    )
    # The reconciler sees v2 Ready; the handover finishes and v1 leaves node a.
    observed = driver.observe("detector", nodes)
    assert (observed[a].phase, observed[a].version) == ("Ready", "2.0.0")
    assert labels(core, a) == ("2.0.0", None)
    eventually(
        lambda: (
            endpoints(core, ns) == {(a, "2.0.0"), (b, "1.0.0")}
            and pods(core, ns) == {(a, "2.0.0"), (b, "1.0.0")}
        ),
        what="v1 gone from node a",
        beat=lambda: start_pods(core, ns),
    )

    # Rollback: the same handover backwards.
    driver.apply("detector", {a: spec("1.0.0")})
    assert labels(core, a) == ("1.0.0", "2.0.0")
    eventually(lambda: (a, "1.0.0") in pods(core, ns), what="a v1 pod beside v2")
    assert (a, "2.0.0") in endpoints(core, ns)
    eventually(
        lambda: driver.observe("detector", [a])[a].phase == "Ready",
        what="v1 Ready on node a",
        beat=lambda: start_pods(core, ns),
    )

    def released() -> bool:  # at the first look once the Endpoints list v1's pod
        driver.observe("detector", [a])
        return labels(core, a) == ("1.0.0", None)

    eventually(released, what="the handover back to v1 finished")
    eventually(
        lambda: (
            endpoints(core, ns) == {(a, "1.0.0"), (b, "1.0.0")}
            and pods(core, ns) == {(a, "1.0.0"), (b, "1.0.0")}
        ),
        what="back on v1 everywhere",
        beat=lambda: start_pods(core, ns),
    )
    driver.apply("detector", {a: spec("1.0.0")})  # collects v2's DaemonSet, now unused
    versions = [
        w["metadata"]["labels"]["edgefleet.io/version"]
        for w in driver.workloads("detector")
        if not w["metadata"].get("deletionTimestamp")  # (a foreground deletion may linger)
    ]
    assert versions == ["1.0.0"]

    # Leaving the model takes its Service with its last DaemonSet.
    driver.apply("detector", {a: None, b: None})
    with pytest.raises(k8s.ApiException) as gone:
        core.read_namespaced_service(objects.service_name("detector"), ns)
    assert gone.value.status == 404
    assert labels(core, a) == labels(core, b) == (None, None)


def test_the_handover_waits_for_the_endpoints_not_the_pod(
    driver: KubernetesDriver, nodes: list[str], core: Any, ns: str
) -> None:
    """A new pod Ready that the Service does not route to yet keeps the old one: here
    Ready before it has an IP, so the endpoints controller cannot list it at all."""
    a = nodes[0]
    driver.apply("detector", {a: spec("1.0.0")})
    eventually(
        lambda: endpoints(core, ns) == {(a, "1.0.0")},
        what="v1 served",
        beat=lambda: start_pods(core, ns),
    )
    driver.apply("detector", {a: spec("2.0.0")})
    eventually(lambda: (a, "2.0.0") in pods(core, ns), what="a v2 pod beside v1")
    mark_pods_ready(core, ns, f"app.kubernetes.io/name={objects.APP_NAME}")  # no IP
    for _ in range(3):
        observed = driver.observe("detector", [a])[a]
        assert (observed.phase, observed.version) == ("Ready", "2.0.0")
        assert labels(core, a) == ("2.0.0", "1.0.0")  # v1 still serves
        assert endpoints(core, ns) == {(a, "1.0.0")}
        time.sleep(0.5)
    # Its IP: the Endpoints list it, and the next look ends the handover.
    eventually(
        lambda: (a, "2.0.0") in endpoints(core, ns),
        what="v2 in the Endpoints",
        beat=lambda: start_pods(core, ns),
    )
    driver.observe("detector", [a])
    assert labels(core, a) == ("2.0.0", None)


def test_a_push_mode_version_change_keeps_every_node_served(
    driver: KubernetesDriver, nodes: list[str], core: Any, ns: str
) -> None:
    """Make before break in push mode, as the reconciler drives it (``apply`` once, then
    ``observe`` until every node reports the new version Ready, which is where each
    handover finishes), with the kubelet turning pods Ready just before each look: the
    driver sees the new pod Ready before the endpoints controller has listed it, and
    must keep the old one until it has. Through two updates and a rollback, every
    node's Service has a Ready pod of the version it leaves or the one it moves to at
    every sample."""
    versions = ["1.0.0", "2.0.0", "3.0.0"]

    def beat() -> None:
        start_pods(core, ns)
        driver.observe("detector", nodes)

    def serving(version: str) -> bool:
        return (
            watch.now() == {n: {version} for n in nodes}
            and pods(core, ns) == {(n, version) for n in nodes}
            and all(labels(core, n) == (version, None) for n in nodes)
        )

    driver.apply("detector", dict.fromkeys(nodes, spec("1.0.0")))
    watch = EndpointWatch(core, ns, versions)
    updates: list[Update] = []
    try:
        eventually(lambda: serving("1.0.0"), what="1.0.0 served on every node", beat=beat)
        for old, new in [("1.0.0", "2.0.0"), ("2.0.0", "3.0.0"), ("3.0.0", "2.0.0")]:
            started = time.monotonic()
            driver.apply("detector", dict.fromkeys(nodes, spec(new)))
            eventually(partial(serving, new), what=f"{new} served", beat=beat, timeout_s=60)
            updates.append((started, time.monotonic(), old, new))
            # The old DaemonSet gone for good before the next change: one applied while
            # its foreground deletion is still under way would go with it.
            eventually(
                lambda: len(driver.workloads("detector")) == 1,
                what=f"{old}'s DaemonSet deleted",
                beat=beat,
            )
    finally:
        watch.stop()
    assert_every_node_served(watch, nodes, updates)


def test_no_room_for_both_pods_falls_back_to_break_before_make(
    driver: KubernetesDriver, core: Any, ns: str
) -> None:
    node = f"edge-{uuid.uuid4().hex[:6]}-small"
    make_node(core, node, labels={}, cpu="1", memory="1Gi")
    try:
        big = {"requests": {"cpu": "600m", "memory": "256Mi"}, "limits": {"cpu": "1"}}
        driver.apply("detector", {node: spec("1.0.0", resources=big)})
        eventually(
            lambda: driver.observe("detector", [node])[node].phase == "Ready",
            what="v1 Ready",
            beat=lambda: start_pods(core, ns),
        )
        driver.apply("detector", {node: spec("2.0.0", resources=big)})
        assert labels(core, node) == ("2.0.0", "1.0.0")
        # The scheduler finds no room for v2 beside v1: v1 goes first.
        eventually(
            lambda: labels(core, node) == ("2.0.0", None),
            what="the previous label dropped",
            beat=lambda: driver.observe("detector", [node]),
        )
        eventually(
            lambda: (
                driver.observe("detector", [node])[node].phase == "Ready"
                and pods(core, ns) == {(node, "2.0.0")}
            ),
            what="v2 scheduled and Ready once v1 left",
            beat=lambda: start_pods(core, ns),
            timeout_s=60,
        )
    finally:
        driver.apply("detector", {node: None})
        core.delete_node(node)
