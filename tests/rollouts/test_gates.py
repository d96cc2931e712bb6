"""Gate decisions (pass / hold / fail) from hand-built node samples."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from controller.rollouts.gates import GateResult, NodeSample, evaluate
from controller.rollouts.spec import Gates

TARGET = "f" * 64
OLD = "0" * 64
SINCE = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
GATES = {"maxP95LatencyMs": 40, "maxErrorRate": 0.01, "minHealthyRatio": 1.0, "minSamples": 20}


def gates(**overrides: Any) -> Gates:
    return Gates.model_validate({**GATES, **overrides})


def metrics(
    *,
    sha: str = TARGET,
    samples: int = 100,
    p95: float | None = 12.0,
    error_rate: float = 0.0,
    at: datetime = SINCE + timedelta(minutes=1),
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "sha256": sha,
        "samples": samples,
        "error_rate": error_rate,
        "reported_at": at.isoformat(),
    }
    if p95 is not None:
        out["p95_ms"] = p95
    return out


def ok(name: str, p95: float = 12.0, state: str = "Running") -> NodeSample:
    return NodeSample(name, state, metrics(p95=p95))


def run(
    samples: list[NodeSample],
    rules: Gates | None = None,
    *,
    bake_done: bool = True,
    deadline_passed: bool = False,
) -> GateResult:
    return evaluate(
        samples,
        rules or gates(),
        target_sha=TARGET,
        since=SINCE,
        bake_done=bake_done,
        deadline_passed=deadline_passed,
    )


def counts(result: GateResult) -> tuple[int, int, int, int]:
    s = result.snapshot
    return s["nodes"], s["healthy"], s["unhealthy"], s["silent"]


def test_all_healthy_after_bake_passes() -> None:
    result = run([ok("a", 12.0), ok("b", 30.5, state="Healthy"), ok("c", 8.0)])
    assert result.decision == "pass"
    assert result.reason == "3 of 3 node(s) healthy"
    assert counts(result) == (3, 3, 0, 0)
    assert result.snapshot["healthy_ratio"] == 1.0
    assert result.snapshot["max_p95_ms"] == 30.5
    assert result.snapshot["min_healthy_ratio"] == 1.0
    assert result.snapshot["limits"] == GATES
    assert result.snapshot["unhealthy_nodes"] == {}
    assert result.snapshot["silent_nodes"] == []


def test_healthy_during_bake_holds() -> None:
    result = run([ok("a"), ok("b")], bake_done=False)
    assert result.decision == "hold"
    assert result.reason == "healthy; waiting for the bake time"


SILENT = {
    "too-few-samples": metrics(samples=19),
    "zero-samples": metrics(samples=0),
    "old-version-sha256": metrics(sha=OLD),
    "reported-before-the-wave-started": metrics(at=SINCE - timedelta(seconds=1)),
    "never-reported": {},
    "no-reported_at": {k: v for k, v in metrics().items() if k != "reported_at"},
    "no-p95-under-a-latency-gate": metrics(p95=None),
}


@pytest.mark.parametrize("m", list(SILENT.values()), ids=list(SILENT))
def test_a_silent_node_never_counts_as_healthy(m: dict[str, Any]) -> None:
    samples = [ok("a"), ok("b"), NodeSample("quiet", "Running", m)]
    held = run(samples)
    assert held.decision == "hold"  # never a pass, however long it bakes
    assert held.reason == "waiting for 1 silent node(s)"
    assert counts(held) == (3, 2, 0, 1)
    assert held.snapshot["silent_nodes"] == ["quiet"]
    assert held.snapshot["healthy_ratio"] == round(2 / 3, 4)
    assert held.snapshot["max_p95_ms"] == 12.0

    failed = run(samples, deadline_passed=True)
    assert failed.decision == "fail"
    assert "1 node(s) still silent" in failed.reason
    assert "fewer than 20 samples" in failed.reason


def test_reported_exactly_at_wave_start_counts() -> None:
    result = run([NodeSample("a", "Running", metrics(at=SINCE))])
    assert result.decision == "pass"


def test_healthy_since_is_compared_across_timezones() -> None:
    berlin = timezone(timedelta(hours=1))
    after = (SINCE + timedelta(seconds=1)).astimezone(berlin)  # 13:00:01+01:00
    before = (SINCE - timedelta(seconds=1)).astimezone(berlin)
    assert counts(run([NodeSample("a", "Running", metrics(at=after))])) == (1, 1, 0, 0)
    assert counts(run([NodeSample("a", "Running", metrics(at=before))])) == (1, 0, 0, 1)


@pytest.mark.parametrize(
    ("sample", "why"),
    [
        pytest.param(
            NodeSample("x", "Running", metrics(p95=95.0)), "p95 95.0 ms > 40.0 ms", id="p95"
        ),
        pytest.param(
            NodeSample("x", "Running", metrics(error_rate=0.05)),
            "error rate 0.0500 > 0.01",
            id="error-rate",
        ),
        pytest.param(NodeSample("x", "Failed", metrics()), "workload failed", id="failed-state"),
        pytest.param(NodeSample("x", "Failed", {}), "workload failed", id="failed-silent"),
    ],
)
def test_an_unhealthy_node_fails_a_full_ratio_at_once(sample: NodeSample, why: str) -> None:
    # Bake not done, deadline far away: the ratio can no longer be reached, so fail now.
    result = run([ok("a"), ok("b"), ok("c"), sample], bake_done=False)
    assert result.decision == "fail"
    assert counts(result) == (4, 3, 1, 0)
    assert result.snapshot["unhealthy_nodes"] == {"x": why}
    assert result.reason == ("1 of 4 node(s) unhealthy: healthy ratio can reach at most 0.75 < 1.0")


def test_early_fail_while_most_nodes_are_still_silent() -> None:
    samples = [NodeSample(f"n{i}", "Running", {}) for i in range(9)]
    samples.append(NodeSample("bad", "Running", metrics(p95=80.0)))
    result = run(samples, rules=gates(minHealthyRatio=0.95), bake_done=False)
    assert result.decision == "fail"
    assert counts(result) == (10, 0, 1, 9)
    assert "can reach at most 0.90 < 0.95" in result.reason
    assert result.snapshot["max_p95_ms"] == 80.0


@pytest.mark.parametrize(
    ("healthy", "unhealthy", "silent", "bake_done", "decision"),
    [
        pytest.param(3, 1, 0, True, "pass", id="3-of-4-at-0.75"),
        pytest.param(3, 1, 0, False, "hold", id="3-of-4-baking"),
        pytest.param(2, 1, 1, True, "hold", id="silent-can-still-make-it"),
        pytest.param(2, 2, 0, True, "fail", id="2-unhealthy-is-too-many"),
        pytest.param(1, 2, 1, False, "fail", id="early-fail-with-silent"),
    ],
)
def test_min_healthy_ratio_below_one_tolerates_some_unhealthy_nodes(
    healthy: int, unhealthy: int, silent: int, bake_done: bool, decision: str
) -> None:
    samples = [ok(f"h{i}", p95=10.0 + i) for i in range(healthy)]
    samples += [NodeSample(f"u{i}", "Running", metrics(p95=41.0 + i)) for i in range(unhealthy)]
    samples += [NodeSample(f"s{i}", "Running", metrics(samples=3)) for i in range(silent)]
    result = run(samples, rules=gates(minHealthyRatio=0.75), bake_done=bake_done)
    assert result.decision == decision
    total = healthy + unhealthy + silent
    assert counts(result) == (total, healthy, unhealthy, silent)
    assert result.snapshot["healthy_ratio"] == round(healthy / total, 4)
    assert result.snapshot["max_p95_ms"] == 41.0 + unhealthy - 1


def test_deadline_fails_a_wave_that_did_not_reach_its_ratio() -> None:
    samples = [ok("a"), NodeSample("b", "Running", metrics(samples=5))]
    assert run(samples, deadline_passed=False).decision == "hold"
    result = run(samples, deadline_passed=True)
    assert result.decision == "fail"
    assert result.reason.startswith("progress deadline passed with 1 node(s) still silent")
    # A wave that reached its ratio is not failed by the deadline.
    assert run([ok("a"), ok("b")], deadline_passed=True).decision == "pass"


def test_no_samples_left_is_a_pass() -> None:
    """Every node Deferred (offline): the reconciler budgets those, the gate has no one
    to wait for."""
    result = run([])
    assert result.decision == "pass"
    assert counts(result) == (0, 0, 0, 0)
    assert result.snapshot["healthy_ratio"] == 1.0
    assert result.snapshot["max_p95_ms"] is None


def test_limits_that_are_not_set_are_not_checked() -> None:
    loose = Gates.model_validate({"minSamples": 5})
    samples = [
        NodeSample("no-p95", "Running", metrics(p95=None, samples=5)),
        NodeSample("slow-and-erring", "Running", metrics(p95=900.0, error_rate=0.5)),
    ]
    result = run(samples, rules=loose)
    assert result.decision == "pass"
    assert counts(result) == (2, 2, 0, 0)
    assert result.snapshot["max_p95_ms"] == 900.0
    assert result.snapshot["limits"] == {"minHealthyRatio": 1.0, "minSamples": 5}


def test_snapshot_numbers() -> None:
    samples = [
        ok("h1", 10.0),
        ok("h2", 33.3, state="Healthy"),
        NodeSample("slow", "Running", metrics(p95=55.5)),
        NodeSample("erring", "Running", metrics(p95=20.0, error_rate=0.2)),
        NodeSample("failed", "Failed", {}),
        NodeSample("old", "Running", metrics(sha=OLD, p95=999.0)),  # silent: not counted
        NodeSample("few", "Running", metrics(samples=1, p95=700.0)),  # silent: not counted
    ]
    result = run(samples, rules=gates(minHealthyRatio=0.2))
    s = result.snapshot
    assert (s["nodes"], s["healthy"], s["unhealthy"], s["silent"]) == (7, 2, 3, 2)
    assert s["healthy_ratio"] == 0.2857  # 2 / 7
    assert s["max_p95_ms"] == 55.5
    assert s["unhealthy_nodes"] == {
        "erring": "error rate 0.2000 > 0.01",
        "failed": "workload failed",
        "slow": "p95 55.5 ms > 40.0 ms",
    }
    assert s["silent_nodes"] == ["few", "old"]
    assert result.decision == "pass"  # 2/7 >= 0.2 after the bake


def test_snapshot_node_lists_are_sorted_and_capped() -> None:
    samples = [NodeSample(f"n{i:03}", "Running", {}) for i in range(60, 0, -1)]
    samples += [NodeSample(f"u{i:03}", "Failed", {}) for i in range(60, 0, -1)]
    s = run(samples, rules=gates(minHealthyRatio=0.0), bake_done=False).snapshot
    assert (s["silent"], s["unhealthy"]) == (60, 60)
    assert s["silent_nodes"] == [f"n{i:03}" for i in range(1, 51)]
    assert list(s["unhealthy_nodes"]) == [f"u{i:03}" for i in range(1, 51)]


def test_max_p95_ignores_stale_numbers_of_a_failed_node() -> None:
    """A node whose new workload failed may still carry its previous version's numbers;
    the gate's evidence is about the new version only (they once were counted)."""
    samples = [ok("a", 12.0), NodeSample("crashed", "Failed", metrics(sha=OLD, p95=250.0))]
    result = run(samples)
    assert result.decision == "fail"
    assert result.snapshot["max_p95_ms"] == 12.0
