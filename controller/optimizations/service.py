"""Variants: optimization jobs that derive a new immutable version from an ONNX parent
(quantized, fp16 or pruned), with its lineage and a side-by-side comparison report.

A job is a row first (Pending), then a Celery task. The variant version, its artifact
and its lineage appear together when the job succeeds; a failed job leaves only its own
row with the reason."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from controller.audit import record_event
from controller.db.models import Model, ModelVersion, Optimization, OptimizationStatus
from controller.db.session import session_scope
from controller.errors import Conflict, InvalidInput, NotFound
from controller.optimizations import compare, optimize, sample_inputs
from controller.optimizations import repository as repo
from controller.registry import repository as registry_repo
from controller.registry.schemas import check_version
from controller.registry.service import (
    json_object_field,
    probe_limits,
    record_version,
    require_version,
)
from controller.registry.store import ArtifactStore, artifact_store
from controller.settings import Settings
from controller.tasks.celery_app import enqueue
from node_agent.probe_launcher import ProbeRequest, probe_model
from node_agent.runtimes import InputHints, OnnxRunner, open_runner

log = logging.getLogger(__name__)
PARAMS = {
    "dynamic-int8": {"per_channel"},
    "static-int8": {"per_channel", "samples", "target", "format", "calibration", "op_types"},
    "fp16": set(),
    "prune": {"sparsity", "scope"},
}
COMMON = {"rtol", "atol"}


def request_variant(
    session: Session,
    store: ArtifactStore,
    *,
    name: str,
    parent: str,
    version: str,
    method: str,
    params_json: str | None,
    calibration: bytes | None,
    settings: Settings | None = None,
) -> Optimization:
    """``settings`` bounds the params JSON; without, its defaults do (an in-process call,
    as the demo's, has no request to bound)."""
    parent_version = require_version(session, name, parent)
    check_version(version)
    if method not in optimize.METHODS:
        raise InvalidInput(
            f"unknown method {method!r}: expected one of {', '.join(optimize.METHODS)}",
            loc=("body", "method"),
        )
    if parent_version.format != "onnx":
        raise InvalidInput(
            "TFLite models are optimized when they are converted (post-training quantization "
            "in the TFLite converter); register the converted file as its own version",
            loc=("path", "version"),
        )
    params = json_object_field(params_json, "params", settings or Settings.model_construct())
    unknown = set(params) - PARAMS[method] - COMMON
    if unknown:
        allowed = ", ".join(sorted(PARAMS[method] | COMMON))
        raise InvalidInput(
            f"unknown parameter(s) {sorted(unknown)} for {method} (allowed: {allowed})",
            loc=("body", "params", sorted(unknown)[0]),
        )
    if method == "prune":
        sparsity = params.get("sparsity", 0.5)
        if not isinstance(sparsity, int | float) or not 0 < sparsity < 1:
            raise InvalidInput(
                "sparsity must be a number between 0 and 1", loc=("body", "params", "sparsity")
            )
    _check_quantization(params)
    if registry_repo.get_version(session, name, version) is not None:
        raise Conflict(f"model {name} already has a version {version!r}; name the variant anew")
    calibration_sha = None
    if calibration:
        with store.stage([calibration]) as staged:
            calibration_sha = staged.sha256
            store.promote(staged)
    job = Optimization(
        model_id=parent_version.model_id,
        parent_version_id=parent_version.id,
        target_version=version,
        method=method,
        params=params,
        calibration_sha256=calibration_sha,
        status=OptimizationStatus.PENDING,
        stage="queued",
    )
    session.add(job)
    session.flush()

    enqueue(session, "registry.derive_variant", job.id)
    return job


def _check_quantization(params: dict[str, Any]) -> None:
    """Static int8's choices, refused at the request rather than in the job."""
    choices = {"format": optimize.QUANT_FORMATS, "calibration": optimize.CALIBRATION_METHODS}
    for key, allowed in choices.items():
        if key in params and params[key] not in allowed:
            raise InvalidInput(
                f"{key} must be one of {', '.join(allowed)}", loc=("body", "params", key)
            )
    if "target" in params and not (isinstance(params["target"], str) and params["target"]):
        raise InvalidInput(
            "target is the execution provider the variant is for, e.g. CPUExecutionProvider",
            loc=("body", "params", "target"),
        )
    ops = params.get("op_types")
    if ops is not None and not (
        isinstance(ops, list) and ops and all(isinstance(o, str) for o in ops)
    ):
        raise InvalidInput(
            'op_types is a list of operator types, e.g. ["Conv", "MatMul"]',
            loc=("body", "params", "op_types"),
        )


def get_job(session: Session, name: str, job_id: int) -> Optimization:
    job = repo.get_job(session, name, job_id)
    if job is None:
        raise NotFound(f"model {name!r} has no optimization {job_id}")
    return job


def _set(job_id: int, **fields: Any) -> None:
    with session_scope() as session:
        job = session.get(Optimization, job_id)
        assert job is not None
        for key, value in fields.items():
            setattr(job, key, value)


def _failed(job_id: int, exc: Exception) -> str:
    log.warning("optimization %s failed: %s", job_id, exc)
    message = f"{type(exc).__name__}: {exc}"
    _set(job_id, status=OptimizationStatus.FAILED, stage=None, message=message)
    return OptimizationStatus.FAILED


MEMORY_PROBE_RUNS = 10


def peak_memory(
    original: Path, variant: bytes, metadata: dict[str, Any], settings: Settings
) -> dict[str, Any]:
    """Peak memory of both models, each alone in a child process (node_agent/probe.py:
    VmHWM of the process, and the model's share above the loaded runtime), on the same
    generated inputs. Two processes because a process's high-water mark cannot be
    split between two models loaded side by side."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="edgefleet-variant-") as tmp:
        variant_path = Path(tmp) / "variant.onnx"
        variant_path.write_bytes(variant)
        for key, path in (("original", original), ("variant", variant_path)):
            request = ProbeRequest(
                path=str(path),
                format="onnx",
                metadata=metadata,
                runs=MEMORY_PROBE_RUNS,
                warmup_runs=1,
                threads=settings.benchmark_threads,
                default_dim=settings.probe_default_dim,
                limits=probe_limits(settings),
            )
            result = probe_model(request, timeout_s=settings.probe_timeout_s)
            bench = result.get("benchmark")
            if not bench:
                error = (result.get("validation") or {}).get("error", "no benchmark")
                raise RuntimeError(f"measuring the {key} model's memory failed: {error}")
            out[key] = {k: bench[k] for k in ("peak_rss_bytes", "model_peak_bytes")}
    base = out["original"]["model_peak_bytes"]
    out["model_peak_ratio"] = round(out["variant"]["model_peak_bytes"] / base, 4) if base else None
    return out


def summary(method: str, parent: str, report: dict[str, Any]) -> str:
    """A comparison report in one line (the VariantDerived and VariantCompared events)."""
    return (
        f"{method} of {parent}: size x{report['size_ratio']}, "
        f"p50 x{report['latency_ratio']['p50']}, "
        f"top-1 agreement {report['top1_agreement']}, "
        f"max abs error {report['max_abs_error']}; "
        + (
            "recommended"
            if report["verdict"]["recommended"]
            else "not recommended: " + "; ".join(report["verdict"]["reasons"])
        )
    )


PUSHED_SAMPLES = 8
"""Generated inputs a pushed variant is compared with its parent on."""


def compare_pushed(version_id: int, settings: Settings) -> str | None:
    """The comparison report of a variant pushed with its parent (``--parent``: an int8
    or lite ``.tflite`` of a float one, an fp16 ``.onnx``), run in the runtime of their
    format on generated inputs sized by the variant's validation hints, else the
    parent's. Stored in the variant's lineage as a derived variant's is, so rollouts read
    both alike; a failure is stored instead (``comparison_error``), and a rollout that
    needs the report then says why there is none."""
    store = artifact_store(settings)
    with session_scope() as session:
        mv = session.get(ModelVersion, version_id)
        if mv is None or mv.parent_id is None or "report" in (mv.lineage or {}):
            return None  # a duplicate delivery
        parent = session.get(ModelVersion, mv.parent_id)
        model = session.get(Model, mv.model_id)
        assert parent is not None
        assert model is not None
        fmt, label, parent_version = mv.format, f"{model.name}:{mv.version}", parent.version
        paths = (store.require(parent.sha256), store.require(mv.sha256))
        meta = mv.meta if (mv.meta or {}).get("validation") else parent.meta
        hints = InputHints.from_metadata(meta)
    report: dict[str, Any] | None = None
    error = ""
    try:
        original, variant = (path.read_bytes() for path in paths)
        specs = open_runner(original, fmt).inputs
        samples = sample_inputs.generated_samples(
            specs, PUSHED_SAMPLES, settings.probe_default_dim, hints
        )
        report = compare.compare(
            original,
            variant,
            samples,
            fmt=fmt,
            latency_runs=settings.comparison_runs,
            min_agreement=settings.variant_min_agreement,
        )
        report["warnings"] = [
            "compared on generated random inputs (a pushed variant brings no samples)"
        ]
    except Exception as exc:  # the report says why, and rollouts needing it refuse
        error = f"{type(exc).__name__}: {exc}"
        log.warning("comparing %s with %s failed: %s", label, parent_version, error)
    with session_scope() as session:
        mv = session.get(ModelVersion, version_id, with_for_update=True)
        assert mv is not None
        lineage = dict(mv.lineage or {})
        if report is not None:
            lineage["report"] = report
            reason, message = "VariantCompared", summary("pushed", parent_version, report)
        else:
            lineage["comparison_error"] = error
            reason, message = "VariantComparisonFailed", error
        mv.lineage = lineage
        record_event(
            session,
            kind="ModelVersion",
            name=label,
            reason=reason,
            message=message,
            data={"lineage": {k: v for k, v in lineage.items() if k != "report"}},
        )
    return reason


def run_job(job_id: int, settings: Settings) -> str | None:
    store = artifact_store(settings)
    with session_scope() as session:
        job = session.get(Optimization, job_id, with_for_update=True)
        if job is None or job.status != OptimizationStatus.PENDING:
            return None  # a duplicate delivery
        job.status, job.stage = OptimizationStatus.RUNNING, "loading"
        parent = session.get(ModelVersion, job.parent_version_id)
        model = session.get(Model, job.model_id)
        assert parent is not None
        assert model is not None
        method, params, target = job.method, dict(job.params), job.target_version
        parent_path = store.require(parent.sha256)
        calibration = (
            store.require(job.calibration_sha256).read_bytes() if job.calibration_sha256 else None
        )
        lineage_base = {
            "parent": parent.version,
            "parent_sha256": parent.sha256,
            "method": method,
            "params": params,
        }
        parent_id, model_name, parent_version_label = parent.id, model.name, parent.version
        parent_meta = dict(parent.meta or {})
    try:
        original = parent_path.read_bytes()
        specs = OnnxRunner(original, threads=1).inputs
        notes: list[str] = []
        if calibration is not None:
            samples = sample_inputs.load_samples(calibration, specs)
        else:
            samples = sample_inputs.generated_samples(
                specs,
                int(params.get("samples", 32)),
                settings.probe_default_dim,
                InputHints.from_metadata(parent_meta),
            )
            notes.append(
                "no sample inputs uploaded: calibration and comparison used generated random "
                "inputs, a poor stand-in for real data (upload an .npz of real samples)"
            )
        # Calibrate on the first part, compare on a held-out rest when there is enough.
        held_out = samples[len(samples) * 3 // 4 :] if len(samples) >= 8 else samples
        calibrate = samples[: len(samples) * 3 // 4] if len(samples) >= 8 else samples
        _set(job_id, stage=f"deriving ({method})")
        variant = optimize.derive(original, method, params, samples=calibrate)
        _set(job_id, stage="comparing")
        report = compare.compare(
            original,
            variant.data,
            held_out,
            rtol=float(params.get("rtol", 1e-2)),
            atol=float(params.get("atol", 1e-3)),
            latency_runs=settings.comparison_runs,
            min_agreement=settings.variant_min_agreement,
        )
        report["details"] = variant.details
        report["warnings"] = notes + variant.warnings
        _set(job_id, stage="measuring peak memory")
        report["peak_memory"] = peak_memory(parent_path, variant.data, parent_meta, settings)
    except Exception as exc:  # any failure: the job says why, and no version exists
        return _failed(job_id, exc)
    with session_scope() as session, store.stage([variant.data]) as staged:
        job = session.get(Optimization, job_id)
        assert job is not None
        metadata: dict[str, Any] = {
            "labels": {"variant-of": lineage_base["parent"], "method": method}
        }
        if parent_meta.get("validation"):  # it takes the same inputs as its parent
            metadata["validation"] = parent_meta["validation"]
        try:
            result = record_version(
                session,
                model_name,
                target,
                staged.path,
                staged.sha256,
                staged.size,
                metadata,
                "Derived",
            )
        except Exception as exc:
            session.rollback()
            return _failed(job_id, exc)
        mv = result.version
        mv.parent_id = parent_id
        mv.lineage = {**lineage_base, "report": report}
        store.promote(staged)
        job.status, job.stage = OptimizationStatus.SUCCEEDED, None
        job.result_version_id, job.report = mv.id, report
        record_event(
            session,
            kind="ModelVersion",
            name=f"{model_name}:{target}",
            reason="VariantDerived",
            message=summary(method, parent_version_label, report),
            data={"lineage": lineage_base},
        )
    return OptimizationStatus.SUCCEEDED
