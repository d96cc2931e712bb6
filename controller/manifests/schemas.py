"""The manifest kinds an apply accepts (apiVersion ``edgefleet.io/v1``), by ``kind``.
Each domain owns its kind's model; ``scripts/gen_schemas.py`` writes their JSON Schemas
to ``schemas/`` and the API serves them at ``/v1/schemas/{kind}``."""

from __future__ import annotations

from controller.fleet.spec import ClusterManifest
from controller.registry.spec import ModelVersionManifest
from controller.rollouts.spec import RolloutManifest
from controller.schedules.spec import FreezePeriodManifest

Manifest = ClusterManifest | ModelVersionManifest | FreezePeriodManifest | RolloutManifest

KINDS: dict[str, type[Manifest]] = {
    "Cluster": ClusterManifest,
    "ModelVersion": ModelVersionManifest,
    "FreezePeriod": FreezePeriodManifest,
    "Rollout": RolloutManifest,
}
