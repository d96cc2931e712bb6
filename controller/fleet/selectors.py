"""Which nodes a label selector picks: the ``selector`` of a Rollout and of a benchmark
request, with Kubernetes label-selector semantics plus a list of clusters. Nodes, their
clusters and labels are the fleet's, so the vocabulary lives here and the domains that
select nodes (rollouts, benchmarks) import it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import Field, model_validator

from controller.kit.manifest import LabelKey, LabelValue, Name, Strict


class Requirement(Strict):
    key: LabelKey
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[LabelValue] = Field(default_factory=list)

    @model_validator(mode="after")
    def _values(self) -> Requirement:
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"operator {self.operator} needs a non-empty values list")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"operator {self.operator} takes no values")
        return self


class Selector(Strict):
    matchLabels: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    matchExpressions: list[Requirement] = Field(default_factory=list)
    clusters: list[Name] = Field(
        default_factory=list, description="only nodes of these clusters (default: all)"
    )


def selector_matches(selector: Selector, cluster: str, labels: Mapping[str, str]) -> bool:
    """Kubernetes label-selector semantics: every matchLabels pair and every expression
    must hold (NotIn and DoesNotExist also hold when the key is absent)."""
    if selector.clusters and cluster not in selector.clusters:
        return False
    for key, wanted in selector.matchLabels.items():
        if labels.get(key) != wanted:
            return False
    for req in selector.matchExpressions:
        value = labels.get(req.key)
        if req.operator == "In" and (value is None or value not in req.values):
            return False
        if req.operator == "NotIn" and value is not None and value in req.values:
            return False
        if req.operator == "Exists" and value is None:
            return False
        if req.operator == "DoesNotExist" and value is not None:
            return False
    return True
