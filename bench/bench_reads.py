"""The read paths at fleet scale (#18): ``edgefleet get nodes``, ``describe rollout``,
``events`` and the dashboard's pages, over HTTP on a real uvicorn, at a baseline size
(10,000 nodes, a million events) and at 100,000 nodes with 10 million events, in one run:
one database of each size, each served by its own uvicorn.

The fleet is written with set-based SQL (``INSERT ... SELECT generate_series``), shaped
as the controller writes it: clusters of 1,000 nodes (``site<k>``, their ``site`` label
the cluster's name), a registry of a few models and versions, finished rollouts whose
nodes later rollouts took over, a second model's Succeeded rollout over a third of the
fleet, and one rollout ``fleet`` over every node in four waves (1, 10 %, 50 %, 100 %: the
canary and the second wave Healthy, the third Running, the last Pending) with its
assignments and their metric windows. Events, oldest first, the way ``audit.record_event``
writes them: 60 % of a rollout (transitions, one per wave and state change, with their
node lists cut short; each rollout's in a stretch of time of its own, in the order they
were created, ``fleet``'s the newest), 25 % of a cluster (syncs, drift repair), 10 % of a
node (about ten each), 5 % of a model version, over 90 days. Then, as autovacuum leaves
tables at rest, VACUUM (ANALYZE); then one heartbeat interval of a fleet in service
(every node row and metric window written once: dead row versions, pages no longer
all-visible).

Every request below, ``--repeat`` times on each size, the sizes interleaved call by call
(one on the baseline, the same on the full size, then the next), so that the load of
other work on a shared machine falls on both alike; with a viewer token (the CLI's
bearer, the browser's session cookie from ``/login``):

- ``get nodes``: the CLI's pages of 1,000 (``limit``/``offset``): the first, the last
  (deepest), and the first with ``--cluster``;
- ``describe rollout fleet``: the rollout, and its events (``--events 50``);
- ``describe node`` and ``events node/...``, ``events rollout/fleet`` and a watch's
  next poll (``after``);
- ``rollout nodes fleet``: the first page of 1,000, of wave 1, of the Running nodes;
- the dashboard: the fleet overview, the rollout's page, a node's, a site's, a model's,
  and the first ``page`` event of each one's live stream (``/live/...``).

Each is printed with p50/p95/p99 at both sizes, the ratio of the p95s (the goal: flat)
and met / not met against the 200 ms p95 goal at the full size.

Run: python bench/bench_reads.py [--nodes 100000] [--events 10000000] [--repeat 40]
Needs PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379 (as the tests do)."""

from __future__ import annotations

import argparse
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import _env
import httpx
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from controller.auth.service import create_token
from controller.db import migrate
from controller.db.models import Role
from controller.db.session import dispose_engines, get_engine, session_scope
from controller.rollouts import repository as rollout_repo
from controller.settings import get_settings

GOAL_MS = 200.0
PER_CLUSTER = 1000
MODELS = ("detector", "classifier", "segmenter", "ocr", "tracker")
VERSIONS_PER_MODEL = 8
FINISHED_ROLLOUTS = 20

_CLUSTERS = text(
    """
    INSERT INTO clusters (name, driver, generation, spec, labels, status, created_at,
                          updated_at, last_sync_at)
    SELECT 'site' || k, 'simulated', 1, '{}', jsonb_build_object('region', 'eu-' || k % 4),
           'Ready', now(), now(), now()
    FROM generate_series(CAST(:first AS integer), CAST(:last AS integer)) AS k
    """
)

# The nodes a cluster sync makes (bench_fleet.py's), with a heartbeat and a credential.
_NODES = text(
    """
    INSERT INTO nodes (cluster_id, name, labels, architecture, capacity, allocatable,
                       runtimes, health, last_heartbeat_at, last_seq, credential_hash,
                       cpu_model, benchmarks_pending, created_at, updated_at)
    SELECT c.id, c.name || '-n' || i,
           jsonb_build_object('kubernetes.io/arch', 'amd64',
                              'kubernetes.io/hostname', c.name || '-n' || i,
                              'tier', 'retail', 'site', c.name),
           'amd64', CAST(:resources AS jsonb), CAST(:resources AS jsonb),
           CAST('["onnx", "tflite"]' AS jsonb),
           CASE WHEN i % 97 = 0 THEN 'Stale' WHEN i % 211 = 0 THEN 'Offline' ELSE 'Ready' END,
           now() - make_interval(secs => i % 60), 1000 + i, md5(c.name || '/' || i) || md5(c.name),
           'Cortex-A72', 0, now(), now()
    FROM clusters c, generate_series(0, :per - 1) AS i
    WHERE NOT EXISTS (SELECT 1 FROM nodes n WHERE n.cluster_id = c.id)
    """
)

_MODELS = text(
    """
    INSERT INTO models (name, description, created_at, updated_at)
    SELECT m, 'the ' || m || ' of the stores', now(), now() FROM unnest(CAST(:names AS text[])) m
    """
)

_VERSIONS = text(
    """
    INSERT INTO model_versions (model_id, version, format, sha256, size_bytes, signature,
                                metadata, status, benchmark, status_changed_at, created_at,
                                updated_at)
    SELECT m.id, '1.' || v || '.0', 'onnx', md5(m.name || v) || md5(v || m.name),
           2000000 + v * 1000,
           '{"inputs": [{"name": "x", "dtype": "float32", "shape": [1, 3, 96, 96]}]}',
           '{}', 'Ready', jsonb_build_object('p50_ms', 3.1 + v, 'p95_ms', 4.2 + v),
           now(), now() - make_interval(days => 90 - v * 10), now()
    FROM models m, generate_series(0, :count - 1) AS v
    """
)

_ROLLOUTS = text(
    """
    INSERT INTO rollouts (name, generation, spec, model_version_id, phase, current_wave,
                          message, started_at, finished_at, created_at, updated_at)
    SELECT 'detector-' || k, 1, CAST(:spec AS jsonb),
           (SELECT mv.id FROM model_versions mv JOIN models m ON m.id = mv.model_id
            WHERE m.name = 'detector' ORDER BY mv.id LIMIT 1 OFFSET k % :versions),
           CASE WHEN k % 5 = 4 THEN 'RolledBack' ELSE 'Succeeded' END, 3, 'done',
           now() - make_interval(days => 90 - k * 4),
           now() - make_interval(days => 90 - k * 4, hours => -2),
           now() - make_interval(days => 90 - k * 4), now() - make_interval(days => 90 - k * 4)
    FROM generate_series(0, :count - 1) AS k
    """
)

_ACTIVE = text(
    """
    INSERT INTO rollouts (name, generation, spec, model_version_id, phase, current_wave,
                          message, started_at, created_at, updated_at)
    SELECT :name, 1, CAST(:spec AS jsonb), mv.id, :phase, :wave, :message,
           now() - interval '1 hour', now() - interval '1 hour', now()
    FROM model_versions mv JOIN models m ON m.id = mv.model_id
    WHERE m.name = :model ORDER BY mv.id DESC LIMIT 1
    """
)

# Waves of 1, 10 %, 50 %, 100 % of ``total`` nodes (the planner's cumulative steps).
_WAVES = text(
    """
    INSERT INTO waves (rollout_id, index, node_count, bake_s, phase, started_at, baked_at,
                       finished_at)
    SELECT r.id, w.i, w.n, 300, w.phase,
           CASE WHEN w.i <= :wave THEN now() - interval '50 minutes' END,
           CASE WHEN w.i < :wave THEN now() - interval '40 minutes' END,
           CASE WHEN w.i < :wave THEN now() - interval '30 minutes' END
    FROM rollouts r,
         (VALUES (0, 1), (1, CAST(:total AS integer) / 10 - 1),
                 (2, CAST(:total AS integer) / 2 - CAST(:total AS integer) / 10),
                 (3, CAST(:total AS integer) - CAST(:total AS integer) / 2)) AS w0(i, n),
         LATERAL (SELECT w0.i AS i, w0.n AS n,
                         CASE WHEN w0.i < :wave THEN 'Passed'
                              WHEN w0.i = :wave THEN 'Baking' ELSE 'Pending' END AS phase) AS w
    WHERE r.name = :name
    """
)

# One assignment per selected node (every ``every``-th by id), in the wave its place in
# id order puts it, in the state that wave has reached, with an agent's metric window.
_ASSIGNMENTS = text(
    """
    INSERT INTO assignments (node_id, model_id, rollout_id, wave_id, desired_version_id,
                             previous_version_id, observed_version_id, state, metrics,
                             updated_at)
    SELECT n.id, r_model.model_id, r.id, w.id,
           CASE WHEN w.index <= :wave THEN r.model_version_id ELSE r_model.previous END,
           r_model.previous,
           CASE WHEN w.index < :wave THEN r.model_version_id ELSE r_model.previous END,
           CASE WHEN w.index < :wave THEN 'Healthy' WHEN w.index = :wave THEN 'Running'
                ELSE 'Pending' END,
           jsonb_build_object('window_s', 60, 'samples', 600 + n.rank % 50,
                              'p50_ms', 3.5, 'p95_ms', 4.0 + (n.rank % 17) / 10.0,
                              'p99_ms', 6.0, 'error_rate', 0.0,
                              'measured_at', to_char(now(), 'YYYY-MM-DD"T"HH24:MI:SS"Z"')),
           now()
    FROM (SELECT id, row_number() OVER (ORDER BY id) - 1 AS rank FROM nodes
          WHERE id % :every = 0) AS n,
         rollouts r,
         LATERAL (SELECT mv.model_id, (SELECT p.id FROM model_versions p
                                       WHERE p.model_id = mv.model_id ORDER BY p.id
                                       LIMIT 1) AS previous
                  FROM model_versions mv WHERE mv.id = r.model_version_id) AS r_model,
         waves w
    WHERE r.name = :name AND w.rollout_id = r.id
      AND w.index = CASE WHEN n.rank = 0 THEN 0
                         WHEN n.rank < CAST(:total AS integer) / 10 THEN 1
                         WHEN n.rank < CAST(:total AS integer) / 2 THEN 2 ELSE 3 END
    """
)

# Events ``first`` .. ``last`` of ``final`` (their place in time: 90 days, oldest first).
_EVENTS = text(
    """
    INSERT INTO events (created_at, object_kind, object_name, rollout_id, reason, message,
                        data, actor)
    SELECT now() - make_interval(secs => (CAST(:final AS bigint) - i) * 7776000.0 / :final),
           CASE WHEN i % 100 < 60 THEN 'Rollout' WHEN i % 100 < 85 THEN 'Cluster'
                WHEN i % 100 < 95 THEN 'Node' ELSE 'ModelVersion' END,
           CASE WHEN i % 100 < 60 THEN ro.names[1 + i * ro.n / :final]
                WHEN i % 100 < 85 THEN 'site' || (i / 100) % :clusters
                WHEN i % 100 < 95 THEN 'site' || node.k / :per || '/site' || node.k / :per
                                       || '-n' || node.k % :per
                ELSE (ARRAY['detector', 'classifier', 'segmenter'])[1 + i % 3] || CHR(58) || '1.'
                     || (i / 100) % 8 || '.0' END,
           CASE WHEN i % 100 < 60 THEN ro.ids[1 + i * ro.n / :final] END,
           CASE WHEN i % 100 < 60
                THEN (ARRAY['WaveStarted', 'NodesApplying', 'NodesRunning', 'NodesHealthy',
                            'GatePassed', 'WaveBaking'])[1 + i % 6]
                WHEN i % 100 < 85 THEN (ARRAY['NodesSynced', 'DriftRepaired'])[1 + i % 2]
                WHEN i % 100 < 95 THEN 'NodeReset'
                ELSE (ARRAY['Validated', 'BenchmarkSucceeded'])[1 + i % 2] END,
           CASE WHEN i % 100 < 60 THEN (i % 40) || ' node(s) → Healthy'
                WHEN i % 100 < 85 THEN (i % 1000) || ' nodes' ELSE '' END,
           CASE WHEN i % 100 < 60 THEN
                     jsonb_build_object('to', 'Healthy', 'wave', i % 4,
                                        'from', jsonb_build_object('Running', i % 40),
                                        'nodes', jsonb_build_array('site1-n' || i % 1000,
                                                                   'site2-n' || i % 1000))
                ELSE '{}' END,
           CASE WHEN i % 100 BETWEEN 85 AND 94 THEN 'token:ops' END
    FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS i,
         (SELECT array_agg(id ORDER BY id) AS ids, array_agg(name ORDER BY id) AS names,
                 count(*) AS n FROM rollouts) AS ro,
         -- the node events' nodes: a permutation (7919 is prime) spreads them evenly
         LATERAL (SELECT ((i / 100) * 10 + i % 10) * 7919
                         % (CAST(:clusters AS bigint) * :per) AS k) AS node
    """
)


_HEARTBEAT_NODES = text(
    "UPDATE nodes SET last_seq = last_seq + 1, last_heartbeat_at = now(), updated_at = now()"
)
_HEARTBEAT_ASSIGNMENTS = text(
    "UPDATE assignments SET metrics = metrics || jsonb_build_object('samples', 601),"
    " updated_at = now() WHERE rollout_id IS NOT NULL"
)


def spec(strategy_bake: str = "5m") -> str:
    import json

    return json.dumps(
        {
            "model": {"name": "detector", "version": "1.7.0"},
            "selector": {"matchLabels": {"tier": "retail"}},
            "strategy": {
                "steps": [
                    {"nodes": 1, "bake": strategy_bake},
                    {"percent": 10, "bake": strategy_bake},
                    {"percent": 50, "bake": strategy_bake},
                    {"percent": 100},
                ],
                "maxUnavailable": "10%",
            },
            "gates": {"maxP95LatencyMs": 50, "minHealthyRatio": 0.99, "minSamples": 10},
        }
    )


def _events(conn: Connection, first: int, last: int, *, final: int, clusters: int) -> None:
    """Events ``first``..``last`` in chunks of a million, the secondary indexes dropped
    meanwhile and built again at the end as they were (as a restore would: quicker than
    keeping three B-trees in step row by row)."""
    indexes = conn.execute(
        text(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'events'"
            " AND indexname <> 'pk_events'"
        )
    ).all()
    for name, _ in indexes:
        conn.execute(text(f'DROP INDEX "{name}"'))
    chunk = 1_000_000
    for start in range(first, last + 1, chunk):
        conn.execute(
            _EVENTS,
            {
                "first": start,
                "last": min(last, start + chunk - 1),
                "final": final,
                "clusters": clusters,
                "per": PER_CLUSTER,
            },
        )
        conn.commit()
    conn.execute(text("SET maintenance_work_mem = '512MB'"))
    for _, definition in indexes:
        conn.execute(text(definition))
    conn.commit()


def populate(
    engine: Engine, nodes: int, events: int, *, final_events: int, done_events: int = 0
) -> dict[str, float]:
    """Grow the fleet to ``nodes`` and the log to ``events`` (both set-based); the rollout
    ``fleet`` is laid out again over every node. Seconds per part."""
    clusters = nodes // PER_CLUSTER
    took: dict[str, float] = {}
    with engine.connect() as conn:
        t0 = time.perf_counter()
        have = conn.scalar(text("SELECT count(*) FROM clusters")) or 0
        if have == 0:
            conn.execute(_MODELS, {"names": list(MODELS)})
            conn.execute(_VERSIONS, {"count": VERSIONS_PER_MODEL})
            conn.execute(
                _ROLLOUTS,
                {"spec": spec(), "count": FINISHED_ROLLOUTS, "versions": VERSIONS_PER_MODEL},
            )
        conn.execute(_CLUSTERS, {"first": have, "last": clusters - 1})
        conn.execute(_NODES, {"resources": '{"cpu": "4", "memory": "8Gi"}', "per": PER_CLUSTER})
        conn.commit()
        took["nodes"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        conn.execute(text("DELETE FROM assignments"))
        for name, model, phase, wave, every, message in (
            ("classifier-1", "classifier", "Succeeded", 4, 3, "all waves passed"),
            ("fleet", "detector", "Progressing", 2, 1, "wave 3 of 4: baking"),
        ):
            conn.execute(
                text("DELETE FROM waves USING rollouts r WHERE r.id = rollout_id AND r.name = :n"),
                {"n": name},
            )
            if not conn.scalar(text("SELECT count(*) FROM rollouts WHERE name = :n"), {"n": name}):
                conn.execute(
                    _ACTIVE,
                    {
                        "name": name,
                        "spec": spec(),
                        "phase": phase,
                        "wave": wave,
                        "message": message,
                        "model": model,
                    },
                )
            total = nodes // every
            conn.execute(_WAVES, {"name": name, "wave": wave, "total": total})
            conn.execute(_ASSIGNMENTS, {"name": name, "wave": wave, "total": total, "every": every})
        # The counts the triggers started (0014), folded as the rollouts' steps fold them.
        with Session(bind=conn) as s:
            for rollout_id in rollout_repo.unfolded(s):
                rollout_repo.fold_counts(s, rollout_id)
        conn.commit()
        took["rollouts"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if events > done_events:
            _events(conn, done_events, events - 1, final=final_events, clusters=clusters)
        took["events"] = time.perf_counter() - t0
    # As autovacuum leaves a table at rest: statistics, and the visibility map that
    # index-only scans read.
    t0 = time.perf_counter()
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM (ANALYZE)"))
    took["vacuum"] = time.perf_counter() - t0
    # Then one heartbeat interval of a fleet in service: ingestion writes every node row
    # (last_seq, heartbeat time) and every assignment's metric window once a minute, so
    # their tables hold a dead version of each row and pages the visibility map no longer
    # marks all-visible (index-only scans of them visit the heap), as they do in service.
    t0 = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(_HEARTBEAT_NODES)
        conn.execute(_HEARTBEAT_ASSIGNMENTS)
    took["heartbeats"] = time.perf_counter() - t0
    return took


@dataclass
class Path:
    """One HTTP call the CLI or a browser makes."""

    name: str
    client: str  # "api" (bearer token) or "page" (session cookie)
    url: str
    params: dict[str, str | int] = field(default_factory=dict)
    stream: bool = False  # a live page: time to its first ``page`` event


def paths(nodes: int, after: int, node_key: str) -> list[Path]:
    cluster, node = node_key.split("/")
    deep = nodes - PER_CLUSTER
    return [
        Path("get nodes: first page", "api", "/v1/nodes", {"limit": 1000, "offset": 0}),
        Path("get nodes: last page", "api", "/v1/nodes", {"limit": 1000, "offset": deep}),
        Path(
            "get nodes --cluster",
            "api",
            "/v1/nodes",
            {"limit": 1000, "offset": 0, "cluster": cluster},
        ),
        Path("describe rollout", "api", "/v1/rollouts/fleet"),
        Path("describe rollout --events 50", "api", "/v1/rollouts/fleet/events", {"limit": 50}),
        Path("describe rollout (90 days old)", "api", "/v1/rollouts/detector-0"),
        Path(
            "events rollout/... (90 days old)",
            "api",
            "/v1/events",
            {"kind": "Rollout", "name": "detector-0", "limit": 50},
        ),
        Path("describe node", "api", f"/v1/clusters/{cluster}/nodes/{node}"),
        Path(
            "events node/... (and describe node)",
            "api",
            "/v1/events",
            {"kind": "Node", "name": f"{cluster}/{node}", "limit": 50},
        ),
        Path(
            "events rollout/fleet",
            "api",
            "/v1/events",
            {"kind": "Rollout", "name": "fleet", "limit": 50},
        ),
        Path(
            "events rollout/fleet --watch (poll)",
            "api",
            "/v1/events",
            {"kind": "Rollout", "name": "fleet", "after": after, "limit": 1000},
        ),
        Path("get rollouts", "api", "/v1/rollouts", {"limit": 1000, "offset": 0}),
        Path("rollout nodes: first page", "api", "/v1/rollouts/fleet/nodes", {"limit": 1000}),
        Path(
            "rollout nodes --wave 1",
            "api",
            "/v1/rollouts/fleet/nodes",
            {"limit": 1000, "wave": 1},
        ),
        Path(
            "rollout nodes --state Running",
            "api",
            "/v1/rollouts/fleet/nodes",
            {"limit": 1000, "state": "Running"},
        ),
        Path("page: fleet", "page", "/"),
        Path("page: rollout fleet", "page", "/rollouts/fleet"),
        Path("page: rollout (90 days old)", "page", "/rollouts/detector-0"),
        Path("page: node", "page", f"/clusters/{cluster}/nodes/{node}"),
        Path("page: site", "page", f"/clusters/{cluster}", {"site": cluster}),
        Path("page: model", "page", "/models/detector"),
        Path("live: fleet", "page", "/live/", stream=True),
        Path("live: rollout fleet", "page", "/live/rollouts/fleet", stream=True),
        Path("live: node", "page", f"/live/clusters/{cluster}/nodes/{node}", stream=True),
        Path("live: site", "page", f"/live/clusters/{cluster}", {"site": cluster}, stream=True),
        Path("live: model", "page", "/live/models/detector", stream=True),
    ]


def _first_page_event(client: httpx.Client, p: Path) -> None:
    with client.stream("GET", p.url, params=p.params) as resp:
        resp.raise_for_status()
        seen = False
        for line in resp.iter_lines():
            if line == "event: page":
                seen = True
            elif seen and line == "":
                return
    raise RuntimeError(f"{p.url}: the stream ended before its first page")


@dataclass
class Target:
    """One size's database, served by its own uvicorn."""

    label: str
    nodes: int
    events: int
    url: str = ""
    token: str = ""
    paths: list[Path] = field(default_factory=list)
    times: dict[str, list[float]] = field(default_factory=dict)


def measure(targets: list[Target], repeat: int) -> None:
    """Each path ``repeat`` times on every target, interleaved (path by path, one call on
    each size in turn), so that the machine's load, which other work on it moves, falls
    on both sizes alike; milliseconds per call into each target's ``times``."""
    clients: list[dict[str, httpx.Client]] = []
    try:
        for t in targets:
            api = httpx.Client(
                base_url=t.url, headers={"Authorization": f"Bearer {t.token}"}, timeout=120
            )
            browser = httpx.Client(base_url=t.url, timeout=120)
            clients.append({"api": api, "page": browser})
            signed = browser.post("/login", data={"token": t.token})
            if signed.status_code != 303 or "edgefleet_session" not in browser.cookies:
                raise RuntimeError(f"sign-in failed: {signed.status_code} {signed.text[:300]}")
            t.times = {p.name: [] for p in t.paths}
            for p in t.paths:  # one warm-up each (plans cached, pages touched)
                _call(clients[-1][p.client], p)
        for _ in range(repeat):
            for i in range(len(targets[0].paths)):
                for t, c in zip(targets, clients, strict=True):
                    p = t.paths[i]
                    t0 = time.perf_counter()
                    _call(c[p.client], p)
                    t.times[p.name].append((time.perf_counter() - t0) * 1000)
    finally:
        for c in clients:
            for client in c.values():
                client.close()


def _call(client: httpx.Client, p: Path) -> None:
    if p.stream:
        _first_page_event(client, p)
        return
    resp = client.get(p.url, params=p.params)
    if resp.status_code != 200:
        raise RuntimeError(f"{p.url} {p.params}: {resp.status_code} {resp.text[:300]}")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def report(base: Target, full: Target, loads: tuple[str, str]) -> bool:
    calls = len(next(iter(full.times.values())))
    print(f"\nedgefleet read paths over HTTP (uvicorn x1 per size, Postgres), {calls} calls each,")
    print("  the two sizes interleaved call by call")
    print(f"  baseline: {base.nodes:,} nodes, {base.events:,} events")
    print(f"  full:     {full.nodes:,} nodes, {full.events:,} events")
    print(f"  load average before: {loads[0]}; after: {loads[1]}")
    head = ("path", "base p50", "p95", "full p50", "p95", "p99", "p95 x", "goal")
    print("\n  {:<38} {:>9} {:>7} {:>9} {:>7} {:>7} {:>6}  {}".format(*head))
    met_all = True
    for name, big in full.times.items():
        small = base.times[name]
        b95 = pct(small, 0.95)
        f50, f95, f99 = (pct(big, q) for q in (0.5, 0.95, 0.99))
        met = f95 <= GOAL_MS
        met_all &= met
        print(
            f"  {name:<38} {pct(small, 0.5):7.1f}ms {b95:5.1f}ms {f50:7.1f}ms {f95:5.1f}ms"
            f" {f99:5.1f}ms {f95 / b95:5.1f}x  {'met' if met else 'NOT MET'}"
        )
    print(
        f"\n  goal: p95 <= {GOAL_MS:.0f} ms at {full.nodes:,} nodes and {full.events:,} events: "
        f"{'met on every path' if met_all else 'not met on every path'}"
    )
    return met_all


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument(
        "--keep", action="store_true", help="keep the databases afterwards (to EXPLAIN)"
    )
    args = parser.parse_args()
    targets = [
        Target("base", args.nodes // 10, args.events // 10),
        Target("full", args.nodes, args.events),
    ]
    names = [f"{_env.DB}_{t.label}" for t in targets]
    settings = get_settings()
    try:
        with ExitStack() as servers:
            for t, name in zip(targets, names, strict=True):
                _env.admin(f'CREATE DATABASE "{name}"')
                mine = settings.model_copy(update={"database_url": f"{_env.PG}/{name}"})
                migrate.upgrade(mine)
                engine = get_engine(mine)
                with session_scope(engine) as s:
                    _, t.token = create_token(
                        s, name="bench-viewer", role=Role.VIEWER, expires=None, created_by="bench"
                    )
                t0 = time.perf_counter()
                took = populate(engine, t.nodes, t.events, final_events=t.events)
                parts = ", ".join(f"{k} {v:.1f} s" for k, v in took.items())
                print(
                    f"filled {t.nodes:,} nodes, {t.events:,} events in "
                    f"{time.perf_counter() - t0:.1f} s ({parts})",
                    flush=True,
                )
                with session_scope(engine) as s:
                    after = s.scalar(
                        text(
                            "SELECT max(e.id) - 5 FROM events e JOIN rollouts r"
                            " ON r.id = e.rollout_id WHERE r.name = 'fleet'"
                        )
                    )
                    # A node with events (the newest node event's).
                    node_key = s.scalar(
                        text(
                            "SELECT object_name FROM events WHERE object_kind = 'Node'"
                            " ORDER BY id DESC LIMIT 1"
                        )
                    )
                t.paths = paths(t.nodes, int(after or 0), str(node_key))
                _, port = servers.enter_context(
                    _env.uvicorn_server(env={"EDGEFLEET_DATABASE_URL": mine.database_url})
                )
                t.url = f"http://127.0.0.1:{port}"
            before = loadavg()
            measure(targets, args.repeat)
            report(targets[0], targets[1], (before, loadavg()))
    finally:
        dispose_engines()
        for name in names if not args.keep else ():
            _env.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if args.keep:
            print(f"  databases {', '.join(names)} kept")


if __name__ == "__main__":
    main()
