"""Apply: parse every document, validate every document, then apply them all in one
transaction, in dependency order (Clusters, then ModelVersions, then FreezePeriods, then
Rollouts, whose dry-run forecast reads the freezes). Any error anywhere rolls the whole
call back: a bad manifest changes nothing at all."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from controller import faults
from controller.errors import EdgefleetError, Forbidden, InvalidInput
from controller.fleet.service import apply_cluster
from controller.fleet.spec import ClusterManifest
from controller.kit.manifest import API_VERSION
from controller.kit.outcome import ApplyOutcome
from controller.kit.transactions import suspend_after_commit
from controller.manifests.schemas import KINDS, Manifest
from controller.registry.service import apply_model_version
from controller.registry.spec import ModelVersionManifest
from controller.registry.store import ArtifactStore
from controller.rollouts.service import apply_rollout
from controller.rollouts.spec import RolloutManifest
from controller.schedules.service import apply_freeze_manifest
from controller.schedules.spec import FreezePeriodManifest
from controller.settings import Settings
from controller.untrusted import DOCUMENTS_SETTING, load_json, load_yaml_documents

ORDER = {"Cluster": 0, "ModelVersion": 1, "FreezePeriod": 2, "Rollout": 3}


class ManifestInvalid(InvalidInput):
    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors[0]["msg"])
        self.detail = errors


def parse_yaml(text: str, settings: Settings) -> list[Any]:
    """The documents of a YAML stream (empty ones left out), within the request bounds."""
    return load_yaml_documents(
        text,
        max_depth=settings.max_nesting_depth,
        max_nodes=settings.max_input_nodes,
        max_documents=settings.max_manifest_documents,
    )


def parse_json(text: str, settings: Settings) -> list[Any]:
    """A JSON list of documents (or one document), within the request bounds."""
    body = load_json(
        text,
        what="the body",
        max_depth=settings.max_nesting_depth,
        max_nodes=settings.max_input_nodes,
    )
    docs = body if isinstance(body, list) else [body]
    if len(docs) > settings.max_manifest_documents:
        raise InvalidInput(
            f"{len(docs)} documents, more than the {settings.max_manifest_documents} one "
            f"request may hold ({DOCUMENTS_SETTING})",
            loc=("body",),
        )
    return docs


def _expected(err: dict[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    if err["type"] == "extra_forbidden":
        return "unknown field (not in the schema)"
    if err["type"] == "missing":
        return "field required"
    if "expected" in ctx:
        return f"{err['msg']}"
    return str(err["msg"])


def validate_documents(docs: list[Any]) -> list[Manifest]:
    errors: list[dict[str, Any]] = []
    parsed: list[Manifest] = []
    if not docs:
        raise InvalidInput("no documents to apply", loc=("body",))
    names: dict[tuple[str, str], int] = {}
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            errors.append(
                {"loc": ["body", i], "msg": "a document must be a mapping", "type": "type_error"}
            )
            continue
        kind = doc.get("kind")
        if doc.get("apiVersion") != API_VERSION:
            errors.append(
                {
                    "loc": ["body", i, "apiVersion"],
                    "msg": f"expected apiVersion {API_VERSION!r}, got {doc.get('apiVersion')!r}",
                    "type": "value_error",
                }
            )
            continue
        if kind not in KINDS:
            errors.append(
                {
                    "loc": ["body", i, "kind"],
                    "msg": f"unknown kind {kind!r}: expected one of {', '.join(KINDS)}",
                    "type": "value_error",
                }
            )
            continue
        try:
            manifest = KINDS[kind].model_validate(doc)
        except ValidationError as exc:
            meta = doc.get("metadata")
            label = f"{kind} {meta.get('name', '?') if isinstance(meta, dict) else '?'}"
            for err in exc.errors():
                errors.append(
                    {
                        "loc": ["body", i, *err["loc"]],
                        "msg": f"{label}: {_expected(dict(err))}",
                        "type": err["type"],
                    }
                )
            continue
        key = (kind, manifest.metadata.name)
        if key in names:
            errors.append(
                {
                    "loc": ["body", i, "metadata", "name"],
                    "msg": f"{kind} {key[1]} appears twice (documents {names[key]} and {i})",
                    "type": "value_error",
                }
            )
        names[key] = i
        parsed.append(manifest)
    if errors:
        raise ManifestInvalid(errors)
    return parsed


def apply_documents(
    session: Session,
    docs: list[Any],
    settings: Settings,
    store: ArtifactStore,
    *,
    dry_run: bool,
    may_apply_clusters: bool,
) -> list[ApplyOutcome]:
    """A dry-run performs the real apply inside a SAVEPOINT and rolls it back, so its
    answer (plans across documents of one file included) is exactly what apply does.
    Without ``may_apply_clusters`` a Cluster document refuses the whole call (403)."""
    manifests = validate_documents(docs)
    if not may_apply_clusters:
        clusters = [i for i, m in enumerate(manifests) if isinstance(m, ClusterManifest)]
        if clusters:
            raise Forbidden(
                f"document {clusters[0]}: applying a Cluster needs an admin token "
                "(its credentials reach a remote API server)",
                detail=[
                    {
                        "loc": ["body", i, "kind"],
                        "msg": "applying a Cluster needs an admin token",
                        "type": "forbidden",
                    }
                    for i in clusters
                ],
            )
    if not dry_run:
        return _apply_all(session, manifests, settings, store, dry_run=False)
    with suspend_after_commit(session):
        nested = session.begin_nested()
        try:
            return _apply_all(session, manifests, settings, store, dry_run=True)
        finally:
            nested.rollback()


def _apply_all(
    session: Session,
    manifests: list[Manifest],
    settings: Settings,
    store: ArtifactStore,
    *,
    dry_run: bool,
) -> list[ApplyOutcome]:
    ordered = sorted(
        enumerate(manifests),
        key=lambda im: (ORDER[im[1].kind], im[0]),
    )
    outcomes: list[tuple[int, ApplyOutcome]] = []
    faults.point("manifests.apply.validated")
    for index, manifest in ordered:
        try:
            if isinstance(manifest, ClusterManifest):
                outcome = apply_cluster(session, manifest, settings)
            elif isinstance(manifest, ModelVersionManifest):
                outcome = apply_model_version(session, store, manifest)
            elif isinstance(manifest, FreezePeriodManifest):
                outcome = apply_freeze_manifest(session, manifest)
            else:
                assert isinstance(manifest, RolloutManifest)
                outcome = apply_rollout(session, manifest, settings, dry_run=dry_run)
        except EdgefleetError as exc:
            exc.message = f"document {index}: {exc.message}"
            if isinstance(exc.detail, str):
                exc.detail = f"document {index}: {exc.detail}"
            elif isinstance(exc.detail, dict) and "message" in exc.detail:
                exc.detail = {**exc.detail, "message": exc.message, "document": index}
            elif isinstance(exc.detail, list):
                exc.detail = [_in_document(item, index) for item in exc.detail]
            raise
        outcomes.append((index, outcome))
        session.flush()
        faults.point("manifests.apply.document")
    return [o for _, o in sorted(outcomes, key=lambda io: io[0])]


def _in_document(item: Any, index: int) -> Any:
    """A field path inside document ``index``: ["body", "spec", ...] -> ["body", index, ...]."""
    if not isinstance(item, dict):
        return item
    loc = list(item.get("loc") or [])
    if loc[:1] == ["body"] and not (len(loc) > 1 and isinstance(loc[1], int)):
        loc = ["body", index, *loc[1:]]
    return {**item, "loc": loc}


def json_schema(kind: str) -> dict[str, Any]:
    schema = KINDS[kind].model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://edgefleet.io/schemas/v1/{kind}.json"
    return schema
