"""Per-node variant choice (``spec.model.variants``): which of the version and its
variants each node gets. A pure function of the candidates, their on-node benchmarks per
node class, the gates and the memory limit, so the dry-run shows exactly what apply does.

Per node class, a candidate is eligible when
- it has a Succeeded on-node benchmark on that class (numbers from that hardware, not
  from the registry's machine),
- its benchmarked p95 is within ``gates.maxP95LatencyMs`` (when set),
- its benchmarked peak memory is within the rollout's memory limit (when set),
- and, for a variant, it meets ``spec.comparison`` (how close it stays to its parent).
The eligible candidate with the lowest benchmarked p50 wins (ties: the version itself,
then the name). A class with no eligible candidate gets the version itself, with a
warning: the live gates will judge it like any rollout.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from controller.rollouts.spec import Gates


@dataclass(frozen=True)
class Candidate:
    version_id: int
    version: str
    reference: bool  # the rollout's own spec.model.version
    comparison_problem: str | None = None  # why it misses spec.comparison


@dataclass(frozen=True)
class Measured:
    p50_ms: float
    p95_ms: float
    peak_bytes: int | None
    node: str


@dataclass
class ClassChoice:
    node_class: str
    version: Candidate
    reason: str
    nodes: int = 0
    candidates: list[dict[str, Any]] = field(default_factory=list)
    fallback: bool = False  # no eligible candidate: the version itself

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version.version,
            "reason": self.reason,
            "nodes": self.nodes,
            "candidates": self.candidates,
        }


@dataclass
class Choice:
    by_node: dict[int, int]  # node id -> version id
    by_class: dict[str, ClassChoice]

    def fallback_classes(self) -> list[str]:
        return [c for c, got in sorted(self.by_class.items()) if got.fallback]

    def counts(self, node_ids: Sequence[int], names: Mapping[int, str]) -> dict[str, int]:
        """How many of these nodes get which version (by version name)."""
        return dict(sorted(Counter(names[self.by_node[n]] for n in node_ids).items()))


def _why_not(
    c: Candidate, m: Measured | None, gates: Gates, memory_limit: int | None
) -> str | None:
    if c.comparison_problem is not None:
        return c.comparison_problem
    if m is None:
        return "not benchmarked on this class"
    if gates.maxP95LatencyMs is not None and m.p95_ms > gates.maxP95LatencyMs:
        return f"benchmarked p95 {m.p95_ms} ms > gate {gates.maxP95LatencyMs} ms"
    if memory_limit is not None and m.peak_bytes is not None and m.peak_bytes > memory_limit:
        return f"peak memory {m.peak_bytes} B > limit {memory_limit} B"
    return None


def choose(
    nodes: Sequence[tuple[int, str]],
    candidates: Sequence[Candidate],
    measured: Mapping[tuple[int, str], Measured],
    gates: Gates,
    *,
    memory_limit: int | None,
) -> Choice:
    """``nodes``: (node id, node class); ``measured``: by (version id, node class)."""
    reference = next(c for c in candidates if c.reference)
    by_class: dict[str, ClassChoice] = {}
    by_node: dict[int, int] = {}
    for node_id, cls in nodes:
        got = by_class.get(cls)
        if got is None:
            got = _choose_class(cls, candidates, reference, measured, gates, memory_limit)
            by_class[cls] = got
        got.nodes += 1
        by_node[node_id] = got.version.version_id
    return Choice(by_node, by_class)


def _choose_class(
    cls: str,
    candidates: Sequence[Candidate],
    reference: Candidate,
    measured: Mapping[tuple[int, str], Measured],
    gates: Gates,
    memory_limit: int | None,
) -> ClassChoice:
    table: list[dict[str, Any]] = []
    eligible: list[tuple[float, int, str, Candidate]] = []
    for c in candidates:
        m = measured.get((c.version_id, cls))
        why = _why_not(c, m, gates, memory_limit)
        row: dict[str, Any] = {"version": c.version}
        if m is not None:
            row.update(p50_ms=m.p50_ms, p95_ms=m.p95_ms, peak_bytes=m.peak_bytes, node=m.node)
        if why is not None:
            row["excluded"] = why
        else:
            eligible.append((m.p50_ms if m else 0.0, 0 if c.reference else 1, c.version, c))
        table.append(row)
    if not eligible:
        return ClassChoice(
            cls,
            reference,
            "no candidate benchmarked within the gates on this class: the version itself",
            candidates=table,
            fallback=True,
        )
    p50, _, _, best = min(eligible, key=lambda e: e[:3])
    return ClassChoice(cls, best, f"fastest within the gates (p50 {p50} ms)", candidates=table)
