"""A rollout over more nodes than a Postgres statement takes bind parameters (65,535):
apply, dry-run and step it. Planning one used to bind one parameter per selected node
(``number of parameters must be between 0 and 65535``)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text

from controller.db.models import Cluster
from controller.db.session import session_scope
from controller.rollouts import reconciler
from controller.rollouts import repository as rollout_repo
from controller.settings import Settings
from tests.rollouts.helpers import (
    apply,
    assert_counts_agree,
    cluster_doc,
    push_versions,
    report,
    rollout_doc,
    rollout_id,
    state_counts,
    wave_phases,
)

CLUSTERS = ("east", "west")
PER_CLUSTER = 33_000
TOTAL = PER_CLUSTER * len(CLUSTERS)  # 66,000 > 65,535

# The nodes a cluster sync would make (tests/rollouts/helpers.cluster_doc's labels),
# written in one statement per cluster instead of 33,000 ORM objects.
_BULK_NODES = text(
    """
    INSERT INTO nodes (cluster_id, name, labels, architecture, capacity, allocatable,
                       runtimes, health, last_seq, benchmarks_pending, created_at, updated_at)
    SELECT :cluster_id, :cluster || '-n' || i,
           jsonb_build_object('tier', 'retail', 'site', CAST(:cluster AS text),
                              'kubernetes.io/arch', 'amd64',
                              'kubernetes.io/hostname', :cluster || '-n' || i),
           'amd64', CAST(:resources AS jsonb), CAST(:resources AS jsonb),
           CAST('["onnx", "tflite"]' AS jsonb), 'Ready', 0, 0, now(), now()
    FROM generate_series(1, :count - 1) AS i
    """
)


@pytest.fixture
def wide_fleet(client: TestClient, sim_fleet: None) -> TestClient:
    """Two simulated clusters of 33,000 nodes each (one synced from the manifest, the
    rest bulk-inserted alike), detector 1.0.0 registered."""
    assert apply(client, *(cluster_doc(c, 1) for c in CLUSTERS)).status_code == 200
    with session_scope() as s:
        for name in CLUSTERS:
            cluster_id = s.scalar(select(Cluster.id).where(Cluster.name == name))
            s.execute(
                _BULK_NODES,
                {
                    "cluster_id": cluster_id,
                    "cluster": name,
                    "count": PER_CLUSTER,
                    "resources": '{"cpu": "4", "memory": "8Gi"}',
                },
            )
    push_versions(client, "1.0.0")
    return client


def test_a_rollout_over_more_nodes_than_bind_parameters(
    wide_fleet: TestClient, settings: Settings
) -> None:
    doc = rollout_doc("wide", "1.0.0")  # steps: 1 node, 50 %, 100 %
    resp = apply(wide_fleet, doc, dry_run=True)
    assert resp.status_code == 200, resp.text[:2000]
    plan = resp.json()["results"][0]["plan"]
    assert plan["nodes"] == TOTAL
    assert [w["nodes"] for w in plan["waves"]] == [1, TOTAL // 2 - 1, TOTAL // 2]
    assert sum(sum(w["clusters"].values()) for w in plan["waves"]) == TOTAL
    assert set(plan["waves"][2]["clusters"]) == set(CLUSTERS)
    assert len(plan["waves"][1]["nodeNames"]) == 200  # a sample, not 33,000 names

    resp = apply(wide_fleet, doc)  # claims every node; the eager task runs step 1
    assert resp.status_code == 200, resp.text[:2000]
    rid = rollout_id("wide")
    with session_scope() as s:
        counts = state_counts(s, rid)
        waves = {w: sum(n.values()) for w, n in counts.items()}
        assert sorted(waves.values()) == [1, TOTAL // 2 - 1, TOTAL // 2]
        canary_wave = next(w for w, n in waves.items() if n == 1)
        assert counts[canary_wave] == {"Running": 1}  # the first wave started
        assert sum(n.get("Pending", 0) for n in counts.values()) == TOTAL - 1
    assert wave_phases("wide")[0] in ("Applying", "Baking")

    # Another rollout of the same model over the same nodes: the owners' check looks
    # all 66,000 nodes up at once, and names the holder.
    resp = apply(wide_fleet, rollout_doc("rival", "1.0.0"))
    assert resp.status_code == 409, resp.text[:2000]
    assert "wide" in resp.json()["detail"]["message"]

    report()  # the canary's agent
    assert reconciler.reconcile(rid, settings) == "Progressing"
    assert wave_phases("wide")[0] in ("Baking", "Passed")
    with session_scope() as s:  # 66,000 nodes' moves, folded by the steps
        assert_counts_agree(s, rid)
        assert rollout_repo.unfolded(s) == []
