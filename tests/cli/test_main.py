from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import Connection
from typer.testing import CliRunner

from controller.api.app import create_app
from controller.cli.client import ApiClient
from controller.cli.main import app
from controller.registry import samples
from controller.registry.tflite_builder import build_tflite_mlp
from controller.settings import Settings
from tests.conftest import bearer
from tests.live import free_port, serve
from tests.rollouts.helpers import apply, cluster_doc

runner = CliRunner()


@pytest.fixture
def api_url(settings: Settings, connection: Connection, redis_available: None) -> Iterator[str]:
    with serve(create_app(settings)) as url:
        yield url


def cli(api_url: str, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, [*args], env={"EDGEFLEET_API_URL": api_url, "COLUMNS": "200"})
    return result.exit_code, result.output


def test_push_list_describe(api_url: str, tmp_path: Path) -> None:
    model = tmp_path / "cnn.onnx"
    model.write_bytes(samples.build_cnn())
    code, out = cli(api_url, "models", "push", str(model), "--name", "cam", "--version", "1.0.0")
    assert code == 0, out
    assert "Status:      Ready" in out
    assert "image: float32 [batch, 3, 32, 32]" in out
    assert "Benchmark:   p50" in out

    tfl = tmp_path / "mlp.bin"
    tfl.write_bytes(build_tflite_mlp())
    code, out = cli(api_url, "models", "push", str(tfl), "-n", "sensor", "-v", "2", "-o", "json")
    assert code == 0, out
    assert json.loads(out)["format"] == "tflite"

    code, out = cli(api_url, "models", "list", "-o", "yaml")
    assert code == 0, out
    assert [m["name"] for m in yaml.safe_load(out)] == ["cam", "sensor"]

    code, out = cli(api_url, "models", "list")
    assert "cam" in out
    assert "sensor" in out
    assert "LATEST" in out

    code, out = cli(api_url, "models", "describe", "cam")
    assert code == 0
    assert "1.0.0" in out
    assert "Ready" in out

    code, out = cli(api_url, "models", "describe", "cam", "1.0.0", "-o", "json")
    assert json.loads(out)["signature"]["inputs"][0]["name"] == "image"


def test_push_streams_the_file_as_it_sends_it(api_url: str, tmp_path: Path) -> None:
    """The upload is read in chunks while it is sent, never whole into memory first:
    what the progress bar counts is the upload itself."""
    model = tmp_path / "heavy.onnx"
    model.write_bytes(samples.build_cnn(seed=2, channels=48, size=96))
    size = model.stat().st_size
    chunks: list[int] = []
    client = ApiClient(api_url)
    try:
        pushed = client.push_version(
            model, name="heavy", version="1", metadata=None, progress=chunks.append
        )
    finally:
        client.close()
    assert pushed["size_bytes"] == size
    assert sum(chunks) == size
    assert max(chunks) <= 64 * 1024
    assert len([c for c in chunks if c]) >= size // (64 * 1024)


def test_push_off_a_terminal_draws_no_progress(api_url: str, tmp_path: Path) -> None:
    model = tmp_path / "heavy.onnx"
    model.write_bytes(samples.build_cnn(seed=2, channels=48, size=96))
    code, out = cli(api_url, "models", "push", str(model), "-n", "heavy", "-v", "1", "-o", "json")
    assert code == 0, out
    assert json.loads(out)["status"] == "Ready"  # the answer alone: no bar, no spinner
    assert "\r" not in out
    assert "uploading" not in out


def test_push_on_a_terminal_shows_the_upload(api_url: str, tmp_path: Path) -> None:
    model = tmp_path / "heavy.onnx"
    model.write_bytes(samples.build_cnn(seed=2, channels=48, size=96))
    terminal, tty = pty.openpty()
    command = ("models", "push", str(model), "-n", "heavy", "-v", "1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "controller.cli.main", *command],
        env=os.environ | {"EDGEFLEET_API_URL": api_url, "COLUMNS": "120"},
        stdin=subprocess.DEVNULL,
        stdout=tty,
        stderr=tty,
    )
    os.close(tty)
    shown = bytearray()
    try:
        while True:
            try:
                chunk = os.read(terminal, 65536)
            except OSError:  # EIO: the command ended and closed its terminal
                break
            if not chunk:
                break
            shown.extend(chunk)
        assert proc.wait(60) == 0, shown.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(terminal)
    text = shown.decode(errors="replace")
    assert "uploading heavy.onnx" in text
    assert "Status:      Ready" in text


def test_errors_are_explained(api_url: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model at all" * 10)
    code, out = cli(api_url, "models", "push", str(bad), "--name", "cam", "--version", "1")
    assert code == 1
    assert "validation_error (422)" in out
    assert "body.file:" in out

    code, out = cli(api_url, "models", "describe", "ghost")
    assert code == 1
    assert "not_found (404): model 'ghost' not found" in out

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(samples.build_failing_model())
    code, out = cli(api_url, "models", "push", str(broken), "--name", "broken", "--version", "1")
    assert code == 1  # pushed, but the runtime refused it
    assert "Status:      Invalid" in out


def test_unreachable_controller() -> None:
    code, out = cli(f"http://127.0.0.1:{free_port()}", "models", "list")
    assert code == 1
    assert "cannot reach the controller" in out


def test_push_with_parent_compares_a_tflite_variant(api_url: str, tmp_path: Path) -> None:
    """A smaller TFLite build pushed with --parent: its comparison report, run in
    LiteRT, is in its description."""
    full, lite = tmp_path / "full.tflite", tmp_path / "lite.tflite"
    full.write_bytes(build_tflite_mlp(hidden=64))
    lite.write_bytes(build_tflite_mlp(hidden=16))
    code, out = cli(api_url, "models", "push", str(full), "-n", "sensor", "-v", "1")
    assert code == 0, out
    code, out = cli(
        api_url, "models", "push", str(lite), "-n", "sensor", "-v", "1-lite", "--parent", "1"
    )
    assert code == 0, out
    assert "Variant of:  1 (pushed {})" in out
    code, out = cli(api_url, "models", "describe", "sensor", "1-lite", "-o", "json")
    report = json.loads(out)["lineage"]["report"]
    assert report["size_ratio"] == round(lite.stat().st_size / full.stat().st_size, 4) < 1
    assert report["top1_agreement"] is not None  # a softmax output: agreement counted
    code, out = cli(
        api_url, "models", "push", str(lite), "-n", "sensor", "-v", "2", "--parent", "9"
    )
    assert code == 1
    assert "body.parent" in out


def test_optimize_prints_the_comparison(api_url: str, tmp_path: Path) -> None:
    model = tmp_path / "cnn.onnx"
    model.write_bytes(samples.build_cnn(channels=32))
    code, out = cli(api_url, "models", "push", str(model), "--name", "cam", "--version", "1")
    assert code == 0, out
    code, out = cli(
        api_url,
        "models",
        "optimize",
        "cam",
        "1",
        "--method",
        "prune",
        "--as",
        "1-sparse",
        "--params",
        '{"sparsity": 0.5}',
    )
    assert code == 0, out
    assert "cam 1 -> 1-sparse (prune): Succeeded" in out
    assert "agreement   top-1" in out
    assert "memory      model peak x" in out
    assert "note: no sample inputs uploaded" in out
    # Unstructured sparsity keeps the weights dense on disk: nothing gained, and said so.
    assert "  verdict     not recommended: it is no smaller than its parent (size x1.0)" in out
    code, out = cli(api_url, "models", "describe", "cam", "1-sparse")
    assert code == 0, out
    assert "Variant of:  1 (prune {'sparsity': 0.5})" in out
    assert "top-1 agreement" in out
    code, out = cli(api_url, "models", "optimize", "cam", "1", "--method", "int4", "--as", "x")
    assert code == 1
    assert "body.method" in out


def test_benchmark_requests_and_lists(
    api_url: str, tmp_path: Path, sim_fleet: None, join_token: str
) -> None:
    with httpx.Client(base_url=api_url, headers=bearer("admin")) as http:
        assert apply(http, cluster_doc("lab", 2)).status_code == 200
        for node in ("lab-n0", "lab-n1"):
            body = {"cluster": "lab", "node": node, "join_token": join_token}
            assert http.post("/v1/agents/enroll", json=body).status_code == 200
    model = tmp_path / "cnn.onnx"
    model.write_bytes(samples.build_cnn())
    code, out = cli(api_url, "models", "push", str(model), "--name", "cam", "--version", "1")
    assert code == 0, out
    code, out = cli(api_url, "models", "benchmark", "cam", "1", "-l", "tier=retail", "--runs", "9")
    assert code == 0, out
    assert "NODE CLASS" in out
    assert "Pending" in out
    code, out = cli(api_url, "models", "benchmark", "cam", "1", "--list", "-o", "json")
    assert code == 0, out
    (row,) = json.loads(out)
    assert (row["status"], row["runs"]) == ("Pending", 9)
    code, out = cli(api_url, "models", "benchmark", "cam", "1", "-l", "tier")
    assert code == 2
    assert "expected key=value" in out
    code, out = cli(api_url, "models", "benchmark", "cam", "1", "-l", "tier=none")
    assert code == 1
    assert "body.selector" in out


def test_a_pull_clusters_join_token_is_printed_once_and_enrols_it(api_url: str) -> None:
    with httpx.Client(base_url=api_url, headers=bearer("admin")) as http:
        doc = {
            "apiVersion": "edgefleet.io/v1",
            "kind": "Cluster",
            "metadata": {"name": "shop"},
            "spec": {"driver": "kubernetes", "mode": "pull"},
        }
        assert apply(http, doc).status_code == 200
        code, out = cli(api_url, "clusters", "join-token", "shop", "--expires", "2h")
        assert code == 0, out
        token = out.strip().splitlines()[-1]
        assert token.startswith("efj_")
        assert "single use" in out
        enrol = {"join_token": token}
        resp = http.post("/v1/clusters/shop/pull/enroll", json=enrol, headers={"Authorization": ""})
        assert resp.status_code == 200, resp.text
        code, out = cli(api_url, "clusters", "reset", "shop")
        assert code == 0, out
        assert "issue a join token" in out
        resp = http.post("/v1/clusters/shop/pull/enroll", json=enrol, headers={"Authorization": ""})
        assert resp.status_code == 401  # used up
    code, out = cli(api_url, "clusters", "join-token", "shop", "--expires", "9d")
    assert code != 0
    assert "expires" in out
