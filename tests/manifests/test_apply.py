"""POST /v1/apply through the API: validation with field paths, all-or-nothing,
idempotency, dry-run plans, pre-flight problems and the JSON Schemas."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import pytest
import yaml
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from controller.db.base import Base
from controller.db.models import (
    Assignment,
    Cluster,
    Event,
    Model,
    ModelVersion,
    Node,
    Rollout,
    VersionStatus,
    Wave,
)
from controller.db.session import session_scope
from controller.manifests import builders
from controller.manifests.builders import document
from controller.registry import repository as registry_repo
from controller.settings import Settings
from tests.manifests.examples import design_rollout
from tests.rollouts.helpers import (
    apply,
    cluster_doc,
    push_versions,
    rollout_doc,
    running_versions,
)

Loc = list[str | int]
YAML = "application/yaml"
_DELETE = object()

STORED: tuple[type[Base], ...] = (
    Cluster,
    Node,
    Model,
    ModelVersion,
    Rollout,
    Wave,
    Assignment,
    Event,
)


def stored() -> dict[str, int]:
    """Row counts of every table an apply can write."""
    with session_scope() as s:
        return {
            str(t.__tablename__): int(s.scalar(select(func.count()).select_from(t)) or 0)
            for t in STORED
        }


def edited(doc: dict[str, Any], path: tuple[str | int, ...], value: Any = _DELETE) -> Any:
    """A deep copy of ``doc`` with the value at ``path`` replaced (or deleted)."""
    out = copy.deepcopy(doc)
    parent: Any = out
    for key in path[:-1]:
        parent = parent[key]
    if value is _DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return out


def good_cluster() -> dict[str, Any]:
    return cluster_doc("berlin", 2)


def rollout() -> dict[str, Any]:
    return rollout_doc("d", "1.0.0")


def cluster(**spec: Any) -> dict[str, Any]:
    return document("Cluster", "paris", spec)


def model_version(**artifact: Any) -> dict[str, Any]:
    return builders.model_version("1.0.0", artifact, name="detector-1")


SHA = "a" * 64
SIM_NODE = {"nodes": [{"name": "p0"}]}
STRATEGY = ("spec", "strategy")
STEPS = (*STRATEGY, "steps")
REQUESTS = ("spec", "resources", "requests")
EXPRESSIONS = ("spec", "selector", "matchExpressions")


@dataclass(frozen=True)
class Bad:
    """A malformed apply call and the errors it must get: (loc, words of the message)."""

    errors: list[tuple[Loc, str]]
    docs: list[Any] = field(default_factory=list)
    raw: str | None = None
    content_type: str = YAML


def bad_rollout(path: tuple[str | int, ...], value: Any, loc: Loc, msg: str) -> Bad:
    """A good Cluster, then the bad Rollout: the Cluster must not be stored either."""
    return Bad([(["body", 1, *loc], msg)], [good_cluster(), edited(rollout(), path, value)])


def bad_doc(doc: Any, loc: Loc, msg: str) -> Bad:
    return Bad([(["body", 1, *loc], msg)], [good_cluster(), doc])


BAD: list[Any] = [
    pytest.param(
        bad_rollout(
            ("apiVersion",),
            "edgefleet.io/v2",
            ["apiVersion"],
            "expected apiVersion 'edgefleet.io/v1', got 'edgefleet.io/v2'",
        ),
        id="apiVersion-wrong",
    ),
    pytest.param(
        bad_rollout(("apiVersion",), _DELETE, ["apiVersion"], "expected apiVersion"),
        id="apiVersion-missing",
    ),
    pytest.param(
        bad_rollout(
            ("kind",),
            "Deployment",
            ["kind"],
            "unknown kind 'Deployment': expected one of Cluster, ModelVersion, FreezePeriod, "
            "Rollout",
        ),
        id="kind-unknown",
    ),
    pytest.param(
        bad_rollout(("metadata", "name"), _DELETE, ["metadata", "name"], "field required"),
        id="metadata-name-missing",
    ),
    pytest.param(
        bad_rollout(("metadata",), _DELETE, ["metadata"], "field required"),
        id="metadata-missing",
    ),
    pytest.param(
        bad_rollout(("metadata", "name"), "Detector", ["metadata", "name"], "should match pattern"),
        id="name-uppercase",
    ),
    pytest.param(
        bad_rollout(("metadata", "name"), "d" * 64, ["metadata", "name"], "should match pattern"),
        id="name-too-long",
    ),
    pytest.param(
        bad_rollout(("status",), {"phase": "Succeeded"}, ["status"], "unknown field"),
        id="top-level-field-unknown",
    ),
    pytest.param(
        Bad(
            [
                (["body", 1, "spec", "strategy"], "field required"),
                (["body", 1, "spec", "stratgy"], "unknown field"),
            ],
            [
                good_cluster(),
                edited(
                    edited(rollout(), ("spec", "stratgy"), rollout()["spec"]["strategy"]),
                    STRATEGY,
                ),
            ],
        ),
        id="spec-field-typo-stratgy",
    ),
    pytest.param(
        bad_rollout(
            ("metadata", "labels"),
            {"-bad-": "x"},
            ["metadata", "labels", "-bad-", "[key]"],
            "should match pattern",
        ),
        id="label-key-bad",
    ),
    pytest.param(
        bad_rollout(
            ("metadata", "labels"),
            {"tier": "has space"},
            ["metadata", "labels", "tier"],
            "should match pattern",
        ),
        id="label-value-bad",
    ),
    pytest.param(
        bad_rollout(
            ("spec", "selector", "matchLabels", "tier"),
            "re tail",
            ["spec", "selector", "matchLabels", "tier"],
            "should match pattern",
        ),
        id="selector-label-value-bad",
    ),
    pytest.param(bad_rollout(STEPS, [], [*STEPS], "at least 1 item"), id="steps-empty"),
    pytest.param(
        bad_rollout(
            (*STEPS, 1),
            {"nodes": 2, "percent": 50},
            [*STEPS, 1],
            "give exactly one of nodes or percent",
        ),
        id="step-nodes-and-percent",
    ),
    pytest.param(
        bad_rollout(
            (*STEPS, 1), {"bake": "1m"}, [*STEPS, 1], "give exactly one of nodes or percent"
        ),
        id="step-neither-nodes-nor-percent",
    ),
    pytest.param(
        bad_rollout(
            (*STEPS, 1, "percent"), 0, [*STEPS, 1, "percent"], "greater than or equal to 1"
        ),
        id="percent-0",
    ),
    pytest.param(
        bad_rollout(
            (*STEPS, 1, "percent"), 101, [*STEPS, 1, "percent"], "less than or equal to 100"
        ),
        id="percent-101",
    ),
    pytest.param(
        bad_rollout((*STEPS, 0, "nodes"), -1, [*STEPS, 0, "nodes"], "greater than or equal to 1"),
        id="nodes-negative",
    ),
    pytest.param(
        bad_rollout((*STEPS, 0, "nodes"), "one", [*STEPS, 0, "nodes"], "valid integer"),
        id="nodes-not-a-number",
    ),
    pytest.param(
        bad_rollout(
            (*STEPS, 1, "bake"),
            "10 minutes",
            [*STEPS, 1, "bake"],
            "'10 minutes' is not a duration (examples: 30s, 10m, 1h30m)",
        ),
        id="bake-10-minutes",
    ),
    pytest.param(
        bad_rollout(
            (*STRATEGY, "progressDeadline"),
            "soon",
            [*STRATEGY, "progressDeadline"],
            "'soon' is not a duration",
        ),
        id="progressDeadline-not-a-duration",
    ),
    pytest.param(
        bad_rollout(
            (*STRATEGY, "progressDeadline"),
            "0s",
            [*STRATEGY, "progressDeadline"],
            "must be longer than 0s",
        ),
        id="progressDeadline-zero",
    ),
    pytest.param(
        bad_rollout(
            (*STRATEGY, "maxUnavailable"),
            "0%",
            [*STRATEGY, "maxUnavailable"],
            "must allow at least one node",
        ),
        id="maxUnavailable-0%",
    ),
    pytest.param(
        bad_rollout(
            (*STRATEGY, "maxUnavailable"),
            0,
            [*STRATEGY, "maxUnavailable"],
            "must allow at least one node",
        ),
        id="maxUnavailable-0",
    ),
    # Fixed bug: a bad int-or-percent is reported twice, at the pydantic union members
    # (".../maxUnavailable/int" and ".../maxUnavailable/constrained-str"), not at the field.
    pytest.param(
        bad_rollout(
            (*STRATEGY, "maxUnavailable"), "150%", [*STRATEGY, "maxUnavailable"], "percentage"
        ),
        id="maxUnavailable-150%",
    ),
    # Negative counts were once accepted (IntOrPercent had no lower bound on the int).
    pytest.param(
        bad_rollout(
            (*STRATEGY, "maxUnavailable"), -1, [*STRATEGY, "maxUnavailable"], "at least one node"
        ),
        id="maxUnavailable-negative",
    ),
    pytest.param(
        bad_rollout((*STRATEGY, "maxDeferred"), -1, [*STRATEGY, "maxDeferred"], "an integer >= 0"),
        id="maxDeferred-negative",
    ),
    pytest.param(
        bad_rollout(
            (*REQUESTS, "cpu"),
            "lots",
            [*REQUESTS, "cpu"],
            "'lots' is not a Kubernetes quantity (examples: 250m, 1, 0.5, 512Mi, 2Gi)",
        ),
        id="quantity-lots",
    ),
    pytest.param(
        bad_rollout(
            (*REQUESTS, "memory"),
            "1.5.2Gi",
            [*REQUESTS, "memory"],
            "'1.5.2Gi' is not a Kubernetes quantity",
        ),
        id="quantity-1.5.2Gi",
    ),
    # Fixed bug: a negative request passes validation (Kubernetes refuses it at apply time).
    pytest.param(
        bad_rollout((*REQUESTS, "cpu"), "-1", [*REQUESTS, "cpu"], "negative"),
        id="quantity-negative",
    ),
    pytest.param(
        bad_rollout(
            (*REQUESTS, "memory"),
            "1Gi",
            ["spec", "resources"],
            "requests.memory (1Gi) must not exceed limits.memory (512Mi)",
        ),
        id="requests-over-limits",
    ),
    pytest.param(
        bad_rollout(
            EXPRESSIONS,
            [{"key": "accelerator", "operator": "In"}],
            [*EXPRESSIONS, 0],
            "operator In needs a non-empty values list",
        ),
        id="matchExpressions-In-without-values",
    ),
    pytest.param(
        bad_rollout(
            EXPRESSIONS,
            [{"key": "accelerator", "operator": "Exists", "values": ["coral"]}],
            [*EXPRESSIONS, 0],
            "operator Exists takes no values",
        ),
        id="matchExpressions-Exists-with-values",
    ),
    pytest.param(
        bad_rollout(
            EXPRESSIONS,
            [{"key": "accelerator", "operator": "Near", "values": ["coral"]}],
            [*EXPRESSIONS, 0, "operator"],
            "'In', 'NotIn', 'Exists' or 'DoesNotExist'",
        ),
        id="matchExpressions-operator-unknown",
    ),
    pytest.param(
        bad_rollout(
            ("spec", "gates", "minHealthyRatio"),
            1.5,
            ["spec", "gates", "minHealthyRatio"],
            "less than or equal to 1",
        ),
        id="gates-minHealthyRatio-1.5",
    ),
    pytest.param(
        bad_rollout(
            ("spec", "gates", "maxErrorRate"),
            -1,
            ["spec", "gates", "maxErrorRate"],
            "greater than or equal to 0",
        ),
        id="gates-maxErrorRate-negative",
    ),
    pytest.param(
        bad_rollout(
            ("spec", "gates", "maxP95LatencyMs"),
            0,
            ["spec", "gates", "maxP95LatencyMs"],
            "greater than 0",
        ),
        id="gates-maxP95LatencyMs-0",
    ),
    pytest.param(
        bad_rollout(
            ("spec", "onFailure"), "explode", ["spec", "onFailure"], "'rollback' or 'pause'"
        ),
        id="onFailure-explode",
    ),
    pytest.param(
        bad_doc(
            cluster(driver="docker", simulated=SIM_NODE),
            ["spec", "driver"],
            "'kubernetes', 'simulated' or 'local'",
        ),
        id="cluster-driver-docker",
    ),
    pytest.param(
        bad_doc(
            cluster(driver="kubernetes", server="https://paris.example:6443"),
            ["spec"],
            "driver 'kubernetes' needs credentials (token or kubeconfig)",
        ),
        id="cluster-kubernetes-without-credentials",
    ),
    pytest.param(
        bad_doc(
            cluster(driver="kubernetes", server="https://paris.example:6443", credentials={}),
            ["spec", "credentials"],
            "give either token (with server and caData) or kubeconfig",
        ),
        id="cluster-kubernetes-empty-credentials",
    ),
    pytest.param(
        bad_doc(
            cluster(driver="simulated"),
            ["spec"],
            "driver 'simulated' needs a 'simulated' section",
        ),
        id="cluster-simulated-without-section",
    ),
    pytest.param(
        bad_doc(
            cluster(driver="simulated", simulated={"nodes": [{"name": "p0"}, {"name": "p0"}]}),
            ["spec", "simulated"],
            "duplicate node names: p0",
        ),
        id="cluster-simulated-duplicate-node-names",
    ),
    pytest.param(
        bad_doc(
            cluster(driver="simulated", simulated={"nodes": [{"name": "p0", "architecture": "x"}]}),
            ["spec", "simulated", "nodes", 0, "architecture"],
            "'amd64', 'arm64' or 'arm'",
        ),
        id="cluster-simulated-architecture-unknown",
    ),
    pytest.param(
        bad_doc(
            model_version(sha256=SHA, path="./detector.onnx"),
            ["spec", "artifact"],
            "give exactly one of sha256 or path",
        ),
        id="modelversion-sha256-and-path",
    ),
    pytest.param(
        bad_doc(
            model_version(sha256="xyz"),
            ["spec", "artifact", "sha256"],
            "should match pattern '^[0-9a-f]{64}$'",
        ),
        id="modelversion-sha256-bad",
    ),
    # Fixed bug: the service's own 422s drop the document index: ["body", "spec", "artifact", ...].
    pytest.param(
        bad_doc(
            model_version(path="./detector.onnx"),
            ["spec", "artifact", "path"],
            "the API takes artifact.sha256",
        ),
        id="modelversion-path-sent-to-the-api",
    ),
    pytest.param(
        bad_doc(
            model_version(sha256=SHA),
            ["spec", "artifact", "sha256"],
            f"no artifact sha256:{SHA} in the artifact store",
        ),
        id="modelversion-sha256-not-in-store",
    ),
    pytest.param(
        Bad(
            [(["body", 2, "metadata", "name"], "Rollout d appears twice (documents 1 and 2)")],
            [good_cluster(), rollout(), rollout()],
        ),
        id="same-kind-and-name-twice",
    ),
    pytest.param(
        Bad(
            [(["body"], "not valid YAML at line 22, column 5")],
            raw=yaml.safe_dump(good_cluster())
            + "---\nkind: Rollout\nmetadata: {name: d\nspec: {}\n",
        ),
        id="yaml-syntax-error",
    ),
    pytest.param(
        bad_doc(["apiVersion", "kind"], [], "a document must be a mapping"),
        id="document-is-a-list",
    ),
    pytest.param(
        Bad(
            [(["header", "content-type"], "send application/yaml or application/json")],
            raw="kind,name\nCluster,berlin\n",
            content_type="text/csv",
        ),
        id="content-type-text-csv",
    ),
    pytest.param(Bad([(["body"], "no documents to apply")], raw=""), id="empty-body"),
    pytest.param(
        Bad([(["body"], "no documents to apply")], raw="# nothing here\n---\n"),
        id="comments-only",
    ),
    pytest.param(
        Bad([(["body"], "not valid JSON")], raw='[{"kind": ', content_type="application/json"),
        id="json-syntax-error",
    ),
]


@pytest.mark.parametrize("case", BAD)
def test_malformed_apply_is_a_422_naming_the_field_and_stores_nothing(
    client: TestClient, sim_fleet: None, case: Bad
) -> None:
    before = stored()
    body = case.raw if case.raw is not None else yaml.safe_dump_all(case.docs)
    resp = client.post("/v1/apply", content=body, headers={"content-type": case.content_type})

    assert resp.status_code == 422, resp.text
    got = resp.json()
    assert got["error"] == "validation_error"
    errors = sorted(got["detail"], key=lambda e: json.dumps(e["loc"]))
    assert [e["loc"] for e in errors] == [loc for loc, _ in case.errors], errors
    for error, (_, words) in zip(errors, case.errors, strict=True):
        assert words in error["msg"], error
    # All or nothing: not even the valid Cluster before the bad document.
    assert stored() == before
    assert client.get("/v1/clusters/berlin").status_code == 404
    assert client.get("/v1/rollouts/d").status_code == 404


def test_the_table_covers_enough_cases() -> None:
    assert len(BAD) >= 30


# ---------------------------------------------------------------- idempotency


def _steps(bake: str) -> dict[str, Any]:
    return {
        "steps": [{"nodes": 1}, {"percent": 50, "bake": bake}, {"percent": 100}],
        "maxUnavailable": "50%",
    }


def _actions(resp: Any) -> list[tuple[str, str, str, int | None]]:
    assert resp.status_code == 200, resp.text
    return [
        (r["kind"], r["name"], r["action"], r.get("generation")) for r in resp.json()["results"]
    ]


def _set_status(version: str, status: VersionStatus) -> None:
    with session_scope() as s:
        mv = registry_repo.get_version(s, "detector", version)
        assert isinstance(mv, ModelVersion)
        mv.status = status


def test_reapplying_is_unchanged_and_a_bake_change_is_one_precise_change(
    client: TestClient, sim_fleet: None
) -> None:
    push_versions(client, "1.0.0")
    _set_status("1.0.0", VersionStatus.VALIDATING)  # the rollout waits in Pending
    docs = (cluster_doc("berlin", 3), rollout_doc("d", "1.0.0", strategy=_steps("10m")))

    assert _actions(apply(client, *docs)) == [
        ("Cluster", "berlin", "created", 1),
        ("Rollout", "d", "created", 1),
    ]
    events = stored()["events"]
    again = apply(client, *docs)
    assert _actions(again) == [
        ("Cluster", "berlin", "unchanged", 1),
        ("Rollout", "d", "unchanged", 1),
    ]
    assert all("changes" not in r for r in again.json()["results"])
    assert stored()["events"] == events  # an unchanged apply records nothing

    changed = apply(client, docs[0], rollout_doc("d", "1.0.0", strategy=_steps("5m")))
    assert _actions(changed) == [
        ("Cluster", "berlin", "unchanged", 1),
        ("Rollout", "d", "configured", 2),
    ]
    result = changed.json()["results"][1]
    assert result["changes"] == [{"path": "spec.strategy.steps[1].bake", "old": "10m", "new": "5m"}]
    body = client.get("/v1/rollouts/d").json()
    assert (body["generation"], body["phase"]) == (2, "Pending")
    assert body["spec"]["strategy"]["steps"][1]["bake"] == "5m"
    assert [w["bake_s"] for w in body["wave_detail"]] == [0, 300, 0]

    # Defaults spelled out, and the same documents as JSON, are the same manifests.
    explicit = rollout_doc(
        "d",
        "1.0.0",
        strategy={**_steps("5m"), "maxDeferred": "10%", "progressDeadline": "15m"},
        onFailure="rollback",
    )
    explicit["spec"]["strategy"]["steps"][0]["bake"] = "0s"
    as_json = client.post(
        "/v1/apply",
        content=json.dumps([docs[0], explicit]),
        headers={"content-type": "application/json"},
    )
    assert _actions(as_json) == [
        ("Cluster", "berlin", "unchanged", 1),
        ("Rollout", "d", "unchanged", 2),
    ]


def test_spec_change_mid_flight_is_a_409_until_aborted(client: TestClient, sim_fleet: None) -> None:
    push_versions(client, "1.0.0")
    docs = (cluster_doc("berlin", 3), rollout_doc("d", "1.0.0", strategy=_steps("10m")))
    assert _actions(apply(client, *docs))[1] == ("Rollout", "d", "created", 1)
    assert client.get("/v1/rollouts/d").json()["phase"] == "Progressing"  # the eager step ran

    edit = rollout_doc("d", "1.0.0", strategy=_steps("5m"))
    resp = apply(client, edit)
    assert resp.status_code == 409
    assert "its spec cannot change mid-flight" in resp.json()["detail"]
    assert client.get("/v1/rollouts/d").json()["generation"] == 1

    assert client.post("/v1/rollouts/d/abort").status_code == 202
    resp = apply(client, edit)
    assert _actions(resp) == [("Rollout", "d", "configured", 2)]
    assert resp.json()["results"][0]["changes"] == [
        {"path": "spec.strategy.steps[1].bake", "old": "10m", "new": "5m"}
    ]


def _kube_cluster(token: str) -> dict[str, Any]:
    # Port 1 refuses at once: the cluster is stored as Unreachable, which is all we need.
    credentials = {"token": token, "caData": "-----BEGIN CERTIFICATE-----"}
    spec = {"driver": "kubernetes", "server": "https://127.0.0.1:1", "credentials": credentials}
    return document("Cluster", "k3s-lab", spec)


def test_credential_changes_are_detected_but_never_returned(client: TestClient) -> None:
    first, second = "tok-FIRST-8d1c7a", "tok-SECOND-51e0b2"
    created = apply(client, _kube_cluster(first))
    assert _actions(created) == [("Cluster", "k3s-lab", "created", 1)]

    unchanged = apply(client, _kube_cluster(first))
    assert _actions(unchanged) == [("Cluster", "k3s-lab", "unchanged", 1)]

    configured = apply(client, _kube_cluster(second))
    assert _actions(configured) == [("Cluster", "k3s-lab", "configured", 2)]
    (change,) = configured.json()["results"][0]["changes"]
    assert change["path"] == "spec.credentialsFingerprint"
    assert change["old"] != change["new"]

    listing = client.get("/v1/clusters")
    one = client.get("/v1/clusters/k3s-lab")
    for resp in (created, unchanged, configured, listing, one):
        assert first not in resp.text
        assert second not in resp.text
        assert "BEGIN CERTIFICATE" not in resp.text
    assert one.json()["has_credentials"] is True
    assert one.json()["status"] == "Unreachable"
    with session_scope() as s:
        row = s.scalar(select(Cluster).where(Cluster.name == "k3s-lab"))
        assert row is not None
        assert row.credentials is not None
        assert second.encode() not in row.credentials  # encrypted at rest
        assert "credentials" not in row.spec
        events = s.scalars(select(Event).where(Event.object_name == "k3s-lab")).all()
        assert events
        assert all(second not in json.dumps(e.data) and first not in e.message for e in events)


# ---------------------------------------------------------------- dry-run


def _plan(resp: Any, index: int = -1) -> dict[str, Any]:
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["dryRun"] is True
    plan = body["results"][index]["plan"]
    assert isinstance(plan, dict)
    return plan


def test_dry_run_plans_over_a_cluster_of_the_same_file_and_stores_nothing(
    client: TestClient, sim_fleet: None, settings: Settings
) -> None:
    push_versions(client, "1.0.0")
    assert apply(client, cluster_doc("berlin", 4)).status_code == 200
    clusters_before = client.get("/v1/clusters").json()
    before = stored()

    docs = (cluster_doc("paris", 3), rollout_doc("d", "1.0.0"))
    first = apply(client, *docs, dry_run=True)
    second = apply(client, *docs, dry_run=True)
    assert _plan(first) == _plan(second)  # deterministic
    results = first.json()["results"]
    assert [(r["kind"], r["action"]) for r in results] == [
        ("Cluster", "created"),
        ("Rollout", "created"),
    ]
    assert "problems" not in results[1]

    plan = _plan(first)
    # Steps 1 node, 50% of 7 (4, rounded up), 100%: waves of 1, 3 and 3 nodes.
    assert plan["nodes"] == 7
    assert [w["nodes"] for w in plan["waves"]] == [1, 3, 3]
    for wave in plan["waves"]:
        assert sum(wave["clusters"].values()) == wave["nodes"]
        assert len(wave["nodeNames"]) == wave["nodes"]
    totals: dict[str, int] = {}
    for wave in plan["waves"]:
        for name, count in wave["clusters"].items():
            totals[name] = totals.get(name, 0) + count
    assert totals == {"berlin": 4, "paris": 3}  # the new cluster's nodes are planned
    names = [n for w in plan["waves"] for n in w["nodeNames"]]
    assert sorted(names) == sorted(
        [f"berlin/berlin-n{i}" for i in range(4)] + [f"paris/paris-n{i}" for i in range(3)]
    )

    assert client.get("/v1/rollouts/d").status_code == 404
    assert client.get("/v1/clusters/paris").status_code == 404
    assert client.get("/v1/clusters").json() == clusters_before
    assert stored() == before
    assert running_versions(settings, ["berlin", "paris"]) == {}  # no task ran

    # The dry-run showed exactly what the apply does.
    real = apply(client, *docs)
    assert real.status_code == 200, real.text
    assert real.json()["results"][1]["plan"] == plan


def _lab(**node: Any) -> dict[str, Any]:
    doc = cluster_doc("lab", 2)
    for n in doc["spec"]["simulated"]["nodes"]:
        n.update(node)
    return doc


LAB_NODES = ["lab/lab-n0", "lab/lab-n1"]
PREFLIGHT: list[Any] = [
    pytest.param(
        _lab(),
        rollout_doc("d", "1.0.0", selector={"matchLabels": {"tier": "nowhere"}}),
        {"NoMatchingNodes": None},
        id="NoMatchingNodes",
    ),
    pytest.param(
        _lab(), rollout_doc("d", "9.9.9"), {"ModelVersionNotFound": None}, id="ModelVersionNotFound"
    ),
    pytest.param(
        _lab(architecture="arm"),
        rollout_doc("d", "1.0.0"),
        {"UnsupportedArchitecture": LAB_NODES},
        id="UnsupportedArchitecture",
    ),
    pytest.param(
        _lab(runtimes=["tflite"]),
        rollout_doc("d", "1.0.0"),
        {"RuntimeMissing": LAB_NODES},
        id="RuntimeMissing",
    ),
    pytest.param(
        _lab(),
        rollout_doc("d", "1.0.0", resources={"requests": {"memory": "16Gi"}}),
        {"InsufficientResources": LAB_NODES},
        id="InsufficientResources",
    ),
    pytest.param(
        _lab(architecture="arm", runtimes=["tflite"], memory="1Gi"),
        rollout_doc("d", "1.0.0", resources={"requests": {"memory": "2Gi"}}),
        {
            "UnsupportedArchitecture": LAB_NODES,
            "RuntimeMissing": LAB_NODES,
            "InsufficientResources": LAB_NODES,
        },
        id="three-problems-at-once",
    ),
]


@pytest.mark.parametrize(("lab", "doc", "expected"), PREFLIGHT)
def test_preflight_problems_show_in_dry_run_and_refuse_apply(
    client: TestClient,
    sim_fleet: None,
    lab: dict[str, Any],
    doc: dict[str, Any],
    expected: dict[str, list[str] | None],
) -> None:
    push_versions(client, "1.0.0")  # ONNX, Ready
    before = stored()

    dry = apply(client, lab, doc, dry_run=True)
    assert dry.status_code == 200, dry.text
    problems = dry.json()["results"][1]["problems"]
    assert {p["code"]: p.get("nodes") for p in problems} == expected
    assert all(p["severity"] == "error" and p["message"] for p in problems)

    resp = apply(client, lab, doc)
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert {e["type"]: e.get("nodes") for e in detail} == expected
    assert all(e["loc"] == ["body", 1, "spec"] and e["msg"] for e in detail)
    # The Cluster of the same call was rolled back with the refused Rollout.
    assert stored() == before
    assert client.get("/v1/clusters/lab").status_code == 404


# ---------------------------------------------------------------- JSON Schemas


def test_schemas_lists_the_kinds(client: TestClient) -> None:
    resp = client.get("/v1/schemas")
    assert resp.status_code == 200
    assert resp.json() == {
        "Cluster": "/v1/schemas/Cluster",
        "ModelVersion": "/v1/schemas/ModelVersion",
        "FreezePeriod": "/v1/schemas/FreezePeriod",
        "Rollout": "/v1/schemas/Rollout",
    }
    for kind, url in resp.json().items():
        schema = client.get(url).json()
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["$id"] == f"https://edgefleet.io/schemas/v1/{kind}.json"


def test_rollout_schema_accepts_the_design_example_and_rejects_unknown_fields(
    client: TestClient,
) -> None:
    resp = client.get("/v1/schemas/Rollout")
    assert resp.status_code == 200
    validator = jsonschema.Draft202012Validator(resp.json())
    example = design_rollout()
    assert list(validator.iter_errors(example)) == []

    typo = edited(example, ("spec", "stratgy"), example["spec"]["strategy"])
    errors = list(validator.iter_errors(typo))
    assert [list(e.absolute_path) for e in errors] == [["spec"]]
    assert "'stratgy' was unexpected" in errors[0].message
    deep = edited(example, ("spec", "strategy", "steps", 1, "percentage"), 10)
    assert [list(e.absolute_path) for e in validator.iter_errors(deep)] == [
        ["spec", "strategy", "steps", 1]
    ]


def test_unknown_schema_kind_is_a_404_in_the_error_shape(client: TestClient) -> None:
    resp = client.get("/v1/schemas/Deployment")
    assert resp.status_code == 404
    assert resp.json() == {
        "error": "not_found",
        "detail": "unknown kind 'Deployment' (known: Cluster, ModelVersion, FreezePeriod, Rollout)",
    }
