"""Manifest documents built in code, as the plain dicts a YAML file parses to: the demo's
scenario, the tests and the benches write their fleets, model versions and rollouts with
these, so the envelope and the example fleet's conventions live in one place.

The example fleet: retail nodes (``tier: retail``) labelled with their ``site``, running
the ``detector`` model. Every builder copies what it is given, so a caller may pass a
shared constant (``RESOURCES``) and change the document it gets back."""

from __future__ import annotations

import copy
from typing import Any

from controller.kit.manifest import API_VERSION

RETAIL = {"tier": "retail"}
MODEL = "detector"
# The inference workload's requests and limits in the examples.
RESOURCES = {
    "requests": {"cpu": "250m", "memory": "256Mi"},
    "limits": {"cpu": "1", "memory": "512Mi"},
}


def document(
    kind: str, name: str, spec: dict[str, Any], *, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """The envelope: apiVersion, ``kind``, metadata (``name``, ``labels`` if any), spec."""
    metadata: dict[str, Any] = {"name": name}
    if labels:
        metadata["labels"] = dict(labels)
    spec = copy.deepcopy(spec)
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": metadata, "spec": spec}


def site_labels(site: str, **labels: str) -> dict[str, str]:
    """The labels of a node of the example fleet at ``site`` (and ``labels``)."""
    return {**RETAIL, "site": site, **labels}


def fleet(
    name: str,
    count: int,
    *,
    driver: str = "simulated",
    prefix: str | None = None,
    node: dict[str, Any] | None = None,
    labels: dict[str, str] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """A Cluster of ``count`` retail nodes of site ``name``, alike but for their names,
    ``<prefix>-<i>`` (prefix ``<name>-n`` unless given). ``node`` adds to their template
    (architecture, cpu, memory), ``options`` to the driver's section (``applyLatency``,
    ``basePort``...); ``labels`` are the Cluster's own."""
    template = {"labels": site_labels(name), **(node or {})}
    nodes = {"count": count, "prefix": prefix or f"{name}-n", "template": template, **options}
    return document("Cluster", name, {"driver": driver, driver: nodes}, labels=labels)


def model_version(
    version: str,
    artifact: dict[str, Any],
    *,
    name: str | None = None,
    labels: dict[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A ModelVersion of ``detector``: the artifact (``path``, ``url``, ``sha256``) and
    any other ``spec`` field; named ``detector-<version, dots as dashes>`` unless
    ``name`` is given."""
    body = {"model": MODEL, "version": version, "artifact": artifact, **spec}
    name = name or f"{MODEL}-{version.replace('.', '-')}"
    return document("ModelVersion", name, body, labels=labels)


def rollout(name: str, version: str, **spec: Any) -> dict[str, Any]:
    """A Rollout of ``detector`` ``version`` to the retail nodes; ``spec`` adds its
    fields (strategy, gates, resources...) or replaces these two (``model``,
    ``selector``)."""
    body = {"model": {"name": MODEL, "version": version}, "selector": {"matchLabels": RETAIL}}
    return document("Rollout", name, {**body, **spec})
