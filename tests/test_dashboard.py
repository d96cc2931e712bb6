"""The dashboard's pages, read as a browser's parser reads them (tables by id, cells, SVG
shapes and their data), not by matching strings of markup."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from controller.db.models import Node
from controller.settings import Settings
from tests.rollouts.helpers import apply, cluster_doc, drive, push_versions, rollout_doc


class Page(HTMLParser):
    """Every table's rows (cell texts) by the table's id, and every element's attributes
    by its tag."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.elements: dict[str, list[dict[str, str]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        self.elements.setdefault(tag, []).append(attributes)
        if tag == "table":
            self._table = attributes.get("id", "")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def rows(self, table: str) -> list[dict[str, str]]:
        header, *body = self.tables[table]
        return [dict(zip(header, row, strict=True)) for row in body]


def browse(client: TestClient, path: str) -> Page:
    resp = client.get(path, headers={"Authorization": client.headers["Authorization"]})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-frame-options"] == "DENY"
    return Page(resp.text)


@pytest.fixture
def fleet(client: TestClient, sim_fleet: None) -> TestClient:
    resp = apply(client, cluster_doc("berlin", 3), cluster_doc("paris", 2))
    assert resp.status_code == 200, resp.text
    push_versions(client, "1.0.0", "2.0.0")
    return client


def test_overview_groups_nodes_by_site_and_links_rollouts(
    fleet: TestClient, settings: Settings, session: Session
) -> None:
    assert apply(fleet, rollout_doc("good", "1.0.0")).status_code == 200
    drive("good", settings)
    session.execute(update(Node).where(Node.name == "paris-n1").values(health="Offline"))
    session.flush()
    page = browse(fleet, "/")
    sites = {(r["Cluster"], r["Site"]): r for r in page.rows("sites")}
    assert set(sites) == {("berlin", "berlin"), ("paris", "paris")}
    assert (sites["berlin", "berlin"]["Nodes"], sites["berlin", "berlin"]["Ready"]) == ("3", "3")
    assert (sites["paris", "paris"]["Ready"], sites["paris", "paris"]["Offline"]) == ("1", "1")
    bars = [d["title"] for d in page.elements["div"] if d.get("class") == "bar" and d.get("title")]
    assert "Ready 1, Offline 1" in bars
    links = [a.get("href") for a in page.elements["a"]]
    assert "/rollouts/good" in links
    assert [r["Phase"] for r in page.rows("rollouts")] == ["Succeeded"]


def test_rollout_page_shows_waves_gate_evidence_and_events(
    fleet: TestClient, settings: Settings
) -> None:
    gates = {"gates": {"maxP95LatencyMs": 40, "maxErrorRate": 0.01, "minSamples": 20}}
    assert apply(fleet, rollout_doc("slow", "2.0.0", **gates)).status_code == 200
    phases = drive("slow", settings, metrics=lambda node: (400.0, 0))  # 10x over the gate
    assert phases[-1] == "RolledBack"
    page = browse(fleet, "/rollouts/slow")
    waves = page.rows("waves")
    assert waves[0]["Phase"] == "Failed"
    assert all(w["Phase"] == "Pending" for w in waves[1:])
    bars = [e for e in page.elements["rect"] if "p95" in e.get("class", "")]
    assert [(b["data-wave"], float(b["data-p95"])) for b in bars] == [("0", 400.0)]
    (limit,) = [e for e in page.elements["line"] if e.get("class") == "limit"]
    assert float(limit["data-limit"]) == 40.0
    reasons = [r["Reason"] for r in page.rows("events")]
    assert reasons.index("RollingBack") < reasons.index("GateFailed")  # newest first
    failed = next(r for r in page.rows("events") if r["Reason"] == "GateFailed")
    assert "slowest p95 400 ms" in failed["Evidence"]


def test_rollout_page_of_an_unknown_rollout_is_a_404(fleet: TestClient) -> None:
    resp = fleet.get("/rollouts/nope")
    assert resp.status_code == 404
    assert resp.json()["error"] == "not_found"
