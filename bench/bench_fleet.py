"""Rollout engine at fleet scale: N simulated nodes (default 10,000 in 10 clusters) on
Postgres, one rollout from apply to Succeeded, with agents' heartbeats ingested in
batches between steps.

Baseline, measured in the same process: reading the rollout's assignment rows with their
nodes (one SELECT, the I/O floor of a reconcile step). Each step is printed as a ratio to
it. Run: python bench/bench_fleet.py [--nodes 10000] [--clusters 10]

``--plan-only`` measures only the dry-run plan, at a tenth of ``--nodes`` and then at
``--nodes`` in the same process (the nodes bulk-inserted as a sync would make them, which
is quicker than syncing them), and prints the growth as a ratio; each size's baseline is
reading what a plan reads of every node, unparsed (the fleet's I/O floor of a plan).
``--profile FILE`` writes a cProfile of the (last) plain dry-run.
Needs PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379 (as the tests do)."""

from __future__ import annotations

import argparse
import copy
import cProfile
import itertools
import resource
import statistics
import time

import _env
from sqlalchemy import text

from controller.agents.simulated import RunningWorkload, report_running
from controller.benchmarks.service import node_class
from controller.db import migrate
from controller.db.models import AssignmentState, BenchmarkStatus, NodeBenchmark
from controller.db.session import session_scope
from controller.manifests.builders import fleet, rollout
from controller.manifests.service import apply_documents
from controller.registry import samples, service
from controller.registry.store import artifact_store
from controller.rollouts import reconciler as rollouts
from controller.rollouts import repository as rollout_repo
from controller.settings import get_settings
from controller.tasks.celery_app import configure
from node_agent.contract import InferenceMetrics

ROLLOUT = rollout(
    "bench",
    "1.0.0",
    strategy={
        "steps": [{"nodes": 1}, {"percent": 10}, {"percent": 50}, {"percent": 100}],
        "maxUnavailable": "100%",
    },
    gates={"maxP95LatencyMs": 50, "minHealthyRatio": 0.99, "minSamples": 10},
)

_seq = itertools.count(1)


def report() -> int:
    """The agents of every Running node (Healthy ones have proven themselves already)."""

    def numbers(_: RunningWorkload) -> InferenceMetrics:
        return InferenceMetrics(window_s=10, samples=50, p95_ms=5.0)

    return report_running(numbers, _seq, states=(AssignmentState.RUNNING,))


# The nodes a sync of cluster(name, count) makes, in one statement per cluster.
_BULK_NODES = text(
    """
    INSERT INTO nodes (cluster_id, name, labels, architecture, capacity, allocatable,
                       runtimes, health, last_seq, benchmarks_pending, created_at, updated_at)
    SELECT c.id, c.name || '-n' || i,
           jsonb_build_object('kubernetes.io/arch', 'amd64',
                              'kubernetes.io/hostname', c.name || '-n' || i,
                              'tier', 'retail', 'site', c.name),
           'amd64', CAST(:resources AS jsonb), CAST(:resources AS jsonb),
           CAST('["onnx", "tflite"]' AS jsonb), 'Ready', 0, 0, now(), now()
    FROM clusters c, generate_series(CAST(:first AS integer), CAST(:last AS integer)) AS i
    """
)


# What a plan reads of every node, unparsed: the I/O floor of a plan.
_NODE_COLUMNS = text(
    "SELECT n.id, c.name, n.name, CAST(n.labels AS text), n.architecture,"
    " CAST(n.allocatable AS text), CAST(n.runtimes AS text), n.health, n.cpu_model"
    " FROM nodes n JOIN clusters c ON c.id = n.cluster_id"
)


def plan_scaling(nodes: int, clusters: int, profile: str | None) -> None:
    """The dry-run plan at nodes/10, then at nodes: wall and CPU time (median of 3),
    each against reading every node row, and the growth between the two sizes."""
    settings = get_settings()
    configure(settings)
    migrate.upgrade(settings)
    store = artifact_store(settings)
    with session_scope() as s:
        service.push_version(
            s, store, name="detector", version="1.0.0", chunks=[samples.build_cnn()], metadata={}
        )
        apply_documents(
            s,
            [fleet(f"site{i}", 0) for i in range(clusters)],
            settings,
            store,
            dry_run=False,
            may_apply_clusters=True,
        )
    resources = '{"cpu": "4", "memory": "8Gi"}'
    results = []
    done = 0
    for size in (nodes // 10, nodes):
        per = size // clusters
        with session_scope() as s:
            s.execute(_BULK_NODES, {"first": done, "last": per - 1, "resources": resources})
            s.execute(text("ANALYZE nodes"))
        done = per
        floors, runs = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            with session_scope() as s:
                s.execute(_NODE_COLUMNS).all()
            floors.append(time.perf_counter() - t0)
        for i in range(3):
            profiler = cProfile.Profile() if profile and size == nodes and i == 2 else None
            t0, c0 = time.perf_counter(), time.process_time()
            with session_scope() as s:
                if profiler is not None:
                    profiler.enable()
                got = apply_documents(
                    s, [ROLLOUT], settings, store, dry_run=True, may_apply_clusters=True
                )
                if profiler is not None and profile is not None:
                    profiler.disable()
                    profiler.dump_stats(profile)
            runs.append((time.perf_counter() - t0, time.process_time() - c0))
            assert got[0].plan is not None
            assert got[0].plan["nodes"] == per * clusters
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        results.append((per * clusters, wall, cpu, statistics.median(floors)))
    print(f"\nedgefleet dry-run plan scaling ({clusters} clusters, Postgres, median of 3)")
    print(f"  {'nodes':>8} {'wall':>8} {'CPU':>8} {'floor':>8} {'x floor':>8}")
    for size, wall, cpu, floor in results:
        print(f"  {size:>8} {wall:7.2f}s {cpu:7.2f}s {floor:7.2f}s {wall / floor:8.1f}")
    (small, wall_s, cpu_s, _), (big, wall_b, cpu_b, _) = results
    print(
        f"  growth {small} -> {big} nodes: {wall_b / wall_s:.1f}x wall, {cpu_b / cpu_s:.1f}x CPU "
        f"(goal: <= 12x; plan at {big} <= 2 s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--clusters", type=int, default=10)
    parser.add_argument(
        "--profile", metavar="FILE", help="write a cProfile of the plain dry-run to FILE"
    )
    parser.add_argument(
        "--plan-only", action="store_true", help="the dry-run plan at --nodes/10 and --nodes"
    )
    args = parser.parse_args()
    with _env.database():
        if args.plan_only:
            plan_scaling(args.nodes, args.clusters, args.profile)
            return
        settings = get_settings()
        configure(settings)
        migrate.upgrade(settings)
        store = artifact_store(settings)
        with session_scope() as s:
            service.push_version(
                s,
                store,
                name="detector",
                version="1.0.0",
                chunks=[samples.build_cnn()],
                metadata={},
            )
        per = args.nodes // args.clusters
        t0 = time.perf_counter()
        with session_scope() as s:
            apply_documents(
                s,
                [fleet(f"site{i}", per) for i in range(args.clusters)],
                settings,
                store,
                dry_run=False,
                may_apply_clusters=True,
            )
        sync_s = time.perf_counter() - t0

        profiler = cProfile.Profile() if args.profile else None
        t0 = time.perf_counter()
        with session_scope() as s:
            if profiler is not None:
                profiler.enable()
            apply_documents(s, [ROLLOUT], settings, store, dry_run=True, may_apply_clusters=True)
            if profiler is not None:
                profiler.disable()
        dry_s = time.perf_counter() - t0
        if profiler is not None:
            profiler.dump_stats(args.profile)
        # The same dry-run with per-node variant choice (spec.model.variants) over the
        # version and one variant, both benchmarked on the fleet's node class.
        with session_scope() as s:
            service.push_version(
                s,
                store,
                name="detector",
                version="1.0.0-b",
                chunks=[samples.build_cnn(seed=1)],
                metadata={},
            )
            versions = s.execute(text("select id from model_versions order by id")).scalars()
            arch = s.execute(text("select architecture from nodes limit 1")).scalar_one()
            for version_id, p50 in zip(versions, (4.0, 3.0), strict=True):
                s.add(
                    NodeBenchmark(
                        model_version_id=version_id,
                        node_class=node_class(arch, {}, None),
                        node_name="site0/site0-n0",
                        status=BenchmarkStatus.SUCCEEDED,
                        result={"p50_ms": p50, "p95_ms": p50 * 1.5, "peak_rss_bytes": 2**26},
                    )
                )
        choosing = copy.deepcopy(ROLLOUT)
        choosing["spec"]["model"]["variants"] = ["1.0.0-b"]
        t0 = time.perf_counter()
        with session_scope() as s:
            got = apply_documents(
                s, [choosing], settings, store, dry_run=True, may_apply_clusters=True
            )
        variants_s = time.perf_counter() - t0
        chosen = got[0].plan["variants"] if got[0].plan else {}
        assert {c["version"] for c in chosen.values()} == {"1.0.0-b"}, chosen

        t0 = time.perf_counter()
        with session_scope() as s:
            apply_documents(
                s, [ROLLOUT], settings, store, dry_run=False, may_apply_clusters=True
            )  # eager: step 1 runs at commit
        apply_s = time.perf_counter() - t0

        with session_scope() as s:
            rid = s.scalar(text("select id from rollouts where name = 'bench'"))
        floors = []
        for _ in range(5):
            t0 = time.perf_counter()
            with session_scope() as s:
                rows = rollout_repo.rows_of(s, rid)
            floors.append(time.perf_counter() - t0)
        floor = statistics.median(floors)

        steps: list[tuple[str, float, float, int]] = []
        phase = "Progressing"
        while phase in ("Pending", "Progressing") and len(steps) < 50:
            t0 = time.perf_counter()
            reported = report()
            ingest_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            phase = rollouts.reconcile(rid, settings) or "locked"
            steps.append((phase, time.perf_counter() - t0, ingest_s, reported))
        total_nodes = len(rows)
        print(
            f"\nedgefleet fleet bench: {total_nodes} nodes in {args.clusters} clusters (Postgres)"
        )
        print(f"  apply {args.clusters} Cluster manifests + node sync : {sync_s:8.2f} s")
        print(f"  dry-run plan of the rollout                 : {dry_s:8.2f} s")
        print(
            f"  dry-run with per-node variant choice        : {variants_s:8.2f} s "
            f"({variants_s / dry_s:.2f}x the plain dry-run)"
        )
        print(f"  apply rollout (+ first reconcile step)      : {apply_s:8.2f} s")
        print(f"  baseline: SELECT all assignment rows        : {floor * 1000:8.1f} ms")
        header = ("step", "phase", "reconcile", "x floor", "ingest", "beats")
        print("\n  {:>4} {:<12} {:>10} {:>8} {:>9} {:>6}".format(*header))
        for i, (ph, dt, ingest, beats) in enumerate(steps):
            ms, ingest_ms = dt * 1000, ingest * 1000
            print(f"  {i:>4} {ph:<12} {ms:8.0f} ms {dt / floor:8.1f} {ingest_ms:6.0f} ms {beats:6}")
        total = sum(s[1] for s in steps)
        beats_total = sum(s[3] for s in steps)
        ingest_total = sum(s[2] for s in steps)
        print(f"\n  reconcile total {total:.2f} s over {len(steps)} steps; final phase {phase}")
        rate = beats_total / max(ingest_total, 1e-9)
        print(f"  heartbeats ingested {beats_total} in {ingest_total:.2f} s ({rate:.0f}/s)")
        print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
