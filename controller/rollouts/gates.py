"""Gate evaluation: may a wave be promoted?

A node counts as healthy only when its agent reported, for the new version and since the
wave started, at least ``minSamples`` inferences with p95 latency and error rate within
the limits. A node that reports nothing is never a pass. Offline (Deferred) nodes are
left out of the ratio and budgeted separately by the reconciler."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from controller.db.models import AssignmentState
from controller.rollouts.spec import Gates


@dataclass(frozen=True)
class NodeSample:
    node: str
    state: str
    metrics: dict[str, Any]
    # The version this node is to run, when not the rollout's own (a chosen variant).
    target_sha: str | None = None


@dataclass
class GateResult:
    decision: str  # pass | hold | fail
    reason: str
    snapshot: dict[str, Any] = field(default_factory=dict)
    # Why a fail: "unhealthy" (too many nodes failed the limits) or "silent" (the deadline
    # passed before enough nodes reported); the engine names a silent failure with nodes
    # still applying for what it is, a progress deadline.
    cause: str | None = None


def _current(metrics: dict[str, Any], target_sha: str, since: datetime) -> bool:
    """Numbers reported for the new version since the wave started."""
    reported = metrics.get("reported_at")
    return (
        metrics.get("sha256") == target_sha
        and reported is not None
        and datetime.fromisoformat(reported) >= since
    )


def _node_verdict(
    sample: NodeSample, gates: Gates, target_sha: str, since: datetime
) -> tuple[str, str | None]:
    """(healthy | unhealthy | silent, why)."""
    if sample.state == AssignmentState.FAILED:
        return "unhealthy", "workload failed"
    m = sample.metrics
    target_sha = sample.target_sha or target_sha
    if not _current(m, target_sha, since) or int(m.get("samples", 0)) < gates.minSamples:
        return "silent", None
    if gates.maxP95LatencyMs is not None:
        p95 = m.get("p95_ms")
        if p95 is None:
            return "silent", None
        if p95 > gates.maxP95LatencyMs:
            return "unhealthy", f"p95 {p95} ms > {gates.maxP95LatencyMs} ms"
    if gates.maxErrorRate is not None and float(m.get("error_rate", 0.0)) > gates.maxErrorRate:
        return "unhealthy", f"error rate {m.get('error_rate'):.4f} > {gates.maxErrorRate}"
    return "healthy", None


def evaluate(
    samples: Sequence[NodeSample],
    gates: Gates,
    *,
    target_sha: str,
    since: datetime,
    bake_done: bool,
    deadline_passed: bool,
) -> GateResult:
    verdicts = {s.node: _node_verdict(s, gates, target_sha, since) for s in samples}
    healthy = [n for n, (v, _) in verdicts.items() if v == "healthy"]
    unhealthy = {n: why for n, (v, why) in verdicts.items() if v == "unhealthy"}
    silent = [n for n, (v, _) in verdicts.items() if v == "silent"]
    total = len(samples)
    ratio = len(healthy) / total if total else 1.0
    # The most this wave can still reach if every silent node turns out healthy.
    best = (total - len(unhealthy)) / total if total else 1.0
    latencies = [
        s.metrics["p95_ms"]
        for s in samples
        if verdicts[s.node][0] != "silent"
        and s.metrics.get("p95_ms") is not None
        and _current(s.metrics, s.target_sha or target_sha, since)
    ]
    snapshot: dict[str, Any] = {
        "nodes": total,
        "healthy": len(healthy),
        "unhealthy": len(unhealthy),
        "silent": len(silent),
        "healthy_ratio": round(ratio, 4),
        "min_healthy_ratio": gates.minHealthyRatio,
        "max_p95_ms": max(latencies) if latencies else None,
        "limits": gates.model_dump(exclude_none=True),
        "unhealthy_nodes": dict(sorted(unhealthy.items())[:50]),
        "silent_nodes": sorted(silent)[:50],
    }
    if best < gates.minHealthyRatio:
        return GateResult(
            "fail",
            f"{len(unhealthy)} of {total} node(s) unhealthy: healthy ratio can reach at most "
            f"{best:.2f} < {gates.minHealthyRatio}",
            snapshot,
            cause="unhealthy",
        )
    if ratio >= gates.minHealthyRatio:
        if bake_done:
            return GateResult("pass", f"{len(healthy)} of {total} node(s) healthy", snapshot)
        return GateResult("hold", "healthy; waiting for the bake time", snapshot)
    if deadline_passed:
        return GateResult(
            "fail",
            f"progress deadline passed with {len(silent)} node(s) still silent "
            f"(fewer than {gates.minSamples} samples on the new version)",
            snapshot,
            cause="silent",
        )
    return GateResult("hold", f"waiting for {len(silent)} silent node(s)", snapshot)
