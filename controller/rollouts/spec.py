"""The ``Rollout`` manifest: which model version goes to which nodes (selector), in
which waves and at what pace (strategy), judged by which gates."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator, model_validator

from controller.fleet.selectors import Selector
from controller.kit.durations import parse_duration
from controller.kit.manifest import (
    Document,
    Duration,
    Name,
    Quantity,
    Strict,
    Version,
    check_quantity,
)
from controller.kit.quantity import parse_quantity
from controller.schedules.spec import Schedule

_PERCENT = re.compile(r"^(100|[1-9]?[0-9])%$")
PERCENT = re.compile(r"^(\d+)%$")


def _int_or_percent(value: object) -> int | str:
    """One error at the field itself (not one per branch of an int | str union)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and _PERCENT.match(value):
        return value
    raise ValueError(
        f"expected a node count (an integer >= 0) or a percentage from '0%' to '100%', "
        f"got {value!r}"
    )


def _at_least_one(value: object) -> int | str:
    if value in (0, "0%") or (isinstance(value, int) and not isinstance(value, bool) and value < 0):
        raise ValueError(
            f"must allow at least one node: an integer >= 1 or a percentage above 0%, got {value!r}"
        )
    return _int_or_percent(value)


IntOrPercent = Annotated[
    int | str,
    BeforeValidator(_int_or_percent),
    Field(description="a node count (int >= 0) or a percentage string like '10%'"),
]
PositiveIntOrPercent = Annotated[
    int | str,
    BeforeValidator(_at_least_one),
    Field(description="a node count (int >= 1) or a percentage string like '10%'"),
]


class ResourceList(Strict):
    cpu: Quantity | None = None
    memory: Quantity | None = None

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, v: str | int | float | None) -> str | None:
        return None if v is None else check_quantity(v)


class Resources(Strict):
    requests: ResourceList = Field(default_factory=ResourceList)
    limits: ResourceList = Field(default_factory=ResourceList)

    @model_validator(mode="after")
    def _requests_within_limits(self) -> Resources:
        for field in ("cpu", "memory"):
            req, lim = getattr(self.requests, field), getattr(self.limits, field)
            if req is not None and lim is not None and parse_quantity(req) > parse_quantity(lim):
                raise ValueError(f"requests.{field} ({req}) must not exceed limits.{field} ({lim})")
        return self


class ModelRef(Strict):
    name: Name
    version: Version
    variants: Literal["auto"] | list[Version] | None = Field(
        None,
        description="Let the controller pick, per node class, the fastest of this version "
        "and these variants that its on-node benchmarks show within the gates (p95) and the "
        "memory limit, and that meet spec.comparison; 'auto': every Ready variant derived "
        "from the version. A class without such a benchmark gets the version itself.",
    )

    @field_validator("variants")
    @classmethod
    def _distinct(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("give at least one variant, or 'auto', or leave it out")
            if len(set(v)) != len(v):
                raise ValueError("variants must be distinct")
            if info.data.get("version") in v:
                raise ValueError("the version itself is always a candidate: list variants only")
        return v


class Step(Strict):
    nodes: int | None = Field(None, ge=1, description="cumulative node count after this step")
    percent: int | None = Field(None, ge=1, le=100, description="cumulative percentage")
    bake: Duration = "0s"

    @field_validator("bake")
    @classmethod
    def _bake(cls, v: str) -> str:
        parse_duration(v)
        return v

    @model_validator(mode="after")
    def _one_size(self) -> Step:
        if (self.nodes is None) == (self.percent is None):
            raise ValueError("give exactly one of nodes or percent")
        return self


class Strategy(Strict):
    steps: list[Step] = Field(min_length=1, max_length=100)
    maxUnavailable: PositiveIntOrPercent = "25%"
    maxDeferred: IntOrPercent = Field(
        "10%", description="offline nodes a wave may defer before the rollout fails"
    )
    progressDeadline: Duration = "15m"

    @field_validator("progressDeadline")
    @classmethod
    def _deadline(cls, v: str) -> str:
        if parse_duration(v) <= 0:
            raise ValueError("must be longer than 0s")
        return v


class Gates(Strict):
    maxP95LatencyMs: float | None = Field(None, gt=0)
    maxErrorRate: float | None = Field(None, ge=0, le=1)
    minHealthyRatio: float = Field(1.0, ge=0, le=1)
    minSamples: int = Field(20, ge=1, description="inferences a node must report to count")


class ComparisonRequirement(Strict):
    """Limits on a derived variant's comparison report (how close it stays to its parent)."""

    minAgreement: float | None = Field(None, ge=0, le=1, description="top-1 agreement")
    maxAbsError: float | None = Field(None, ge=0, description="max absolute output error")


class RolloutSpec(Strict):
    model: ModelRef
    selector: Selector
    resources: Resources = Field(default_factory=Resources)
    strategy: Strategy
    gates: Gates = Field(default_factory=Gates)
    onFailure: Literal["rollback", "pause"] = "rollback"
    comparison: ComparisonRequirement | None = None
    schedule: Schedule | None = Field(
        None,
        description="when waves may start nodes: a start time, maintenance windows per "
        "time zone, bake counted in windows only (none: any time)",
    )


class RolloutManifest(Document):
    kind: Literal["Rollout"]
    spec: RolloutSpec
