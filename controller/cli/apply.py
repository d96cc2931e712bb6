"""``edgefleet apply``: manifests from files, a directory or stdin, sent in one
``/v1/apply`` call, so a directory is all or nothing.

ModelVersion documents may name a local artifact (``spec.artifact.path``): the API only
takes ``sha256``, so ``apply`` first uploads the file through the registry's push endpoint
and sends the returned sha256. Before it uploads anything it validates those documents
locally and dry-runs the rest, so a bad manifest uploads nothing either. ``--dry-run``
never uploads: it hashes the file and says what it would upload."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError
from rich.console import Group
from rich.text import Text

from controller.cli.client import ApiClient, ApiError
from controller.cli.errors import client_error, fail
from controller.cli.format import SEVERITY_STYLE, duration, human_bytes
from controller.cli.options import ApiUrl, OutputOpt
from controller.cli.output import Output, console, emit, err_console, upload_progress
from controller.registry.spec import ModelVersionManifest


class ManifestError(Exception):
    """A problem with the manifests found before anything is sent."""


@dataclass
class Source:
    label: str  # file path, or <stdin>
    base: Path  # where the file's relative artifact paths resolve
    position: int  # the document's index within its file
    documents: int = 1  # documents in that file


@dataclass
class Artifact:
    """A ModelVersion document whose artifact is a local file."""

    index: int
    model: str
    version: str
    path: str  # as written in the manifest
    file: Path
    sha256: str
    size: int
    metadata: dict[str, Any]
    existing: dict[str, Any] | None = None
    uploaded: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        return f"{self.model}:{self.version}"


def _parse_stream(text: str, label: str) -> list[Any]:
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ManifestError(
            f"{label}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}"
        ) from exc


def _manifest_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(
            (p for p in path.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml")),
            key=lambda p: p.name,
        )
        if not files:
            raise ManifestError(f"{path}: no *.yaml or *.yml files in this directory")
        return files
    if path.is_file():
        return [path]
    raise ManifestError(f"{path}: no such file or directory")


def read_manifests(filenames: Sequence[str]) -> tuple[list[Any], list[Source]]:
    """Every document of every FILE, DIR (its *.yaml/*.yml, sorted) or ``-`` (stdin), in
    order, with where each came from."""
    docs: list[Any] = []
    sources: list[Source] = []

    def add(text: str, label: str, base: Path) -> None:
        found = _parse_stream(text, label)
        docs.extend(found)
        sources.extend(Source(label, base, i, len(found)) for i in range(len(found)))

    for name in filenames:
        if name == "-":
            add(sys.stdin.read(), "<stdin>", Path.cwd())
            continue
        for file in _manifest_files(Path(name).expanduser()):
            add(file.read_text(encoding="utf-8"), str(file), file.parent)
    if not docs:
        raise ManifestError(f"no documents in {', '.join(filenames)}")
    return docs, sources


def _sha256(file: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with file.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _error_msg(err: dict[str, Any]) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown field (not in the schema)"
    if err["type"] == "missing":
        return "field required"
    return str(err["msg"])


def _has_artifact_path(doc: Any) -> bool:
    if not isinstance(doc, dict) or doc.get("kind") != "ModelVersion":
        return False
    spec = doc.get("spec")
    artifact = spec.get("artifact") if isinstance(spec, dict) else None
    return isinstance(artifact, dict) and "path" in artifact


def find_artifacts(
    docs: Sequence[Any], sources: Sequence[Source]
) -> tuple[list[Artifact], list[dict[str, Any]]]:
    """The ModelVersion documents with ``artifact.path``, validated here (the server
    never sees them with a path) and hashed; errors in the API's 422 shape."""
    artifacts: list[Artifact] = []
    errors: list[dict[str, Any]] = []
    for i, doc in enumerate(docs):
        if not _has_artifact_path(doc):
            continue
        meta = doc.get("metadata")
        label = f"ModelVersion {meta.get('name', '?') if isinstance(meta, dict) else '?'}"
        try:
            manifest = ModelVersionManifest.model_validate(doc)
        except ValidationError as exc:
            errors.extend(
                {
                    "loc": ["body", i, *err["loc"]],
                    "msg": f"{label}: {_error_msg(dict(err))}",
                    "type": err["type"],
                }
                for err in exc.errors()
            )
            continue
        spec = manifest.spec
        assert spec.artifact.path is not None
        raw = Path(spec.artifact.path).expanduser()
        file = raw if raw.is_absolute() else sources[i].base / raw
        if not file.is_file():
            errors.append(
                {
                    "loc": ["body", i, "spec", "artifact", "path"],
                    "msg": f"{label}: no such file: {file}",
                    "type": "value_error",
                }
            )
            continue
        sha, size = _sha256(file)
        metadata: dict[str, Any] = {"labels": dict(manifest.metadata.labels)}
        if spec.description:
            metadata["description"] = spec.description
        if spec.validation is not None:
            metadata["validation"] = spec.validation.model_dump()
        artifacts.append(
            Artifact(i, spec.model, spec.version, spec.artifact.path, file, sha, size, metadata)
        )
    return artifacts, errors


def _with_sha(doc: Any, artifact: Artifact | None) -> Any:
    if artifact is None:
        return doc
    sha = artifact.uploaded["sha256"] if artifact.uploaded else artifact.sha256
    return {**doc, "spec": {**doc["spec"], "artifact": {"sha256": sha}}}


def _dump(docs: Sequence[Any]) -> str:
    return yaml.safe_dump_all(list(docs), sort_keys=False, allow_unicode=True)


def _renumber(exc: ApiError, sent: Sequence[int]) -> ApiError:
    """An error about a request that left some documents out, in the numbers of the
    user's whole stream."""

    def index(j: Any) -> Any:
        return sent[j] if isinstance(j, int) and 0 <= j < len(sent) else j

    def text(s: str) -> str:
        s = re.sub(
            r"\bdocuments (\d+) and (\d+)",
            lambda m: f"documents {index(int(m[1]))} and {index(int(m[2]))}",
            s,
        )
        return re.sub(r"\bdocument (\d+)", lambda m: f"document {index(int(m[1]))}", s)

    detail: Any = exc.detail
    if isinstance(detail, list):
        renumbered = []
        for item in detail:
            if isinstance(item, dict):
                loc = list(item.get("loc") or [])
                if len(loc) > 1 and loc[0] == "body":
                    loc[1] = index(loc[1])
                item = {**item, "loc": loc, "msg": text(str(item.get("msg", "")))}
            renumbered.append(item)
        detail = renumbered
    elif isinstance(detail, dict):
        detail = {**detail}
        if isinstance(detail.get("message"), str):
            detail["message"] = text(detail["message"])
        if "document" in detail:
            detail["document"] = index(detail["document"])
    elif isinstance(detail, str):
        detail = text(detail)
    return ApiError(exc.status, exc.error, detail)


def _note_pending(
    results: list[dict[str, Any]], docs: Sequence[Any], pending: Sequence[Artifact]
) -> None:
    """A Rollout of a version this apply uploads first is not blocked by the version
    being unknown to the server yet: say so instead of ModelVersionNotFound."""
    by_ref = {(a.model, a.version): a for a in pending}
    for i, result in enumerate(results):
        if result.get("kind") != "Rollout" or not result.get("problems"):
            continue
        ref = ((docs[i].get("spec") or {}).get("model") or {}) if isinstance(docs[i], dict) else {}
        artifact = by_ref.get((str(ref.get("name")), str(ref.get("version"))))
        if artifact is None:
            continue
        result["problems"] = [
            {
                "code": "ModelVersionUploadedFirst",
                "severity": "info",
                "message": (
                    f"model version {artifact.label} is not registered yet: apply uploads "
                    f"{artifact.path} first; it is validated, and the rollout waits in Pending "
                    "until it is Ready (runtime checks run once its format is known)"
                ),
            }
            if p.get("code") == "ModelVersionNotFound"
            else p
            for p in result["problems"]
        ]


def _artifact_info(a: Artifact, upload: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "path": a.path,
        "file": str(a.file),
        "sha256": a.uploaded["sha256"] if a.uploaded else a.sha256,
        "sizeBytes": a.size,
        "upload": upload,
    }
    if a.uploaded:
        info["status"] = a.uploaded.get("status")
    return info


def run_apply(
    client: ApiClient, docs: list[Any], sources: Sequence[Source], *, dry_run: bool
) -> dict[str, Any]:
    """The whole apply: validate and hash local artifacts, dry-run what can be, upload,
    apply. Returns the API's answer, with an ``artifact`` entry on ModelVersion results
    whose file this command handled."""
    artifacts, errors = find_artifacts(docs, sources)
    if errors:
        raise ApiError(422, "validation_error", errors)
    by_index = {a.index: a for a in artifacts}
    for a in artifacts:
        a.existing = client.get_or_none(f"/v1/models/{a.model}/versions/{a.version}")
    pending = [a for a in artifacts if a.existing is None]
    pending_at = {a.index for a in pending}

    if dry_run or pending:
        # The server cannot see a version that is not uploaded yet: dry-run the rest.
        sent = [i for i in range(len(docs)) if i not in pending_at]
        answer: list[dict[str, Any]] = []
        if sent:
            try:
                reply = client.apply(
                    _dump([_with_sha(docs[i], by_index.get(i)) for i in sent]), dry_run=True
                )
            except ApiError as exc:
                raise _renumber(exc, sent) from exc
            answer = reply["results"]
        results: list[dict[str, Any]] = [{} for _ in docs]
        for j, i in enumerate(sent):
            results[i] = answer[j]
        for a in pending:
            results[a.index] = {
                "kind": "ModelVersion",
                "name": a.label,
                "action": "created",
                "artifact": _artifact_info(a, "wouldUpload"),
            }
        _note_pending(results, docs, pending)
        if dry_run:
            for a in artifacts:
                if a.existing is not None:
                    results[a.index]["artifact"] = _artifact_info(a, "alreadyRegistered")
            return {"dryRun": True, "results": results}
        blocking = [
            {
                "loc": ["body", i, "spec"],
                "msg": f"Rollout {r['name']}: {p['message']}",
                "type": p["code"],
            }
            for i, r in enumerate(results)
            for p in r.get("problems", [])
            if p.get("severity") == "error"
        ]
        if blocking:  # what the apply would refuse: refuse it before uploading
            raise ApiError(422, "validation_error", blocking)
        for a in pending:
            with upload_progress(a.file) as progress:
                a.uploaded = client.push_version(
                    a.file,
                    name=a.model,
                    version=a.version,
                    metadata=json.dumps(a.metadata),
                    progress=progress,
                )

    reply = client.apply(_dump([_with_sha(d, by_index.get(i)) for i, d in enumerate(docs)]))
    results = reply["results"]
    for a in artifacts:
        result = results[a.index]
        result["artifact"] = _artifact_info(a, "uploaded" if a.uploaded else "alreadyRegistered")
        if a.uploaded and result.get("action") == "unchanged":
            result["action"] = "created"  # the upload of this very command created it
    return dict(reply)


def _value(v: Any) -> str:
    """A changed field's old or new value, on one line."""
    if v is None:
        return "<none>"
    if isinstance(v, str):
        return v
    text = json.dumps(v, separators=(",", ":"), default=str)
    return text if len(text) <= 200 else text[:197] + "..."


def _result_lines(result: dict[str, Any], *, dry_run: bool) -> list[Text]:
    kind, name, action = result["kind"], result["name"], result["action"]
    head = Text(f"{kind.lower()}.edgefleet.io/{name} ")
    head.append(action, style="bold" if action != "unchanged" else "")
    notes: list[str] = ["dry run"] if dry_run else []
    artifact = result.get("artifact")
    if artifact and artifact["upload"] != "alreadyRegistered":
        what = "would upload" if artifact["upload"] == "wouldUpload" else "uploaded"
        status = f", status {artifact['status']}" if artifact.get("status") else ""
        notes.append(
            f"{what} {artifact['path']}: {human_bytes(artifact['sizeBytes'])}, "
            f"sha256:{artifact['sha256'][:12]}{status}"
        )
    if notes:
        head.append(f" ({'; '.join(notes)})")
    lines = [head]
    for change in result.get("changes", []):
        lines.append(
            Text(f"  {change['path']}: {_value(change.get('old'))} -> {_value(change.get('new'))}")
        )
    plan = result.get("plan")
    if dry_run and plan is not None:
        waves = plan.get("waves", [])
        lines.append(Text(f"  plan: {plan.get('nodes', 0)} node(s) in {len(waves)} wave(s)"))
        for w in waves:
            clusters = ", ".join(f"{c}={n}" for c, n in (w.get("clusters") or {}).items())
            versions = w.get("versions") or {}
            mix = ", ".join(f"{v}={n}" for v, n in versions.items())
            mix = f"  versions {mix}" if mix else ""
            lines.append(
                Text(
                    f"    wave {w['index']}: {w['nodes']:>4} node(s)  "
                    f"bake {duration(w.get('bake_s')):<6}  {clusters}{mix}"
                )
            )
            expected = w.get("expected")  # spec.schedule: when the wave should run
            if expected:
                zones = ", ".join(f"{z} {t or 'never'}" for z, t in expected["zones"].items())
                lines.append(Text(f"      expected start {expected['start'] or 'never'} ({zones})"))
        lines.extend(_variant_lines(plan.get("variants") or {}))
    for p in result.get("problems", []):
        severity = p.get("severity", "error")
        line = Text("  ")
        line.append(f"{severity}", style=SEVERITY_STYLE.get(severity, ""))
        line.append(f" {p['code']}: {p['message']}")
        nodes = p.get("nodes") or []
        if nodes:
            count = p.get("nodeCount", len(nodes))
            shown = ", ".join(nodes[:5]) + (", ..." if count > 5 else "")
            line.append(f" ({count} node(s): {shown})")
        lines.append(line)
    return lines


def _variant_lines(variants: dict[str, Any]) -> list[Text]:
    """spec.model.variants: the version chosen per node class, and why the others not."""
    lines = [Text("  variant per node class:")] if variants else []
    for cls, got in variants.items():
        head = f"    {cls}: {got['version']} on {got['nodes']} node(s), {got['reason']}"
        lines.append(Text(head))
        for c in got.get("candidates", []):
            numbers = (
                f"p50 {c['p50_ms']} ms, p95 {c['p95_ms']} ms" if "p50_ms" in c else "no numbers"
            )
            verdict = f"excluded: {c['excluded']}" if "excluded" in c else "eligible"
            lines.append(Text(f"      {c['version']:<16} {numbers}; {verdict}"))
    return lines


def _apply_view(reply: dict[str, Any]) -> Group:
    dry_run = bool(reply.get("dryRun"))
    return Group(*(ln for r in reply["results"] for ln in _result_lines(r, dry_run=dry_run)))


def _explain_documents(exc: ApiError, sources: Sequence[Source]) -> None:
    """Which file each document number of an error comes from (for DIR and many -f)."""
    if len({s.label for s in sources}) < 2 and all(s.documents == 1 for s in sources):
        return
    found: set[int] = set()
    if isinstance(exc.detail, list):
        for item in exc.detail:
            loc = item.get("loc", []) if isinstance(item, dict) else []
            if len(loc) > 1 and loc[0] == "body" and isinstance(loc[1], int):
                found.add(loc[1])
    text = exc.detail.get("message", "") if isinstance(exc.detail, dict) else str(exc.detail)
    found.update(int(n) for n in re.findall(r"\bdocuments? (\d+)", str(text)))
    for i in sorted(n for n in found if 0 <= n < len(sources)):
        src = sources[i]
        where = f" (document {src.position + 1} of {src.documents})" if src.documents > 1 else ""
        err_console.print(Text(f"  document {i} is {src.label}{where}"), highlight=False)


def apply_files(
    filename: list[str], api_url: str | None, *, dry_run: bool, refused_code: int = 1
) -> dict[str, Any]:
    """Read the manifests (``-f``), upload their artifacts and apply them (or dry-run).
    An apply the server refuses is shown, with the file behind each document number,
    and exits with ``refused_code`` (``diff`` exits 2: its 1 says "differences")."""
    try:
        docs, sources = read_manifests(filename)
    except (ManifestError, OSError) as exc:
        raise client_error(str(exc)) from exc
    client = ApiClient(api_url)
    try:
        return run_apply(client, docs, sources, dry_run=dry_run)
    except ApiError as exc:
        fail(exc)
        _explain_documents(exc, sources)
        raise typer.Exit(code=refused_code) from exc
    finally:
        client.close()


def apply_manifests(
    filename: Annotated[
        list[str],
        typer.Option(
            "--filename",
            "-f",
            help="Manifest FILE (several --- documents), DIR (its *.yaml/*.yml), or - (stdin).",
        ),
    ],
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Show what would change and the plans; change nothing."),
    ] = False,
    output: OutputOpt = Output.table,
    api_url: ApiUrl = None,
) -> None:
    """Apply Cluster, ModelVersion and Rollout manifests, all or nothing.

    ModelVersion documents may give spec.artifact.path (relative to the manifest's
    directory, or the working directory for stdin): the file is uploaded first.
    A dry-run exits 1 when a plan has error-severity problems."""
    reply = apply_files(filename, api_url, dry_run=dry_run)
    if output is Output.table:
        console.print(_apply_view(reply))
    else:
        emit(reply, output)
    errors = [
        p for r in reply["results"] for p in r.get("problems", []) if p.get("severity") == "error"
    ]
    if dry_run and errors:
        raise typer.Exit(code=1)
