"""Rollouts: apply (plan, pre-flight checks, claim nodes), also as a dry-run plan.
The commands are in ``commands.py``, the reconcile step in ``reconciler.py``."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from controller import faults
from controller.audit import record_event
from controller.benchmarks import repository as bench_repo
from controller.benchmarks.service import node_class
from controller.db.base import utcnow
from controller.db.models import (
    Assignment,
    AssignmentState,
    Model,
    ModelVersion,
    Rollout,
    RolloutPhase,
    VersionStatus,
    Wave,
    WavePhase,
)
from controller.db.session import session_scope
from controller.errors import Conflict, InvalidInput, NotFound
from controller.fleet import repository as fleet_repo
from controller.kit.collector import collector_paused
from controller.kit.diff import diff
from controller.kit.outcome import ApplyOutcome
from controller.kit.quantity import memory_bytes
from controller.rollouts import choice as choice_mod
from controller.rollouts import planner, scheduling
from controller.rollouts import repository as repo
from controller.rollouts.reconciler import queue_step
from controller.rollouts.spec import ComparisonRequirement, RolloutManifest, RolloutSpec
from controller.rollouts.state import ACTIVE_PHASES, TERMINAL_PHASES, transition
from controller.settings import Settings

P, A = RolloutPhase, AssignmentState


class PreflightFailed(InvalidInput):
    def __init__(self, name: str, problems: list[planner.Problem]) -> None:
        super().__init__(f"rollout {name} failed pre-flight checks")
        self.detail = [
            {
                "loc": ["body", "spec"],  # the apply adds the document index
                "msg": p.message,
                "type": p.code,
                **({"nodes": p.nodes[:50], "nodeCount": len(p.nodes)} if p.nodes else {}),
            }
            for p in problems
        ]


def _node_views(session: Session, *, classes: bool) -> list[planner.NodeView]:
    """The fleet as the planner sees it; with ``classes``, each node's benchmark class
    (only the per-node variant choice reads it)."""
    return [
        planner.NodeView(
            id=n.id,
            cluster=n.cluster,
            name=n.name,
            labels=n.labels,
            architecture=n.architecture,
            allocatable=n.allocatable,
            runtimes=n.runtimes,
            health=n.health,
            node_class=node_class(n.architecture, n.labels, n.cpu_model) if classes else "",
        )
        for n in fleet_repo.node_facts(session)
    ]


@dataclass
class VariantPlan:
    """spec.model.variants resolved: the choice per node and the versions' names."""

    choice: choice_mod.Choice
    names: dict[int, str]
    problems: list[planner.Problem]


def plan_summary(
    waves: Sequence[planner.PlannedWave], variants: VariantPlan | None = None
) -> dict[str, Any]:
    plan: dict[str, Any] = {
        "nodes": sum(len(w.nodes) for w in waves),
        "waves": [
            {
                "index": w.index,
                "bake_s": w.bake_s,
                "nodes": len(w.nodes),
                "clusters": dict(sorted(_count_by_cluster(w.nodes).items())),
                "nodeNames": [n.key for n in w.nodes[:200]],
            }
            for w in waves
        ],
    }
    if variants is not None:
        for w, out in zip(waves, plan["waves"], strict=True):
            out["versions"] = variants.choice.counts([n.id for n in w.nodes], variants.names)
        plan["variants"] = {
            cls: got.as_dict() for cls, got in sorted(variants.choice.by_class.items())
        }
    return plan


def _plan_variants(
    session: Session,
    spec: RolloutSpec,
    version: ModelVersion,
    model: Model,
    selected: Sequence[planner.NodeView],
    default_comparison: ComparisonRequirement,
) -> VariantPlan:
    """Resolve spec.model.variants and choose per node (controller/rollouts/choice.py)."""
    problems: list[planner.Problem] = []
    wanted = spec.model.variants
    found: list[ModelVersion] = []
    if wanted == "auto":
        found = [
            v for v in repo.variants_of(session, version.id) if v.status == VersionStatus.READY
        ]
        if not found:
            problems.append(
                planner.Problem(
                    "NoVariants",
                    f"no Ready variant derives from {model.name}:{version.version} "
                    "(edgefleet models optimize); every node gets the version itself",
                    severity="warning",
                )
            )
    else:
        for name in wanted or []:
            got = repo.version_of(session, model.name, name)
            if got is None:
                problems.append(
                    planner.Problem(
                        "VariantNotFound", f"variant {model.name}:{name} is not registered"
                    )
                )
            elif got[0].status != VersionStatus.READY:
                problems.append(
                    planner.Problem(
                        "VariantNotReady",
                        f"variant {model.name}:{name} is {got[0].status}: every listed variant "
                        "must be Ready (validated) before a rollout can choose it",
                    )
                )
            else:
                found.append(got[0])
    candidates = [choice_mod.Candidate(version.id, version.version, reference=True)] + [
        choice_mod.Candidate(
            v.id,
            v.version,
            reference=False,
            comparison_problem=planner.comparison_problem(
                spec, f"{model.name}:{v.version}", v.lineage, default_comparison
            ),
        )
        for v in found
    ]
    measured = {
        key: choice_mod.Measured(
            p50_ms=float(b.result["p50_ms"]),
            p95_ms=float(b.result["p95_ms"]),
            peak_bytes=b.result.get("peak_rss_bytes"),
            node=b.node_name,
        )
        for key, b in bench_repo.succeeded_for(session, [c.version_id for c in candidates]).items()
        if b.result and b.result.get("p50_ms") is not None and b.result.get("p95_ms") is not None
    }
    limit = spec.resources.limits.memory
    chosen = choice_mod.choose(
        [(n.id, n.node_class) for n in selected],
        candidates,
        measured,
        spec.gates,
        memory_limit=memory_bytes(limit) if limit else None,
    )
    fallback = set(chosen.fallback_classes())
    if fallback and found:
        problems.append(
            planner.Problem(
                "NoVariantMeetsGates",
                f"{len(fallback)} node class(es) have no candidate benchmarked within the gates "
                f"on them ({', '.join(sorted(fallback)[:5])}): their nodes get "
                f"{version.version} itself (edgefleet models benchmark measures a class)",
                [n.key for n in selected if n.node_class in fallback],
                severity="warning",
            )
        )
    return VariantPlan(chosen, {c.version_id: c.version for c in candidates}, problems)


def _count_by_cluster(nodes: Iterable[planner.NodeView]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for n in nodes:
        out[n.cluster] += 1
    return out


@collector_paused()  # a plan over the whole fleet: see controller/kit/collector.py
def apply_rollout(
    session: Session,
    manifest: RolloutManifest,
    settings: Settings,
    *,
    dry_run: bool,
    now: datetime | None = None,
) -> ApplyOutcome:
    """``now``: the instant the plan's schedule forecast starts from (default: now)."""
    name, spec = manifest.metadata.name, manifest.spec
    spec_doc = spec.model_dump(mode="json", exclude_none=True)
    found = repo.version_of(session, spec.model.name, spec.model.version)
    version, model = found if found else (None, None)
    fleet = _node_views(session, classes=spec.model.variants is not None)
    selected = planner.select_nodes(spec, fleet)
    owners = repo.owners(session, model.id, [n.id for n in selected], exclude=name) if model else {}
    default_comparison = ComparisonRequirement(
        minAgreement=settings.variant_min_agreement, maxAbsError=settings.variant_max_abs_error
    )
    problems = planner.preflight(
        spec,
        selected,
        model_format=version.format if version else None,
        version_status=version.status if version else None,
        supported_architectures=settings.inference_architectures,
        owners=owners,
        lineage=version.lineage if version else None,
        default_comparison=default_comparison,
    )
    waves = planner.plan_waves(name, selected, spec.strategy)
    variants = (
        _plan_variants(session, spec, version, model, selected, default_comparison)
        if spec.model.variants is not None and version is not None and model is not None
        else None
    )
    if variants is not None:
        problems.extend(variants.problems)
    calendars = scheduling.calendars_for(session, spec, selected)
    if calendars is not None:
        problems.extend(scheduling.schedule_problems(calendars, selected))
    plan = plan_summary(waves, variants)
    if calendars is not None:
        scheduling.add_forecast(plan, calendars, waves, now or utcnow())
    # Applied for real, the rollout is locked as a step or a command locks it, and read
    # under the lock: a step starting it meanwhile (Pending -> Progressing) is seen, and
    # its spec is not replaced mid-flight behind its back; a dry run only reads.
    existing = repo.get(session, name) if dry_run else repo.lock(session, name)
    changes: list[dict[str, Any]] = []
    if existing is not None:
        changes = diff({"spec": existing.spec}, {"spec": spec_doc})
        if not changes:
            return ApplyOutcome("Rollout", name, "unchanged", existing.generation, plan=plan)
        if existing.phase not in (P.PENDING, *TERMINAL_PHASES) and all(
            c["path"] == "spec.schedule"
            or c["path"].startswith(("spec.schedule.", "spec.schedule["))
            for c in changes
        ):
            # Only the schedule changed: it may change at any time, like the schedule
            # route does, without replanning the waves.
            if not dry_run:
                scheduling.set_schedule(session, name, spec.schedule)
            return ApplyOutcome(
                "Rollout", name, "configured", existing.generation, changes, plan=plan
            )
        if existing.phase not in (P.PENDING, *TERMINAL_PHASES):
            raise Conflict(
                f"rollout {name} is {existing.phase}: its spec cannot change mid-flight; "
                "abort it first, or apply the change under a new rollout name"
            )
    action = "configured" if existing is not None else "created"
    generation = existing.generation + 1 if existing is not None else 1
    if version is not None and version.lineage and version.lineage.get("report"):
        report = version.lineage["report"]
        comparison = {
            k: report.get(k)
            for k in ("top1_agreement", "max_abs_error", "size_ratio", "latency_ratio")
        }
    else:
        comparison = None
    outcome = ApplyOutcome(
        "Rollout",
        name,
        action,
        generation,
        changes,
        plan,
        [p.as_dict() for p in problems],
    )
    if comparison is not None and outcome.plan is not None:
        outcome.plan["comparison"] = comparison  # the dry-run shows the variant's numbers
    if dry_run:
        return outcome
    if owners:
        holder = sorted(owners)[0]
        message = (
            f"rollout {holder} is active on {len(owners[holder])} of the selected nodes for "
            f"model {spec.model.name} (e.g. {sorted(owners[holder])[0]}); one active rollout "
            "per (model, node): wait for it, abort it, or narrow the selector"
        )
        raise Conflict(
            message,
            detail={
                "message": message,
                "rollout": holder,
                "owners": {k: sorted(v)[:50] for k, v in owners.items()},
            },
        )
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise PreflightFailed(name, errors)
    assert version is not None
    assert model is not None
    rollout = existing or Rollout(name=name)
    if existing is None:
        session.add(rollout)
    else:
        repo.delete_waves(session, rollout.id)
        if rollout.phase != P.PENDING:
            transition(
                session, rollout, P.PENDING, reason="Reapplied", message=f"generation {generation}"
            )
    rollout.generation = generation
    rollout.spec = spec_doc
    rollout.model_version_id = version.id
    rollout.phase = P.PENDING
    rollout.current_wave = 0
    rollout.started_at = rollout.finished_at = None
    rollout.schedule_evaluated_at = None  # a new plan has no windows to catch up on
    rollout.message = "waiting for the reconciler"
    session.flush()
    targets = variants.choice.by_node if variants is not None else {}
    _claim_nodes(session, rollout, model.id, waves, targets)
    repo.fold_counts(session, rollout.id)  # under the lock, or a row no one else sees yet
    faults.point("rollout.apply.claimed")
    data: dict[str, Any] = {"changes": changes, "waves": [len(w.nodes) for w in waves]}
    if variants is not None:
        data["versions"] = variants.choice.counts([n.id for n in selected], variants.names)
    record_event(
        session,
        kind="Rollout",
        name=name,
        rollout_id=rollout.id,
        reason="Applied",
        message=(
            f"{action} generation {generation}: {len(selected)} node(s) in {len(waves)} wave(s)"
        ),
        data=data,
    )
    faults.on_commit(session, "rollout.apply.committed")
    queue_step(session, rollout.id)
    return outcome


def _claim_nodes(
    session: Session,
    rollout: Rollout,
    model_id: int,
    waves: Sequence[planner.PlannedWave],
    targets: dict[int, int],
) -> None:
    """``targets``: the version chosen per node id (spec.model.variants), else none.

    Every assignment changes in ONE flush, which updates them in id order: heartbeat
    ingestion updates assignments in id order too, and two writers that lock rows in
    one order never deadlock (flushed wave by wave, an apply deadlocked with the agents'
    heartbeats)."""
    rows = [
        Wave(
            rollout_id=rollout.id,
            index=planned.index,
            node_count=len(planned.nodes),
            bake_s=int(planned.bake_s),
            phase=WavePhase.PENDING,
        )
        for planned in waves
    ]
    session.add_all(rows)
    session.flush()  # the waves' ids; no assignment has changed yet
    node_ids = [n.id for w in waves for n in w.nodes]
    existing = repo.assignments_for_nodes(session, model_id, node_ids)
    _record_superseded(session, rollout, waves, existing)
    repo.release(session, rollout.id, set(node_ids))  # its SELECT flushes nothing
    for planned, wave in zip(waves, rows, strict=True):
        for node in planned.nodes:
            a = existing.get(node.id)
            if a is None:
                a = Assignment(node_id=node.id, model_id=model_id, desired_version_id=None)
                session.add(a)
            elif a.rollout_id != rollout.id or a.state == A.ROLLED_BACK:
                # A new claim: what the node runs now is what it returns to on rollback,
                # under the resources it runs with now.
                a.previous_rollout_id = a.shipped_by
                a.previous_version_id = a.desired_version_id
            a.rollout_id = rollout.id
            a.wave_id = wave.id
            a.target_version_id = targets.get(node.id)
            a.state = A.PENDING
            a.message = None
            a.metrics = {}
    session.flush()


def _record_superseded(
    session: Session,
    rollout: Rollout,
    waves: Sequence[planner.PlannedWave],
    existing: dict[int, Assignment],
) -> None:
    """A Succeeded rollout's nodes that had not converged yet (offline while it ran)
    follow the rollout claiming them now: the earlier one stops caring about them and
    says so, once, here (its steps no longer see them: they left its rows)."""
    given_up: dict[int, list[str]] = defaultdict(list)
    for node in (n for w in waves for n in w.nodes):
        a = existing.get(node.id)
        if (
            a is not None
            and a.rollout_id is not None
            and a.rollout_id != rollout.id
            and a.state in repo.PENDING_STATES
        ):
            given_up[a.rollout_id].append(node.key)
    for earlier_id, nodes in sorted(given_up.items()):
        earlier = session.get(Rollout, earlier_id)
        if earlier is None or earlier.phase != P.SUCCEEDED:
            continue
        record_event(
            session,
            kind="Rollout",
            name=earlier.name,
            rollout_id=earlier.id,
            reason="Superseded",
            message=(
                f"{len(nodes)} node(s) not yet converged now follow rollout {rollout.name}; "
                "this rollout no longer updates them"
            ),
            data={"rollout": rollout.name, "nodes": sorted(nodes)[:500]},
        )


def delete(session: Session, name: str) -> None:
    """Delete a rollout that is over. Locked as the reconciler locks it, so a step in
    progress finishes first; the nodes it moved keep running what they run, owned by no
    rollout until the next one of their model."""
    rollout = repo.lock(session, name)
    if rollout is None:
        raise NotFound(f"rollout {name!r} not found")
    if rollout.phase in ACTIVE_PHASES:
        raise Conflict(
            f"rollout {name!r} is {rollout.phase}: abort it first (edgefleet rollout abort {name})"
        )
    phase = rollout.phase
    session.delete(rollout)
    record_event(session, kind="Rollout", name=name, reason="Deleted", data={"phase": phase})


def version_ready(version: ModelVersion) -> bool:
    return version.status == VersionStatus.READY


def purge_events(settings: Settings, *, now: datetime | None = None) -> int:
    """Delete the events older than ``event_retention_days`` (none when it is 0), in
    batches of ``retention_batch_rows``, each batch its own transaction (so it opens its
    own sessions, unlike the functions above): a purge of millions of rows holds no lock
    long and never bloats one transaction's WAL. Returns how many were deleted."""
    if not settings.event_retention_days:
        return 0
    before = (now or utcnow()) - timedelta(days=settings.event_retention_days)
    deleted = 0
    while True:
        with session_scope() as session:
            batch = repo.delete_events_before(session, before, limit=settings.retention_batch_rows)
        deleted += batch
        if batch < settings.retention_batch_rows:
            return deleted
