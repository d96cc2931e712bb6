"""The dashboard's pages, read as a browser's parser reads them (tables by id, cells, SVG
shapes and their data), not by matching strings of markup."""

from __future__ import annotations

import io
import itertools
from html.parser import HTMLParser

import anyio
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from controller.dashboard.live import Slots, events
from controller.db.models import Node
from controller.registry import samples
from controller.settings import Settings
from tests.optimizations.test_variants import derive, finished, push
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
    page = Page(resp.text)
    (main,) = [m for m in page.elements["main"] if m.get("id") == "live"]
    assert main["data-stream"] == "/live" + path
    return page


def stream(client: TestClient, path: str) -> list[tuple[str, str]]:
    """The events of one live stream, read to its end: (event name, data)."""
    resp = client.get(path)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    out = []
    for block in resp.text.split("\n\n"):
        fields = [line.partition(": ") for line in block.split("\n") if line]
        name = next((v for k, _, v in fields if k == "event"), None)
        if name is not None:
            out.append((name, "\n".join(v for k, _, v in fields if k == "data")))
    return out


@pytest.fixture
def short_streams(client: TestClient, settings: Settings) -> None:
    """Live streams of this test's app that end after half a second."""
    client.app.state.settings = settings.model_copy(  # type: ignore[attr-defined]
        update={"dashboard_live_stream_s": 0.5, "dashboard_live_interval_s": 0.1}
    )


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
    assert {"/clusters/paris?site=paris", "/clusters/berlin"} <= set(links)
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


def test_model_page_shows_versions_lineage_and_the_optimization_verdict(
    client: TestClient,
) -> None:
    push(client, "scorer", "1", samples.build_sequence_scorer(features=64, hidden=128))
    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    np.savez(
        buf,
        tokens=rng.standard_normal((8, 1, 8, 64)).astype(np.float32),
        mask=np.ones((8, 1, 8), dtype=np.float32),
    )
    job = finished(
        client,
        "scorer",
        derive(client, "scorer", "1", "1-dyn", "dynamic-int8", calibration=buf.getvalue()),
    )
    assert job["status"] == "Succeeded", job["message"]
    page = browse(client, "/models/scorer")
    versions = {r["Version"]: r for r in page.rows("versions")}
    assert set(versions) == {"1", "1-dyn"}
    assert (versions["1-dyn"]["Parent"], versions["1-dyn"]["Method"]) == ("1", "dynamic-int8")
    assert versions["1"]["Parent"] == ""
    api = [client.get(f"/v1/models/scorer/versions/{v}").json() for v in versions]
    assert [(r["Format"], r["Status"]) for r in versions.values()] == [
        (v["format"], v["status"]) for v in api
    ]
    sizes = [int(c["data-bytes"]) for c in page.elements["td"] if "data-bytes" in c]
    assert sizes == [v["size_bytes"] for v in api]
    (opt,) = page.rows("optimizations")
    report = job["report"]
    assert opt["Variant"] == "1 → 1-dyn"
    assert float(opt["Size ratio"]) == report["size_ratio"]
    expected = (
        "recommended"
        if report["verdict"]["recommended"]
        else "not recommended: " + "; ".join(report["verdict"]["reasons"])
    )
    assert opt["Verdict"] == expected
    assert client.get("/models/nope").status_code == 404


def test_node_page_shows_its_workloads_numbers_and_history(
    fleet: TestClient, settings: Settings
) -> None:
    assert apply(fleet, rollout_doc("good", "1.0.0")).status_code == 200
    drive("good", settings, metrics=lambda node: (12.5, 0))
    rollout = browse(fleet, "/rollouts/good")
    nodes = rollout.rows("nodes")
    assert len(nodes) == 5
    assert {n["State"] for n in nodes} == {"Healthy"}
    assert [n["Wave"] for n in nodes] == sorted(n["Wave"] for n in nodes)
    assert "/clusters/berlin/nodes/berlin-n0" in [a.get("href") for a in rollout.elements["a"]]
    assert "/models/detector" in [a.get("href") for a in rollout.elements["a"]]

    node = browse(fleet, "/clusters/berlin/nodes/berlin-n0")
    (work,) = node.rows("workloads")
    assert (work["Model"], work["Rollout"], work["State"]) == ("detector", "good", "Healthy")
    assert (work["Desired"], work["Observed"]) == ("1.0.0", "1.0.0")
    assert float(work["p95 ms"]) == 12.5
    assert float(work["Error rate"]) == 0.0
    api = fleet.get("/v1/events", params={"kind": "Node", "name": "berlin/berlin-n0"}).json()
    assert [r["Reason"] for r in node.rows("history")] == [e["reason"] for e in api]
    assert fleet.get("/clusters/berlin/nodes/nope").status_code == 404


def test_a_live_stream_sends_the_page_body_and_ends(
    fleet: TestClient, settings: Settings, short_streams: None
) -> None:
    assert apply(fleet, rollout_doc("good", "1.0.0")).status_code == 200
    drive("good", settings)
    sent = stream(fleet, "/live/rollouts/good")
    # The body once (nothing changed in half a second), then the stream ends.
    assert [name for name, _ in sent] == ["page"]
    body = Page(sent[0][1])
    assert {w["Phase"] for w in body.rows("waves")} == {"Passed"}
    assert browse(fleet, "/rollouts/good").tables == body.tables
    assert stream(fleet, "/live/rollouts/nope") == [("gone", "")]
    overview = Page(stream(fleet, "/live/")[0][1])
    assert [r["Phase"] for r in overview.rows("rollouts")] == ["Succeeded"]


def test_live_streams_are_bounded_per_process(fleet: TestClient, short_streams: None) -> None:
    fleet.app.state.live_slots = slots = Slots(1)  # type: ignore[attr-defined]
    slots.take()  # another page's
    resp = fleet.get("/live/")
    assert resp.status_code == 503
    assert resp.headers["retry-after"] == "30"
    assert "EDGEFLEET_DASHBOARD_LIVE_STREAMS" in resp.json()["detail"]
    slots.give()
    assert stream(fleet, "/live/")[0][0] == "page"
    assert slots.taken == 0  # given back when the stream ended


def test_a_live_stream_sends_only_changes(session: Session) -> None:
    bodies = itertools.chain(["a", "a", "b\nc\r"], itertools.repeat("b\nc\r"))

    async def collect() -> list[str]:
        gen = events(lambda _: next(bodies), interval_s=0.01, duration_s=0.2)
        return [chunk async for chunk in gen]

    chunks = anyio.run(collect)
    assert chunks[0] == "retry: 1000\n\n"
    assert chunks[1:4] == [
        "event: page\ndata: a\n\n",
        ":\n\n",
        "event: page\ndata: b\ndata: c&#13;\n\n",
    ]
    assert set(chunks[4:]) == {":\n\n"}


def test_a_sites_link_lists_its_nodes_linked_to_their_pages(
    fleet: TestClient, session: Session
) -> None:
    assert apply(fleet, cluster_doc("lab", 3)).status_code == 200  # of site "lab"
    session.execute(update(Node).where(Node.name == "lab-n1").values(labels={}))
    session.flush()
    overview = {(r["Cluster"], r["Site"]) for r in browse(fleet, "/").rows("sites")}
    assert {("lab", "lab"), ("lab", "-")} <= overview
    site = browse(fleet, "/clusters/lab?site=lab")
    assert [(r["Node"], r["Site"]) for r in site.rows("nodes")] == [
        ("lab-n0", "lab"),
        ("lab-n2", "lab"),
    ]
    hrefs = [a.get("href") for a in site.elements["a"]]
    assert "/clusters/lab/nodes/lab-n0" in hrefs
    unlabelled = browse(fleet, "/clusters/lab?site=")
    assert [r["Node"] for r in unlabelled.rows("nodes")] == ["lab-n1"]
    assert [r["Node"] for r in browse(fleet, "/clusters/lab").rows("nodes")] == [
        "lab-n0",
        "lab-n1",
        "lab-n2",
    ]
    long = fleet.get("/clusters/lab", params={"site": "x" * 64})
    assert long.status_code == 422
    assert long.json()["detail"][0]["loc"] == ["query", "site"]
    assert fleet.get("/clusters/nope").status_code == 404
