"""node_agent/cluster/handover.py: the make-before-break rule both modes follow. The old
version is released only once the new one serves: its pod Ready *and* among the ready
addresses of the model's Service's Endpoints, which kube-proxy routes by and which the
endpoints controller updates a moment after the pod turns Ready."""

from __future__ import annotations

from typing import Any

from node_agent.cluster.handover import routed_pods, step

READY = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
STARTING = {"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}]}
UNSCHEDULABLE = {
    "phase": "Pending",
    "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "cpu"}
    ],
}


def pod(name: str, version: str, status: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "labels": {"edgefleet.io/model": "m", "edgefleet.io/version": version},
        },
        "spec": {"nodeName": "n1"},
        "status": status,
    }


def endpoints(ready: list[str], not_ready: tuple[str, ...] = ()) -> dict[str, Any]:
    def address(name: str) -> dict[str, Any]:
        return {"ip": "10.0.0.1", "nodeName": "n1", "targetRef": {"kind": "Pod", "name": name}}

    subset: dict[str, Any] = {"ports": [{"name": "http", "port": 8500}]}
    if ready:
        subset["addresses"] = [address(n) for n in ready]
    if not_ready:
        subset["notReadyAddresses"] = [address(n) for n in not_ready]
    return {"metadata": {"name": "ef-m"}, "subsets": [subset]}


def test_routed_pods_are_the_ready_addresses_only() -> None:
    eps = [endpoints(["a-1", "b-1"], ("c-1",)), {"metadata": {"name": "ef-x"}}]
    eps.append({"subsets": [{"addresses": [{"ip": "10.0.0.9"}]}]})  # no pod behind it
    assert routed_pods(eps) == {"a-1", "b-1"}
    assert routed_pods([]) == frozenset()


def test_a_new_pod_ready_but_not_yet_in_the_endpoints_keeps_the_old_one() -> None:
    old, new = pod("v1-x", "1", READY), pod("v2-y", "2", READY)
    # The kubelet says v2 is Ready; the endpoints controller has not listed it yet.
    routed = routed_pods([endpoints(["v1-x"], ("v2-y",))])
    assert step("2", "2", "1", [old, new], routed) == ("2", "1")
    # Not listed at all yet either.
    assert step("2", "2", "1", [old, new], routed_pods([endpoints(["v1-x"])])) == ("2", "1")
    # Once the Endpoints route to it, v1 is released.
    routed = routed_pods([endpoints(["v1-x", "v2-y"])])
    assert step("2", "2", "1", [old, new], routed) == ("2", None)


def test_a_version_change_starts_a_handover_from_the_version_that_serves() -> None:
    old = pod("v1-x", "1", READY)
    routed = routed_pods([endpoints(["v1-x"])])
    assert step("2", "1", None, [old], routed) == ("2", "1")
    # v2 starting, not Ready: v1 still serves.
    assert step("2", "2", "1", [old, pod("v2-y", "2", STARTING)], routed) == ("2", "1")
    # v1 Ready but not routed to yet (it just came up): kept too, rather than leave
    # the node with nothing until v2 is up.
    assert step("2", "1", None, [old], frozenset()) == ("2", "1")


def test_a_change_in_the_middle_of_a_change_keeps_the_version_that_serves() -> None:
    v1, v2 = pod("v1-x", "1", READY), pod("v2-y", "2", READY)
    # v2 is Ready but not routed to; v1 serves: moving on to v3 keeps v1, not v2.
    routed = routed_pods([endpoints(["v1-x"])])
    assert step("3", "2", "1", [v1, v2], routed) == ("3", "1")
    # Back to v1 while v2 starts: v1 serves, nothing to keep.
    assert step("1", "2", "1", [v1, pod("v2-y", "2", STARTING)], routed) == ("1", None)


def test_nothing_is_kept_when_leaving_or_without_room() -> None:
    old = pod("v1-x", "1", READY)
    routed = routed_pods([endpoints(["v1-x"])])
    assert step(None, "1", None, [old], routed) == (None, None)
    starved = pod("v2-y", "2", UNSCHEDULABLE)
    assert step("2", "2", "1", [old, starved], routed) == ("2", None)
