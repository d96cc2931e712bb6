"""kubectl-like commands of the rollout engine: ``apply``, ``get``, ``describe rollout``
and ``rollout status|pause|resume|abort|undo|retry``. Everything goes through the REST API.

``apply`` reads manifests from files, a directory or stdin and sends them in one
``/v1/apply`` call, so a directory is all or nothing. ModelVersion documents may name a
local artifact (``spec.artifact.path``): the API only takes ``sha256``, so ``apply`` first
uploads the file through the registry's push endpoint and sends the returned sha256. Before
it uploads anything it validates those documents locally and dry-runs the rest, so a bad
manifest uploads nothing either. ``--dry-run`` never uploads: it hashes the file and says
what it would upload."""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError
from rich.console import Group, RenderableType
from rich.live import Live
from rich.padding import Padding
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from controller.cli.client import ApiClient, ApiError
from controller.cli.output import Output, console, emit, err_console, human_bytes
from controller.manifests.schemas import ModelVersionManifest

get_app = typer.Typer(
    help="List resources: rollouts, nodes, clusters, models.", no_args_is_help=True
)
describe_app = typer.Typer(help="Show one resource in detail.", no_args_is_help=True)
rollout_app = typer.Typer(
    help="Watch and steer rollouts: status, pause, resume, abort, undo, retry.",
    no_args_is_help=True,
)

ApiUrl = Annotated[
    str | None,
    typer.Option("--api-url", envvar="EDGEFLEET_API_URL", help="Controller URL."),
]
OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="Output format.")]

# A rollout in one of these phases changes no more by itself (Failed is where the
# reconciler decides between rollback and pause; Paused waits for a human).
TERMINAL_PHASES = ("Succeeded", "RolledBack", "Aborted", "Failed")
WATCH_STOP_PHASES = (*TERMINAL_PHASES, "Paused")
PHASE_STYLE = {
    "Succeeded": "green",
    "Passed": "green",
    "Healthy": "green",
    "Progressing": "cyan",
    "Baking": "cyan",
    "Applying": "cyan",
    "Running": "cyan",
    "Pending": "white",
    "Paused": "yellow",
    "Deferred": "yellow",
    "Failed": "red",
    "RolledBack": "red",
    "Aborted": "red",
}
SEVERITY_STYLE = {"error": "red", "warning": "yellow", "info": "cyan"}


def register(app: typer.Typer) -> None:
    """Add the rollout engine's commands to the ``edgefleet`` app."""
    app.command("apply")(apply_manifests)
    app.add_typer(get_app, name="get")
    app.add_typer(describe_app, name="describe")
    app.add_typer(rollout_app, name="rollout")


def _fail(exc: ApiError) -> typer.Exit:
    """The error rendering of every ``edgefleet`` command (``main._fail``); a detail
    object with a ``message`` (409s about owners) is shown as that message."""
    from controller.cli.main import _fail as fail  # main imports this module

    if isinstance(exc.detail, dict) and isinstance(exc.detail.get("message"), str):
        exc = ApiError(exc.status, exc.error, exc.detail["message"])
    return fail(exc)


def _client_error(message: str) -> typer.Exit:
    err_console.print(Text.assemble(("error:", "red"), " ", message))
    return typer.Exit(code=1)


# ---------------------------------------------------------------- formatting


def _table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    """Like ``output.make_table``, but cells are plain text: messages such as
    ``[berlin/n1]`` are not rich markup."""
    t = Table(show_edge=False, box=None, header_style="bold", pad_edge=False)
    for col in columns:
        t.add_column(col)
    for row in rows:
        t.add_row(*(v if isinstance(v, Text) else Text("" if v is None else str(v)) for v in row))
    return t


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _age(value: str | None, *, now: datetime | None = None) -> str:
    """kubectl's AGE: 45s, 12m, 5h, 3d."""
    at = _parse_time(value)
    if at is None:
        return "<never>"
    seconds = max(0, int(((now or datetime.now(UTC)) - at).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 2 * 3600:
        return f"{seconds // 60}m"
    if seconds < 48 * 3600:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def _when(value: str | None) -> str:
    at = _parse_time(value)
    if at is None:
        return "<none>"
    return f"{at.strftime('%Y-%m-%d %H:%M:%S')} ({_age(value)} ago)"


def _duration(seconds: float | None) -> str:
    """Seconds as a Go-style duration, the form manifests use: 0s, 90s -> 1m30s, 2h."""
    if seconds is None:
        return ""
    if seconds < 60 and seconds != int(seconds):
        return f"{seconds:g}s"
    rest = int(seconds)
    if rest == 0:
        return "0s"
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            out += f"{rest // size}{unit}"
            rest %= size
    return out


def _value(v: Any) -> str:
    if v is None:
        return "<none>"
    if isinstance(v, str):
        return v
    text = json.dumps(v, separators=(",", ":"), default=str)
    return text if len(text) <= 200 else text[:197] + "..."


def _counts(states: dict[str, int] | None) -> str:
    if not states:
        return ""
    return " ".join(f"{k}={v}" for k, v in sorted(states.items()))


def _styled(value: str) -> Text:
    return Text(value, style=PHASE_STYLE.get(value, ""))


def _done(states: dict[str, int]) -> int:
    """Nodes that run the new version: Running (waiting for its numbers) or Healthy."""
    return states.get("Healthy", 0) + states.get("Running", 0)


def _percent(done: int, total: int) -> int:
    return 100 if total == 0 else done * 100 // total


# ---------------------------------------------------------------- apply


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
            a.uploaded = client.push_version(
                a.file, name=a.model, version=a.version, metadata=json.dumps(a.metadata)
            )

    reply = client.apply(_dump([_with_sha(d, by_index.get(i)) for i, d in enumerate(docs)]))
    results = reply["results"]
    for a in artifacts:
        result = results[a.index]
        result["artifact"] = _artifact_info(a, "uploaded" if a.uploaded else "alreadyRegistered")
        if a.uploaded and result.get("action") == "unchanged":
            result["action"] = "created"  # the upload of this very command created it
    return dict(reply)


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
                    f"bake {_duration(w.get('bake_s')):<6}  {clusters}{mix}"
                )
            )
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
    try:
        docs, sources = read_manifests(filename)
    except (ManifestError, OSError) as exc:
        raise _client_error(str(exc)) from exc
    client = ApiClient(api_url)
    try:
        reply = run_apply(client, docs, sources, dry_run=dry_run)
    except ApiError as exc:
        failure = _fail(exc)
        _explain_documents(exc, sources)
        raise failure from exc
    finally:
        client.close()
    if output is Output.table:
        console.print(_apply_view(reply))
    else:
        emit(reply, output)
    errors = [
        p for r in reply["results"] for p in r.get("problems", []) if p.get("severity") == "error"
    ]
    if dry_run and errors:
        raise typer.Exit(code=1)


# ---------------------------------------------------------------- get


def _collect(client: ApiClient, path: str, limit: int | None, **params: Any) -> list[Any]:
    """Every item of a paged list (or the first ``limit``)."""
    query = {k: v for k, v in params.items() if v is not None}
    items: list[Any] = []
    while limit is None or len(items) < limit:
        size = 1000 if limit is None else min(1000, limit - len(items))
        page = client.get(path, limit=size, offset=len(items), **query)
        items.extend(page["items"])
        if not page["items"] or len(items) >= page["total"]:
            break
    return items


def _listing(
    fetch: Callable[[ApiClient], list[Any]],
    output: Output,
    api_url: str | None,
    table: Callable[[list[Any]], Table],
) -> None:
    client = ApiClient(api_url)
    try:
        items = fetch(client)
    except ApiError as exc:
        raise _fail(exc) from exc
    finally:
        client.close()
    if output is Output.table and not items:
        err_console.print("No resources found.")
        return
    emit(items, output, table=table)


def _wave_label(r: dict[str, Any]) -> str:
    waves = int(r.get("waves") or 0)
    return f"{min(int(r.get('current_wave') or 0) + 1, waves) if waves else 0}/{waves}"


def _rollouts_table(items: list[dict[str, Any]]) -> Table:
    now = datetime.now(UTC)
    return _table(
        ["NAME", "PHASE", "MODEL", "VERSION", "WAVE", "AGE", "MESSAGE"],
        [
            [
                r["name"],
                _styled(r["phase"]),
                r["model"],
                r["version"],
                _wave_label(r),
                _age(r.get("created_at"), now=now),
                r.get("message") or "",
            ]
            for r in items
        ],
    )


def _nodes_table(items: list[dict[str, Any]]) -> Table:
    now = datetime.now(UTC)
    return _table(
        ["CLUSTER", "NAME", "HEALTH", "ARCH", "CPU", "MEMORY", "LAST-HEARTBEAT"],
        [
            [
                n["cluster"],
                n["name"],
                n["health"],
                n.get("architecture") or "",
                (n.get("allocatable") or {}).get("cpu", ""),
                (n.get("allocatable") or {}).get("memory", ""),
                _age(n.get("last_heartbeat_at"), now=now),
            ]
            for n in items
        ],
    )


def _clusters_table(items: list[dict[str, Any]]) -> Table:
    return _table(
        ["NAME", "DRIVER", "STATUS", "NODES", "GENERATION"],
        [
            [
                c["name"],
                c["driver"],
                c["status"],
                f"{sum((c.get('nodes') or {}).values())} ({_counts(c.get('nodes'))})"
                if c.get("nodes")
                else "0",
                c["generation"],
            ]
            for c in items
        ],
    )


def _models_table(items: list[dict[str, Any]]) -> Table:
    now = datetime.now(UTC)
    return _table(
        ["NAME", "VERSIONS", "LATEST", "AGE", "DESCRIPTION"],
        [
            [
                m["name"],
                m["version_count"],
                m.get("latest_version") or "",
                _age(m.get("created_at"), now=now),
                m.get("description") or "",
            ]
            for m in items
        ],
    )


LimitOpt = Annotated[
    int | None, typer.Option("--limit", min=1, help="At most this many (default: all).")
]


@get_app.command("rollouts")
def get_rollouts(
    limit: LimitOpt = None, output: OutputOpt = Output.table, api_url: ApiUrl = None
) -> None:
    """List rollouts: phase, model version, current wave of all waves."""
    _listing(lambda c: _collect(c, "/v1/rollouts", limit), output, api_url, _rollouts_table)


@get_app.command("nodes")
def get_nodes(
    cluster: Annotated[
        str | None, typer.Option("--cluster", "-c", help="Only this cluster.")
    ] = None,
    limit: LimitOpt = None,
    output: OutputOpt = Output.table,
    api_url: ApiUrl = None,
) -> None:
    """List the fleet's nodes: health, architecture, allocatable resources, heartbeat."""
    _listing(
        lambda c: _collect(c, "/v1/nodes", limit, cluster=cluster), output, api_url, _nodes_table
    )


@get_app.command("clusters")
def get_clusters(output: OutputOpt = Output.table, api_url: ApiUrl = None) -> None:
    """List clusters: driver, status, nodes by health."""
    _listing(lambda c: list(c.get("/v1/clusters")), output, api_url, _clusters_table)


@get_app.command("models")
def get_models(
    limit: LimitOpt = None, output: OutputOpt = Output.table, api_url: ApiUrl = None
) -> None:
    """List registered models."""
    _listing(lambda c: _collect(c, "/v1/models", limit), output, api_url, _models_table)


# Singular forms, as kubectl accepts them.
get_app.command("rollout", hidden=True)(get_rollouts)
get_app.command("node", hidden=True)(get_nodes)
get_app.command("cluster", hidden=True)(get_clusters)
get_app.command("model", hidden=True)(get_models)


# ---------------------------------------------------------------- describe


def _selector(sel: dict[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in (sel.get("matchLabels") or {}).items()]
    for req in sel.get("matchExpressions") or []:
        values = ",".join(req.get("values") or [])
        parts.append(f"{req['key']} {req['operator']}" + (f" ({values})" if values else ""))
    if sel.get("clusters"):
        parts.append(f"clusters in ({', '.join(sel['clusters'])})")
    return ", ".join(parts) or "<all nodes>"


def _strategy(strategy: dict[str, Any]) -> str:
    steps = []
    for step in strategy.get("steps") or []:
        size = f"{step['percent']}%" if "percent" in step else f"{step.get('nodes')} node(s)"
        bake = step.get("bake", "0s")
        steps.append(size if bake in ("0s", "0", "") else f"{size} (bake {bake})")
    limits = ", ".join(
        f"{k} {strategy[k]}"
        for k in ("maxUnavailable", "maxDeferred", "progressDeadline")
        if k in strategy
    )
    return " -> ".join(steps) + (f"; {limits}" if limits else "")


def _describe_view(d: dict[str, Any]) -> Group:
    spec = d.get("spec") or {}
    total = sum((d.get("states") or {}).values())
    fields: list[tuple[str, str | Text]] = [
        ("Name", d["name"]),
        ("Generation", str(d["generation"])),
        ("Phase", _styled(d["phase"])),
        ("Message", d.get("message") or ""),
        ("Model", f"{d['model']}:{d['version']}"),
        ("Selector", _selector(spec.get("selector") or {})),
        ("Strategy", _strategy(spec.get("strategy") or {})),
        ("Gates", " ".join(f"{k}={v}" for k, v in (spec.get("gates") or {}).items())),
        ("On failure", str(spec.get("onFailure", "rollback"))),
        ("Created", _when(d.get("created_at"))),
        ("Started", _when(d.get("started_at"))),
        ("Finished", _when(d.get("finished_at"))),
        ("Wave", _wave_label(d)),
        ("Nodes", f"{total} ({_counts(d.get('states'))})" if total else "0"),
    ]
    versions = d.get("versions") or {}
    if len(versions) > 1 or spec.get("model", {}).get("variants"):
        fields.insert(5, ("Variants", _counts(versions)))
    parts: list[RenderableType] = []
    for key, value in fields:
        line = Text(f"{key + ':':<13} ")
        line.append(value if isinstance(value, Text) else Text(value))
        parts.append(line)
    parts.append(Text("Waves:"))
    waves = _table(
        ["WAVE", "PHASE", "NODES", "DONE", "BAKE", "STATES", "STARTED", "BAKED", "FINISHED"],
        [
            [
                w["index"],
                _styled(w["phase"]),
                w["nodes"],
                f"{_percent(_done(w.get('states') or {}), w['nodes'])}%",
                _duration(w.get("bake_s")),
                _counts(w.get("states")),
                _age(w.get("started_at")) if w.get("started_at") else "",
                _age(w.get("baked_at")) if w.get("baked_at") else "",
                _age(w.get("finished_at")) if w.get("finished_at") else "",
            ]
            for w in d.get("wave_detail") or []
        ],
    )
    parts.append(Padding(waves, (0, 0, 0, 2), expand=False))
    parts.append(Text("Events:"))
    events = d.get("events") or []
    if events:
        parts.append(
            Padding(
                _table(
                    ["AGE", "TIME", "REASON", "BY", "MESSAGE"],
                    [
                        [
                            _age(e["time"]),
                            str(e["time"])[:19],
                            e["reason"],
                            e.get("actor") or "controller",
                            e["message"],
                        ]
                        for e in events
                    ],
                ),
                (0, 0, 0, 2),
                expand=False,
            )
        )
    else:
        parts.append(Text("  <none>"))
    return Group(*parts)


@describe_app.command("rollout")
def describe_rollout(
    name: Annotated[str, typer.Argument(help="Rollout name.")],
    events: Annotated[int, typer.Option("--events", min=1, max=1000, help="Last N events.")] = 10,
    output: OutputOpt = Output.table,
    api_url: ApiUrl = None,
) -> None:
    """Describe a rollout: phase, spec summary, waves with node state counts, events."""
    client = ApiClient(api_url)
    try:
        detail = client.get(f"/v1/rollouts/{name}")
        if events != 10:
            detail["events"] = client.get(f"/v1/rollouts/{name}/events", limit=events)
    except ApiError as exc:
        raise _fail(exc) from exc
    finally:
        client.close()
    if output is Output.table:
        console.print(_describe_view(detail))
    else:
        emit(detail, output)


describe_app.command("rollouts", hidden=True)(describe_rollout)


# ---------------------------------------------------------------- rollout status


def _progress(d: dict[str, Any]) -> tuple[int, int]:
    waves = d.get("wave_detail") or []
    done = sum(_done(w.get("states") or {}) for w in waves)
    return done, sum(int(w["nodes"]) for w in waves)


def _status_line(d: dict[str, Any]) -> str:
    done, total = _progress(d)
    return (
        f"rollout {d['name']}: {d['phase']}, wave {_wave_label(d)}, "
        f"{done}/{total} node(s) ({_percent(done, total)}%)"
        + (f": {d['message']}" if d.get("message") else "")
    )


def _status_view(d: dict[str, Any]) -> Group:
    head = Text("rollout ")
    head.append(d["name"], style="bold")
    head.append(f" (generation {d['generation']}, {d['model']}:{d['version']}): ")
    head.append(d["phase"], style=PHASE_STYLE.get(d["phase"], ""))
    rows: list[list[Any]] = []
    for w in d.get("wave_detail") or []:
        nodes, done = int(w["nodes"]), _done(w.get("states") or {})
        rows.append(
            [
                f"wave {w['index']}",
                _styled(w["phase"]),
                ProgressBar(total=max(nodes, 1), completed=done if nodes else 1, width=30),
                f"{_percent(done, nodes):>3}%",
                f"{done}/{nodes}",
                _duration(w.get("bake_s")),
                _counts(w.get("states")),
            ]
        )
    done, total = _progress(d)
    rows.append(
        [
            "total",
            _styled(d["phase"]),
            ProgressBar(total=max(total, 1), completed=done if total else 1, width=30),
            f"{_percent(done, total):>3}%",
            f"{done}/{total}",
            "",
            _counts(d.get("states")),
        ]
    )
    table = Table(show_edge=False, box=None, header_style="bold", pad_edge=False)
    for col in ("WAVE", "PHASE", "PROGRESS", "", "NODES", "BAKE", "STATES"):
        table.add_column(col)
    for row in rows:
        table.add_row(*(v if not isinstance(v, str) else Text(v) for v in row))
    parts: list[RenderableType] = [head, table]
    if d.get("message"):
        parts.append(Text(f"message: {d['message']}"))
    return Group(*parts)


@rollout_app.command("status")
def rollout_status(
    name: Annotated[str, typer.Argument(help="Rollout name.")],
    watch: Annotated[
        bool,
        typer.Option(
            "--watch", "-w", help="Refresh until the rollout ends or pauses; exit 0 if Succeeded."
        ),
    ] = False,
    interval: Annotated[float, typer.Option(min=0.05, help="Seconds between refreshes.")] = 1.0,
    timeout: Annotated[
        float | None, typer.Option(min=0, help="With --watch: give up after this many seconds.")
    ] = None,
    output: OutputOpt = Output.table,
    api_url: ApiUrl = None,
) -> None:
    """Per-wave progress (Running + Healthy nodes of each wave) and the phase.

    With --watch, refreshes until the phase is Succeeded, RolledBack, Aborted, Failed or
    Paused; exits 0 only for Succeeded (1 otherwise, and on --timeout)."""
    client = ApiClient(api_url)
    path = f"/v1/rollouts/{name}"
    timed_out = False
    try:
        detail = client.get(path)
        if watch:
            deadline = None if timeout is None else time.monotonic() + timeout

            def step() -> bool:
                """Wait, refresh; False when the watch is over."""
                nonlocal detail, timed_out
                if detail["phase"] in WATCH_STOP_PHASES:
                    return False
                if deadline is not None and time.monotonic() >= deadline:
                    timed_out = True
                    return False
                pause = interval if deadline is None else min(interval, deadline - time.monotonic())
                time.sleep(max(0.0, pause))
                detail = client.get(path)
                return True

            if output is not Output.table:
                while step():
                    pass
            elif console.is_terminal:
                with Live(_status_view(detail), console=console, refresh_per_second=4) as live:
                    while step():
                        live.update(_status_view(detail))
            else:  # a log: one line per change, then the final picture
                last = _status_line(detail)
                console.print(Text(last))
                while step():
                    line = _status_line(detail)
                    if line != last:
                        console.print(Text(line))
                        last = line
    except ApiError as exc:
        raise _fail(exc) from exc
    finally:
        client.close()
    if output is Output.table:
        if not (watch and console.is_terminal):
            console.print(_status_view(detail))
    else:
        emit(detail, output)
    if timed_out:
        err_console.print(
            Text(f"timed out after {timeout:g} s: rollout {name} is still {detail['phase']}")
        )
        raise typer.Exit(code=1)
    if watch and detail["phase"] != "Succeeded":
        raise typer.Exit(code=1)


# ---------------------------------------------------------------- rollout commands

COMMANDS = {
    "pause": "Pause a rollout: the reconciler leaves it alone until resume.",
    "resume": "Resume a paused rollout.",
    "abort": "Abort an active rollout: touched nodes return to their previous version.",
    "undo": "Undo a Succeeded rollout: its nodes return to their previous version.",
    "retry": "Retry a Failed, RolledBack or Aborted rollout from its first wave.",
}


def _command(action: str) -> Callable[..., None]:
    def run(
        name: Annotated[str, typer.Argument(help="Rollout name.")],
        output: OutputOpt = Output.table,
        api_url: ApiUrl = None,
    ) -> None:
        client = ApiClient(api_url)
        try:
            detail = client.post(f"/v1/rollouts/{name}/{action}")
        except ApiError as exc:
            raise _fail(exc) from exc
        finally:
            client.close()
        emit(detail, output, table=lambda d: f"rollout {d['name']} {d['phase']}")

    run.__name__ = f"rollout_{action}"
    return run


for _action, _help in COMMANDS.items():
    rollout_app.command(_action, help=_help)(_command(_action))
