"""The fleet-state gauges count rows at scrape time, and a label whose rows are gone
reads 0 rather than its last count."""

from __future__ import annotations

from prometheus_client import Gauge
from sqlalchemy import Connection
from sqlalchemy.orm import Session

from controller import metrics as m
from controller.db.gauges import refresh_state_gauges
from controller.db.models import Cluster, Node, NodeHealth


def _value(gauge: Gauge, label: str) -> float:
    sample = gauge.labels(label)._value.get()
    return float(sample)


def test_gauges_count_nodes_by_health_and_reset_empty_labels(
    session: Session, connection: Connection
) -> None:
    cluster = Cluster(name="gauges", driver="simulated")
    session.add(cluster)
    session.flush()
    healths = [NodeHealth.READY] * 3 + [NodeHealth.OFFLINE]
    nodes = [Node(cluster_id=cluster.id, name=f"n{i}", health=h) for i, h in enumerate(healths)]
    session.add_all(nodes)
    session.flush()

    refresh_state_gauges(connection)
    assert _value(m.NODES, NodeHealth.READY.value) == 3
    assert _value(m.NODES, NodeHealth.OFFLINE.value) == 1
    assert _value(m.NODES, NodeHealth.STALE.value) == 0

    for node in nodes:
        node.health = NodeHealth.STALE
    session.flush()
    refresh_state_gauges(connection)
    assert _value(m.NODES, NodeHealth.STALE.value) == 4
    assert _value(m.NODES, NodeHealth.READY.value) == 0  # emptied: not the last count
    assert _value(m.NODES, NodeHealth.OFFLINE.value) == 0
