"""Convergence of deferred nodes: a node offline while its rollout ran gets, once it is
back, the version its assignment says, passes the same per-node health check a wave's
nodes pass, and the event log says so; a node that fails it returns to its previous
version. A Succeeded rollout shows the nodes still on their way (status.pending).

Nodes go offline as in production: their agent's last heartbeat is old, and
mark_silent_nodes (beat's check) marks them Offline; they come back with a heartbeat."""

from __future__ import annotations

import io
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from rich.console import Console
from sqlalchemy import select

from controller.cli.get import _rollouts_table
from controller.db.base import utcnow
from controller.db.models import Assignment, ModelVersion, Node
from controller.db.session import session_scope
from controller.faults import FaultInjected, armed
from controller.fleet import service as fleet_service
from controller.rollouts import reconciler
from controller.rollouts import repository as repo
from controller.settings import Settings
from node_agent.contract import Heartbeat
from tests.rollouts.faulty import Faults, install, permanent, transient
from tests.rollouts.helpers import (
    apply,
    cluster_doc,
    drive,
    next_seq,
    node_states,
    push_versions,
    report,
    rollout_doc,
    rollout_events,
    rollout_id,
    running_versions,
)

CLUSTERS = ("berlin", "paris")
AWAY = "paris-n1"  # the node that is offline while the rollout runs
KEY = f"paris/{AWAY}"
# One wave of every node; one offline node may be deferred.
ONE_WAVE = {"strategy": {"steps": [{"percent": 100}], "maxUnavailable": "100%", "maxDeferred": 1}}


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Faults:
    return install(monkeypatch)


@pytest.fixture
def fleet(client: TestClient, sim_fleet: None, faults: Faults, settings: Settings) -> TestClient:
    """Two sites of 2 nodes each, every node on detector 1.0.0 (rollout d1); 2.0.0 and
    3.0.0 registered."""
    resp = apply(client, *(cluster_doc(c, 2) for c in CLUSTERS))
    assert resp.status_code == 200, resp.text
    push_versions(client, "1.0.0", "2.0.0", "3.0.0")
    apply(client, rollout_doc("d1", "1.0.0", **ONE_WAVE))
    assert drive("d1", settings)[-1] == "Succeeded"
    return client


def _beat(node: str, *, at: Any) -> None:
    cluster = node.split("-")[0]
    with session_scope() as s:
        fleet_service.ingest_heartbeats(
            s, [Heartbeat(cluster=cluster, node=node, seq=next_seq(), sent_at=at)], now=at
        )


def go_offline(settings: Settings, node: str = AWAY) -> None:
    """The node's agent last beat long ago: beat's silence check marks it Offline."""
    _beat(node, at=utcnow() - timedelta(seconds=settings.node_offline_s + 60))
    with session_scope() as s:
        fleet_service.mark_silent_nodes(s, settings, now=utcnow())
    assert health(node) == "Offline"


def come_back(node: str = AWAY) -> None:
    _beat(node, at=utcnow())
    assert health(node) == "Ready"


def health(node: str) -> str:
    with session_scope() as s:
        found = s.scalar(select(Node.health).where(Node.name == node))
        assert found is not None
        return found


def reasons(name: str) -> list[str]:
    return [r for r, _ in rollout_events(name)]


def pending(client: TestClient, name: str) -> int:
    detail = client.get(f"/v1/rollouts/{name}").json()["status"]["pending"]
    [listed] = [r for r in client.get("/v1/rollouts").json()["items"] if r["name"] == name]
    assert listed["status"]["pending"] == detail
    assert isinstance(detail, int)
    return detail


def work_left() -> list[int]:
    with session_scope() as s:
        return list(repo.to_reconcile(s))


def assignment(node: str) -> tuple[str, str | None, str | None]:
    """State, desired and previous version of the node's assignment (model detector)."""
    with session_scope() as s:
        versions = dict(s.execute(select(ModelVersion.id, ModelVersion.version)).all())
        a = s.scalars(
            select(Assignment).join(Node, Node.id == Assignment.node_id).where(Node.name == node)
        ).one()
        return (
            a.state,
            versions.get(a.desired_version_id or 0),
            versions.get(a.previous_version_id or 0),
        )


def succeeded_without(fleet: TestClient, settings: Settings, name: str, version: str) -> None:
    """Rollout ``name`` to ``version`` succeeds while AWAY is offline (Deferred)."""
    go_offline(settings)
    apply(fleet, rollout_doc(name, version, **ONE_WAVE))
    assert node_states(name)[AWAY] == "Deferred"
    assert drive(name, settings)[-1] == "Succeeded"
    assert running_versions(settings, CLUSTERS)[AWAY] == "1.0.0"


def step(name: str, settings: Settings, **kwargs: Any) -> str | None:
    return reconciler.reconcile(rollout_id(name), settings, **kwargs)


def table_text(client: TestClient) -> str:
    out = io.StringIO()
    Console(file=out, width=200).print(
        _rollouts_table(client.get("/v1/rollouts").json()["items"], False)
    )
    return out.getvalue()


# ---------------------------------------------------------------- converging


def test_a_node_offline_across_a_rollout_converges_with_its_health_evidence(
    fleet: TestClient, settings: Settings
) -> None:
    succeeded_without(fleet, settings, "d2", "2.0.0")
    rid = rollout_id("d2")
    # Succeeded, and says one node is still to come; nothing to step while it is away.
    assert pending(fleet, "d2") == 1
    assert "Succeeded (1 pending)" in table_text(fleet)
    assert rid not in work_left()
    assert step("d2", settings) == "Succeeded"
    assert node_states("d2")[AWAY] == "Deferred"

    come_back()
    assert rid in work_left()  # beat's tick steps it now
    assert step("d2", settings) == "Succeeded"
    # Back, told to switch, switched: not done before its health check.
    assert running_versions(settings, CLUSTERS)[AWAY] == "2.0.0"
    assert node_states("d2")[AWAY] == "Applying"
    assert pending(fleet, "d2") == 1
    assert step("d2", settings) == "Succeeded"  # no numbers yet: it holds
    assert node_states("d2")[AWAY] == "Applying"
    assert "Converged" not in reasons("d2")

    report()  # its agent reports 2.0.0 within the gates
    assert step("d2", settings) == "Succeeded"
    assert node_states("d2")[AWAY] == "Healthy"
    assert assignment(AWAY) == ("Healthy", "2.0.0", "1.0.0")
    assert set(running_versions(settings, CLUSTERS).values()) == {"2.0.0"}
    assert pending(fleet, "d2") == 0
    assert "pending" not in table_text(fleet)
    assert rid not in work_left()

    events = rollout_events("d2")
    after = [(r, d) for r, d in events[[r for r, _ in events].index("Succeeded") :]]
    assert [r for r, _ in after] == ["Succeeded", "NodeBack", "Converging", "Converged"]
    for reason, data in after[1:]:
        assert data["nodes"] == [KEY], reason
        assert data["versions"] == {KEY: "2.0.0"}, reason
    assert after[3][1]["from"] == {"Applying": 1}
    # Steps after that change nothing.
    assert step("d2", settings) == "Succeeded"
    assert rollout_events("d2") == events


def test_a_node_offline_across_a_rolled_back_rollout_stays_on_its_previous_version(
    fleet: TestClient, settings: Settings
) -> None:
    """Nothing to do: the revert releases the node it never touched (Deferred ->
    RolledBack), its desired version never changed, and nothing steps the rollout."""
    go_offline(settings)
    apply(fleet, rollout_doc("d2", "2.0.0", **ONE_WAVE))
    assert drive("d2", settings, metrics=lambda n: (400.0, 0))[-1] == "RolledBack"
    assert node_states("d2")[AWAY] == "RolledBack"
    assert pending(fleet, "d2") == 0

    come_back()
    assert rollout_id("d2") not in work_left()
    before = rollout_events("d2")
    assert step("d2", settings) == "RolledBack"
    with session_scope() as s:
        assert fleet_service.repair_drift(s, settings) == {}
    assert rollout_events("d2") == before
    assert assignment(AWAY) == ("RolledBack", "1.0.0", "1.0.0")
    assert set(running_versions(settings, CLUSTERS).values()) == {"1.0.0"}
    assert pending(fleet, "d2") == 0


def test_a_node_offline_across_an_undone_rollout_stays_on_its_previous_version(
    fleet: TestClient, settings: Settings
) -> None:
    succeeded_without(fleet, settings, "d2", "2.0.0")
    assert pending(fleet, "d2") == 1
    assert fleet.post("/v1/rollouts/d2/undo").status_code == 202
    assert node_states("d2")[AWAY] == "RolledBack"
    assert pending(fleet, "d2") == 0
    come_back()
    assert rollout_id("d2") not in work_left()
    assert step("d2", settings) == "RolledBack"
    assert "NodeBack" not in reasons("d2")
    assert set(running_versions(settings, CLUSTERS).values()) == {"1.0.0"}


def test_a_node_back_during_a_later_rollout_follows_the_later_one(
    fleet: TestClient, settings: Settings
) -> None:
    succeeded_without(fleet, settings, "d2", "2.0.0")
    assert pending(fleet, "d2") == 1
    apply(fleet, rollout_doc("d3", "3.0.0", **ONE_WAVE))  # claims every node, AWAY too
    # d2 gives the node up, and says so once.
    superseded = [d for r, d in rollout_events("d2") if r == "Superseded"]
    assert superseded == [{"rollout": "d3", "nodes": [KEY]}]
    assert pending(fleet, "d2") == 0
    assert rollout_id("d2") not in work_left()
    # What the node runs now is what d3 returns it to: 1.0.0, not d2's 2.0.0.
    assert assignment(AWAY) == ("Deferred", "1.0.0", "1.0.0")

    come_back()  # while d3 runs
    assert rollout_id("d2") not in work_left()
    assert step("d2", settings) == "Succeeded"
    assert drive("d3", settings)[-1] == "Succeeded"
    assert set(running_versions(settings, CLUSTERS).values()) == {"3.0.0"}
    assert node_states("d3")[AWAY] == "Healthy"
    assert pending(fleet, "d3") == 0
    assert AWAY not in node_states("d2")
    d2 = reasons("d2")
    assert d2.count("Superseded") == 1
    assert not {"NodeBack", "Converging", "Converged"} & set(d2)
    # Applying d3 again (unchanged or changed) does not repeat it.
    apply(fleet, rollout_doc("d3", "3.0.0", **ONE_WAVE))
    assert reasons("d2").count("Superseded") == 1


def test_a_node_back_after_a_later_rollout_ended_converges_to_the_later_one(
    fleet: TestClient, settings: Settings
) -> None:
    succeeded_without(fleet, settings, "d2", "2.0.0")
    apply(fleet, rollout_doc("d3", "3.0.0", **ONE_WAVE))
    assert drive("d3", settings)[-1] == "Succeeded"
    assert pending(fleet, "d3") == 1
    come_back()
    assert rollout_id("d3") in work_left()
    assert rollout_id("d2") not in work_left()
    step("d3", settings)
    report()
    step("d3", settings)
    assert node_states("d3")[AWAY] == "Healthy"
    assert set(running_versions(settings, CLUSTERS).values()) == {"3.0.0"}
    assert pending(fleet, "d3") == 0


# ---------------------------------------------------------------- failing to converge


@pytest.mark.parametrize("failure", ["unhealthy", "silent"])
def test_a_node_back_that_fails_its_health_check_is_reverted(
    fleet: TestClient, settings: Settings, failure: str
) -> None:
    succeeded_without(fleet, settings, "d2", "2.0.0")
    come_back()
    assert step("d2", settings) == "Succeeded"
    assert running_versions(settings, CLUSTERS)[AWAY] == "2.0.0"
    if failure == "unhealthy":
        report(lambda n: (400.0 if n == KEY else 12.0, 0))
        assert step("d2", settings) == "Succeeded"
        why = "health check failed: p95 400.0 ms > 40.0 ms"
    else:  # its agent beats but reports no inference: the progress deadline (15m)
        assert step("d2", settings, now=utcnow() + timedelta(minutes=14)) == "Succeeded"
        assert node_states("d2")[AWAY] == "Applying"
        assert step("d2", settings, now=utcnow() + timedelta(minutes=16)) == "Succeeded"
        why = "progress deadline (15m) passed without health evidence on the new version"
    # Back where it was, recorded, and the rollout still Succeeded with nothing pending.
    assert assignment(AWAY) == ("RolledBack", "1.0.0", "1.0.0")
    assert running_versions(settings, CLUSTERS)[AWAY] == "1.0.0"
    assert {
        n: v for n, v in running_versions(settings, CLUSTERS).items() if n != AWAY
    } == dict.fromkeys(("berlin-n0", "berlin-n1", "paris-n0"), "2.0.0")
    failed = [d for r, d in rollout_events("d2") if r == "ConvergenceFailed"]
    assert len(failed) == 1
    assert failed[0]["nodes"] == [KEY]
    assert failed[0]["from"] == {"Applying": 1}
    assert failed[0]["versions"] == {KEY: "1.0.0"}
    assert failed[0]["why"] == {KEY: why}
    assert "Converged" not in reasons("d2")
    assert pending(fleet, "d2") == 0
    assert rollout_id("d2") not in work_left()
    assert fleet.get("/v1/rollouts/d2").json()["phase"] == "Succeeded"


def test_a_revert_the_cluster_refuses_is_retried_until_it_lands(
    fleet: TestClient, settings: Settings, faults: Faults
) -> None:
    succeeded_without(fleet, settings, "d2", "2.0.0")
    come_back()
    step("d2", settings)
    report(lambda n: (400.0, 0))
    faults.apply["paris"] = transient()
    assert step("d2", settings) == "Succeeded"
    # Not recorded as reverted while it still runs 2.0.0: still on its way, retried.
    assert node_states("d2")[AWAY] == "Applying"
    assert running_versions(settings, CLUSTERS)[AWAY] == "2.0.0"
    assert rollout_id("d2") in work_left()
    assert "ConvergenceFailed" not in reasons("d2")
    faults.apply.clear()
    assert step("d2", settings) == "Succeeded"
    assert assignment(AWAY) == ("RolledBack", "1.0.0", "1.0.0")
    assert running_versions(settings, CLUSTERS)[AWAY] == "1.0.0"
    assert reasons("d2").count("ConvergenceFailed") == 1


def test_a_node_back_on_a_cluster_that_refuses_to_report_is_reverted_at_once(
    fleet: TestClient, settings: Settings, faults: Faults
) -> None:
    """Its cluster took the new version but will not say what runs (a 403): it returns
    to its previous version in that step, saying why, not after the progress deadline;
    RolledBack once the cluster answers again and shows it there."""
    succeeded_without(fleet, settings, "d2", "2.0.0")
    come_back()
    faults.observe["paris"] = permanent("403 Forbidden: pods is forbidden")
    assert step("d2", settings) == "Succeeded"
    why = "cluster paris refused to report it: 403 Forbidden: pods is forbidden"
    (failed,) = [d for r, d in rollout_events("d2") if r == "ConvergenceFailed"]
    assert (failed["nodes"], failed["why"]) == ([KEY], {KEY: why})
    assert assignment(AWAY) == ("Reverting", "1.0.0", "1.0.0")  # not seen back yet
    assert running_versions(settings, CLUSTERS)[AWAY] == "1.0.0"
    faults.observe.clear()
    assert step("d2", settings) == "Succeeded"
    assert assignment(AWAY) == ("RolledBack", "1.0.0", "1.0.0")
    assert "Converged" not in reasons("d2")


def test_a_converging_node_reverted_is_back_only_once_seen_on_its_previous_version(
    fleet: TestClient, settings: Settings, faults: Faults
) -> None:
    """Its workload never comes up (neither 2.0.0 nor, at first, 1.0.0): past the
    progress deadline it is reverted, and Reverting until 1.0.0 is seen there."""
    succeeded_without(fleet, settings, "d2", "2.0.0")
    come_back()
    faults.stuck.add(AWAY)
    assert step("d2", settings) == "Succeeded"
    later = utcnow() + timedelta(minutes=16)  # past the progress deadline (15m)
    assert step("d2", settings, now=later) == "Succeeded"
    assert node_states("d2")[AWAY] == "Reverting"
    assert "ConvergenceFailed" in reasons("d2")
    assert rollout_id("d2") in work_left()  # stepped on until it is seen back
    assert step("d2", settings, now=later) == "Succeeded"
    assert node_states("d2")[AWAY] == "Reverting"
    faults.stuck.clear()
    assert step("d2", settings, now=later) == "Succeeded"
    assert assignment(AWAY) == ("RolledBack", "1.0.0", "1.0.0")
    assert rollout_id("d2") not in work_left()
    [(_, back)] = [(r, d) for r, d in rollout_events("d2") if r == "RolledBack"]
    assert (back["nodes"], back["from"]) == ([KEY], {"Reverting": 1})


# ---------------------------------------------------------------- rollbacks, verified


def rolled_back_with(
    fleet: TestClient, settings: Settings, faults: Faults, before_gate: Any = None
) -> None:
    """d2 (2.0.0) reaches every node, its gate fails and it rolls back; ``before_gate``
    runs just before the failing step (a node goes offline, a cluster acts up)."""
    apply(fleet, rollout_doc("d2", "2.0.0", **ONE_WAVE))
    assert step("d2", settings) == "Progressing"
    assert set(running_versions(settings, CLUSTERS).values()) == {"2.0.0"}
    report(lambda n: (400.0, 0))
    if before_gate is not None:
        before_gate()
    assert step("d2", settings) == "RolledBack"


def message(fleet: TestClient, name: str) -> str:
    text = fleet.get(f"/v1/rollouts/{name}").json()["message"]
    assert isinstance(text, str)
    return text


def test_a_rollback_ends_only_when_every_node_is_seen_on_its_previous_version(
    fleet: TestClient, settings: Settings, faults: Faults
) -> None:
    """paris-n0's previous version does not come up at once (a handover in progress):
    the node stays Reverting and the rollout keeps stepping, says so, and counts it
    pending, until its cluster shows 1.0.0 Ready there."""
    rolled_back_with(fleet, settings, faults, lambda: faults.stuck.add("paris-n0"))
    rid = rollout_id("d2")
    states = node_states("d2")
    assert states.pop("paris-n0") == "Reverting"
    assert set(states.values()) == {"RolledBack"}
    assert pending(fleet, "d2") == 1
    assert "RolledBack (1 pending)" in table_text(fleet)
    assert message(fleet, "d2") == "reverting: 1 node(s) not yet seen on their previous version"
    assert rid in work_left()  # beat's tick steps it too
    assert "RollbackComplete" not in reasons("d2")
    assert step("d2", settings) == "RolledBack"
    assert node_states("d2")["paris-n0"] == "Reverting"

    faults.stuck.clear()
    assert step("d2", settings) == "RolledBack"
    assert set(node_states("d2").values()) == {"RolledBack"}
    assert assignment("paris-n0") == ("RolledBack", "1.0.0", "1.0.0")
    assert pending(fleet, "d2") == 0
    assert rid not in work_left()
    assert message(fleet, "d2") == "every node the rollout touched runs its previous version again"
    events = rollout_events("d2")
    assert [r for r, _ in events][-2:] == ["RolledBack", "RollbackComplete"]
    assert events[-2][1]["nodes"] == ["paris/paris-n0"]
    assert events[-2][1]["from"] == {"Reverting": 1}
    assert events[-2][1]["versions"] == {"paris/paris-n0": "1.0.0"}
    assert step("d2", settings) == "RolledBack"
    assert rollout_events("d2") == events  # nothing more to do, nothing more said


def test_a_node_offline_during_a_rollback_is_verified_once_it_is_back(
    fleet: TestClient, settings: Settings, faults: Faults
) -> None:
    rolled_back_with(fleet, settings, faults, lambda: go_offline(settings))
    rid = rollout_id("d2")
    assert node_states("d2")[AWAY] == "Reverting"
    assert pending(fleet, "d2") == 1
    assert message(fleet, "d2") == (
        "every node the rollout touched runs its previous version again, except 1 offline "
        "node(s) reverted once they are back"
    )
    [(_, complete)] = [(r, d) for r, d in rollout_events("d2") if r == "RollbackComplete"]
    assert complete["offline"] == [KEY]
    detail = fleet.get("/v1/rollouts/d2").json()
    # Nothing to step while it is away; a retry need not wait for it.
    assert rid not in work_left()
    before = rollout_events("d2")
    assert step("d2", settings) == "RolledBack"
    assert rollout_events("d2") == before
    assert detail["states"] == {"RolledBack": 3, "Reverting": 1}

    come_back()
    assert rid in work_left()
    assert step("d2", settings) == "RolledBack"
    assert assignment(AWAY) == ("RolledBack", "1.0.0", "1.0.0")
    assert pending(fleet, "d2") == 0
    assert set(running_versions(settings, CLUSTERS).values()) == {"1.0.0"}
    completions = [d for r, d in rollout_events("d2") if r == "RollbackComplete"]
    assert [d["offline"] for d in completions] == [[KEY], []]
    assert rid not in work_left()


def test_a_node_whose_previous_version_fails_after_the_revert_is_failed_saying_why(
    fleet: TestClient, settings: Settings, faults: Faults
) -> None:
    rolled_back_with(fleet, settings, faults, lambda: faults.failing.update({AWAY: "OOMKilled"}))
    why = "its previous version 1.0.0 failed (OOMKilled) after the revert; it stays there"
    assert assignment(AWAY) == ("Failed", "1.0.0", "1.0.0")
    [(_, failed)] = [(r, d) for r, d in rollout_events("d2") if r == "RevertFailed"]
    assert failed["nodes"] == [KEY]
    assert failed["reasons"] == {str(failed_id(AWAY)): why}
    [(_, complete)] = [(r, d) for r, d in rollout_events("d2") if r == "RollbackComplete"]
    assert complete["failed"] == {KEY: why}
    assert message(fleet, "d2").endswith("except 1 node(s) failing on their previous version")
    assert pending(fleet, "d2") == 0
    assert rollout_id("d2") not in work_left()
    # Nothing is left reverting: a retry may start over.
    assert fleet.post("/v1/rollouts/d2/retry").status_code == 202


def failed_id(node: str) -> int:
    with session_scope() as s:
        found = s.scalar(
            select(Assignment.id).join(Node, Node.id == Assignment.node_id).where(Node.name == node)
        )
        assert found is not None
        return found


# ---------------------------------------------------------------- crash in the middle


def test_a_step_that_dies_after_the_push_loses_nothing_and_repeats_nothing(
    fleet: TestClient, settings: Settings
) -> None:
    succeeded_without(fleet, settings, "d2", "2.0.0")
    come_back()
    before = rollout_events("d2")
    with armed("rollout.converge.pushed=raise"), pytest.raises(FaultInjected):
        step("d2", settings)
    # The cluster was told, nothing was recorded: the transaction rolled back whole.
    assert running_versions(settings, CLUSTERS)[AWAY] == "2.0.0"
    assert rollout_events("d2") == before
    assert node_states("d2")[AWAY] == "Deferred"
    assert rollout_id("d2") in work_left()
    # The next step pushes again (the same objects) and records each move once.
    assert step("d2", settings) == "Succeeded"
    report()
    assert step("d2", settings) == "Succeeded"
    after = reasons("d2")[len(before) :]
    assert after == ["NodeBack", "Converging", "Converged"]
    assert set(running_versions(settings, CLUSTERS).values()) == {"2.0.0"}


def test_a_node_back_from_offline_waits_for_its_rollouts_window(
    fleet: TestClient, settings: Settings
) -> None:
    """A scheduled rollout's late node starts only inside the schedule's window, as its
    waves did. The window opens every day an hour before now and stays open 23 hours, so
    the rollout runs now; the node comes back in the closed hour and waits, and goes when
    the window opens again."""
    now = utcnow()
    opens = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    schedule = {
        "timeZone": "UTC",
        "windows": [{"cron": f"0 {opens.hour} * * *", "duration": "23h"}],
    }
    go_offline(settings)
    apply(fleet, rollout_doc("d2", "2.0.0", schedule=schedule, **ONE_WAVE))
    assert drive("d2", settings)[-1] == "Succeeded"
    come_back()
    closed = opens + timedelta(hours=23, minutes=30)
    assert step("d2", settings, now=closed) == "Succeeded"
    assert node_states("d2")[AWAY] == "Pending"  # back, and waiting for the window
    assert "Converging" not in reasons("d2")
    assert step("d2", settings, now=closed + timedelta(hours=1)) == "Succeeded"
    assert node_states("d2")[AWAY] == "Applying"
    assert "Converging" in reasons("d2")
