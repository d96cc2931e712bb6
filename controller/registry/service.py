"""Model registry: push (stage → inspect → record → promote), read, validate."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from controller import faults, metrics
from controller.audit import record_event
from controller.auth.service import Principal
from controller.db.base import utcnow
from controller.db.models import Model, ModelVersion, VersionStatus
from controller.db.session import session_scope
from controller.errors import Conflict, Forbidden, InvalidInput, NotFound
from controller.kit.outcome import ApplyOutcome
from controller.registry import repository as repo
from controller.registry.inspect import inspect_artifact
from controller.registry.schemas import PushMetadata, check_model_name, check_version
from controller.registry.spec import ModelVersionManifest
from controller.registry.store import ArtifactStore, artifact_store
from controller.settings import Settings
from controller.tasks.celery_app import enqueue
from controller.untrusted import load_json
from node_agent.probe import ProbeFailed, ProbeLimits, ProbeRequest, probe_model

log = logging.getLogger(__name__)


def probe_limits(settings: Settings) -> ProbeLimits:
    """The probe child's limits; a verdict over one names the setting to raise."""
    return ProbeLimits(
        memory_mb=settings.probe_memory_limit_mb,
        cpu_s=settings.probe_cpu_limit_s,
        memory_setting="EDGEFLEET_PROBE_MEMORY_LIMIT_MB",
        cpu_setting="EDGEFLEET_PROBE_CPU_LIMIT_S",
    )


def json_object_field(raw: str | None, field: str, settings: Settings) -> dict[str, Any]:
    """A multipart form field that holds a JSON object (empty: {})."""
    if raw is None or not raw.strip():
        return {}
    doc = load_json(
        raw,
        what=field,
        max_depth=settings.max_nesting_depth,
        max_nodes=settings.max_input_nodes,
        loc=("body", field),
    )
    if not isinstance(doc, dict):
        raise InvalidInput(f"{field} must be a JSON object", loc=("body", field))
    return doc


def parse_metadata(raw: str | None, settings: Settings) -> dict[str, Any]:
    doc = json_object_field(raw, "metadata", settings)
    try:
        PushMetadata.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ("body", "metadata", *first["loc"])
        raise InvalidInput(f"{first['msg']}", loc=loc) from exc
    return doc


@dataclass(frozen=True)
class PushResult:
    version: ModelVersion
    created: bool


def push_version(
    session: Session,
    store: ArtifactStore,
    *,
    name: str,
    version: str,
    chunks: Iterable[bytes],
    metadata: dict[str, Any],
    parent: str | None = None,
) -> PushResult:
    """``parent``: a version of the same model this one is a variant of (an int8
    ``.tflite`` of an fp32 one, say): linked as its lineage, and compared with it."""
    check_model_name(name)
    check_version(version)
    with store.stage(chunks) as staged:
        faults.point("registry.push.staged")
        existing = repo.get_version(session, name, version)
        if existing is not None:
            return _same_or_conflict(existing, name, staged.sha256)
        result = record_version(
            session, name, version, staged.path, staged.sha256, staged.size, metadata, "Pushed"
        )
        if result.created and parent is not None:
            _link_parent(session, result.version, name, parent)
        if result.created:
            faults.point("registry.push.before_promote")
            store.promote(staged)
    return result


def _link_parent(session: Session, mv: ModelVersion, name: str, parent: str) -> None:
    """Record ``parent`` as the lineage of the pushed variant ``mv`` and queue the
    comparison of the two (the optimizations domain's). A parent of another format or
    with other inputs could not be run on the same feeds: refused, naming the field."""
    loc = ("body", "parent")
    of = repo.get_version(session, name, parent)
    if of is None:
        raise InvalidInput(f"model {name!r} has no version {parent!r} to be a variant of", loc=loc)
    if of.format != mv.format:
        raise InvalidInput(
            f"the parent {parent} is {of.format} and this artifact {mv.format}: a variant is "
            "compared with its parent in one runtime",
            loc=loc,
        )
    ours, theirs = _input_names(mv.signature), _input_names(of.signature)
    if ours != theirs:
        raise InvalidInput(
            f"this artifact's inputs {ours} are not its parent {parent}'s {theirs}: a variant "
            "takes the same inputs (name and dtype)",
            loc=loc,
        )
    mv.parent_id = of.id
    mv.lineage = {
        "parent": of.version,
        "parent_sha256": of.sha256,
        "method": "pushed",
        "params": {},
    }
    enqueue(session, "optimizations.compare_variant", mv.id)


def _input_names(signature: dict[str, Any]) -> list[tuple[str, str]]:
    return sorted((str(i["name"]), str(i["dtype"])) for i in signature.get("inputs", []))


def record_version(
    session: Session,
    name: str,
    version: str,
    path: Path,
    sha256: str,
    size: int,
    metadata: dict[str, Any],
    reason: str,
) -> PushResult:
    """Inspect the artifact at ``path`` and insert the version (status Pending), its event
    and its validation task. Raises ArtifactRejected for a file that is not a model.
    Every way a version comes in goes through here: a push, a ModelVersion manifest, and
    a variant the optimizations domain derived."""
    fmt, signature = inspect_artifact(path)
    model = repo.get_or_create_model(session, name, metadata.get("description"))
    mv = ModelVersion(
        model_id=model.id,
        version=version,
        format=fmt.value,
        sha256=sha256,
        size_bytes=size,
        signature=signature,
        meta=metadata,
        status=VersionStatus.PENDING,
    )
    if not repo.add_version(session, mv):  # a concurrent push of the same version won
        raced = repo.get_version(session, name, version)
        assert raced is not None
        return _same_or_conflict(raced, name, sha256)
    record_event(
        session,
        kind="ModelVersion",
        name=f"{name}:{version}",
        reason=reason,
        message=f"{fmt.value} artifact sha256:{sha256} ({size} bytes)",
        data={"sha256": sha256, "size_bytes": size, "format": fmt.value},
    )
    metrics.MODEL_PUSHES.labels(result="created").inc()
    _queue_validation(session, mv)
    return PushResult(mv, created=True)


def apply_model_version(
    session: Session, store: ArtifactStore, manifest: ModelVersionManifest
) -> ApplyOutcome:
    """A ModelVersion manifest: register an artifact already in the store by sha256."""
    spec = manifest.spec
    label = f"{spec.model}:{spec.version}"
    if spec.artifact.path is not None or spec.artifact.sha256 is None:
        raise InvalidInput(
            "artifact.path is for `edgefleet apply`, which uploads the file and sends its "
            "sha256; the API takes artifact.sha256",
            loc=("body", "spec", "artifact", "path"),
        )
    sha = spec.artifact.sha256
    existing = repo.get_version(session, spec.model, spec.version)
    if existing is not None:
        _same_or_conflict(existing, spec.model, sha)
        return ApplyOutcome("ModelVersion", label, "unchanged")
    if not store.exists(sha):
        raise InvalidInput(
            f"no artifact sha256:{sha} in the artifact store: push the file first "
            "(edgefleet models push) or give artifact.path to edgefleet apply",
            loc=("body", "spec", "artifact", "sha256"),
        )
    path = store.path_for(sha)
    metadata: dict[str, Any] = {"labels": dict(manifest.metadata.labels)}
    if spec.description:
        metadata["description"] = spec.description
    if spec.validation is not None:
        metadata["validation"] = spec.validation.model_dump()
    record_version(
        session, spec.model, spec.version, path, sha, path.stat().st_size, metadata, "Applied"
    )
    return ApplyOutcome("ModelVersion", label, "created")


def _same_or_conflict(existing: ModelVersion, name: str, sha256: str) -> PushResult:
    if existing.sha256 == sha256:
        metrics.MODEL_PUSHES.labels(result="unchanged").inc()
        return PushResult(existing, created=False)
    metrics.MODEL_PUSHES.labels(result="conflict").inc()
    raise Conflict(
        f"model {name} version {existing.version} already exists with different content "
        f"(sha256:{existing.sha256}, pushed sha256:{sha256}); versions are immutable, "
        "push the new bytes as a new version"
    )


def _queue_validation(session: Session, mv: ModelVersion) -> None:

    session.flush()
    enqueue(session, "registry.validate_version", mv.id)


def require_model(session: Session, name: str) -> Model:
    model = repo.get_model(session, name)
    if model is None:
        raise NotFound(f"model {name!r} not found")
    return model


def require_version(session: Session, name: str, version: str) -> ModelVersion:
    mv = repo.get_version(session, name, version)
    if mv is None:
        require_model(session, name)
        raise NotFound(f"model {name!r} has no version {version!r}")
    return mv


def delete_version(session: Session, name: str, version: str) -> None:
    """Forget a version no rollout and no node uses. Its variants keep their lineage's
    method (their parent becomes unknown); its benchmarks and optimization jobs go with
    it. The artifact's bytes stay in the store (another version may share them)."""
    found = require_version(session, name, version)
    mv = repo.get_version_by_id(session, found.id, lock=True)
    if mv is None:  # deleted meanwhile
        raise NotFound(f"model {name!r} has no version {version!r}")
    rollouts, nodes = repo.version_users(session, mv.id)
    if rollouts or nodes:
        used = [f"rollout(s) {', '.join(rollouts)}"] if rollouts else []
        used += [f"{nodes} node assignment(s)"] if nodes else []
        raise Conflict(
            f"{name}:{version} is in use by {' and '.join(used)}: delete those rollouts, "
            "or roll the nodes to another version, first"
        )
    session.delete(mv)
    record_event(session, kind="ModelVersion", name=f"{name}:{version}", reason="Deleted")


def require_download(
    session: Session, name: str, version: str, principal: Principal
) -> ModelVersion:
    """The version, if ``principal`` may download it: any API token may; a node credential
    or an artifact token only a version its node or cluster is meant to run or benchmark
    (a stolen one opens no other model)."""
    mv = require_version(session, name, version)
    if principal.cluster is not None and not repo.version_reaches(
        session, mv.id, cluster=principal.cluster, node=principal.node
    ):
        where = (
            f"node {principal.cluster}/{principal.node}"
            if principal.node
            else (f"cluster {principal.cluster}")
        )
        raise Forbidden(f"{name} {version} is not assigned to {where}")
    return mv


def revalidate(session: Session, name: str, version: str) -> ModelVersion:
    """Run validation and benchmark again (after a runtime upgrade, say). The bytes and
    signature never change; only the verdict and the numbers are replaced."""
    mv = require_version(session, name, version)
    if mv.status == VersionStatus.VALIDATING:
        raise Conflict(f"model {name} version {version} is being validated right now")
    _set_status(mv, VersionStatus.PENDING, "queued for validation")
    _queue_validation(session, mv)
    return mv


def _set_status(mv: ModelVersion, status: VersionStatus, message: str | None) -> None:
    mv.status = status
    mv.status_message = message
    mv.status_changed_at = utcnow()


@dataclass(frozen=True)
class _ProbeJob:
    path: Path
    format: str
    metadata: dict[str, Any]
    label: str


def _claim(version_id: int, store: ArtifactStore) -> _ProbeJob | None:
    with session_scope() as session:
        mv = repo.get_version_by_id(session, version_id, lock=True)
        if mv is None or mv.status not in (VersionStatus.PENDING, VersionStatus.VALIDATING):
            return None  # already decided: a duplicate delivery of the task
        model_name = session.get(Model, mv.model_id).name  # type: ignore[union-attr]
        _set_status(mv, VersionStatus.VALIDATING, "loading the model in its runtime")
        return _ProbeJob(
            store.require(mv.sha256), mv.format, dict(mv.meta), f"{model_name}:{mv.version}"
        )


def run_validation(version_id: int, settings: Settings) -> str | None:
    """Validate then benchmark one version. Idempotent: a version already Ready or
    Invalid is left alone, so a redelivered task does nothing."""
    store = artifact_store(settings)
    job = _claim(version_id, store)
    if job is None:
        return None
    faults.point("registry.validate.claimed")
    request = ProbeRequest(
        path=str(job.path),
        format=job.format,
        metadata=job.metadata,
        runs=settings.benchmark_runs,
        warmup_runs=settings.benchmark_warmup_runs,
        threads=settings.benchmark_threads,
        default_dim=settings.probe_default_dim,
        limits=probe_limits(settings),
    )
    try:
        result = probe_model(request, timeout_s=settings.probe_timeout_s)
    except ProbeFailed as exc:
        result = {"validation": {"passed": False, "error": str(exc)}, "benchmark": None}
    validation = result["validation"]
    passed = bool(validation.get("passed"))
    faults.point("registry.validate.probed")
    with session_scope() as session:
        mv = repo.get_version_by_id(session, version_id, lock=True)
        if mv is None:
            return None
        mv.validation = validation
        mv.benchmark = result.get("benchmark")
        if passed:
            bench = mv.benchmark or {}
            _set_status(
                mv,
                VersionStatus.READY,
                f"validated in {validation.get('runtime')}; "
                f"p50 {bench.get('p50_ms')} ms, p95 {bench.get('p95_ms')} ms",
            )
        else:
            _set_status(mv, VersionStatus.INVALID, str(validation.get("error")))
        record_event(
            session,
            kind="ModelVersion",
            name=job.label,
            reason="Validated" if passed else "ValidationFailed",
            message=mv.status_message or "",
            data={"validation": validation, "benchmark": mv.benchmark},
        )
        metrics.MODEL_VALIDATIONS.labels(result="passed" if passed else "failed").inc()
        return mv.status


def requeue_stuck(settings: Settings) -> list[int]:
    """Versions left Pending or Validating by a lost message or a dead worker."""

    cutoff = utcnow() - timedelta(seconds=settings.stuck_validation_s)
    with session_scope() as session:
        ids = list(repo.stuck_version_ids(session, before=cutoff))
        for version_id in ids:
            mv = repo.get_version_by_id(session, version_id)
            if mv is not None:
                # Back to Pending so the claim works; the task is sent after commit.
                _set_status(mv, VersionStatus.PENDING, "requeued: validation did not finish")
                enqueue(session, "registry.validate_version", version_id)
    if ids:
        log.warning("requeued %d stuck model version validations: %s", len(ids), ids)
    return ids
