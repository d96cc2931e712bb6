"""Follow-up steps of an active rollout stay one chain, whatever else queues steps for
it (beat's tick, commands): the reconcile messages are read off a private Celery queue
on real Redis and run the way a worker would (each when it is due), tick after tick.

Time is the engine's injected clock, not the wall clock: a step runs at the instant its
message is due (a follow-up at the ``next_step_at`` its step wrote, a tick's step between
two follow-ups), so a loaded machine cannot turn a late step into an extra chain."""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import redis
from fastapi.testclient import TestClient

from controller.db.base import utcnow
from controller.db.models import Rollout
from controller.db.session import session_scope
from controller.rollouts import reconciler
from controller.settings import Settings
from controller.tasks.celery_app import configure
from tests.conftest import REDIS_URL
from tests.rollouts.helpers import (
    apply,
    cluster_doc,
    push_versions,
    report,
    rollout_doc,
    rollout_id,
)

INTERVAL_S = 0.2
# One wave baking an hour: the rollout stays Progressing, queuing follow-ups, throughout.
BAKING = {"strategy": {"steps": [{"percent": 100, "bake": "1h"}], "maxUnavailable": "100%"}}


@dataclass
class Message:
    task: str
    args: list[object]
    eta: datetime | None


class Broker:
    """The private queue's messages, taken off Redis as a worker would take them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.redis = redis.Redis.from_url(REDIS_URL)

    def _keys(self) -> list[bytes]:
        # kombu keeps one list per priority band: the queue's name, then name + suffix.
        return list(self.redis.scan_iter(match=f"{self.name}*"))

    def take_all(self) -> list[Message]:
        out = []
        for key in self._keys():
            while (raw := self._pop(key)) is not None:
                envelope = json.loads(raw)
                body = json.loads(base64.b64decode(envelope["body"]))
                eta = envelope["headers"].get("eta")
                out.append(
                    Message(
                        envelope["headers"]["task"],
                        body[0],
                        datetime.fromisoformat(eta) if eta else None,
                    )
                )
        return out

    def _pop(self, key: bytes) -> bytes | None:
        try:
            raw: bytes | None = self.redis.rpop(key)
        except redis.ResponseError:  # not a list: none of the queue's bands
            return None
        return raw

    def close(self) -> None:
        for key in self._keys():
            self.redis.delete(key)
        self.redis.close()


def run_like_a_worker(
    messages: list[Message], settings: Settings, rid: int, tick_at: datetime
) -> datetime:
    """Each reconcile when it is due, in that order: the tick's step (no ETA) at
    ``tick_at``, a follow-up (an ETA) at the ``next_step_at`` its step wrote. Returns the
    instant of the last follow-up step run."""
    chain_at = tick_at
    for m in sorted(messages, key=lambda m: m.eta or datetime.min.replace(tzinfo=UTC)):
        assert m.task == "rollouts.reconcile", m
        assert int(str(m.args[0])) == rid
        if m.eta is None:
            reconciler.reconcile(rid, settings, now=tick_at)
            continue
        with session_scope() as s:
            due = s.get(Rollout, rid).next_step_at  # type: ignore[union-attr]
        assert due is not None
        reconciler.reconcile(rid, settings, now=due)
        chain_at = due
    return chain_at


def test_ticks_do_not_multiply_follow_up_chains(
    committed_client: TestClient, sim_fleet: None, settings: Settings
) -> None:
    client = committed_client
    assert apply(client, cluster_doc("east", 2), cluster_doc("west", 2)).status_code == 200
    push_versions(client, "1.0.0")
    assert apply(client, rollout_doc("d", "1.0.0", **BAKING)).status_code == 200
    report()
    fast = settings.model_copy(update={"reconcile_interval_s": INTERVAL_S})
    name = f"{settings.celery_queue}-follow-ups-{uuid.uuid4().hex[:6]}"
    broker = Broker(name)
    configure(settings.model_copy(update={"tasks_eager": False, "celery_queue": name}))
    try:
        rid = rollout_id("d")
        chain_at = utcnow()
        # The first chain's step.
        assert reconciler.reconcile(rid, fast, now=chain_at) == "Progressing"
        per_round = []
        for _ in range(6):
            assert reconciler.tick(fast) == [rid]  # what beat sends every 10 s
            messages = broker.take_all()
            per_round.append(len(messages))
            # The tick lands between two steps of the chain.
            tick_at = chain_at + timedelta(seconds=INTERVAL_S / 4)
            chain_at = run_like_a_worker(messages, fast, rid, tick_at)
            report()
    finally:
        configure(settings)
        broker.close()
    assert client.get("/v1/rollouts/d").json()["phase"] == "Progressing"
    # Each round: the chain's one follow-up and the tick's step, which must not start a
    # chain of its own (before the fix: 2, 3, 4, 5, 6, 7, one more chain every tick).
    assert per_round == [2] * 6, per_round
