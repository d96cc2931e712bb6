"""Scheduled rollouts end to end: the engine (controller/rollouts/step_schedule.py) admits a
node only while its calendar allows a start, pauses a wave at a window's end, catches up
once after an outage, and follows a schedule changed or cancelled mid-flight. Every step
runs at an injected instant (reconcile(..., now=...)); nothing sleeps.

The injected clock runs in November 2026, before the wall clock: the simulated agents'
numbers carry the wall-clock time, and the gates count only numbers reported since the
wave started. The steps the apply and the schedule route queue (run at once, in process,
by the eager worker) are left out: they would run at the wall clock's time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from controller.db.models import Event, Rollout, Wave
from controller.db.session import session_scope
from controller.rollouts import commands, reconciler, step_schedule, waves
from controller.rollouts import repository as rollout_repo
from controller.rollouts import service as rollout_service
from controller.rollouts.spec import RolloutManifest
from controller.schedules.windows import TIMEZONE_LABEL
from controller.settings import Settings
from tests.conftest import bearer
from tests.rollouts.helpers import (
    apply,
    cluster_doc,
    node_states,
    push_versions,
    report,
    rollout_doc,
    rollout_events,
    rollout_id,
    wave_nodes,
)

T0 = datetime(2026, 11, 10, 12, tzinfo=UTC)  # a Tuesday, noon UTC
TICK = timedelta(minutes=15)
SITES = {"nyc": "America/New_York", "berlin": "Europe/Berlin", "tokyo": "Asia/Tokyo"}
NIGHT = {"windows": [{"cron": "0 1 * * *", "duration": "4h"}]}  # 01:00-05:00 local
STEPS = [{"nodes": 1, "bake": "1h"}, {"percent": 50, "bake": "1h"}, {"percent": 100}]


@pytest.fixture(autouse=True)
def steps_only_at_injected_times(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rollout_service, "queue_step", lambda *_, **__: None)


@pytest.fixture
def sites(client: TestClient, sim_fleet: None) -> TestClient:
    """Two nodes in each of three sites, each labelled with its site's zone."""
    docs = [
        cluster_doc(name, 2, labels={TIMEZONE_LABEL: zone.replace("/", ".")})
        for name, zone in SITES.items()
    ]
    resp = apply(client, *docs)
    assert resp.status_code == 200, resp.text
    push_versions(client, "1.0.0")
    return client


def scheduled(name: str, schedule: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    strategy = {"steps": STEPS, "maxUnavailable": "50%"}
    strategy.update(spec.pop("strategy", {}))
    body: dict[str, Any] = {"strategy": strategy, **spec}
    if schedule is not None:
        body["schedule"] = schedule
    return rollout_doc(name, "1.0.0", **body)


def zone_of(node: str) -> ZoneInfo:
    return ZoneInfo(SITES[node.split("-")[0]])


def in_night(t: datetime, node: str) -> bool:
    return 1 <= t.astimezone(zone_of(node)).hour < 5


@dataclass
class Run:
    """What a run of steps saw: when each node first left Pending, the phases."""

    started: dict[str, datetime] = field(default_factory=dict)
    phases: list[tuple[datetime, str]] = field(default_factory=list)

    @property
    def phase(self) -> str:
        return self.phases[-1][1]


def run(
    name: str,
    settings: Settings,
    start: datetime,
    until: datetime,
    *,
    tick: timedelta = TICK,
    seen: Run | None = None,
    between: Callable[[datetime], None] | None = None,
) -> Run:
    """Step the rollout at start, start + tick, ... until ``until`` or it ends, the
    agents reporting after each step, as the worker and the fleet would."""
    rid = rollout_id(name)
    out = seen or Run()
    t = start
    while t <= until:
        phase = reconciler.reconcile(rid, settings, now=t)
        assert phase is not None
        out.phases.append((t, phase))
        for node, state in node_states(name).items():
            if state not in ("Pending", "Deferred"):
                out.started.setdefault(node, t)
        report()
        if phase not in ("Pending", "Progressing"):
            break
        if between is not None:
            between(t)
        t += tick
    return out


def wave_starts(name: str) -> list[datetime | None]:
    with session_scope() as s:
        return list(
            s.scalars(
                select(Wave.started_at)
                .join(Rollout, Rollout.id == Wave.rollout_id)
                .where(Rollout.name == name)
                .order_by(Wave.index)
            )
        )


def rollout_message(name: str) -> str | None:
    with session_scope() as s:
        return s.scalar(select(Rollout.message).where(Rollout.name == name))


def reasons(name: str) -> list[str]:
    return [reason for reason, _ in rollout_events(name)]


def dry_run_at(doc: dict[str, Any], settings: Settings, now: datetime) -> dict[str, Any]:
    """The dry-run plan as the apply computes it, forecast from ``now``."""
    with session_scope() as s:
        outcome = rollout_service.apply_rollout(
            s, RolloutManifest.model_validate(doc), settings, dry_run=True, now=now
        )
        s.rollback()
    assert outcome.plan is not None
    return outcome.plan


def at(text: str | None) -> datetime:
    assert text is not None
    return datetime.fromisoformat(text)


# ---------------------------------------------------------------- the "done when"


def test_three_time_zones_each_run_in_their_own_night_as_the_dry_run_predicted(
    sites: TestClient, settings: Settings
) -> None:
    doc = scheduled("night", NIGHT)
    plan = dry_run_at(doc, settings, T0)
    expected = [w["expected"] for w in plan["waves"]]
    assert [w["nodes"] for w in plan["waves"]] == [1, 2, 3]
    # The API's dry-run shows the same fields (forecast from the wall clock).
    resp = apply(sites, doc, dry_run=True)
    assert resp.status_code == 200, resp.text
    api_waves = resp.json()["results"][0]["plan"]["waves"]
    assert all(set(w["expected"]) == {"start", "finished", "baked", "zones"} for w in api_waves)

    assert apply(sites, doc).status_code == 200
    seen = run("night", settings, T0, T0 + timedelta(days=4))
    assert seen.phase == "Succeeded"
    assert set(node_states("night").values()) == {"Healthy"}

    # Every node started inside its own site's night, never in another's.
    assert len(seen.started) == 6
    for node, t in seen.started.items():
        assert in_night(t, node), (node, t.astimezone(zone_of(node)))

    # Each wave started when the dry-run said, give or take the one step between the
    # gate passing and the next wave's first step.
    starts = wave_starts("night")
    for index, (forecast, actual) in enumerate(zip(expected, starts, strict=True)):
        assert actual is not None
        assert at(forecast["start"]) <= actual <= at(forecast["start"]) + TICK, index
        # And each zone of the wave started its nodes when forecast for that zone.
        for zone, start in forecast["zones"].items():
            zone_nodes = [n for n, t in seen.started.items() if SITES[n.split("-")[0]] == zone]
            got = [seen.started[n] for n in zone_nodes if n in wave_members("night", index)]
            assert got, (index, zone)
            assert at(start) <= min(got) <= at(start) + TICK, (index, zone, got)

    # Waiting is said once per wait, not once per step.
    events = rollout_events("night")
    waits = [d for r, d in events if r == "WaitingForWindow"]
    steps_waiting = sum(1 for t, _ in seen.phases if not any(in_night(t, n) for n in seen.started))
    assert 0 < len(waits) < steps_waiting / 4
    opened = [d for r, d in events if r == "WindowOpened"]
    assert opened
    assert all(z["late_s"] == 0 for d in opened for z in d["zones"].values())


def wave_members(name: str, index: int) -> set[str]:
    return {key.split("/")[1] for key in wave_nodes(name)[index]}


def test_a_freeze_blocks_the_rollout(sites: TestClient, settings: Settings) -> None:
    # Berlin's first night is frozen (the retail sites' Christmas, say), the others not.
    berlin_night = datetime(2026, 11, 11, 0, tzinfo=UTC)  # 01:00 CET
    resp = sites.post(
        "/v1/freezes",
        json={
            "name": "berlin-stocktake",
            "start": berlin_night.isoformat(),
            "end": (berlin_night + timedelta(days=1, hours=12)).isoformat(),
            "selector": {"matchLabels": {"site": "berlin"}},
            "reason": "stocktake",
        },
    )
    assert resp.status_code == 201, resp.text
    assert [f["name"] for f in sites.get("/v1/freezes").json()] == ["berlin-stocktake"]
    assert sites.get("/v1/freezes/berlin-stocktake").json()["spec"]["reason"] == "stocktake"

    doc = scheduled("frozen", NIGHT, strategy={"steps": [{"percent": 100}]})
    plan = dry_run_at(doc, settings, T0)
    zones = plan["waves"][0]["expected"]["zones"]
    assert at(zones["Europe/Berlin"]) == datetime(2026, 11, 13, 0, tzinfo=UTC)  # 2 nights on
    assert apply(sites, doc).status_code == 200
    seen = run("frozen", settings, T0, T0 + timedelta(days=4))
    assert seen.phase == "Succeeded"
    berlin = {n: t for n, t in seen.started.items() if n.startswith("berlin")}
    assert berlin
    assert all(t >= berlin_night + timedelta(days=1, hours=12) for t in berlin.values())
    assert all(in_night(t, n) for n, t in seen.started.items())
    assert min(berlin.values()) == at(zones["Europe/Berlin"])
    waits = [d for r, d in rollout_events("frozen") if r == "WaitingForWindow"]
    assert any(
        z.get("frozenBy") == ["berlin-stocktake"] for d in waits for z in d["zones"].values()
    )


def test_a_freeze_applied_as_a_manifest_holds_a_wave_already_running(
    sites: TestClient, settings: Settings
) -> None:
    doc = scheduled(
        "held",
        {"timeZone": "UTC"},
        strategy={"steps": [{"percent": 100}], "maxUnavailable": 1, "progressDeadline": "2h"},
    )
    assert apply(sites, doc).status_code == 200
    seen = run("held", settings, T0, T0)
    before = dict(seen.started)
    assert 0 < len(before) < 6
    freeze = {
        "apiVersion": "edgefleet.io/v1",
        "kind": "FreezePeriod",
        "metadata": {"name": "all-hands"},
        "spec": {"start": T0.isoformat(), "end": (T0 + timedelta(hours=6)).isoformat()},
    }
    resp = apply(sites, freeze)
    assert resp.status_code == 200, resp.text
    assert resp.json()["results"][0] == {
        "kind": "FreezePeriod",
        "name": "all-hands",
        "action": "created",
        "generation": 1,
    }
    run("held", settings, T0 + TICK, T0 + timedelta(hours=5), seen=seen)
    assert seen.started == before  # the nodes moved stay; no other starts
    message = rollout_message("held")
    assert message is not None
    assert message.startswith(step_schedule.WAITING)
    run("held", settings, T0 + timedelta(hours=6), T0 + timedelta(hours=8), seen=seen)
    assert seen.phase == "Succeeded"
    assert min(t for n, t in seen.started.items() if n not in before) == T0 + timedelta(hours=6)


# ---------------------------------------------------------------- windows and waves


def test_a_wave_that_cannot_finish_in_its_window_pauses_at_its_end(
    sites: TestClient, settings: Settings
) -> None:
    """One node at a time (maxUnavailable 1), a 30-minute window, steps every 15
    minutes: two nodes a night. The ones moved stay; the rest wait for the next night;
    the rollout says so once a night and its progress deadline does not fail it."""
    schedule = {"timeZone": "UTC", "windows": [{"cron": "0 1 * * *", "duration": "30m"}]}
    doc = scheduled(
        "slow",
        schedule,
        selector={"matchLabels": {"tier": "retail"}, "clusters": ["nyc", "berlin"]},
        strategy={"steps": [{"percent": 100}], "maxUnavailable": 1},
    )
    assert apply(sites, doc).status_code == 200
    night1 = datetime(2026, 11, 11, 1, tzinfo=UTC)
    seen = run("slow", settings, T0, night1 + timedelta(hours=12))
    assert seen.phase == "Progressing"
    assert sorted(seen.started.values()) == [night1, night1 + TICK]
    states = node_states("slow")
    assert sorted(states.values()) == ["Healthy", "Healthy", "Pending", "Pending"]
    message = rollout_message("slow")
    assert message is not None
    assert message.startswith(step_schedule.WAITING)
    assert "2 node(s) not started" in message
    assert "2026-11-12T01:00:00+00:00" in message
    # Said once for the wait before the first night and once for the pause after it.
    assert reasons("slow").count("WaitingForWindow") == 2

    # The next follow-up is queued for the next opening, not the next interval.
    with session_scope() as s:
        rollout = rollout_repo.lock(s, "slow")
        assert rollout is not None
        step = waves.Step(s, rollout, settings, night1 + timedelta(hours=13))
        assert step.wake_at() == datetime(2026, 11, 12, 1, tzinfo=UTC)
        s.rollback()

    night2 = night1 + timedelta(days=1)
    run("slow", settings, night2 - TICK, night2 + timedelta(hours=2), seen=seen)
    assert seen.phase == "Succeeded"
    assert sorted(seen.started.values())[2:] == [night2, night2 + TICK]
    assert "ProgressDeadlineExceeded" not in reasons("slow")


def test_bake_counts_only_inside_windows(sites: TestClient, settings: Settings) -> None:
    schedule = {
        "timeZone": "UTC",
        "windows": [{"cron": "0 1 * * *", "duration": "4h"}],
        "bakeInWindowsOnly": True,
    }
    doc = scheduled(
        "baked",
        schedule,
        strategy={
            "steps": [{"nodes": 1, "bake": "6h"}, {"percent": 100}],
            "maxUnavailable": "100%",
        },
    )
    plan = dry_run_at(doc, settings, T0)
    night1 = datetime(2026, 11, 11, 1, tzinfo=UTC)
    # 4h of the first night, 2h of the second.
    assert at(plan["waves"][0]["expected"]["baked"]) == night1 + timedelta(days=1, hours=2)
    assert apply(sites, doc).status_code == 200
    seen = run("baked", settings, T0, night1 + timedelta(days=2), tick=timedelta(minutes=30))
    assert seen.phase == "Succeeded"
    with session_scope() as s:
        baked = s.scalars(
            select(Wave.baked_at).join(Rollout).where(Rollout.name == "baked").order_by(Wave.index)
        ).all()
    assert baked[0] == night1 + timedelta(days=1, hours=2)
    second = wave_starts("baked")[1]
    assert second is not None
    assert baked[0] <= second <= baked[0] + timedelta(minutes=30)  # the step after the gate


def test_a_controller_down_across_a_window_start_catches_up_once(
    sites: TestClient, settings: Settings
) -> None:
    schedule = {"timeZone": "UTC", "windows": [{"cron": "0 1 * * *", "duration": "4h"}]}
    doc = scheduled("restart", schedule, strategy={"steps": [{"percent": 100}]})
    assert apply(sites, doc).status_code == 200
    night1 = datetime(2026, 11, 11, 1, tzinfo=UTC)
    seen = run("restart", settings, night1 - 2 * TICK, night1 - TICK)
    assert not seen.started
    # Down from 00:45 to 02:30: the first step back starts the nodes, and says so once.
    run(
        "restart",
        settings,
        night1 + timedelta(hours=1, minutes=30),
        night1 + 2 * TICK + timedelta(hours=1, minutes=30),
        seen=seen,
    )
    assert min(seen.started.values()) == night1 + timedelta(hours=1, minutes=30)
    opened = [d for r, d in rollout_events("restart") if r == "WindowOpened"]
    assert len(opened) == 1
    assert opened[0]["zones"]["UTC"]["late_s"] == 5400
    assert opened[0]["zones"]["UTC"]["opened"] == night1.isoformat()
    assert "WindowsMissed" not in reasons("restart")


def test_a_controller_down_across_a_whole_window_does_not_replay_it(
    sites: TestClient, settings: Settings
) -> None:
    schedule = {"timeZone": "UTC", "windows": [{"cron": "0 1 * * *", "duration": "4h"}]}
    doc = scheduled("outage", schedule, strategy={"steps": [{"percent": 100}]})
    assert apply(sites, doc).status_code == 200
    night1 = datetime(2026, 11, 11, 1, tzinfo=UTC)
    seen = run("outage", settings, night1 - TICK, night1 - TICK)
    # Down for four whole nights: back at noon, nothing starts, one event for all.
    back = night1 + timedelta(days=3, hours=11)
    run("outage", settings, back, back + 4 * TICK, seen=seen)
    assert not seen.started
    missed = [d for r, d in rollout_events("outage") if r == "WindowsMissed"]
    assert len(missed) == 1
    assert missed[0]["zones"]["UTC"]["count"] == 4
    assert "WindowOpened" not in reasons("outage")
    run(
        "outage",
        settings,
        back + timedelta(hours=12, minutes=45),
        back + timedelta(hours=15),
        seen=seen,
    )
    assert min(seen.started.values()) == back + timedelta(hours=13)  # 01:00 the next night


# ---------------------------------------------------------------- changing the schedule


def test_changing_and_cancelling_the_schedule_mid_rollout(
    sites: TestClient, settings: Settings
) -> None:
    doc = scheduled("moving", NIGHT)
    assert apply(sites, doc).status_code == 200
    seen = run("moving", settings, T0, T0 + TICK)  # noon UTC: no site's night
    assert not seen.started

    view = sites.get("/v1/rollouts/moving/schedule", params={"at": T0.isoformat()}).json()
    assert view["schedule"] == {"windows": NIGHT["windows"], "bakeInWindowsOnly": False}
    zones = {z["timeZone"]: z for w in view["waves"] for z in w["zones"]}
    assert set(zones) <= set(SITES.values())
    tokyo = next(z for z in zones.values() if z["timeZone"] == "Asia/Tokyo")
    assert tokyo["open"] is False
    assert tokyo["reason"] == "outside-window"
    assert tokyo["nextWindow"]["start"] == "2026-11-10T16:00:00+00:00"  # 01:00 JST

    # A window open now in UTC: the canary starts at the next step.
    change = {
        "schedule": {"timeZone": "UTC", "windows": [{"cron": "0 12 * * *", "duration": "2h"}]}
    }
    resp = sites.post("/v1/rollouts/moving/schedule", json=change)
    assert resp.status_code == 200, resp.text
    assert resp.json()["schedule"]["timeZone"] == "UTC"
    run("moving", settings, T0 + 2 * TICK, T0 + 2 * TICK, seen=seen)
    assert set(seen.started.values()) == {T0 + 2 * TICK}

    # Cancelled: the rest need no window at all (here, the evening).
    resp = sites.post("/v1/rollouts/moving/schedule", json={"schedule": None})
    assert resp.status_code == 200, resp.text
    assert resp.json()["schedule"] is None
    assert resp.json()["waves"] == []
    evening = T0 + timedelta(hours=8)
    run("moving", settings, evening, evening + timedelta(hours=3), seen=seen)
    assert seen.phase == "Succeeded"
    assert "ScheduleChanged" in reasons("moving")
    assert "ScheduleCancelled" in reasons("moving")
    assert sites.post("/v1/rollouts/moving/schedule", json=change).status_code == 409


def test_a_manifest_that_changes_only_the_schedule_applies_mid_flight(
    sites: TestClient, settings: Settings
) -> None:
    assert apply(sites, scheduled("again", NIGHT)).status_code == 200
    run("again", settings, T0, T0)
    later = {"timeZone": "UTC", "windows": [{"cron": "0 12 * * *", "duration": "1h"}]}
    resp = apply(sites, scheduled("again", later))
    assert resp.status_code == 200, resp.text
    result = resp.json()["results"][0]
    assert result["action"] == "configured"
    assert all(c["path"].startswith("spec.schedule") for c in result["changes"])
    run("again", settings, T0 + TICK, T0 + TICK)
    assert set(node_states("again").values()) != {"Pending"}
    # Anything else still cannot change mid-flight.
    resp = apply(sites, scheduled("again", later, onFailure="pause"))
    assert resp.status_code == 409, resp.text


def test_a_schedule_without_a_zone_for_every_node_is_refused(
    client: TestClient, sim_fleet: None
) -> None:
    assert apply(client, cluster_doc("nowhere", 2)).status_code == 200
    push_versions(client, "1.0.0")
    resp = apply(client, scheduled("lost", NIGHT))
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert detail[0]["type"] == "NoTimeZone"
    assert TIMEZONE_LABEL in detail[0]["msg"]
    assert detail[0]["nodeCount"] == 2
    assert apply(client, scheduled("found", {**NIGHT, "timeZone": "UTC"})).status_code == 200


def test_freeze_routes_declare_and_check_their_callers(
    client: TestClient, settings: Settings
) -> None:
    body = {"name": "f", "cron": "0 0 24 12 *", "duration": "3d"}
    assert client.post("/v1/freezes", json=body).status_code == 201
    assert client.post("/v1/freezes", json=body).status_code == 200  # replaced, unchanged
    resp = client.post("/v1/freezes", json={**body, "duration": "400d"})
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["loc"][-1] == "duration"
    assert client.get("/v1/freezes/none").status_code == 404


def test_deleting_a_freeze_lets_the_nodes_it_held_start(
    sites: TestClient, settings: Settings
) -> None:
    """DELETE /v1/freezes/{name}: an operator's, audited, 404 for an unknown name; the
    rollout it held starts its nodes at its next step."""
    freeze = {"name": "hold", "start": T0.isoformat(), "end": (T0 + timedelta(days=2)).isoformat()}
    assert sites.post("/v1/freezes", json=freeze).status_code == 201
    doc = scheduled("held", {"timeZone": "UTC"}, strategy={"steps": [{"percent": 100}]})
    assert apply(sites, doc).status_code == 200
    assert not run("held", settings, T0, T0 + TICK).started

    viewer = TestClient(sites.app, headers=bearer("viewer"))
    denied = viewer.delete("/v1/freezes/hold")
    assert denied.status_code == 403
    assert "needs operator" in denied.json()["detail"]
    operator = TestClient(sites.app, headers=bearer("operator"))
    assert operator.delete("/v1/freezes/none").status_code == 404
    resp = operator.delete("/v1/freezes/hold")
    assert resp.status_code == 200, resp.text
    assert resp.json()["name"] == "hold"
    assert sites.get("/v1/freezes/hold").status_code == 404
    assert operator.delete("/v1/freezes/hold").status_code == 404
    with session_scope() as s:
        [deleted] = s.scalars(
            select(Event).where(Event.object_kind == "FreezePeriod", Event.reason == "Deleted")
        ).all()
        assert (deleted.object_name, deleted.actor) == ("hold", "token:test-operator")

    seen = run("held", settings, T0 + 2 * TICK, T0 + 2 * TICK)
    assert set(seen.started.values()) == {T0 + 2 * TICK}


def test_a_retried_rollout_reads_its_schedule_afresh(
    sites: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The windows that opened and closed between a try and its retry are not the
    retry's: it catches up on none of them (no WindowsMissed), and starts only inside
    its own next window."""
    monkeypatch.setattr(commands, "queue_step", lambda *_, **__: None)
    schedule = {"timeZone": "UTC", "windows": [{"cron": "0 1 * * *", "duration": "4h"}]}
    doc = scheduled("again", schedule, strategy={"steps": [{"percent": 100}]})
    assert apply(sites, doc).status_code == 200
    night1 = datetime(2026, 11, 11, 1, tzinfo=UTC)
    seen = run("again", settings, night1, night1)
    assert seen.started
    assert sites.post("/v1/rollouts/again/abort").status_code == 202
    run("again", settings, night1 + TICK, night1 + 4 * TICK)
    assert set(node_states("again").values()) == {"RolledBack"}

    # Retried at noon three days on: three nights came and went since the last try.
    noon = night1 + timedelta(days=3, hours=11)
    resp = sites.post("/v1/rollouts/again/retry")
    assert resp.status_code == 202, resp.text
    view = sites.get("/v1/rollouts/again/schedule", params={"at": noon.isoformat()}).json()
    assert view["evaluatedAt"] is None
    retried = run("again", settings, noon, noon + TICK)
    assert not retried.started
    after = reasons("again")[reasons("again").index("Retried") :]
    assert "WindowsMissed" not in after
    assert "WaitingForWindow" in after
    retried = run("again", settings, noon + timedelta(hours=14), noon + timedelta(hours=14))
    assert set(retried.started.values()) == {noon + timedelta(hours=14)}  # 01:00 next night
