"""On-node benchmarks: requested per node class, handed to one agent of each class, its
result stored per (version, class); and rollouts that let the controller pick, per node,
the variant that is fastest within the gates on that node's class."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from controller.benchmarks.service import node_class
from controller.cli.apply import _result_lines
from controller.cli.describe import _describe_view
from controller.db.base import utcnow
from controller.db.models import Assignment, Event, ModelVersion, Node, NodeBenchmark, NodeHealth
from controller.db.session import session_scope
from controller.fleet.service import set_node_health
from controller.registry import samples
from controller.settings import Settings
from tests.optimizations.test_variants import CNN, calibration_npz, derive, finished, push
from tests.rollouts.helpers import apply, cluster_doc, drive, rollout_doc, running_versions

CLASS = "edgefleet.io/node-class"


def enroll(client: TestClient, node: str, token: str, cluster: str = "lab") -> str:
    resp = client.post(
        "/v1/agents/enroll", json={"cluster": cluster, "node": node, "join_token": token}
    )
    assert resp.status_code == 200, resp.text
    credential: str = resp.json()["credential"]
    return credential


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def lab_doc(classes: dict[str, str]) -> dict[str, Any]:
    """One simulated site whose nodes name their class with the node-class label."""
    doc = cluster_doc("lab", 0)
    doc["spec"]["simulated"]["nodes"] = [
        {"name": name, "labels": {"tier": "retail", CLASS: cls}} for name, cls in classes.items()
    ]
    return doc


@pytest.fixture
def lab(client: TestClient, sim_fleet: None, join_token: str) -> dict[str, str]:
    """Five enrolled nodes in two classes (pi4: 3, xeon: 2) and one unenrolled node of
    a third class; detector 1 registered. Returns node name -> credential."""
    classes = {"pi-a": "pi4", "pi-b": "pi4", "pi-c": "pi4", "xe-a": "xeon", "xe-b": "xeon"}
    resp = apply(client, lab_doc({**classes, "old-a": "tiny"}))
    assert resp.status_code == 200, resp.text
    push(client, "detector", "1", samples.build_cnn(**CNN))
    return {name: enroll(client, name, join_token) for name in classes}


def post_result(client: TestClient, credential: str, job: int, **numbers: Any) -> Any:
    body = {"ok": True, "runs": 50, "cpu": "test cpu", **numbers}
    return client.post(f"/v1/agents/benchmarks/{job}", json=body, headers=bearer(credential))


def measure(
    client: TestClient, lab: dict[str, str], version: str, numbers: dict[str, tuple[float, float]]
) -> None:
    """Request a benchmark of ``version`` and answer each class's job as its agent would,
    with ``numbers[class] = (p50, p95)`` ms."""
    resp = client.post(f"/v1/models/detector/versions/{version}/benchmarks", json={"runs": 50})
    assert resp.status_code == 202, resp.text
    for job in resp.json():
        node = job["node"].split("/")[1]
        (got,) = [
            j
            for j in client.get("/v1/agents/benchmarks", headers=bearer(lab[node])).json()
            if j["id"] == job["id"]
        ]
        p50, p95 = numbers[job["node_class"]]
        answer = post_result(
            client, lab[node], got["id"], p50_ms=p50, p95_ms=p95, p99_ms=p95, peak_rss_bytes=2**26
        )
        assert answer.status_code == 200, answer.text


def test_node_class() -> None:
    assert node_class("arm64", {}, "Cortex-A72  r0p3  x") == "arm64/none/Cortex-A72 r0p3 x"
    assert node_class("arm64", {}, "Cortex-A72 rev 3") == "arm64/none/Cortex-A72"
    assert node_class("amd64", {"edgefleet.io/accelerator": "coral"}, None) == (
        "amd64/coral/unknown"
    )
    assert node_class("amd64", {CLASS: "rpi4-4g"}, "whatever") == "rpi4-4g"
    pi = "arm64/none/Raspberry Pi 4 Model B"
    assert node_class("arm64", {}, "Raspberry Pi 4 Model B Rev 1.4") == pi
    assert node_class("arm64", {}, "Raspberry Pi 4 Model B Rev 1.5") == pi


def test_one_job_per_class_to_one_agent(client: TestClient, lab: dict[str, str]) -> None:
    resp = client.post("/v1/models/detector/versions/1/benchmarks", json={"runs": 30})
    assert resp.status_code == 202, resp.text
    jobs = {j["node_class"]: j for j in resp.json()}
    # The unenrolled node's class has no agent to ask.
    assert sorted(jobs) == ["pi4", "xeon"]
    assert {j["status"] for j in jobs.values()} == {"Pending"}
    pi_node = jobs["pi4"]["node"].split("/")[1]
    assert pi_node.startswith("pi-")
    # Asked again while pending: the same jobs, not new ones.
    again = client.post("/v1/models/detector/versions/1/benchmarks", json={}).json()
    assert sorted(j["id"] for j in again) == sorted(j["id"] for j in jobs.values())
    with session_scope() as s:
        pending = dict(s.execute(select(Node.name, Node.benchmarks_pending)).all())
    assert pending[pi_node] == 1
    assert sum(pending.values()) == 2

    # A node of the other class has nothing to do; the chosen one gets its job.
    other = next(n for n in lab if n.startswith("pi-") and n != pi_node)
    assert client.get("/v1/agents/benchmarks", headers=bearer(lab[other])).json() == []
    (job,) = client.get("/v1/agents/benchmarks", headers=bearer(lab[pi_node])).json()
    assert (job["model"], job["version"], job["format"]) == ("detector", "1", "onnx")
    assert job["runs"] == 30
    assert job["artifact_url"].endswith("/v1/models/detector/versions/1/artifact")
    with session_scope() as s:
        assert s.scalar(select(Node.benchmarks_pending).where(Node.name == pi_node)) == 0
    listed = client.get("/v1/models/detector/versions/1/benchmarks").json()
    assert {j["node_class"]: j["status"] for j in listed} == {"pi4": "Running", "xeon": "Pending"}

    # Another node cannot answer it; a bad result is a 422 naming the field.
    assert post_result(client, lab[other], job["id"], p50_ms=1, p95_ms=2).status_code == 404
    bad = post_result(client, lab[pi_node], job["id"], p50_ms=-1, p95_ms=2)
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"][-1] == "p50_ms"
    no_numbers = post_result(client, lab[pi_node], job["id"])
    assert no_numbers.status_code == 422
    ok = post_result(client, lab[pi_node], job["id"], p50_ms=4.5, p95_ms=6.0, peak_rss_bytes=123)
    assert ok.status_code == 200, ok.text
    stored = ok.json()
    assert stored["status"] == "Succeeded"
    assert (stored["result"]["p50_ms"], stored["result"]["peak_rss_bytes"]) == (4.5, 123)
    twice = post_result(client, lab[pi_node], job["id"], p50_ms=1, p95_ms=1)
    assert twice.status_code == 409
    with session_scope() as s:
        reasons = s.scalars(select(Event.reason).where(Event.object_name == "detector:1")).all()
    assert {"BenchmarkRequested", "BenchmarkSucceeded"} <= set(reasons)
    # Without a credential: 401.
    assert client.get("/v1/agents/benchmarks").status_code == 401


def test_a_failed_benchmark_is_kept_with_its_reason(
    client: TestClient, lab: dict[str, str]
) -> None:
    jobs = client.post("/v1/models/detector/versions/1/benchmarks", json={}).json()
    job = jobs[0]
    node = job["node"].split("/")[1]
    client.get("/v1/agents/benchmarks", headers=bearer(lab[node]))
    resp = client.post(
        f"/v1/agents/benchmarks/{job['id']}",
        json={"ok": False, "error": "load failed: ONNXRuntimeError: bad opset"},
        headers=bearer(lab[node]),
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "Failed"
    assert resp.json()["message"] == "load failed: ONNXRuntimeError: bad opset"
    # Asked again, the failed class is measured anew.
    again = client.post("/v1/models/detector/versions/1/benchmarks", json={}).json()
    assert {j["node_class"]: j["status"] for j in again}[job["node_class"]] == "Pending"


def test_bad_requests(client: TestClient, lab: dict[str, str]) -> None:
    none = client.post(
        "/v1/models/detector/versions/1/benchmarks",
        json={"selector": {"matchLabels": {"tier": "nowhere"}}},
    )
    assert none.status_code == 422
    assert none.json()["detail"][0]["loc"] == ["body", "selector"]
    assert client.post("/v1/models/detector/versions/9/benchmarks", json={}).status_code == 404
    typo = client.post("/v1/models/detector/versions/1/benchmarks", json={"run": 5})
    assert typo.status_code == 422
    push(client, "detector", "2", samples.build_failing_model())
    invalid = client.post("/v1/models/detector/versions/2/benchmarks", json={})
    assert invalid.status_code == 409
    assert "Invalid" in invalid.json()["detail"]


def test_rollout_picks_the_fastest_variant_per_node_class(
    client: TestClient, lab: dict[str, str], settings: Settings
) -> None:
    cal = calibration_npz(16, (1, 3, 32, 32))
    made = derive(client, "detector", "1", "1-int8", "static-int8", calibration=cal)
    job = finished(client, "detector", made)
    assert job["status"] == "Succeeded", job
    # On the Pis int8 is much faster; on the Xeons fp32 wins; neither is measured on tiny.
    measure(client, lab, "1", {"pi4": (30.0, 45.0), "xeon": (1.5, 2.0)})
    measure(client, lab, "1-int8", {"pi4": (9.0, 12.0), "xeon": (1.8, 2.4)})
    doc = rollout_doc("pick", "1", model={"name": "detector", "version": "1", "variants": "auto"})

    dry = apply(client, doc, dry_run=True)
    assert dry.status_code == 200, dry.text
    result = dry.json()["results"][0]
    chosen = result["plan"]["variants"]
    assert {cls: c["version"] for cls, c in chosen.items()} == {
        "pi4": "1-int8",
        "xeon": "1",
        "tiny": "1",
    }
    assert (chosen["pi4"]["nodes"], chosen["xeon"]["nodes"], chosen["tiny"]["nodes"]) == (3, 2, 1)
    assert chosen["tiny"]["reason"].startswith("no candidate")
    pi_table = {c["version"]: c for c in chosen["pi4"]["candidates"]}
    assert pi_table["1"]["excluded"].startswith("benchmarked p95 45.0 ms > gate 40")
    assert pi_table["1-int8"]["p50_ms"] == 9.0
    total = sum(w["versions"].get("1-int8", 0) for w in result["plan"]["waves"])
    assert total == 3
    # The CLI's dry-run view shows the same choice.
    shown = "\n".join(str(line) for line in _result_lines(result, dry_run=True))
    for wave in result["plan"]["waves"]:
        mix = ", ".join(f"{v}={n}" for v, n in wave["versions"].items())
        assert f"versions {mix}" in shown
    assert "pi4: 1-int8 on 3 node(s), fastest within the gates (p50 9.0 ms)" in shown
    assert "excluded: benchmarked p95 45.0 ms > gate 40" in shown
    warnings = {p["code"]: p for p in result["problems"]}
    assert warnings["NoVariantMeetsGates"]["severity"] == "warning"
    assert warnings["NoVariantMeetsGates"]["nodes"] == ["lab/old-a"]

    assert apply(client, doc).status_code == 200
    detail = client.get("/v1/rollouts/pick").json()
    assert detail["versions"] == {"1": 3, "1-int8": 3}
    described = "\n".join(str(line) for line in _describe_view(detail).renderables)
    assert "Variants:     1=3 1-int8=3" in described
    phases = drive("pick", settings)
    assert phases[-1] == "Succeeded", phases
    running = running_versions(settings, ["lab"])
    assert running == {
        "pi-a": "1-int8",
        "pi-b": "1-int8",
        "pi-c": "1-int8",
        "xe-a": "1",
        "xe-b": "1",
        "old-a": "1",
    }
    with session_scope() as s:
        rows = s.execute(
            select(Node.name, ModelVersion.version)
            .join(Assignment, Assignment.node_id == Node.id)
            .join(ModelVersion, ModelVersion.id == Assignment.observed_version_id)
        )
        targets = dict(rows.all())
    assert targets == running


def test_variant_requirements(client: TestClient, lab: dict[str, str]) -> None:
    cal = calibration_npz(16, (1, 3, 32, 32))
    pruned = finished(
        client,
        "detector",
        derive(
            client,
            "detector",
            "1",
            "1-p97",
            "prune",
            {"sparsity": 0.97, "scope": "global"},
            calibration=cal,
        ),
    )
    assert pruned["status"] == "Succeeded"
    measure(client, lab, "1", {"pi4": (30.0, 35.0), "xeon": (1.5, 2.0)})
    measure(client, lab, "1-p97", {"pi4": (3.0, 4.0), "xeon": (0.5, 0.7)})

    def plan(**spec: Any) -> dict[str, Any]:
        model = {"name": "detector", "version": "1", **spec.pop("model", {})}
        resp = apply(client, rollout_doc("req", "1", model=model, **spec), dry_run=True)
        assert resp.status_code == 200, resp.text
        got: dict[str, Any] = resp.json()["results"][0]
        return got

    # Fastest everywhere, unless the comparison requirement rules it out: the rollout's
    # own, or where it names none the controller's default (variant_min_agreement, 0.99),
    # which a 97 % pruned variant does not meet.
    free = plan(model={"variants": ["1-p97"]}, comparison={"minAgreement": 0})
    assert {c: v["version"] for c, v in free["plan"]["variants"].items()}["pi4"] == "1-p97"
    default = plan(model={"variants": ["1-p97"]})["plan"]["variants"]["pi4"]
    assert default["version"] == "1"
    assert (
        "agrees with its parent"
        in {c["version"]: c for c in default["candidates"]}["1-p97"]["excluded"]
    )
    strict = plan(model={"variants": ["1-p97"]}, comparison={"minAgreement": 0.9})
    pi4 = strict["plan"]["variants"]["pi4"]
    assert pi4["version"] == "1"
    assert (
        "agrees with its parent"
        in {c["version"]: c for c in pi4["candidates"]}["1-p97"]["excluded"]
    )
    # A memory limit below the measured peak excludes it too (64 MiB measured).
    tight = plan(
        model={"variants": ["1-p97"]},
        comparison={"minAgreement": 0},
        resources={"limits": {"cpu": "1", "memory": "32Mi"}, "requests": {"memory": "16Mi"}},
    )
    excluded = {c["version"]: c for c in tight["plan"]["variants"]["xeon"]["candidates"]}
    assert excluded["1-p97"]["excluded"].startswith("peak memory")

    def listing(*variants: str) -> dict[str, Any]:
        return {"name": "detector", "version": "1", "variants": list(variants)}

    unknown = apply(client, rollout_doc("req", "1", model=listing("9")))
    assert unknown.status_code == 422
    assert unknown.json()["detail"][0]["type"] == "VariantNotFound"
    itself = apply(client, rollout_doc("req", "1", model=listing("1")))
    assert itself.status_code == 422
    assert itself.json()["detail"][0]["loc"][-1] == "variants"


def test_a_stuck_job_is_handed_to_another_node(
    client: TestClient, lab: dict[str, str], settings: Settings
) -> None:
    first = {
        j["node_class"]: j
        for j in client.post("/v1/models/detector/versions/1/benchmarks", json={}).json()
    }["pi4"]
    node = first["node"].split("/")[1]
    assert client.get("/v1/agents/benchmarks", headers=bearer(lab[node])).json()
    # Its node goes offline mid-benchmark: asking again picks another node of the class.
    with session_scope() as s:
        set_node_health(s, "lab", node, NodeHealth.OFFLINE)
    again = {
        j["node_class"]: j
        for j in client.post("/v1/models/detector/versions/1/benchmarks", json={}).json()
    }["pi4"]
    assert again["id"] == first["id"]  # the same row: one per (version, class)
    assert again["status"] == "Pending"
    moved_to = again["node"].split("/")[1]
    assert moved_to != node
    assert moved_to.startswith("pi-")
    # The old node's late answer is refused; the new one's counts.
    late = post_result(client, lab[node], first["id"], p50_ms=1, p95_ms=2)
    assert late.status_code == 404
    # Silent for longer than the stuck limit: handed out again too.
    with session_scope() as s:
        row = s.get(NodeBenchmark, again["id"])
        assert row is not None
        row.status = "Running"
        row.updated_at = utcnow() - timedelta(seconds=settings.stuck_validation_s + 1)
    third = {
        j["node_class"]: j
        for j in client.post("/v1/models/detector/versions/1/benchmarks", json={}).json()
    }["pi4"]
    assert third["status"] == "Pending"
