"""node_agent/cluster/pods.py: how an inference pod and a node read. Both modes use it
(the cluster agent in pull mode, the push driver in push mode)."""

from __future__ import annotations

from typing import Any

import pytest

from node_agent.cluster.pods import node_report, observe_pod

SHA = "a" * 64


def pod(status: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "p",
            "labels": {"edgefleet.io/model": "m", "edgefleet.io/version": "1"},
            "annotations": {"edgefleet.io/sha256": SHA},
        },
        "spec": spec or {"nodeName": "n1"},
        "status": status,
    }


@pytest.mark.parametrize(
    ("status", "phase", "reason", "restarts"),
    [
        (
            {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
            "Ready",
            None,
            0,
        ),
        ({"phase": "Pending"}, "Pending", None, 0),
        ({"phase": "Running"}, "Running", None, 0),
        (
            {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/1 nodes: insufficient cpu",
                    }
                ],
            },
            "Failed",
            "Unschedulable: 0/1 nodes: insufficient cpu",
            0,
        ),
        (
            {
                "phase": "Running",
                "containerStatuses": [
                    {"restartCount": 3, "lastState": {"terminated": {"reason": "OOMKilled"}}}
                ],
            },
            "Failed",
            "OOMKilled",
            3,
        ),
        (
            {"containerStatuses": [{"state": {"waiting": {"reason": "ImagePullBackOff"}}}]},
            "Failed",
            "ImagePullBackOff",
            0,
        ),
        ({"phase": "Failed", "reason": "Evicted"}, "Failed", "Evicted", 0),
        (
            {
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{"restartCount": 2, "state": {"running": {}}}],
            },
            "Ready",
            None,
            2,
        ),
    ],
)
def test_pod_states(status: dict[str, Any], phase: str, reason: str | None, restarts: int) -> None:
    seen = observe_pod(pod(status))
    assert seen is not None
    assert (seen.model, seen.node, seen.version, seen.sha256) == ("m", "n1", "1", SHA)
    assert (seen.phase, seen.reason, seen.restarts) == (phase, reason, restarts)


def test_an_unscheduled_daemonset_pod_belongs_to_its_affinity_node() -> None:
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n7"]}]}
                ]
            }
        }
    }
    seen = observe_pod(pod({"phase": "Pending"}, affinity=affinity))
    assert seen is not None
    assert seen.node == "n7"


def test_pods_being_deleted_or_of_no_node_are_not_observed() -> None:
    deleting = pod({"phase": "Running"})
    deleting["metadata"]["deletionTimestamp"] = "2026-12-05T12:00:00Z"
    assert observe_pod(deleting) is None
    assert observe_pod(pod({"phase": "Pending"}, schedulerName="x")) is None


def test_node_inventory() -> None:
    node = node_report(
        {
            "metadata": {
                "name": "n1",
                "labels": {
                    "tier": "retail",
                    "model.edgefleet.io/detector": "1.0.0",
                    "edgefleet.io/runtimes": "onnx",
                },
            },
            "status": {
                "nodeInfo": {"architecture": "arm64"},
                "capacity": {"cpu": "4", "memory": "8Gi", "pods": "110"},
                "allocatable": {"cpu": "3800m", "memory": "7Gi"},
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }
    )
    # The model labels are the desired state's, not the node's own.
    assert node.labels == {"tier": "retail", "edgefleet.io/runtimes": "onnx"}
    assert (node.architecture, node.ready, node.runtimes) == ("arm64", True, ["onnx"])
    assert node.capacity == {"cpu": "4", "memory": "8Gi"}
