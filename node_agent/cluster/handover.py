"""Make before break: the rule that moves a node from one version of a model to the next
without interrupting the applications that call it, in both modes. The push driver
(controller/kube/client.py) follows it from the controller; in pull mode the cluster agent
(node_agent/cluster/loop.py) follows it in the cluster, from its own view of the pods, so
a handover finishes there as soon as the new pod is Ready, with or without the
controller. Why surge pods and a node-local Service: controller/kube/objects.py.

A node moving from A to B carries ``model.edgefleet.io/<model>=B`` (what it should run)
and ``previous.model.edgefleet.io/<model>=A`` (what serves until B is Ready); each
version's DaemonSet selects nodes whose label or previous label names it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from typing import Any

from node_agent.cluster.contract import NODE_LABEL_PREFIX, PREVIOUS_LABEL_PREFIX
from node_agent.cluster.pods import observe_pod


def node_label(model: str) -> str:
    """The node label naming the version a node should run."""
    return f"{NODE_LABEL_PREFIX}{model}"


def previous_label(model: str) -> str:
    """The node label naming the version that serves until the new one is Ready."""
    return f"{PREVIOUS_LABEL_PREFIX}{model}"


def routed_pods(endpoints: Iterable[Mapping[str, Any]]) -> frozenset[str]:
    """The names of the pods some Endpoints send traffic to: their ready addresses'
    (``notReadyAddresses`` get none)."""
    return frozenset(
        ref["name"]
        for ep in endpoints
        for subset in ep.get("subsets") or []
        for address in subset.get("addresses") or []
        if (ref := address.get("targetRef") or {}).get("kind") == "Pod" and ref.get("name")
    )


def next_labels(
    wanted: str | None,
    current: str | None,
    previous: str | None,
    serving: Set[str],
    *,
    ready: Set[str] = frozenset(),
    room: bool = True,
) -> tuple[str | None, str | None]:
    """A node's (label, previous label) for the model, given the version it should run
    (``wanted``), its labels now, the versions that serve on it (``serving``: Ready and
    in the Service's Endpoints) and those whose pod is Ready (``ready``, which the
    Endpoints list a moment later).

    The previous label names a version that serves while ``wanted`` does not yet: the
    one the node is leaving if it serves, else the one an unfinished handover kept (a
    change in the middle of a change keeps the version that serves, not the one still
    starting); failing both, one whose pod is Ready, which the Endpoints are about to
    list. Nothing is kept once ``wanted`` serves, when the node leaves the model
    (nothing would take the traffic over), or without ``room``: the scheduler found no
    room for ``wanted``'s pod beside the old one, which must go first (break before make,
    as before surging)."""
    if wanted is None or wanted in serving or not room:
        return wanted, None
    for able in (serving, ready):
        for keep in (current, previous):
            if keep is not None and keep != wanted and keep in able:
                return wanted, keep
    return wanted, None


def step(
    wanted: str | None,
    current: str | None,
    previous: str | None,
    pods: Iterable[Mapping[str, Any]],
    routed: Set[str],
) -> tuple[str | None, str | None]:
    """:func:`next_labels` from the node's pods of the model as listed and the pods the
    model's Service routes to (``routed``, :func:`routed_pods`): a Ready pod serves once
    it is routed to, and a pod of ``wanted`` the scheduler cannot place means no room."""
    serving: set[str] = set()
    ready: set[str] = set()
    starved = False
    for pod in pods:
        o = observe_pod(pod)
        if o is None or o.version is None:
            continue
        if o.phase == "Ready":
            ready.add(o.version)
            if pod["metadata"]["name"] in routed:
                serving.add(o.version)
        starved |= o.version == wanted and (o.reason or "").startswith("Unschedulable")
    return next_labels(wanted, current, previous, serving, ready=ready, room=not starved)
