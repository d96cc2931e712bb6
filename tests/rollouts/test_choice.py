"""The per-node variant choice as a pure function (controller/rollouts/choice.py)."""

from __future__ import annotations

from controller.rollouts.choice import Candidate, Measured, choose
from controller.rollouts.spec import Gates

REF = Candidate(1, "1", reference=True)
INT8 = Candidate(2, "1-int8", reference=False)
FP16 = Candidate(3, "1-fp16", reference=False, comparison_problem="agrees on 0.5 of top-1")


def m(p50: float, p95: float, peak: int | None = None) -> Measured:
    return Measured(p50_ms=p50, p95_ms=p95, peak_bytes=peak, node="lab/n")


def test_fastest_eligible_wins_per_class() -> None:
    measured = {
        (1, "a"): m(10, 12),
        (2, "a"): m(4, 5),
        (3, "a"): m(1, 1),  # fastest, but misses the comparison requirement
        (1, "b"): m(3, 4),
        (2, "b"): m(3, 4),  # a tie: the version itself wins
    }
    got = choose(
        [(10, "a"), (11, "a"), (12, "b"), (13, "c")],
        [REF, INT8, FP16],
        measured,
        Gates(),
        memory_limit=None,
    )
    assert got.by_node == {10: 2, 11: 2, 12: 1, 13: 1}
    assert got.by_class["a"].nodes == 2
    assert got.fallback_classes() == ["c"]
    assert got.counts([10, 12, 13], {1: "1", 2: "1-int8"}) == {"1": 2, "1-int8": 1}
    table = {c["version"]: c for c in got.by_class["a"].candidates}
    assert table["1-fp16"]["excluded"] == "agrees on 0.5 of top-1"
    assert "excluded" not in table["1-int8"]


def test_gate_and_memory_exclude() -> None:
    measured = {(1, "a"): m(10, 50, peak=100), (2, "a"): m(5, 8, peak=900)}
    gates = Gates(maxP95LatencyMs=40)
    got = choose([(1, "a")], [REF, INT8], measured, gates, memory_limit=500)
    # The version itself is too slow, the variant too big: neither, so the version.
    assert got.by_node == {1: 1}
    assert got.by_class["a"].reason.startswith("no candidate")
    table = {c["version"]: c["excluded"] for c in got.by_class["a"].candidates}
    assert table == {
        "1": "benchmarked p95 50 ms > gate 40.0 ms",
        "1-int8": "peak memory 900 B > limit 500 B",
    }
    roomy = choose([(1, "a")], [REF, INT8], measured, gates, memory_limit=None)
    assert roomy.by_node == {1: 2}
