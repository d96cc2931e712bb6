"""A small server-rendered dashboard: the fleet by site, rollouts and model versions, and
a page per rollout (waves, the gate's evidence against its thresholds, its nodes, the
events), per model (versions, lineage, comparison reports, benchmarks) and per node (what
it runs, its numbers, its history). No JavaScript build and no assets: each page has a
live twin under /live that streams its body again as it changes
(controller/dashboard/live.py)."""

from __future__ import annotations

from collections.abc import Callable
from html import escape
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from controller.audit import list_events
from controller.auth.guard import DASHBOARD, SESSION_COOKIE, open_session
from controller.auth.service import SESSION_TTL_S
from controller.benchmarks import repository as benchmark_repo
from controller.dashboard.live import LiveStream, Slots
from controller.dashboard.pages import (
    PAGE_HEADERS,
    STYLE,
    AssignmentView,
    BenchmarkView,
    EventView,
    NodeView,
    OptimizationView,
    VersionView,
    WaveView,
    cluster_body,
    cluster_link,
    model_body,
    model_link,
    node_body,
    page,
    page_path,
    rollout_body,
    rollout_link,
    sites,
    tag,
)
from controller.errors import NotFound
from controller.fleet import repository as fleet_repo
from controller.optimizations import repository as optimization_repo
from controller.registry import repository as registry_repo
from controller.rollouts import repository as rollout_repo
from controller.rollouts.repository import WorkloadRow
from controller.web.deps import SessionDep, SettingsDep

router = APIRouter(include_in_schema=False)

# A page lists this many of a rollout's or a cluster's nodes (and says how many more).
NODES_SHOWN = 200

SiteQuery = Annotated[
    str | None,
    Query(max_length=63, description="Only the nodes of this site (their site label)."),
]


def _html(title: str, body: str, live: str) -> HTMLResponse:
    return HTMLResponse(page(title, body, live=live), headers=PAGE_HEADERS)


def _stream(request: Request, render: Callable[[Session], str]) -> LiveStream:
    slots: Slots = request.app.state.live_slots
    return LiveStream(render, slots, request.app.state.settings)


def overview_body(session: Session) -> str:
    # One pass over the nodes for the sites' grid and the clusters' counts both.
    health = fleet_repo.site_health(session)
    counts: dict[str, dict[str, int]] = {}
    for (cluster, _), per_site in health.items():
        mine = counts.setdefault(cluster, {})
        for state, n in per_site.items():
            mine[state] = mine.get(state, 0) + n
    clusters = "".join(
        f"<tr><td>{cluster_link(c.name)}</td><td>{escape(c.driver)}</td><td>{tag(c.status)}</td>"
        f"<td>{sum(counts.get(c.name, {}).values())}</td>"
        f"<td>{escape(', '.join(f'{k} {v}' for k, v in sorted(counts.get(c.name, {}).items())))}</td></tr>"
        for c in fleet_repo.list_clusters(session)
    )
    models, _ = registry_repo.list_models(session, limit=100, offset=0)
    versions = ""
    for m in models:
        rows, _ = registry_repo.list_versions(session, m.id, limit=100, offset=0)
        for v in rows:
            bench = v.benchmark or {}
            versions += (
                f"<tr><td>{model_link(m.name)}</td><td>{escape(v.version)}</td><td>{escape(v.format)}</td>"
                f"<td>{tag(v.status)}</td><td>{bench.get('p50_ms', '')}</td>"
                f"<td>{bench.get('p95_ms', '')}</td><td class=muted>{v.sha256[:12]}</td></tr>"
            )
    rollouts_html = ""
    rows_r, _ = rollout_repo.list_rollouts(session, limit=50, offset=0)
    live_states = rollout_repo.state_totals(session, [r.id for r in rows_r])
    labels = rollout_repo.model_version_labels(session, [r.model_version_id for r in rows_r])
    for r in rows_r:
        model, version = labels[r.model_version_id]
        # Progress from the waves, the rollout's own history: its nodes may since belong
        # to a later rollout of the same model, which then holds their live state.
        planned = sum(w.node_count for w in r.waves) or 0
        promoted = sum(w.node_count for w in r.waves if w.phase == "Passed")
        pct = 100 * promoted // planned if planned else 100
        totals = live_states.get(r.id, {})
        live = (
            ", ".join(f"{k} {v}" for k, v in sorted(totals.items()))
            or "nodes now held by a later rollout"
        )
        rollouts_html += (
            f'<tr class="p-{escape(r.phase)}"><td>{rollout_link(r.name)}</td>'
            f"<td>{model_link(model)}:{escape(version)}</td><td>{tag(r.phase)}</td>"
            f"<td>{r.current_wave + 1}/{len(r.waves)}</td>"
            f'<td><div class="bar"><div class="fill" style="width:{pct}%"></div></div>'
            f"<span class=muted>{promoted}/{planned} nodes promoted · {escape(live)}</span></td>"
            f"<td class=muted>{escape(r.message or '')}</td></tr>"
        )
    return f"""<h1>edgefleet</h1>
<h2>Rollouts</h2><table id="rollouts"><tr><th>Name</th><th>Model</th><th>Phase</th><th>Wave</th><th>Progress</th><th>Message</th></tr>{rollouts_html}</table>
<h2>Sites</h2>{sites(health)}
<h2>Clusters</h2><table id="clusters"><tr><th>Name</th><th>Driver</th><th>Status</th><th>Nodes</th><th>Health</th></tr>{clusters}</table>
<h2>Model versions</h2><table id="versions"><tr><th>Model</th><th>Version</th><th>Format</th><th>Status</th><th>p50 ms</th><th>p95 ms</th><th>sha256</th></tr>{versions}</table>"""


@router.get("/", response_class=HTMLResponse, dependencies=[DASHBOARD])
def dashboard(session: SessionDep) -> HTMLResponse:
    return _html("edgefleet", overview_body(session), "/live/")


@router.get("/live/", dependencies=[DASHBOARD])
def dashboard_live(request: Request) -> LiveStream:
    return _stream(request, overview_body)


def _workload(row: WorkloadRow) -> AssignmentView:
    a = row.assignment
    return AssignmentView(
        row.cluster,
        row.node,
        row.model,
        row.wave,
        row.rollout,
        a.state,
        row.desired,
        row.observed,
        a.metrics or {},
        a.message,
        a.updated_at,
    )


def rollout_page_body(session: Session, name: str) -> str:
    r = rollout_repo.get(session, name)
    if r is None:
        raise NotFound(f"rollout {name!r} not found")
    model, version = rollout_repo.model_version_label(session, r.model_version_id)
    tally = rollout_repo.tally(session, r)
    states = tally.states
    waves = [
        WaveView(w.index, w.phase, w.node_count, states.get(w.id, {}), w.started_at, w.finished_at)
        for w in r.waves
    ]
    events = [
        EventView(e.created_at, e.reason, e.message, e.actor, e.data or {})
        for e in rollout_repo.events(session, r.id, limit=200)
    ]
    nodes = rollout_repo.rollout_workloads(session, r, limit=NODES_SHOWN)
    return rollout_body(
        name=r.name,
        model=model,
        version=version,
        phase=r.phase,
        message=r.message,
        waves=waves,
        versions=tally.versions,
        events=events,
        nodes=[_workload(n) for n in nodes],
        node_total=sum(tally.totals.values()),
    )


@router.get("/rollouts/{name}", response_class=HTMLResponse, dependencies=[DASHBOARD])
def rollout_detail(name: str, session: SessionDep) -> HTMLResponse:
    """One rollout: its waves and their nodes' states, the gate's evidence at each
    decision against its thresholds, its nodes, and the events with their evidence."""
    return _html(
        f"edgefleet: {name}",
        rollout_page_body(session, name),
        f"/live{page_path('rollouts', name)}",
    )


@router.get("/live/rollouts/{name}", dependencies=[DASHBOARD])
def rollout_live(name: str, request: Request) -> LiveStream:
    return _stream(request, lambda session: rollout_page_body(session, name))


def model_page_body(session: Session, name: str) -> str:
    m = registry_repo.get_model(session, name)
    if m is None:
        raise NotFound(f"model {name!r} not found")
    rows, _ = registry_repo.list_versions(session, m.id, limit=500, offset=0)
    labels = {v.id: v.version for v in rows}
    versions = [
        VersionView(
            v.version,
            v.format,
            v.size_bytes,
            v.status,
            v.sha256,
            v.benchmark or {},
            labels.get(v.parent_id) if v.parent_id is not None else None,
            (v.lineage or {}).get("method"),
            v.created_at,
        )
        for v in rows
    ]
    jobs = [
        OptimizationView(
            o.id, parent, o.target_version, o.method, o.status, o.stage, o.message, o.report or {}
        )
        for o, parent in optimization_repo.jobs_of_model(session, m.id, limit=50)
    ]
    benchmarks = [
        BenchmarkView(version, b.node_class, b.node_name, b.status, b.result or {}, b.finished_at)
        for b, version in benchmark_repo.for_model(session, m.id)
    ]
    return model_body(
        name=m.name,
        description=m.description,
        versions=versions,
        optimizations=jobs,
        benchmarks=benchmarks,
    )


@router.get("/models/{name}", response_class=HTMLResponse, dependencies=[DASHBOARD])
def model_detail(name: str, session: SessionDep) -> HTMLResponse:
    """One model: its versions with their lineage, optimizations, benchmarks."""
    return _html(
        f"edgefleet: {name}", model_page_body(session, name), f"/live{page_path('models', name)}"
    )


@router.get("/live/models/{name}", dependencies=[DASHBOARD])
def model_live(name: str, request: Request) -> LiveStream:
    return _stream(request, lambda session: model_page_body(session, name))


def cluster_page_body(session: Session, name: str, site: str | None) -> str:
    c = fleet_repo.get_cluster(session, name)
    if c is None:
        raise NotFound(f"cluster {name!r} not found")
    nodes, total = fleet_repo.site_nodes(session, c.id, site=site, limit=NODES_SHOWN)
    return cluster_body(
        name=c.name,
        driver=c.driver,
        status=c.status,
        message=c.message,
        site=site,
        nodes=[
            NodeView(
                n.name,
                n.health,
                str((n.labels or {}).get(fleet_repo.SITE_LABEL, "")),
                n.architecture,
                n.last_heartbeat_at,
            )
            for n in nodes
        ],
        total=total,
    )


def _cluster_path(name: str, site: str | None) -> str:
    query = "" if site is None else f"?site={quote(site, safe='')}"
    return page_path("clusters", name) + query


@router.get("/clusters/{name}", response_class=HTMLResponse, dependencies=[DASHBOARD])
def cluster_detail(name: str, session: SessionDep, site: SiteQuery = None) -> HTMLResponse:
    """One cluster's nodes, or one site's of it (the fleet's grid links each site here)."""
    return _html(
        f"edgefleet: {name}",
        cluster_page_body(session, name, site),
        "/live" + _cluster_path(name, site),
    )


@router.get("/live/clusters/{name}", dependencies=[DASHBOARD])
def cluster_live(name: str, request: Request, site: SiteQuery = None) -> LiveStream:
    return _stream(request, lambda session: cluster_page_body(session, name, site))


def node_page_body(session: Session, cluster: str, name: str) -> str:
    n = fleet_repo.get_node(session, cluster, name)
    if n is None:
        raise NotFound(f"node {cluster}/{name} not found")
    events = [
        EventView(e.created_at, e.reason, e.message, e.actor, e.data or {})
        for e in list_events(session, kind="Node", name=f"{cluster}/{name}", limit=100)
    ]
    return node_body(
        cluster=cluster,
        name=n.name,
        health=n.health,
        last_heartbeat_at=n.last_heartbeat_at,
        architecture=n.architecture,
        labels=n.labels or {},
        workloads=[_workload(w) for w in rollout_repo.node_workloads(session, n.id)],
        events=events,
    )


@router.get(
    "/clusters/{cluster}/nodes/{name}", response_class=HTMLResponse, dependencies=[DASHBOARD]
)
def node_detail(cluster: str, name: str, session: SessionDep) -> HTMLResponse:
    """One node: health, last heartbeat, its workloads and their numbers, its events."""
    return _html(
        f"edgefleet: {cluster}/{name}",
        node_page_body(session, cluster, name),
        f"/live{page_path('clusters', cluster, 'nodes', name)}",
    )


@router.get("/live/clusters/{cluster}/nodes/{name}", dependencies=[DASHBOARD])
def node_live(cluster: str, name: str, request: Request) -> LiveStream:
    return _stream(request, lambda session: node_page_body(session, cluster, name))


_SIGN_IN = """<!doctype html><html><head><meta charset="utf-8"><link rel="icon" href="data:,">
<title>edgefleet: sign in</title>
<style>{style}</style></head><body><h1>edgefleet</h1>
<p class=muted>Sign in with an API token (<code>edgefleet tokens create</code>; the demo wrote one to
<code>~/.config/edgefleet/config.yaml</code>).</p>{error}
<form method="post" action="/login"><input type="password" name="token" size="60" autocomplete="off"
autofocus placeholder="eft_..."> <button type="submit">Sign in</button></form></body></html>"""


def _same_origin(request: Request) -> bool:
    """A form post from this controller's own pages (or a client that sends no Origin,
    which browsers always do for a cross-site POST)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin.split("://", 1)[-1].rstrip("/") == host


# Sign-in is open by nature (it is how a browser gets a session); the form turns a valid
# token into an HttpOnly, SameSite=Strict session cookie that the dashboard pages accept
# (the API does not), holding no token.
@router.get("/login", response_class=HTMLResponse)
def sign_in_page() -> HTMLResponse:
    return HTMLResponse(_SIGN_IN.format(style=STYLE, error=""), headers=PAGE_HEADERS)


@router.post("/login", response_class=HTMLResponse, response_model=None)
async def sign_in(
    request: Request, settings: SettingsDep, token: Annotated[str, Form(max_length=256)]
) -> Response:
    if not _same_origin(request):
        return HTMLResponse("cross-site sign-in refused", status_code=403, headers=PAGE_HEADERS)
    value = await run_in_threadpool(
        open_session, token.strip(), settings.secret_key.get_secret_value()
    )
    if value is None:
        error = '<p style="color:#e03131">unknown, expired or revoked token</p>'
        return HTMLResponse(
            _SIGN_IN.format(style=STYLE, error=error), status_code=401, headers=PAGE_HEADERS
        )
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        value,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https" or settings.environment == "production",
        max_age=SESSION_TTL_S,
    )
    return response


@router.post("/logout", response_model=None)
def sign_out(request: Request) -> Response:
    if not _same_origin(request):
        return HTMLResponse("cross-site sign-out refused", status_code=403, headers=PAGE_HEADERS)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response
