"""The planner as pure functions: selector semantics, waves, budgets and pre-flight."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from controller.fleet.selectors import Selector, selector_matches
from controller.rollouts.planner import (
    NodeView,
    PlannedWave,
    Problem,
    count_of,
    max_deferred,
    max_unavailable,
    plan_waves,
    preflight,
    select_nodes,
)
from controller.rollouts.spec import RolloutSpec, Strategy

_ids = iter(range(1, 1_000_000))


def node(
    key: str,
    labels: Mapping[str, str] | None = None,
    *,
    arch: str | None = "amd64",
    cpu: str = "4",
    memory: str = "8Gi",
    runtimes: Sequence[str] = ("onnx", "tflite"),
    allocatable: Mapping[str, Any] | None = None,
) -> NodeView:
    cluster, name = key.split("/")
    return NodeView(
        id=next(_ids),
        cluster=cluster,
        name=name,
        labels=dict(labels or {}),
        architecture=arch,
        allocatable=dict(
            allocatable if allocatable is not None else {"cpu": cpu, "memory": memory}
        ),
        runtimes=list(runtimes),
        health="Ready",
    )


def strategy(*steps: dict[str, Any], **extra: Any) -> Strategy:
    return Strategy.model_validate({"steps": list(steps), **extra})


def spec(**overrides: Any) -> RolloutSpec:
    body: dict[str, Any] = {
        "model": {"name": "detector", "version": "1.0.0"},
        "selector": {},
        "strategy": {"steps": [{"percent": 100}]},
    }
    body.update(overrides)
    return RolloutSpec.model_validate(body)


def fleet(clusters: Sequence[str] = ("berlin", "paris", "oslo"), per: int = 10) -> list[NodeView]:
    return [node(f"{c}/{c}-{i}") for c in clusters for i in range(per)]


def keys(waves: Sequence[PlannedWave]) -> list[list[str]]:
    return [[n.key for n in w.nodes] for w in waves]


# ---------------------------------------------------------------- selectors

LABELLED = [
    node("berlin/a", {"tier": "retail", "accelerator": "coral"}),
    node("berlin/b", {"tier": "retail", "accelerator": "none"}),
    node("berlin/c", {"tier": "retail"}),
    node("paris/d", {"tier": "lab", "accelerator": "gpu"}),
    node("paris/e", {"tier": "retail", "accelerator": "coral", "canary": ""}),
    node("oslo/f", {}),
]
ALL = {"berlin/a", "berlin/b", "berlin/c", "paris/d", "paris/e", "oslo/f"}


def expr(key: str, operator: str, *values: str) -> dict[str, Any]:
    return {"key": key, "operator": operator, "values": list(values)}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        pytest.param({}, ALL, id="empty-selects-all"),
        pytest.param(
            {"matchLabels": {"tier": "retail"}},
            {"berlin/a", "berlin/b", "berlin/c", "paris/e"},
            id="matchLabels",
        ),
        pytest.param(
            {"matchLabels": {"tier": "retail", "accelerator": "coral"}},
            {"berlin/a", "paris/e"},
            id="matchLabels-all-pairs",
        ),
        pytest.param({"matchLabels": {"canary": ""}}, {"paris/e"}, id="matchLabels-empty-value"),
        pytest.param(
            {"matchLabels": {"tier": ""}}, set(), id="matchLabels-empty-value-is-not-absent"
        ),
        pytest.param(
            {"matchExpressions": [expr("accelerator", "In", "coral", "none")]},
            {"berlin/a", "berlin/b", "paris/e"},
            id="In",
        ),
        pytest.param(
            {"matchExpressions": [expr("accelerator", "In", "tpu")]}, set(), id="In-no-match"
        ),
        pytest.param(
            {"matchExpressions": [expr("accelerator", "NotIn", "coral")]},
            {"berlin/b", "berlin/c", "paris/d", "oslo/f"},
            id="NotIn-holds-for-absent-key",
        ),
        pytest.param(
            {"matchExpressions": [expr("accelerator", "Exists")]},
            {"berlin/a", "berlin/b", "paris/d", "paris/e"},
            id="Exists",
        ),
        pytest.param(
            {"matchExpressions": [expr("canary", "Exists")]}, {"paris/e"}, id="Exists-empty-value"
        ),
        pytest.param(
            {"matchExpressions": [expr("accelerator", "DoesNotExist")]},
            {"berlin/c", "oslo/f"},
            id="DoesNotExist",
        ),
        pytest.param({"clusters": ["paris"]}, {"paris/d", "paris/e"}, id="clusters"),
        pytest.param(
            {"clusters": ["paris", "oslo"], "matchLabels": {"tier": "retail"}},
            {"paris/e"},
            id="clusters-and-matchLabels",
        ),
        pytest.param({"clusters": ["nowhere"]}, set(), id="clusters-unknown"),
        pytest.param(
            {
                "matchLabels": {"tier": "retail"},
                "matchExpressions": [
                    expr("accelerator", "NotIn", "none"),
                    expr("canary", "DoesNotExist"),
                ],
            },
            {"berlin/a", "berlin/c"},
            id="every-requirement-must-hold",
        ),
    ],
)
def test_selector_semantics(selector: dict[str, Any], expected: set[str]) -> None:
    parsed = Selector.model_validate(selector)
    got = {n.key for n in LABELLED if selector_matches(parsed, n.cluster, n.labels)}
    assert got == expected
    assert {n.key for n in select_nodes(spec(selector=selector), LABELLED)} == expected


# ---------------------------------------------------------------- waves


def test_same_inputs_in_any_order_give_identical_waves() -> None:
    nodes = fleet()
    plan = strategy({"nodes": 1}, {"percent": 30, "bake": "10m"}, {"percent": 100})
    reference = plan_waves("detector-2", nodes, plan)
    rng = random.Random(7)
    for _ in range(10):
        shuffled = list(nodes)
        rng.shuffle(shuffled)
        again = plan_waves("detector-2", shuffled, plan)
        assert keys(again) == keys(reference)
        assert [(w.index, w.bake_s) for w in again] == [(w.index, w.bake_s) for w in reference]


def test_the_order_depends_on_the_rollout() -> None:
    nodes, plan = fleet(), strategy({"percent": 100})
    assert keys(plan_waves("a", nodes, plan)) != keys(plan_waves("b", nodes, plan))


@pytest.mark.parametrize("name", [f"detector-{i}" for i in range(25)])
def test_first_wave_is_spread_across_clusters(name: str) -> None:
    waves = plan_waves(name, fleet(per=10), strategy({"percent": 30}, {"percent": 100}))
    first = Counter(n.cluster for n in waves[0].nodes)
    assert sum(first.values()) == 9  # 30% of 30
    assert len(first) >= 2, first  # not "the first cluster alphabetically"
    assert max(first.values()) < 9


@pytest.mark.parametrize(
    ("total", "steps", "sizes"),
    [
        pytest.param(7, [{"nodes": 2}, {"percent": 50}, {"percent": 100}], [2, 2, 3], id="mixed"),
        pytest.param(10, [{"percent": 15}, {"percent": 100}], [2, 8], id="percent-rounds-up"),
        pytest.param(10, [{"percent": 1}, {"percent": 100}], [1, 9], id="1%-is-one-node"),
        pytest.param(3, [{"percent": 34}, {"percent": 67}, {"percent": 100}], [2, 1], id="ceil"),
        pytest.param(7, [{"nodes": 50}], [7], id="count-above-total"),
        pytest.param(
            10,
            [{"percent": 50}, {"percent": 30}, {"percent": 50}, {"nodes": 2}, {"percent": 100}],
            [5, 5],
            id="non-increasing-steps-add-no-wave",
        ),
        pytest.param(10, [{"nodes": 5}, {"percent": 10}], [5, 5], id="percent-below-count"),
        pytest.param(10, [{"nodes": 1}, {"percent": 60}], [1, 5, 4], id="implicit-final-wave"),
        pytest.param(4, [{"nodes": 1}], [1, 3], id="implicit-final-after-count"),
        pytest.param(0, [{"nodes": 1}, {"percent": 100}], [], id="no-nodes-no-waves"),
    ],
)
def test_wave_sizes(total: int, steps: list[dict[str, Any]], sizes: list[int]) -> None:
    nodes = fleet(("c",), per=total)
    waves = plan_waves("r", nodes, strategy(*steps))
    assert [len(w.nodes) for w in waves] == sizes
    assert [w.index for w in waves] == list(range(len(sizes)))
    # Every selected node is in exactly one wave.
    assert sorted(k for wave in keys(waves) for k in wave) == sorted(n.key for n in nodes)


def test_bake_belongs_to_the_step_that_made_the_wave() -> None:
    waves = plan_waves(
        "r",
        fleet(("c",), per=10),
        strategy(
            {"nodes": 1, "bake": "90s"},
            {"percent": 10, "bake": "1h"},  # 1 node: no new wave, so no bake of its own
            {"percent": 50, "bake": "1h30m"},
            {"percent": 80},
        ),
    )
    assert [(len(w.nodes), w.bake_s) for w in waves] == [(1, 90.0), (4, 5400.0), (3, 0.0), (2, 0.0)]


@pytest.mark.parametrize(
    ("value", "total", "expected"),
    [
        ("25%", 3, 1),  # floor(0.75) is 0, but one node must be able to move
        ("25%", 10, 2),
        ("50%", 5, 2),
        ("10%", 100, 10),
        ("100%", 7, 7),
        (3, 10, 3),
        (1, 0, 1),
        ("10%", 0, 1),
    ],
)
def test_max_unavailable_rounds_down_but_allows_one(
    value: int | str, total: int, expected: int
) -> None:
    assert max_unavailable(strategy({"percent": 100}, maxUnavailable=value), total) == expected


@pytest.mark.parametrize(
    ("value", "wave", "expected"),
    [
        ("10%", 9, 0),
        ("10%", 10, 1),
        ("10%", 19, 1),
        ("0%", 50, 0),
        ("100%", 5, 5),
        (2, 5, 2),
        (0, 5, 0),
    ],
)
def test_max_deferred_rounds_down(value: int | str, wave: int, expected: int) -> None:
    assert max_deferred(strategy({"percent": 100}, maxDeferred=value), wave) == expected


def test_count_of() -> None:
    assert count_of("10%", 15, round_up=True) == 2
    assert count_of("10%", 15, round_up=False) == 1
    assert count_of(4, 15, round_up=True) == 4
    with pytest.raises(ValueError, match="neither a count nor a percentage"):
        count_of("ten", 15, round_up=True)


# ---------------------------------------------------------------- pre-flight


def codes(problems: Sequence[Problem]) -> dict[str, list[str]]:
    return {p.code: p.nodes for p in problems}


def check(
    selected: Sequence[NodeView],
    *,
    rollout: RolloutSpec | None = None,
    model_format: str | None = "onnx",
    version_status: str | None = "Ready",
    owners: Mapping[str, list[str]] | None = None,
    lineage: Mapping[str, Any] | None = None,
) -> list[Problem]:
    return preflight(
        rollout or spec(),
        selected,
        model_format=model_format,
        version_status=version_status,
        supported_architectures=["amd64", "arm64"],
        owners=owners or {},
        lineage=lineage,
    )


GOOD = [node("berlin/a"), node("paris/b", arch="arm64")]


def test_preflight_of_a_good_rollout_is_empty() -> None:
    assert check(GOOD) == []


@pytest.mark.parametrize(
    ("status", "code", "severity"),
    [
        (None, "ModelVersionNotFound", "error"),
        ("Invalid", "ModelVersionInvalid", "error"),
        ("Pending", "ModelVersionNotReady", "warning"),
        ("Validating", "ModelVersionNotReady", "warning"),
    ],
)
def test_preflight_model_version(status: str | None, code: str, severity: str) -> None:
    (problem,) = check(GOOD, version_status=status)
    assert (problem.code, problem.severity) == (code, severity)
    assert "detector:1.0.0" in problem.message


def test_preflight_no_matching_nodes() -> None:
    (problem,) = check([])
    assert (problem.code, problem.severity, problem.nodes) == ("NoMatchingNodes", "error", [])


def test_preflight_unsupported_architecture() -> None:
    nodes = [*GOOD, node("oslo/pi", arch="arm"), node("oslo/unknown", arch=None)]
    assert codes(check(nodes)) == {"UnsupportedArchitecture": ["oslo/pi", "oslo/unknown"]}


def test_preflight_runtime_missing() -> None:
    nodes = [*GOOD, node("oslo/lite", runtimes=["tflite"]), node("oslo/none", runtimes=[])]
    assert codes(check(nodes)) == {"RuntimeMissing": ["oslo/lite", "oslo/none"]}
    assert codes(check(nodes, model_format="tflite")) == {"RuntimeMissing": ["oslo/none"]}
    # An unknown version has no format: only the version problem is reported.
    assert codes(check(nodes, model_format=None, version_status=None)) == {
        "ModelVersionNotFound": []
    }


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        pytest.param({"requests": {"memory": "16Gi"}}, ["berlin/a", "paris/b"], id="requests"),
        pytest.param({"requests": {"memory": "8Gi"}}, None, id="exactly-allocatable"),
        pytest.param({"requests": {"memory": "8193Mi"}}, ["berlin/a", "paris/b"], id="just-over"),
        pytest.param({"limits": {"memory": "16Gi"}}, ["berlin/a", "paris/b"], id="limits-only"),
        pytest.param(
            {"requests": {"memory": "1Gi"}, "limits": {"memory": "16Gi"}}, None, id="requests-win"
        ),
    ],
)
def test_preflight_insufficient_memory(
    resources: dict[str, Any], expected: list[str] | None
) -> None:
    problems = check(GOOD, rollout=spec(resources=resources))
    assert codes(problems) == ({"InsufficientResources": expected} if expected else {})


def test_preflight_insufficient_cpu_names_the_resource_and_skips_unknown_allocatable() -> None:
    nodes = [
        node("berlin/big", cpu="4"),
        node("berlin/small", cpu="500m"),
        node("x/y", allocatable={}),
    ]
    (problem,) = check(nodes, rollout=spec(resources={"requests": {"cpu": "1"}}))
    assert (problem.code, problem.nodes) == ("InsufficientResources", ["berlin/small"])
    assert "cpu" in problem.message
    assert "1 requested" in problem.message


def test_preflight_nodes_owned_by_other_rollouts_sorted_by_owner() -> None:
    owners = {"zeta": ["berlin/a"], "alpha": ["paris/b", "berlin/a"]}
    problems = check(GOOD, owners=owners)
    assert [(p.code, p.nodes) for p in problems] == [
        ("NodesOwnedByAnotherRollout", ["paris/b", "berlin/a"]),
        ("NodesOwnedByAnotherRollout", ["berlin/a"]),
    ]
    assert problems[0].message.startswith("rollout alpha is active on 2 of these nodes")


def test_preflight_comparison_requirements() -> None:
    strict = spec(comparison={"minAgreement": 0.99, "maxAbsError": 0.01})
    assert codes(check(GOOD, rollout=strict)) == {"NoComparisonReport": []}
    assert codes(check(GOOD, rollout=strict, lineage={"parent": "1.0.0"})) == {
        "NoComparisonReport": []
    }
    report = {"top1_agreement": 0.95, "max_abs_error": 0.5}
    got = check(GOOD, rollout=strict, lineage={"parent": "1.0.0", "report": report})
    assert codes(got) == {"AgreementTooLow": [], "AbsErrorTooHigh": []}
    assert "0.95" in got[0].message
    assert "0.99" in got[0].message
    fine = {"top1_agreement": 0.995, "max_abs_error": 0.001}
    assert check(GOOD, rollout=strict, lineage={"parent": "1.0.0", "report": fine}) == []
    # Without limits, no report is needed.
    assert check(GOOD, rollout=spec(comparison={})) == []


def test_every_problem_code_is_produced() -> None:
    seen: set[str] = set()
    seen |= set(codes(check(GOOD, version_status=None)))
    seen |= set(codes(check(GOOD, version_status="Invalid")))
    seen |= set(codes(check(GOOD, version_status="Validating")))
    seen |= set(codes(check([])))
    bad = [node("a/a", arch="arm", runtimes=["tflite"], memory="1Gi")]
    seen |= set(codes(check(bad, rollout=spec(resources={"requests": {"memory": "2Gi"}}))))
    seen |= set(codes(check(GOOD, owners={"other": ["berlin/a"]})))
    comparison = spec(comparison={"minAgreement": 0.99, "maxAbsError": 0.01})
    seen |= set(codes(check(GOOD, rollout=comparison)))
    report = {"top1_agreement": 0.5, "max_abs_error": 1.0}
    seen |= set(codes(check(GOOD, rollout=comparison, lineage={"report": report})))
    assert seen == {
        "ModelVersionNotFound",
        "ModelVersionInvalid",
        "ModelVersionNotReady",
        "NoMatchingNodes",
        "UnsupportedArchitecture",
        "RuntimeMissing",
        "InsufficientResources",
        "NodesOwnedByAnotherRollout",
        "NoComparisonReport",
        "AgreementTooLow",
        "AbsErrorTooHigh",
    }


def test_problem_as_dict_caps_the_node_list() -> None:
    many = [f"c/n{i}" for i in range(120)]
    out = Problem("RuntimeMissing", "no onnx runtime", many).as_dict()
    assert out == {
        "code": "RuntimeMissing",
        "severity": "error",
        "message": "no onnx runtime",
        "nodes": many[:50],
        "nodeCount": 120,
    }
    assert Problem("NoMatchingNodes", "none").as_dict() == {
        "code": "NoMatchingNodes",
        "severity": "error",
        "message": "none",
    }
