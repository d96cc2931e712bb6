"""The README's "any number of API and worker replicas", with real processes: two
uvicorn API servers and two Celery workers (--concurrency 2 each) on the same Postgres
and Redis (a Celery queue of this test alone), driving several rollouts of two models
over three clusters at once, with pause and resume sent through both APIs and beat's
tick sent meanwhile. Every rollout must end Succeeded with each transition recorded
exactly once, and every node must run what its rollouts put there."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import redis
from sqlalchemy.exc import OperationalError

from controller.db.session import session_scope
from controller.registry import samples
from controller.settings import Settings
from controller.tasks.celery_app import celery_app, configure
from tests.conftest import REDIS_URL, bearer
from tests.live import free_port, repeating
from tests.rollouts.helpers import (
    apply,
    assert_counts_agree,
    cluster_doc,
    report,
    rollout_doc,
    rollout_events,
)
from tests.tasks.test_restarts import process
from tests.tasks.test_worker import wait_for

CLUSTERS = (("east", 3), ("west", 3), ("north", 2))
STRATEGY = {
    "steps": [{"nodes": 1}, {"percent": 50, "bake": "2s"}, {"percent": 100}],
    "maxUnavailable": "50%",
}
# name -> (model, clusters it selects)
ROLLOUTS = {
    "det-east": ("detector", ["east"]),
    "det-west": ("detector", ["west"]),
    "det-north": ("detector", ["north"]),
    "cls-all": ("classifier", ["east", "west", "north"]),
}
PAUSED = ("det-east", "cls-all")  # paused through one API, resumed through the other


@contextlib.contextmanager
def agents() -> Iterator[None]:
    """Stand-ins for the node agents: healthy numbers every 0.2 s; like a real agent,
    one whose heartbeat failed tries again at the next beat."""
    with repeating(report, 0.2, ignore=(OperationalError,)):
        yield


@contextlib.contextmanager
def ticking(queue: str, settings: Settings) -> Iterator[None]:
    """What beat sends: rollouts.tick, here every 0.25 s (not 10 s: a step for every
    active rollout at once, beside its own follow-up, so that steps of one rollout are
    often queued together and only the row lock keeps them apart)."""
    configure(settings.model_copy(update={"tasks_eager": False, "celery_queue": queue}))
    try:
        with repeating(lambda: celery_app.send_task("rollouts.tick"), 0.25):
            yield
    finally:
        configure(settings)


events = rollout_events


def push(api: httpx.Client, model: str, version: str, seed: int) -> None:
    resp = api.post(
        f"/v1/models/{model}/versions",
        data={"version": version},
        files={"file": ("m.onnx", samples.build_cnn(seed=seed), "application/octet-stream")},
    )
    assert resp.status_code == 201, resp.text


def status(api: httpx.Client, path: str) -> str:
    resp = api.get(path)
    assert resp.status_code == 200, resp.text
    result: str = resp.json()["status" if "/models/" in path else "phase"]
    return result


def has_status(api: httpx.Client, path: str, wanted: str) -> bool:
    return status(api, path) == wanted


def wave_started(name: str, wave: int) -> bool:
    return any(r == "WaveStarted" and d.get("wave") == wave for r, d in events(name))


def running(settings: Settings, model: str) -> dict[str, str]:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    out = {}
    for cluster, _ in CLUSTERS:
        data = client.hgetall(f"{settings.sim_state_prefix}:{cluster}:{model}")
        out.update({node: json.loads(raw)["version"] for node, raw in data.items()})
    client.close()
    return out


def test_two_apis_and_two_workers_drive_rollouts_together(
    committed: None, sim_fleet: None, settings: Settings, tmp_path: Path
) -> None:
    queue = f"{settings.celery_queue}-replicas-{uuid.uuid4().hex[:6]}"
    env = {
        "EDGEFLEET_TASKS_EAGER": "false",
        "EDGEFLEET_CELERY_QUEUE": queue,
        "EDGEFLEET_RECONCILE_INTERVAL_S": "0.2",
    }
    ports = [free_port(), free_port()]
    with contextlib.ExitStack() as stack:
        workers = []
        for i in range(2):
            tmp = tmp_path / f"worker-{i}"
            tmp.mkdir()
            log = tmp_path / f"worker-{i}.log"
            argv = ["worker", "--concurrency", "2"]
            stack.enter_context(process(argv, log, {**env, "TMPDIR": str(tmp)}, "ready."))
            workers.append(log)
        apis = []
        for i, port in enumerate(ports):
            api_env = {**env, "EDGEFLEET_API_PORT": str(port)}
            argv = ["server", "--host", "127.0.0.1"]
            log = tmp_path / f"api-{i}.log"
            stack.enter_context(process(argv, log, api_env, "Application startup complete"))
            client = httpx.Client(
                base_url=f"http://127.0.0.1:{port}", headers=bearer("admin"), timeout=30
            )
            stack.callback(client.close)
            apis.append(client)
        a, b = apis

        # Each apply to a cluster takes 150 ms: steps last long enough to overlap.
        resp = apply(a, *(cluster_doc(c, n, applyLatency="150ms") for c, n in CLUSTERS))
        assert resp.status_code == 200, resp.text
        push(a, "detector", "1.0.0", seed=1)
        push(b, "classifier", "1.0.0", seed=2)
        for model in ("detector", "classifier"):
            path = f"/v1/models/{model}/versions/1.0.0"
            wait_for(partial(has_status, a, path, "Ready"), 120, f"{model} validated")

        stack.enter_context(agents())
        stack.enter_context(ticking(queue, settings))
        for i, (name, (model, clusters)) in enumerate(ROLLOUTS.items()):
            doc = rollout_doc(
                name,
                "1.0.0",
                model={"name": model, "version": "1.0.0"},
                selector={
                    "matchExpressions": [{"key": "site", "operator": "In", "values": clusters}]
                },
                strategy=STRATEGY,
            )
            resp = apply(apis[i % 2], doc)
            assert resp.status_code == 200, resp.text

        # Pause each while its second wave bakes, through one API; resume through the other.
        for i, name in enumerate(PAUSED):
            wait_for(partial(wave_started, name, 1), 60, f"{name} wave 1")
            resp = apis[i % 2].post(f"/v1/rollouts/{name}/pause")
            assert resp.status_code == 202, resp.text
            assert resp.json()["phase"] == "Paused"
        paused_at = {name: len(events(name)) for name in PAUSED}
        wait_for(lambda: status(a, "/v1/rollouts/det-west") == "Succeeded", 60, "det-west")
        for name in PAUSED:  # a paused rollout does not move, whatever steps were queued
            assert status(a, f"/v1/rollouts/{name}") == "Paused"
            assert len(events(name)) == paused_at[name], events(name)
        for i, name in enumerate(PAUSED):
            resp = apis[(i + 1) % 2].post(f"/v1/rollouts/{name}/resume")
            assert resp.status_code == 202, resp.text

        for name in ROLLOUTS:
            wait_for(partial(has_status, b, f"/v1/rollouts/{name}", "Succeeded"), 90, name)

    for log in workers:
        text = log.read_text()
        assert "raised unexpected" not in text, text[-4000:]
        assert "Traceback" not in text, text[-4000:]
    for name, (_, clusters) in ROLLOUTS.items():
        got = events(name)
        counts = Counter((reason, data.get("wave")) for reason, data in got)
        waves = 1 + max(d["wave"] for r, d in got if r == "WaveStarted")
        for wave in range(waves):
            assert counts[("WaveStarted", wave)] == 1, (name, got)
            assert counts[("GatePassed", wave)] == 1, (name, got)
        for reason in ("Applied", "Started", "Succeeded"):
            assert counts[(reason, None)] == 1, (name, reason, got)
        commanded = 1 if name in PAUSED else 0
        assert counts[("Paused", None)] == commanded, (name, got)
        assert counts[("Resumed", None)] == commanded, (name, got)
        nodes = {f"{c}/{c}-n{i}" for c, n in CLUSTERS if c in clusters for i in range(n)}
        for reason in ("Applying", "WorkloadReady"):
            moved = [n for r, d in got if r == reason for n in d["nodes"]]
            assert sorted(moved) == sorted(nodes), (name, reason, got)
    with session_scope() as s:  # counted by four processes' transactions at once
        assert_counts_agree(s)
    assert running(settings, "detector") == {
        f"{c}-n{i}": "1.0.0" for c, n in CLUSTERS for i in range(n)
    }
    assert running(settings, "classifier") == running(settings, "detector")
