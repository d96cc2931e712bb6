"""Plans: which nodes, in which wave. Pure functions of the rollout spec and the node
inventory, so a dry-run shows exactly what apply will do.

Order within the selection is a hash of (rollout, cluster, node): deterministic for the
same inputs, yet spread across clusters and sites, so the first canary wave is not
"the first cluster alphabetically"."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from controller.fleet.selectors import selector_matches
from controller.kit.durations import parse_duration
from controller.kit.quantity import cpu_millis, memory_bytes
from controller.rollouts.spec import PERCENT, ComparisonRequirement, RolloutSpec, Strategy


@dataclass(frozen=True)
class NodeView:
    id: int
    cluster: str
    name: str
    labels: Mapping[str, str]
    architecture: str | None
    allocatable: Mapping[str, Any]
    runtimes: Sequence[str]
    health: str
    node_class: str = ""  # what on-node benchmarks are kept per (controller/benchmarks)

    @property
    def key(self) -> str:
        return f"{self.cluster}/{self.name}"


@dataclass(frozen=True)
class PlannedWave:
    index: int
    nodes: list[NodeView]
    bake_s: float


@dataclass
class Problem:
    code: str
    message: str
    nodes: list[str] = field(default_factory=list)
    severity: str = "error"  # errors refuse the apply; warnings are shown

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
        }
        if self.nodes:
            out["nodes"] = self.nodes[:50]
            out["nodeCount"] = len(self.nodes)
        return out


def count_of(value: int | str, total: int, *, round_up: bool) -> int:
    """An int, or a percentage of ``total`` (rounded up for steps, down for budgets)."""
    if isinstance(value, int):
        return value
    match = PERCENT.match(value)
    if match is None:
        raise ValueError(f"{value!r} is neither a count nor a percentage")
    exact = total * int(match.group(1)) / 100
    return math.ceil(exact) if round_up else math.floor(exact)


def _order(rollout: str, node: NodeView) -> str:
    return hashlib.sha256(f"{rollout}/{node.key}".encode()).hexdigest()


def plan_waves(rollout: str, nodes: Sequence[NodeView], strategy: Strategy) -> list[PlannedWave]:
    ordered = sorted(nodes, key=lambda n: _order(rollout, n))
    total = len(ordered)
    waves: list[PlannedWave] = []
    done = 0
    for step in strategy.steps:
        size = (
            step.nodes
            if step.nodes is not None
            else count_of(f"{step.percent}%", total, round_up=True)
        )
        target = min(total, max(size, done))
        if target > done:
            waves.append(PlannedWave(len(waves), ordered[done:target], parse_duration(step.bake)))
            done = target
    if done < total:  # like Argo Rollouts: after the last step, the rest
        waves.append(PlannedWave(len(waves), ordered[done:], 0.0))
    return waves


def max_unavailable(strategy: Strategy, total: int) -> int:
    return max(1, count_of(strategy.maxUnavailable, total, round_up=False))


def max_deferred(strategy: Strategy, wave_size: int) -> int:
    return count_of(strategy.maxDeferred, wave_size, round_up=False)


def select_nodes(spec: RolloutSpec, nodes: Sequence[NodeView]) -> list[NodeView]:
    return [n for n in nodes if selector_matches(spec.selector, n.cluster, n.labels)]


def preflight(
    spec: RolloutSpec,
    selected: Sequence[NodeView],
    *,
    model_format: str | None,
    version_status: str | None,
    supported_architectures: Sequence[str],
    owners: Mapping[str, list[str]],
    lineage: Mapping[str, Any] | None = None,
    default_comparison: ComparisonRequirement | None = None,
) -> list[Problem]:
    """Everything that would make the rollout fail before it starts. ``owners`` maps
    another active rollout's name to the nodes of this selection it holds;
    ``default_comparison`` is what a variant must meet where spec.comparison is silent
    (the settings' EDGEFLEET_VARIANT_*)."""
    problems: list[Problem] = []
    ref = f"{spec.model.name}:{spec.model.version}"
    if version_status is None:
        problems.append(Problem("ModelVersionNotFound", f"model version {ref} is not registered"))
    elif version_status == "Invalid":
        problems.append(
            Problem(
                "ModelVersionInvalid", f"model version {ref} failed validation; it cannot roll out"
            )
        )
    elif version_status != "Ready":
        problems.append(
            Problem(
                "ModelVersionNotReady",
                f"model version {ref} is {version_status}: the rollout waits in Pending "
                "until it is validated (and fails if it turns out Invalid)",
                severity="warning",
            )
        )
    if not selected:
        problems.append(Problem("NoMatchingNodes", "the selector matches no known node"))
    arch = [n.key for n in selected if n.architecture not in supported_architectures]
    if arch:
        problems.append(
            Problem(
                "UnsupportedArchitecture",
                f"the inference image supports {', '.join(supported_architectures)} only",
                arch,
            )
        )
    if model_format is not None:
        missing = [n.key for n in selected if model_format not in n.runtimes]
        if missing:
            problems.append(
                Problem("RuntimeMissing", f"these nodes have no {model_format} runtime", missing)
            )
    needs = spec.resources.requests
    for resource, parse in (("cpu", cpu_millis), ("memory", memory_bytes)):
        wanted = getattr(needs, resource) or getattr(spec.resources.limits, resource)
        if wanted is None:
            continue
        short = [
            n.key
            for n in selected
            if resource in n.allocatable and parse(n.allocatable[resource]) < parse(wanted)
        ]
        if short:
            problems.append(
                Problem(
                    "InsufficientResources",
                    f"these nodes have less allocatable {resource} than the {wanted} requested",
                    short,
                )
            )
    if spec.model.variants is None:
        # With variants, spec.comparison applies to each variant (a variant that misses it
        # is not chosen), not to the version they derive from.
        problems.extend(_comparison_problems(spec, ref, lineage, default_comparison))
    for owner, held in sorted(owners.items()):
        problems.append(
            Problem(
                "NodesOwnedByAnotherRollout",
                f"rollout {owner} is active on {len(held)} of these nodes for model "
                f"{spec.model.name}; one active rollout per (model, node)",
                held,
            )
        )
    return problems


def comparison_problem(
    spec: RolloutSpec,
    ref: str,
    lineage: Mapping[str, Any] | None,
    default: ComparisonRequirement | None = None,
) -> str | None:
    """Why the version ``ref`` misses spec.comparison (or, for a variant, ``default``
    where spec.comparison is silent), or None."""
    found = _comparison_problems(spec, ref, lineage, default)
    return "; ".join(p.message for p in found) if found else None


DEFAULT_SOURCE = "the default requirement (EDGEFLEET_VARIANT_MIN_AGREEMENT, _MAX_ABS_ERROR)"


def _comparison_problems(
    spec: RolloutSpec,
    ref: str,
    lineage: Mapping[str, Any] | None,
    default: ComparisonRequirement | None,
) -> list[Problem]:
    """spec.comparison applies to any version it names; to a variant (a version with a
    parent), each limit it leaves unset is ``default``'s. Under the default's agreement,
    a variant with no classifier output (no top-1 to agree on) must stay within its
    report's tolerances instead, as the report's own verdict asks."""
    given = spec.comparison or ComparisonRequirement()
    if lineage and lineage.get("parent") and default is not None:
        need = ComparisonRequirement(
            minAgreement=given.minAgreement
            if given.minAgreement is not None
            else default.minAgreement,
            maxAbsError=given.maxAbsError if given.maxAbsError is not None else default.maxAbsError,
        )
    else:
        need = given
    if need.minAgreement is None and need.maxAbsError is None:
        return []
    report = (lineage or {}).get("report")
    if not report:
        why = (lineage or {}).get("comparison_error")
        return [
            Problem(
                "NoComparisonReport",
                f"{ref} has no comparison report"
                + (f" (its comparison failed: {why})" if why else "")
                + ", and "
                + ("spec.comparison is set" if spec.comparison else DEFAULT_SOURCE + " applies")
                + " (edgefleet models optimize, or a push with --parent, makes one)",
            )
        ]
    out = []
    parent = (lineage or {}).get("parent", "?")
    agreement = report.get("top1_agreement")
    if need.minAgreement is not None:
        source = (
            "the rollout requires" if given.minAgreement is not None else DEFAULT_SOURCE + " is"
        )
        if agreement is None and given.minAgreement is None:
            if not report.get("allclose", False):
                out.append(
                    Problem(
                        "OutputsDiffer",
                        f"{ref} has no classifier output to agree on, and its outputs differ "
                        f"from its parent {parent}'s beyond the report's tolerances (max abs "
                        f"error {report.get('max_abs_error')}); set spec.comparison to accept "
                        "it",
                    )
                )
        elif agreement is None or agreement < need.minAgreement:
            out.append(
                Problem(
                    "AgreementTooLow",
                    f"{ref} agrees with its parent {parent} on {agreement} of top-1 "
                    f"predictions; {source} {need.minAgreement}",
                )
            )
    error = report.get("max_abs_error")
    if need.maxAbsError is not None and (error is None or error > need.maxAbsError):
        source = "the rollout allows" if given.maxAbsError is not None else DEFAULT_SOURCE + " is"
        out.append(
            Problem(
                "AbsErrorTooHigh",
                f"{ref} differs from its parent by up to {error} (max abs error); {source} "
                f"{need.maxAbsError}",
            )
        )
    return out
