"""Rollouts end to end through the API, the reconciler and the simulated driver."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from controller.db.models import NodeHealth
from controller.db.session import session_scope
from controller.fleet import service as fleet_service
from controller.fleet.service import set_node_health
from controller.manifests.builders import RESOURCES
from controller.rollouts import reconciler
from controller.settings import Settings
from tests.rollouts.helpers import (
    apply,
    cluster_doc,
    drive,
    node_states,
    push_versions,
    report,
    rollout_doc,
    rollout_id,
    running_versions,
    running_workloads,
    wave_nodes,
    wave_phases,
)

CLUSTERS = ("berlin", "paris", "oslo")


@pytest.fixture
def fleet(client: TestClient, sim_fleet: None) -> TestClient:
    """Three simulated sites of 4 nodes each, detector 1.0.0 and 2.0.0 registered."""
    resp = apply(client, *(cluster_doc(c, 4) for c in CLUSTERS))
    assert resp.status_code == 200, resp.text
    push_versions(client, "1.0.0", "2.0.0")
    return client


def rollout_to(
    client: TestClient, settings: Settings, name: str, version: str, **spec: Any
) -> list[str]:
    resp = apply(client, rollout_doc(name, version, **spec))
    assert resp.status_code == 200, resp.text
    return drive(name, settings)


def test_rollout_across_clusters_succeeds(fleet: TestClient, settings: Settings) -> None:
    phases = rollout_to(fleet, settings, "detector-1", "1.0.0")
    assert phases[-1] == "Succeeded"
    assert set(node_states("detector-1").values()) == {"Healthy"}
    assert running_versions(settings, CLUSTERS) == {
        f"{c}-n{i}": "1.0.0" for c in CLUSTERS for i in range(4)
    }
    body = fleet.get("/v1/rollouts/detector-1").json()
    assert body["phase"] == "Succeeded"
    assert [w["nodes"] for w in body["wave_detail"]] == [1, 5, 6]
    assert all(w["phase"] == "Passed" for w in body["wave_detail"])
    assert body["states"] == {"Healthy": 12}
    reasons = [
        e["reason"]
        for e in fleet.get("/v1/rollouts/detector-1/events", params={"limit": 1000}).json()
    ]
    assert reasons.count("GatePassed") == 3
    assert reasons[0] == "Succeeded"
    gate = next(
        e for e in fleet.get("/v1/rollouts/detector-1/events").json() if e["reason"] == "GatePassed"
    )
    assert gate["data"]["gate"]["healthy"] == gate["data"]["gate"]["nodes"]  # the evidence


def test_the_rollout_message_follows_its_waves(fleet: TestClient, settings: Settings) -> None:
    """What `get rollouts` and the dashboard show: the current wave, not wave 0's start
    for the whole rollout."""
    assert apply(fleet, rollout_doc("m", "1.0.0")).status_code == 200
    rid = rollout_id("m")
    seen: list[str] = []
    for _ in range(60):
        phase = reconciler.reconcile(rid, settings)
        seen.append(fleet.get("/v1/rollouts/m").json()["message"])
        if phase != "Progressing":
            break
        report()
    # In order, without repeats. The simulated nodes run the new version at once, so each
    # wave starts applying and starts baking within one step.
    assert list(dict.fromkeys(seen)) == [
        "wave 0 of 3 baking",
        "wave 0 of 3 passed its gate",
        "wave 1 of 3 baking",
        "wave 1 of 3 passed its gate",
        "wave 2 of 3 baking",
        "all 3 wave(s) passed their gates",
    ]


def test_waves_respect_max_unavailable(fleet: TestClient, settings: Settings) -> None:
    spec = {"strategy": {"steps": [{"percent": 100}], "maxUnavailable": 3}}
    apply(fleet, rollout_doc("d", "1.0.0", **spec))  # the eager task ran step 1 at commit
    # Three nodes at a time move; the simulated cluster makes them Running at once, which
    # frees their slots for the next step.
    states = list(node_states("d").values())
    assert (states.count("Running"), states.count("Pending")) == (3, 9)
    reconciler.reconcile(rollout_id("d"), settings)
    states = list(node_states("d").values())
    assert (states.count("Running"), states.count("Pending")) == (6, 6)


def planned_waves(resp: Any) -> list[list[str]]:
    """The node keys of each wave as the apply response's plan shows them."""
    assert resp.status_code == 200, resp.text
    return [sorted(w["nodeNames"]) for w in resp.json()["results"][0]["plan"]["waves"]]


def events_in_order(client: TestClient, name: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = client.get(
        f"/v1/rollouts/{name}/events", params={"limit": 1000}
    ).json()
    assert len(events) < 1000
    return events[::-1]  # the API lists the newest first


def test_failing_gate_rolls_every_touched_node_back(fleet: TestClient, settings: Settings) -> None:
    assert rollout_to(fleet, settings, "d1", "1.0.0")[-1] == "Succeeded"
    waves = planned_waves(apply(fleet, rollout_doc("d2", "2.0.0")))
    assert wave_nodes("d2") == waves  # the plan shown is the plan stored
    (canary,) = waves[0]
    assert [len(w) for w in waves] == [1, 5, 6]

    def slow_after_canary(node: str) -> tuple[float, int]:
        return (10.0, 0) if node == canary else (95.0, 0)

    phases = drive("d2", settings, metrics=slow_after_canary)
    assert phases[-1] == "RolledBack"
    # The fast canary passed wave 0; the slow nodes of wave 1 failed it; wave 2 never began.
    assert wave_phases("d2") == ["Passed", "Failed", "Pending"]
    events = events_in_order(fleet, "d2")
    (passed,) = [e for e in events if e["reason"] == "GatePassed"]
    assert passed["data"]["wave"] == 0
    assert (passed["data"]["gate"]["healthy"], passed["data"]["gate"]["nodes"]) == (1, 1)
    (failed,) = [e for e in events if e["reason"] == "GateFailed"]
    assert failed["data"]["wave"] == 1
    gate = failed["data"]["gate"]
    assert (gate["nodes"], gate["healthy"], gate["unhealthy"]) == (5, 0, 5)
    assert gate["unhealthy_nodes"] == dict.fromkeys(waves[1], "p95 95.0 ms > 40.0 ms")
    # Only waves 0 and 1 were ever sent 2.0.0, and all of them, the promoted canary
    # included, went back; wave 2's nodes were released without being touched.
    applying = [n for e in events if e["reason"] == "Applying" for n in e["data"]["nodes"]]
    assert sorted(applying) == sorted(waves[0] + waves[1])
    # Wave 2's nodes at once; the touched ones told to revert, and RolledBack only once
    # seen on 1.0.0 (the simulated cluster shows it at once: the same step).
    released, verified = [e for e in events if e["reason"] == "RolledBack"]
    assert released["data"]["from"] == {"Pending": 6}
    assert released["data"]["nodes"] == sorted(waves[2])
    (reverting,) = [e for e in events if e["reason"] == "Reverting"]
    assert reverting["data"]["from"] == {"Healthy": 1, "Running": 5}
    assert reverting["data"]["versions"] == dict.fromkeys(sorted(waves[0] + waves[1]), "1.0.0")
    assert verified["data"]["from"] == {"Reverting": 6}
    assert verified["data"]["nodes"] == sorted(waves[0] + waves[1])
    (complete,) = [e for e in events if e["reason"] == "RollbackComplete"]
    assert complete["data"] == {"offline": [], "failed": {}}
    assert [e["reason"] for e in events][-1] == "RollbackComplete"
    assert set(node_states("d2").values()) == {"RolledBack"}
    detail = fleet.get("/v1/rollouts/d2").json()
    assert detail["status"]["pending"] == 0
    assert detail["message"] == "every node the rollout touched runs its previous version again"
    assert running_versions(settings, CLUSTERS) == {
        f"{c}-n{i}": "1.0.0" for c in CLUSTERS for i in range(4)
    }


def test_a_rollback_restores_the_previous_version_under_its_own_resources(
    fleet: TestClient, settings: Settings
) -> None:
    """A rollout with other limits that fails its gate returns the nodes it touched to
    their previous version as it ran before: under the resources of the rollout that had
    shipped it, not its own. (A cluster runs one DaemonSet per version: the failed
    rollout's limits in its pod template would restart that version's pods on every
    node, touched or not.) So does a second failed rollout after it, and drift repair."""
    small = {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"cpu": "500m", "memory": "256Mi"},
    }
    assert small != RESOURCES
    assert rollout_to(fleet, settings, "d1", "1.0.0", resources=small)[-1] == "Succeeded"
    nodes = {f"{c}-n{i}" for c in CLUSTERS for i in range(4)}

    def as_shipped_by_d1() -> dict[str, tuple[str, Any]]:
        return {
            n: (w["version"], w["resources"])
            for n, w in running_workloads(settings, CLUSTERS).items()
        }

    assert as_shipped_by_d1() == dict.fromkeys(nodes, ("1.0.0", small))
    for name in ("d2", "d3"):  # d3 claims nodes d2 rolled back
        resp = apply(fleet, rollout_doc(name, "2.0.0", resources=RESOURCES))
        assert resp.status_code == 200, resp.text
        assert drive(name, settings, metrics=lambda node: (95.0, 0))[-1] == "RolledBack"
        touched = [n for n, s in node_states(name).items() if s == "RolledBack"]
        assert touched
        assert as_shipped_by_d1() == dict.fromkeys(nodes, ("1.0.0", small)), name
    # A reverted node's workload lost behind the controller's back comes back as it was.
    import redis

    ((canary,),) = wave_nodes("d3")[:1]
    cluster, node = canary.split("/")
    r = redis.Redis.from_url(settings.redis_url or "")
    r.hdel(f"{settings.sim_state_prefix}:{cluster}:detector", node)
    r.close()
    with session_scope() as s:
        assert fleet_service.repair_drift(s, settings) == {f"{cluster}/detector": [node]}
    assert as_shipped_by_d1() == dict.fromkeys(nodes, ("1.0.0", small))


def collapse(seq: list[str]) -> list[str]:
    return [x for i, x in enumerate(seq) if i == 0 or seq[i - 1] != x]


def is_subsequence(seq: list[str], of: list[str]) -> bool:
    rest = iter(of)
    return all(x in rest for x in seq)


def test_gate_failing_in_a_later_wave_rolls_back_the_promoted_waves_too(
    fleet: TestClient, settings: Settings
) -> None:
    """The hardest rollback: waves 0 and 1 passed and run 2.0.0 for good, then wave 2
    fails. Every node the rollout touched, the promoted ones included, must return to
    1.0.0. Checked against the cluster itself, the assignments, the waves and the log."""
    everyone = {f"{c}-n{i}" for c in CLUSTERS for i in range(4)}
    assert rollout_to(fleet, settings, "base", "1.0.0")[-1] == "Succeeded"
    waves = planned_waves(apply(fleet, rollout_doc("up", "2.0.0")))
    assert wave_nodes("up") == waves
    assert [len(w) for w in waves] == [1, 5, 6]
    late = set(waves[2])

    def bad_in_wave_2(node: str) -> tuple[float, int]:
        return (12.0, 30) if node in late else (12.0, 0)  # 30% errors > maxErrorRate 1%

    # drive(), recording after every step what the database and the cluster say.
    rid = rollout_id("up")
    seen: list[tuple[list[str], dict[str, str | None]]] = [
        (wave_phases("up"), running_versions(settings, CLUSTERS))
    ]
    for _ in range(60):
        phase = reconciler.reconcile(rid, settings)
        seen.append((wave_phases("up"), running_versions(settings, CLUSTERS)))
        if phase not in ("Pending", "Progressing"):
            break
        report(bad_in_wave_2)
    assert phase == "RolledBack"

    # Each wave went forward only, along Pending, Applying, Baking, then Passed or Failed.
    for index, end in enumerate(["Passed", "Passed", "Failed"]):
        path = collapse([phases[index] for phases, _ in seen])
        assert path[-1] == end
        assert is_subsequence(path, ["Pending", "Applying", "Baking", end]), path
    # Waves 0 and 1 were promoted, and their nodes really ran 2.0.0, before wave 2 began.
    promoted = [
        running
        for phases, running in seen
        if phases[:2] == ["Passed", "Passed"] and phases[2] != "Pending"
    ]
    assert promoted  # wave 2 ran with both earlier waves promoted
    first_waves = {k.split("/")[1] for k in waves[0] + waves[1]}
    assert {n: v for n, v in promoted[0].items() if n in first_waves} == dict.fromkeys(
        first_waves, "2.0.0"
    )
    # After the failure: every node runs 1.0.0 again, and the records agree.
    assert running_versions(settings, CLUSTERS) == dict.fromkeys(everyone, "1.0.0")
    assert node_states("up") == dict.fromkeys(everyone, "RolledBack")
    assert wave_phases("up") == ["Passed", "Passed", "Failed"]
    body = fleet.get("/v1/rollouts/up").json()
    assert (body["phase"], body["states"]) == ("RolledBack", {"RolledBack": 12})

    events = events_in_order(fleet, "up")
    # The rollout's own transitions: each once, each starting where the last one ended.
    rollout_moves = [
        (e["reason"], e["data"]["from"], e["data"]["to"])
        for e in events
        if isinstance(e["data"].get("from"), str)
    ]
    assert rollout_moves == [
        ("Started", "Pending", "Progressing"),
        ("GateFailed", "Progressing", "Failed"),
        ("RollingBack", "Failed", "RolledBack"),
    ]
    wave_log = [
        (e["reason"], e["data"]["wave"])
        for e in events
        if e["reason"] in ("WaveStarted", "GatePassed", "GateFailed")
    ]
    assert wave_log == [
        ("WaveStarted", 0),
        ("GatePassed", 0),
        ("WaveStarted", 1),
        ("GatePassed", 1),
        ("WaveStarted", 2),
        ("GateFailed", 2),
    ]
    gate = next(e for e in events if e["reason"] == "GateFailed")["data"]["gate"]
    assert (gate["nodes"], gate["healthy"], gate["unhealthy"]) == (6, 0, 6)
    assert set(gate["unhealthy_nodes"]) == late
    assert all(
        why.startswith("error rate 0.3000 > 0.01") for why in gate["unhealthy_nodes"].values()
    )

    # Every node's path, replayed from the log (a claim starts it at Pending): each state
    # entered once, in order; each event's "from" counts match the replay.
    paths: dict[str, list[str]] = {n: ["Pending"] for w in waves for n in w}
    for e in events:
        if not isinstance(e["data"].get("from"), dict):
            continue
        nodes = e["data"]["nodes"]
        came_from: dict[str, int] = {}
        for n in nodes:
            came_from[paths[n][-1]] = came_from.get(paths[n][-1], 0) + 1
            paths[n].append(e["data"]["to"])
        assert came_from == e["data"]["from"], e
    promoted_path = ["Pending", "Applying", "Running", "Healthy", "Reverting", "RolledBack"]
    failed_path = ["Pending", "Applying", "Running", "Reverting", "RolledBack"]
    assert paths == {
        **dict.fromkeys(waves[0] + waves[1], promoted_path),
        **dict.fromkeys(waves[2], failed_path),
    }
    # The rollback came after the decision to roll back, in one batch of all 12 nodes.
    reasons = [e["reason"] for e in events]
    assert reasons.count("RolledBack") == 1
    assert reasons.index("RollingBack") < reasons.index("RolledBack")


def test_rollback_to_nothing_removes_the_workload(fleet: TestClient, settings: Settings) -> None:
    apply(fleet, rollout_doc("first", "2.0.0"))
    phases = drive("first", settings, metrics=lambda n: (10.0, 50))  # 50% errors
    assert phases[-1] == "RolledBack"
    assert running_versions(settings, CLUSTERS) == {}  # nothing left behind


def test_failing_gate_with_pause_waits_for_a_human(fleet: TestClient, settings: Settings) -> None:
    apply(fleet, rollout_doc("p", "2.0.0", onFailure="pause"))
    phases = drive("p", settings, metrics=lambda n: (10.0, 20))
    assert phases[-1] == "Paused"
    assert "onFailure: pause" in fleet.get("/v1/rollouts/p").json()["message"]
    # Still on the canary: nothing rolled back, nothing promoted.
    assert list(running_versions(settings, CLUSTERS).values()) == ["2.0.0"]
    resp = fleet.post("/v1/rollouts/p/abort")
    assert resp.status_code == 202
    assert resp.json()["phase"] == "Aborted"
    assert reconciler.reconcile(rollout_id("p"), settings) == "Aborted"
    assert running_versions(settings, CLUSTERS) == {}


def test_silent_nodes_never_pass(fleet: TestClient, settings: Settings) -> None:
    apply(fleet, rollout_doc("quiet", "1.0.0"))
    rid = rollout_id("quiet")
    for _ in range(5):
        reconciler.reconcile(rid, settings)
        report(samples_per_node=5)  # below minSamples (20)
    body = fleet.get("/v1/rollouts/quiet").json()
    assert body["phase"] == "Progressing"
    assert body["current_wave"] == 0
    assert body["wave_detail"][0]["phase"] == "Baking"


def test_offline_nodes_are_deferred_and_do_not_stall(fleet: TestClient, settings: Settings) -> None:
    with session_scope() as s:
        set_node_health(s, "oslo", "oslo-n1", NodeHealth.OFFLINE)
    spec = {"strategy": {"steps": [{"percent": 100}], "maxUnavailable": "100%", "maxDeferred": 2}}
    phases = rollout_to(fleet, settings, "d", "1.0.0", **spec)
    assert phases[-1] == "Succeeded"
    states = node_states("d")
    assert states.pop("oslo-n1") == "Deferred"
    assert set(states.values()) == {"Healthy"}
    assert "1 offline node(s) deferred" in fleet.get("/v1/rollouts/d").json()["message"]


def test_too_many_offline_nodes_fail_the_wave(fleet: TestClient, settings: Settings) -> None:
    with session_scope() as s:
        for n in range(3):
            set_node_health(s, "oslo", f"oslo-n{n}", NodeHealth.OFFLINE)
    spec = {"strategy": {"steps": [{"percent": 100}], "maxDeferred": "10%"}}
    phases = rollout_to(fleet, settings, "d", "1.0.0", **spec)
    assert phases[-1] == "RolledBack"
    failed = [
        e for e in fleet.get("/v1/rollouts/d/events").json() if e["reason"] == "TooManyOfflineNodes"
    ]
    assert len(failed) == 1


def test_injected_workload_failure_fails_the_gate(
    client: TestClient, sim_fleet: None, settings: Settings
) -> None:
    apply(client, cluster_doc("lab", 3, failures={"lab-n2": "ImagePullBackOff"}))
    push_versions(client, "1.0.0")
    spec = {"strategy": {"steps": [{"percent": 100}], "maxUnavailable": "100%"}}
    phases = rollout_to(client, settings, "d", "1.0.0", **spec)
    assert phases[-1] == "RolledBack"
    events = client.get("/v1/rollouts/d/events", params={"limit": 200}).json()
    failed = next(e for e in events if e["reason"] == "WorkloadFailed")
    assert failed["data"]["nodes"] == ["lab/lab-n2"]
    assert "ImagePullBackOff" in str(failed["data"]["reasons"])


def test_second_active_rollout_on_same_nodes_is_a_409(fleet: TestClient) -> None:
    assert apply(fleet, rollout_doc("holder", "1.0.0")).status_code == 200
    resp = apply(fleet, rollout_doc("intruder", "2.0.0"))
    assert resp.status_code == 409
    detail = resp.json()["detail"]
    assert detail["rollout"] == "holder"
    assert detail["message"].startswith(
        "document 0: rollout holder is active on 12 of the selected nodes for model detector"
    )
    assert len(detail["owners"]["holder"]) == 12
    assert fleet.get("/v1/rollouts/intruder").status_code == 404
    # A disjoint selection is fine.
    other = rollout_doc("paris-only", "2.0.0", selector={"matchLabels": {"site": "paris"}})
    assert apply(fleet, other).status_code == 409  # paris nodes are held too
    plan = apply(fleet, other, dry_run=True).json()["results"][0]
    assert plan["problems"][0]["code"] == "NodesOwnedByAnotherRollout"


def test_pause_resume(fleet: TestClient, settings: Settings) -> None:
    apply(fleet, rollout_doc("d", "1.0.0"))
    rid = rollout_id("d")
    reconciler.reconcile(rid, settings)
    assert fleet.post("/v1/rollouts/d/pause").json()["phase"] == "Paused"
    assert reconciler.reconcile(rid, settings) == "Paused"  # the reconciler leaves it alone
    again = fleet.post("/v1/rollouts/d/pause")
    assert again.status_code == 409
    assert "cannot become Paused" in again.json()["detail"]
    assert fleet.post("/v1/rollouts/d/resume").json()["phase"] == "Progressing"
    assert drive("d", settings)[-1] == "Succeeded"


def test_undo_and_retry(fleet: TestClient, settings: Settings) -> None:
    assert rollout_to(fleet, settings, "base", "1.0.0")[-1] == "Succeeded"
    assert rollout_to(fleet, settings, "up", "2.0.0")[-1] == "Succeeded"
    assert set(running_versions(settings, CLUSTERS).values()) == {"2.0.0"}

    resp = fleet.post("/v1/rollouts/up/undo")
    assert resp.status_code == 202
    assert reconciler.reconcile(rollout_id("up"), settings) == "RolledBack"
    assert set(running_versions(settings, CLUSTERS).values()) == {"1.0.0"}
    assert fleet.post("/v1/rollouts/up/undo").status_code == 409

    assert fleet.post("/v1/rollouts/up/retry").json()["phase"] == "Pending"
    assert drive("up", settings)[-1] == "Succeeded"
    assert set(running_versions(settings, CLUSTERS).values()) == {"2.0.0"}


def test_unknown_rollout_and_command(fleet: TestClient) -> None:
    assert fleet.post("/v1/rollouts/ghost/pause").status_code == 404
    apply(fleet, rollout_doc("d", "1.0.0"))
    resp = fleet.post("/v1/rollouts/d/explode")
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["loc"] == ["path", "action"]


def test_rollout_waits_for_validation_then_runs(fleet: TestClient, settings: Settings) -> None:
    """A ModelVersion that is not Ready yet: the rollout waits in Pending."""
    from controller.db.models import ModelVersion, VersionStatus
    from controller.registry import repository as registry_repo

    with session_scope() as s:
        mv = registry_repo.get_version(s, "detector", "2.0.0")
        assert isinstance(mv, ModelVersion)
        mv.status = VersionStatus.VALIDATING
    resp = apply(fleet, rollout_doc("w", "2.0.0"))
    assert resp.status_code == 200
    assert resp.json()["results"][0]["problems"][0]["code"] == "ModelVersionNotReady"
    rid = rollout_id("w")
    assert reconciler.reconcile(rid, settings) == "Pending"
    assert "waiting for model version" in fleet.get("/v1/rollouts/w").json()["message"]
    with session_scope() as s:
        mv = registry_repo.get_version(s, "detector", "2.0.0")
        assert isinstance(mv, ModelVersion)
        mv.status = VersionStatus.INVALID
    assert reconciler.reconcile(rid, settings) == "Failed"


def test_a_rollout_failed_by_an_invalid_version_cannot_be_paused_into_progress(
    fleet: TestClient, settings: Settings
) -> None:
    """A fixed bug: pause accepted a Failed rollout (Failed → Paused is onFailure: pause's
    own move) and resume then sent it to the reconciler, which pushed the version that
    had failed validation to the canary."""
    from controller.db.models import ModelVersion, VersionStatus
    from controller.registry import repository as registry_repo

    def set_status(status: VersionStatus) -> None:
        with session_scope() as s:
            mv = registry_repo.get_version(s, "detector", "2.0.0")
            assert isinstance(mv, ModelVersion)
            mv.status = status

    set_status(VersionStatus.VALIDATING)
    assert apply(fleet, rollout_doc("w", "2.0.0")).status_code == 200
    set_status(VersionStatus.INVALID)
    assert reconciler.reconcile(rollout_id("w"), settings) == "Failed"
    paused = fleet.post("/v1/rollouts/w/pause")
    assert paused.status_code == 409
    assert "rollout w is Failed: it cannot become Paused" in paused.json()["detail"]
    assert fleet.post("/v1/rollouts/w/resume").status_code == 409
    assert reconciler.reconcile(rollout_id("w"), settings) == "Failed"
    assert set(node_states("w").values()) == {"Pending"}
    assert running_versions(settings, CLUSTERS) == {}
    assert fleet.post("/v1/rollouts/w/abort").json()["phase"] == "Aborted"


def test_container_restarts_are_folded_into_state_and_events(
    client: TestClient, sim_fleet: None, settings: Settings
) -> None:
    apply(client, cluster_doc("lab", 3, restarts={"lab-n1": 2}))
    push_versions(client, "1.0.0")
    spec = {"strategy": {"steps": [{"percent": 100}], "maxUnavailable": "100%"}}
    assert rollout_to(client, settings, "d", "1.0.0", **spec)[-1] == "Succeeded"
    events = client.get("/v1/rollouts/d/events", params={"limit": 500}).json()
    restarted = [e for e in events if e["reason"] == "WorkloadRestarted"]
    assert len(restarted) == 1  # once, not on every step or heartbeat
    assert restarted[0]["data"]["restarts"] == {"lab/lab-n1": 2}


def test_a_rollouts_nodes_are_listed_filtered_and_paged(
    client: TestClient, sim_fleet: None, settings: Settings
) -> None:
    """``GET /v1/rollouts/{name}/nodes``: by wave, then cluster and node; the node that
    failed found by its state, with its reason; a wave alone; pages that add up; bad
    filters named by their field."""
    failures = {"lab-n2": "ImagePullBackOff"}
    assert apply(client, cluster_doc("lab", 6, failures=failures)).status_code == 200
    assert apply(client, cluster_doc("annex", 6)).status_code == 200
    push_versions(client, "1.0.0")
    spec = {"strategy": {"steps": [{"nodes": 1}, {"percent": 100}], "maxUnavailable": "100%"}}
    waves = planned_waves(apply(client, rollout_doc("p", "1.0.0", onFailure="pause", **spec)))
    assert drive("p", settings)[-1] == "Paused"

    listed = client.get("/v1/rollouts/p/nodes", params={"limit": 1000}).json()
    assert listed["total"] == 12
    keys = [f"{n['cluster']}/{n['node']}" for n in listed["items"]]
    assert keys == [k for wave in waves for k in sorted(wave)]
    assert [n["wave"] for n in listed["items"]] == [i for i, w in enumerate(waves) for _ in w]

    failed = client.get("/v1/rollouts/p/nodes", params={"state": "Failed"}).json()
    assert failed["total"] == 1
    (node,) = failed["items"]
    assert (node["cluster"], node["node"], node["desired"]) == ("lab", "lab-n2", "1.0.0")
    assert node["wave"] == (0 if waves[0] == ["lab/lab-n2"] else 1)
    assert "ImagePullBackOff" in node["message"], node

    second = client.get("/v1/rollouts/p/nodes", params={"wave": 1}).json()
    assert second["total"] == len(waves[1]) == 11
    assert {n["wave"] for n in second["items"]} == {1}

    pages = [
        client.get("/v1/rollouts/p/nodes", params={"limit": 5, "offset": o}).json()["items"]
        for o in (0, 5, 10)
    ]
    assert [len(p) for p in pages] == [5, 5, 2]
    assert [f"{n['cluster']}/{n['node']}" for p in pages for n in p] == keys

    bad = client.get("/v1/rollouts/p/nodes", params={"state": "Broken"})
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["query", "state"]
    bad = client.get("/v1/rollouts/p/nodes", params={"wave": 2})
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["query", "wave"]
    assert "2 wave(s): wave 2 is not one of them" in bad.json()["detail"][0]["msg"]
    assert client.get("/v1/rollouts/nope/nodes").status_code == 404
    anonymous = client.get("/v1/rollouts/p/nodes", headers={"Authorization": ""})
    assert anonymous.status_code == 401
