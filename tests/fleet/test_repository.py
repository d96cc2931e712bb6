"""``list_nodes``: the pages of ``GET /v1/nodes`` (``edgefleet get nodes`` asks for them
1,000 at a time) are the fleet in (cluster name, node name) order, cut exactly at their
offsets, and reading one reads the rows of the clusters it falls in, not of every node
before it (tests/plans.py: row counts from Postgres's plans)."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from controller.db.models import Cluster
from controller.fleet import repository as repo
from tests.plans import captured

# Created in this order, so that id order and name order differ; "empty" has no nodes.
CLUSTERS = {"west": 300, "east": 250, "empty": 0, "north": 7, "central": 300, "south": 143}
ORDERED = sorted(CLUSTERS)  # ASCII names: code point order is every collation's order

_NODES = text(
    """
    INSERT INTO nodes (cluster_id, name, labels, architecture, capacity, allocatable,
                       runtimes, health, last_seq, benchmarks_pending, created_at, updated_at)
    SELECT :cluster_id, :cluster || '-n' || lpad(CAST(i AS text), 4, '0'),
           jsonb_build_object('site', CAST(:cluster AS text)), 'amd64', '{}', '{}', '[]',
           'Ready', 0, 0, now(), now()
    FROM generate_series(1, :count) AS i
    """
)


@pytest.fixture
def fleet(session: Session) -> list[tuple[str, str]]:
    """The clusters above with their nodes, bulk-inserted; the fleet in page order."""
    for name, count in CLUSTERS.items():
        cluster = Cluster(name=name, driver="simulated")
        session.add(cluster)
        session.flush()
        session.execute(_NODES, {"cluster_id": cluster.id, "cluster": name, "count": count})
    session.execute(text("ANALYZE nodes"))
    return [(c, f"{c}-n{i:04d}") for c in ORDERED for i in range(1, CLUSTERS[c] + 1)]


def _page(
    session: Session, *, limit: int, offset: int, cluster: str | None = None
) -> tuple[list[tuple[str, str]], int]:
    rows, total = repo.list_nodes(session, cluster=cluster, limit=limit, offset=offset)
    return [(r.cluster, r.name) for r in rows], total


def test_pages_cut_the_fleet_in_order_at_every_boundary(
    session: Session, fleet: list[tuple[str, str]]
) -> None:
    # Offsets at, before and after each cluster's first and last node, and past the end.
    edges, at = {0}, 0
    for name in ORDERED:
        at += CLUSTERS[name]
        edges |= {at - 1, at, at + 1}
    for offset in [*sorted(e for e in edges if e >= 0), len(fleet) + 5]:
        for limit in (1, 7, 250, 1000):
            got, total = _page(session, limit=limit, offset=offset)
            assert total == len(fleet)
            assert got == fleet[offset : offset + limit], (offset, limit)


def test_pages_of_one_cluster(session: Session, fleet: list[tuple[str, str]]) -> None:
    central = [k for k in fleet if k[0] == "central"]
    for offset, limit in ((0, 1000), (0, 100), (299, 100), (300, 100), (150, 7)):
        got, total = _page(session, limit=limit, offset=offset, cluster="central")
        assert (got, total) == (central[offset : offset + limit], 300)
    assert _page(session, limit=10, offset=0, cluster="empty") == ([], 0)
    assert _page(session, limit=10, offset=0, cluster="nowhere") == ([], 0)


def test_a_deep_page_reads_the_clusters_it_falls_in_not_the_fleet_before_it(
    session: Session, fleet: list[tuple[str, str]]
) -> None:
    """A page inside "east", the last page (in "west", after 700 nodes of other
    clusters) and one spanning "south" and "west": their node rows come from those
    clusters alone. An ORDER BY ... OFFSET over the whole fleet read every node. Scans are
    ruled out, as a fleet's size rules them out (a test table's few pages are cheaper to
    read whole than by an index)."""
    session.execute(text("SET LOCAL enable_seqscan = off"))
    cases = ((320, 100, ("east",)), (900, 100, ("west",)), (650, 200, ("south", "west")))
    for offset, limit, clusters in cases:
        with captured(session) as statements:
            got, _ = _page(session, limit=limit, offset=offset)
        assert got == fleet[offset : offset + limit]
        pages = [s for s in statements if "ORDER BY" in s.sql and "nodes.name" in s.sql]
        assert len(pages) == 1, [s.sql for s in statements]
        bound = sum(CLUSTERS[c] for c in clusters)
        assert pages[0].rows_read("nodes") <= bound, (pages[0].rows_read("nodes"), pages[0].plan)
    # The counts: one aggregate of the nodes by cluster, and the clusters' names.
    counts = [s for s in statements if s not in pages]
    assert len(counts) == 2


def test_the_page_of_one_cluster_reads_its_index_in_order(
    session: Session, fleet: list[tuple[str, str]]
) -> None:
    """Within one cluster, the page comes from the (cluster_id, name) index in its
    order: the rows before the offset and the page's, never the cluster's rest."""
    session.execute(text("SET LOCAL enable_seqscan = off"))
    session.execute(text("SET LOCAL enable_bitmapscan = off"))
    with captured(session) as statements:
        got, _ = _page(session, limit=10, offset=20, cluster="west")
    assert got == [k for k in fleet if k[0] == "west"][20:30]
    (page,) = [s for s in statements if "ORDER BY" in s.sql and "nodes.name" in s.sql]
    assert "uq_nodes_cluster_id_name" in page.indexes(), page.plan
    assert page.rows_read("nodes") <= 30, page.plan
