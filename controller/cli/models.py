"""``edgefleet models``: push, list, describe, optimize and benchmark model versions."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from controller.cli.client import ApiClient, ApiError
from controller.cli.errors import fail
from controller.cli.format import human_bytes, make_table
from controller.cli.options import ApiUrl, OutputOpt
from controller.cli.output import Output, emit, err_console, upload_progress, waiting

models_app = typer.Typer(help="Model registry: push, list and describe model versions.")


def _versions_table(items: list[dict[str, Any]]) -> Any:
    return make_table(
        ["VERSION", "FORMAT", "STATUS", "SIZE", "P50 MS", "P95 MS", "SHA256", "CREATED"],
        [
            [
                v["version"],
                v["format"],
                v["status"],
                human_bytes(v["size_bytes"]),
                (v.get("benchmark") or {}).get("p50_ms"),
                (v.get("benchmark") or {}).get("p95_ms"),
                v["sha256"][:12],
                v["created_at"][:19],
            ]
            for v in items
        ],
    )


def _shape(shape: list[Any] | None) -> str:
    if shape is None:
        return "?"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _version_text(v: dict[str, Any]) -> str:
    sig = v.get("signature") or {}
    lines = [
        f"Model:       {v['model']}",
        f"Version:     {v['version']}",
        f"Format:      {v['format']}",
        f"Status:      {v['status']}"
        + (f"  ({v['status_message']})" if v["status_message"] else ""),
        f"Size:        {human_bytes(v['size_bytes'])} ({v['size_bytes']} bytes)",
        f"SHA256:      {v['sha256']}",
        f"Artifact:    {v['artifact_url']}",
        f"Created:     {v['created_at']}",
    ]
    if "opset" in sig:
        lines.append("Opset:       " + ", ".join(f"{k} {n}" for k, n in sig["opset"].items()))
    if "schema_version" in sig:
        lines.append(f"Schema:      TFLite v{sig['schema_version']}")
    if sig.get("parameter_count") is not None:
        lines.append(f"Parameters:  {sig['parameter_count']:,}")
    lines.append("Inputs:")
    lines += [f"  {t['name']}: {t['dtype']} {_shape(t['shape'])}" for t in sig.get("inputs", [])]
    lines.append("Outputs:")
    lines += [f"  {t['name']}: {t['dtype']} {_shape(t['shape'])}" for t in sig.get("outputs", [])]
    lineage = v.get("lineage")
    if lineage:
        lines.append(f"Variant of:  {lineage['parent']} ({lineage['method']} {lineage['params']})")
        report = lineage.get("report") or {}
        if report:
            lines.append(
                f"  compared:  size x{report['size_ratio']}, "
                f"p50 x{report['latency_ratio']['p50']}, "
                f"top-1 agreement {report['top1_agreement']}, "
                f"max abs error {report['max_abs_error']} on {report['samples']} sample(s)"
            )
    val = v.get("validation")
    if val:
        verdict = "passed" if val.get("passed") else f"FAILED: {val.get('error')}"
        lines.append(f"Validation:  {verdict}")
        if val.get("runtime"):
            lines.append(f"  runtime:   {val['runtime']}")
        if val.get("input_shapes"):
            lines.append(f"  inputs:    {val['input_shapes']}")
    bench = v.get("benchmark")
    if bench:
        lines.append(
            f"Benchmark:   p50 {bench['p50_ms']} ms, p95 {bench['p95_ms']} ms, "
            f"p99 {bench['p99_ms']} ms over {bench['runs']} runs, {bench['threads']} thread(s)"
        )
        lines.append(
            f"  memory:    model peak {human_bytes(bench['model_peak_bytes'])}, "
            f"process peak {human_bytes(bench['peak_rss_bytes'])}"
        )
        lines.append(f"  machine:   {bench.get('machine')} {bench.get('cpu')}")
    return "\n".join(lines)


def _read_metadata(metadata: str | None) -> str | None:
    if metadata and metadata.startswith("@"):
        return Path(metadata[1:]).read_text()
    return metadata


@models_app.command("push")
def models_push(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    name: Annotated[str, typer.Option("--name", "-n", help="Model name (DNS label).")],
    model_version: Annotated[str, typer.Option("--version", "-v", help="Immutable version.")],
    metadata: Annotated[
        str | None,
        typer.Option(help="JSON object, or @FILE: labels, description, validation hints."),
    ] = None,
    parent: Annotated[
        str | None,
        typer.Option(
            help="A version of this model the file is a variant of (same format and inputs, "
            "e.g. an int8 .tflite of an fp32 one): linked, and compared with it."
        ),
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait until validation and benchmark finish.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 600.0,
    output: OutputOpt = Output.table,
    api_url: ApiUrl = None,
) -> None:
    """Push a model artifact (ONNX or TFLite) as a new immutable version."""
    client = ApiClient(api_url)
    try:
        with upload_progress(file) as progress:
            result = client.push_version(
                file,
                name=name,
                version=model_version,
                metadata=_read_metadata(metadata),
                parent=parent,
                progress=progress,
            )
        path = f"/v1/models/{name}/versions/{model_version}"
        deadline = time.monotonic() + timeout
        with waiting(f"{name} {model_version}") as seen:
            while wait and result["status"] in ("Pending", "Validating"):
                seen(result["status"])
                if time.monotonic() > deadline:
                    err_console.print(f"still {result['status']} after {timeout:g} s")
                    raise typer.Exit(code=2)
                time.sleep(0.5)
                result = client.get(path)
    except ApiError as exc:
        raise fail(exc) from exc
    finally:
        client.close()
    emit(result, output, table=_version_text)
    if result["status"] == "Invalid":
        raise typer.Exit(code=1)


@models_app.command("list")
def models_list(output: OutputOpt = Output.table, api_url: ApiUrl = None) -> None:
    """List registered models."""
    client = ApiClient(api_url)
    try:
        page = client.get("/v1/models", limit=1000)
    except ApiError as exc:
        raise fail(exc) from exc
    finally:
        client.close()
    emit(
        page["items"],
        output,
        table=lambda items: make_table(
            ["NAME", "VERSIONS", "LATEST", "CREATED"],
            [
                [m["name"], m["version_count"], m["latest_version"], m["created_at"][:19]]
                for m in items
            ],
        ),
    )


@models_app.command("describe")
def models_describe(
    name: str,
    model_version: Annotated[str | None, typer.Argument(metavar="[VERSION]")] = None,
    output: OutputOpt = Output.table,
    api_url: ApiUrl = None,
) -> None:
    """Describe a model (its versions) or one version (signature, validation, benchmark)."""
    client = ApiClient(api_url)
    try:
        if model_version is not None:
            result = client.get(f"/v1/models/{name}/versions/{model_version}")
            emit(result, output, table=_version_text)
            return
        model = client.get(f"/v1/models/{name}")
        versions = client.get(f"/v1/models/{name}/versions", limit=1000)["items"]
    except ApiError as exc:
        raise fail(exc) from exc
    finally:
        client.close()
    emit({**model, "versions": versions}, output, table=lambda d: _versions_table(d["versions"]))


@models_app.command("optimize")
def models_optimize(
    name: str,
    model_version: Annotated[str, typer.Argument(metavar="VERSION", help="The parent version.")],
    method: Annotated[str, typer.Option(help="dynamic-int8, static-int8, fp16 or prune.")],
    new_version: Annotated[str, typer.Option("--as", help="Version of the variant.")],
    params: Annotated[str | None, typer.Option(help="JSON, e.g. '{\"sparsity\": 0.5}'.")] = None,
    samples: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help=".npz of sample inputs (calibration)."),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the job.")] = 900.0,
    output: OutputOpt = Output.table,
    api_url: ApiUrl = None,
) -> None:
    """Derive an optimized variant and print its comparison report."""
    client = ApiClient(api_url)
    try:
        data = {"method": method, "version": new_version}
        if params:
            data["params"] = params
        files = {"calibration": (samples.name, samples.read_bytes())} if samples else None
        job = client.request(
            "POST", f"/v1/models/{name}/versions/{model_version}/variants", data=data, files=files
        )
        deadline = time.monotonic() + timeout
        with waiting(f"{method} of {name} {model_version}") as seen:
            while job["status"] in ("Pending", "Running"):
                seen(job["status"])
                if time.monotonic() > deadline:
                    err_console.print(f"optimization still {job['status']} after {timeout:g} s")
                    raise typer.Exit(code=2)
                time.sleep(0.5)
                job = client.get(f"/v1/models/{name}/optimizations/{job['id']}")
    except ApiError as exc:
        raise fail(exc) from exc
    finally:
        client.close()
    emit(job, output, table=_optimization_text)
    if job["status"] != "Succeeded":
        raise typer.Exit(code=1)


def _optimization_text(job: dict[str, Any]) -> str:
    head = f"{job['model']} {job['parent']} -> {job['version']} ({job['method']}): {job['status']}"
    if job["status"] != "Succeeded":
        return f"{head}\n  {job.get('message') or ''}"
    r = job["report"]
    lines = [
        head,
        f"  size        x{r['size_ratio']} ({r['size_bytes']['original']} -> "
        f"{r['size_bytes']['variant']} bytes), compressed x{r['compressed_size_ratio']}",
        f"  latency     p50 x{r['latency_ratio']['p50']}, p95 x{r['latency_ratio']['p95']}",
    ]
    memory = r.get("peak_memory")
    if memory:
        lines.append(
            f"  memory      model peak x{memory['model_peak_ratio']} "
            f"({human_bytes(memory['original']['model_peak_bytes'])} -> "
            f"{human_bytes(memory['variant']['model_peak_bytes'])}; process peak "
            f"{human_bytes(memory['original']['peak_rss_bytes'])} -> "
            f"{human_bytes(memory['variant']['peak_rss_bytes'])})"
        )
    lines += [
        f"  agreement   top-1 {r['top1_agreement']}, max abs error {r['max_abs_error']}, "
        f"allclose {r['allclose']} "
        f"(rtol {r['tolerances']['rtol']}, atol {r['tolerances']['atol']})",
    ]
    lines += [
        f"  {o}: max {v['max_abs_error']}, mean {v['mean_abs_error']}"
        for o, v in r["outputs"].items()
    ]
    lines += [f"  note: {w}" for w in r.get("warnings", [])]
    verdict = r.get("verdict")
    if verdict:
        lines.append(
            "  verdict     recommended"
            if verdict.get("recommended")
            else "  verdict     not recommended: " + "; ".join(verdict.get("reasons") or [])
        )
    return "\n".join(lines)


@models_app.command("benchmark")
def models_benchmark(
    name: str,
    model_version: Annotated[str, typer.Argument(metavar="VERSION")],
    selector: Annotated[
        list[str] | None,
        typer.Option("--selector", "-l", help="Only nodes with this label (key=value)."),
    ] = None,
    runs: Annotated[int, typer.Option(help="Timed inferences per benchmark.")] = 50,
    wait: Annotated[
        float, typer.Option(help="Seconds to wait for the results (0: do not wait).")
    ] = 0.0,
    list_only: Annotated[
        bool, typer.Option("--list", help="Show the stored benchmarks, request nothing.")
    ] = False,
    output: OutputOpt = Output.table,
    api_url: ApiUrl = None,
) -> None:
    """Measure a version on the nodes themselves: one enrolled node of each node class
    runs it (node agent, child process) and reports p50/p95/p99 and peak memory."""
    labels: dict[str, str] = {}
    for item in selector or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            err_console.print(f"[red]error:[/red] --selector {item!r}: expected key=value")
            raise typer.Exit(code=2)
        labels[key] = value
    path = f"/v1/models/{name}/versions/{model_version}/benchmarks"
    client = ApiClient(api_url)
    try:
        if list_only:
            rows = client.get(path)
        else:
            body = {"runs": runs, "selector": {"matchLabels": labels}}
            rows = client.post(path, json=body)
            deadline = time.monotonic() + wait
            with waiting(f"benchmarks of {name} {model_version}") as seen:
                while any(r["status"] in ("Pending", "Running") for r in rows):
                    done = sum(r["status"] not in ("Pending", "Running") for r in rows)
                    seen(f"{done} of {len(rows)} node class(es) done")
                    if time.monotonic() >= deadline:
                        break
                    time.sleep(1.0)
                    rows = client.get(path)
    except ApiError as exc:
        raise fail(exc) from exc
    finally:
        client.close()
    emit(rows, output, table=_benchmarks_table)


def _benchmarks_table(rows: list[dict[str, Any]]) -> Any:
    return make_table(
        ["NODE CLASS", "NODE", "STATUS", "P50 MS", "P95 MS", "PEAK", "NOTE"],
        [
            [
                r["node_class"],
                r["node"],
                r["status"],
                (r.get("result") or {}).get("p50_ms", ""),
                (r.get("result") or {}).get("p95_ms", ""),
                human_bytes((r.get("result") or {}).get("peak_rss_bytes")),
                r.get("message") or "",
            ]
            for r in rows
        ],
    )
