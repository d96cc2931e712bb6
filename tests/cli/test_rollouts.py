"""The rollout engine's CLI (apply, get, describe, rollout ...) against a real server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import Connection
from typer.testing import CliRunner, Result

from controller.api.app import create_app
from controller.cli.main import app
from controller.manifests.builders import model_version
from controller.registry import samples
from controller.settings import Settings
from tests.live import serve
from tests.rollouts.helpers import cluster_doc, drive, rollout_doc

runner = CliRunner()

STEPS: list[dict[str, Any]] = [
    {"nodes": 1, "bake": "0s"},
    {"percent": 50, "bake": "0s"},
    {"percent": 100},
]


@pytest.fixture
def api_url(
    settings: Settings, connection: Connection, redis_available: None, sim_fleet: None
) -> Iterator[str]:
    with serve(create_app(settings)) as url:
        yield url


def cli(api_url: str, *args: str, stdin: str | None = None) -> Result:
    return runner.invoke(
        app, list(args), input=stdin, env={"EDGEFLEET_API_URL": api_url, "COLUMNS": "250"}
    )


def data(api_url: str, *args: str) -> Any:
    """A command's -o json answer."""
    result = cli(api_url, *args, "-o", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def model_doc(version: str, path: str, **spec: Any) -> dict[str, Any]:
    return model_version(
        version, {"path": path}, labels={"team": "vision"}, description="object detector", **spec
    )


def rollout(name: str, *, bake: str = "0s", **spec: Any) -> dict[str, Any]:
    steps = [dict(s) for s in STEPS]
    steps[1]["bake"] = bake
    spec.setdefault("strategy", {"steps": steps, "maxUnavailable": "50%"})
    return rollout_doc(name, "1.0.0", **spec)


def write_manifests(root: Path, *rollouts: dict[str, Any]) -> Path:
    """A manifest directory: two simulated sites of 3 nodes, detector 1.0.0 as a local
    ONNX file (a relative artifact.path), the rollouts, and a file that is no manifest.
    Document numbers: clusters 0 and 1, the model version 2, rollouts from 3."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    (root / "models" / "detector.onnx").write_bytes(samples.build_cnn())
    (root / "10-clusters.yaml").write_text(
        yaml.safe_dump_all([cluster_doc("berlin", 3), cluster_doc("paris", 3)], sort_keys=False)
    )
    (root / "20-model.yml").write_text(
        yaml.safe_dump(model_doc("1.0.0", "models/detector.onnx"), sort_keys=False)
    )
    (root / "30-rollouts.yaml").write_text(yaml.safe_dump_all(list(rollouts), sort_keys=False))
    (root / "notes.txt").write_text("kind: Rollout\nnot a manifest: the suffix is not yaml\n")
    return root


def test_apply_directory_then_get_describe_status(
    api_url: str, tmp_path: Path, settings: Settings
) -> None:
    manifests = write_manifests(tmp_path / "fleet", rollout("detector-1"))
    result = cli(api_url, "apply", "-f", str(manifests))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "cluster.edgefleet.io/berlin created"
    assert lines[1] == "cluster.edgefleet.io/paris created"
    assert lines[2].startswith("modelversion.edgefleet.io/detector:1.0.0 created (uploaded ")
    assert "models/detector.onnx: 6.6 KiB, sha256:" in lines[2]
    assert lines[2].endswith(", status Pending)")  # validation is queued after the push
    assert lines[3] == "rollout.edgefleet.io/detector-1 created"
    assert len(lines) == 4  # notes.txt is not read

    result = cli(api_url, "apply", "-f", str(manifests))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "cluster.edgefleet.io/berlin unchanged",
        "cluster.edgefleet.io/paris unchanged",
        "modelversion.edgefleet.io/detector:1.0.0 unchanged",
        "rollout.edgefleet.io/detector-1 unchanged",
    ]
    version = data(api_url, "models", "describe", "detector", "1.0.0")
    assert version["status"] == "Ready"  # tasks run eagerly in tests
    assert version["metadata"]["labels"] == {"team": "vision"}
    assert version["metadata"]["description"] == "object detector"

    # get: tables, json, yaml
    result = cli(api_url, "get", "rollouts")
    assert result.exit_code == 0, result.output
    header, row = result.stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "MODEL", "VERSION", "WAVE", "AGE", "MESSAGE"]
    assert row.split()[:5] == ["detector-1", "Progressing", "detector", "1.0.0", "1/3"]
    [listed] = data(api_url, "get", "rollouts")
    assert (listed["name"], listed["generation"], listed["waves"]) == ("detector-1", 1, 3)

    result = cli(api_url, "get", "nodes", "--cluster", "paris")
    assert result.exit_code == 0, result.output
    table = result.stdout.splitlines()
    assert table[0].split() == [
        "CLUSTER",
        "NAME",
        "HEALTH",
        "ARCH",
        "CPU",
        "MEMORY",
        "LAST-HEARTBEAT",
    ]
    assert [r.split()[:2] for r in table[1:]] == [["paris", f"paris-n{i}"] for i in range(3)]
    assert all(r.split()[3:6] == ["amd64", "4", "8Gi"] for r in table[1:])
    nodes = yaml.safe_load(cli(api_url, "get", "nodes", "-o", "yaml").stdout)
    assert sorted(n["name"] for n in nodes) == [
        f"{c}-n{i}" for c in ("berlin", "paris") for i in range(3)
    ]
    assert data(api_url, "get", "nodes", "--limit", "2", "--cluster", "berlin")[1]["name"] == (
        "berlin-n1"
    )

    result = cli(api_url, "get", "clusters")
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["NAME", "DRIVER", "STATUS", "NODES", "GENERATION"]
    assert [r.split()[:2] for r in rows] == [["berlin", "simulated"], ["paris", "simulated"]]
    assert all(r.split()[3:] == ["3", "(Ready=3)", "1"] for r in rows)
    clusters = yaml.safe_load(cli(api_url, "get", "clusters", "-o", "yaml").stdout)
    assert [c["nodes"] for c in clusters] == [{"Ready": 3}, {"Ready": 3}]

    result = cli(api_url, "get", "models")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1].split()[:3] == ["detector", "1", "1.0.0"]
    assert [m["latest_version"] for m in data(api_url, "get", "models")] == ["1.0.0"]

    # describe
    result = cli(api_url, "describe", "rollout", "detector-1")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Name:         detector-1" in out
    assert "Phase:        Progressing" in out
    assert "Model:        detector:1.0.0" in out
    assert "Selector:     tier=retail" in out
    assert "Strategy:     1 node(s) -> 50% -> 100%; maxUnavailable 50%" in out
    assert "Waves:" in out
    assert "Events:" in out
    assert "Applied" in out
    assert "created generation 1: 6 node(s) in 3 wave(s)" in out
    described = data(api_url, "describe", "rollout", "detector-1")
    assert [w["nodes"] for w in described["wave_detail"]] == [1, 2, 3]

    # status, once and watched to the end
    assert drive("detector-1", settings)[-1] == "Succeeded"
    result = cli(api_url, "rollout", "status", "detector-1", "--watch", "--timeout", "10")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "rollout detector-1 (generation 1, detector:1.0.0): Succeeded" in out
    assert "100%" in out
    assert "6/6" in out
    for wave, nodes in enumerate([1, 2, 3]):
        assert f"wave {wave}" in out
        assert f"{nodes}/{nodes}" in out
    assert "  0%" not in out
    result = cli(api_url, "rollout", "status", "detector-1")
    assert result.exit_code == 0, result.output
    assert "Succeeded" in result.stdout
    status = data(api_url, "rollout", "status", "detector-1", "--watch")
    assert status["states"] == {"Healthy": 6}

    # a changed bake: dry-run first (changes nothing), then for real
    write_manifests(tmp_path / "fleet", rollout("detector-1", bake="5m"))
    result = cli(api_url, "apply", "-f", str(manifests), "--dry-run")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "cluster.edgefleet.io/berlin unchanged (dry run)" in out
    assert "modelversion.edgefleet.io/detector:1.0.0 unchanged (dry run)" in out
    assert "rollout.edgefleet.io/detector-1 configured (dry run)" in out
    assert "  spec.strategy.steps[1].bake: 0s -> 5m" in out
    assert "  plan: 6 node(s) in 3 wave(s)" in out
    assert "    wave 0:    1 node(s)  bake 0s" in out
    assert "    wave 1:    2 node(s)  bake 5m" in out
    wave2 = next(ln for ln in out.splitlines() if ln.startswith("    wave 2:"))
    assert wave2.endswith(("berlin=1, paris=2", "berlin=2, paris=1"))
    [unchanged] = data(api_url, "get", "rollouts")
    assert (unchanged["generation"], unchanged["phase"]) == (1, "Succeeded")
    plan = data(api_url, "apply", "-f", str(manifests), "--dry-run")
    assert plan["dryRun"] is True
    assert plan["results"][3]["changes"] == [
        {"path": "spec.strategy.steps[1].bake", "old": "0s", "new": "5m"}
    ]
    assert plan["results"][2]["artifact"]["upload"] == "alreadyRegistered"
    assert data(api_url, "get", "rollouts")[0]["generation"] == 1

    result = cli(api_url, "apply", "-f", str(manifests))
    assert result.exit_code == 0, result.output
    assert "rollout.edgefleet.io/detector-1 configured\n" in result.stdout
    assert "  spec.strategy.steps[1].bake: 0s -> 5m\n" in result.stdout
    assert "plan:" not in result.stdout
    [configured] = data(api_url, "get", "rollouts")
    assert configured["generation"] == 2
    assert data(api_url, "describe", "rollout", "detector-1")["wave_detail"][1]["bake_s"] == 300


def test_dry_run_of_a_new_fleet_uploads_and_changes_nothing(api_url: str, tmp_path: Path) -> None:
    manifests = write_manifests(tmp_path / "fleet", rollout("detector-1"))
    result = cli(api_url, "apply", "-f", str(manifests), "--dry-run")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "cluster.edgefleet.io/berlin created (dry run)" in out
    assert "modelversion.edgefleet.io/detector:1.0.0 created (dry run; would upload " in out
    assert "detector.onnx" in out
    assert "rollout.edgefleet.io/detector-1 created (dry run)" in out
    # The plan sees the clusters of the same apply and the version it would upload.
    assert "  plan: 6 node(s) in 3 wave(s)" in out
    assert "  info ModelVersionUploadedFirst: model version detector:1.0.0 is not registered" in out
    assert "ModelVersionNotFound" not in out

    reply = data(api_url, "apply", "-f", str(manifests), "--dry-run")
    artifact = reply["results"][2]["artifact"]
    assert artifact["upload"] == "wouldUpload"
    assert artifact["sizeBytes"] == len(samples.build_cnn())
    assert len(artifact["sha256"]) == 64
    for kind in ("models", "clusters", "rollouts", "nodes"):
        assert data(api_url, "get", kind) == []
    result = cli(api_url, "get", "rollouts")
    assert result.exit_code == 0
    assert "No resources found." in result.output

    # A plan with an error: a dry-run exits 1, a real apply is refused before uploading.
    nowhere = rollout("nowhere", selector={"matchLabels": {"tier": "mars"}})
    (manifests / "40-nowhere.yaml").write_text(yaml.safe_dump(nowhere))
    result = cli(api_url, "apply", "-f", str(manifests), "--dry-run")
    assert result.exit_code == 1, result.output
    assert "rollout.edgefleet.io/nowhere created (dry run)" in result.stdout
    assert "  error NoMatchingNodes: the selector matches no known node" in result.stdout
    assert cli(api_url, "apply", "-f", str(manifests), "--dry-run", "-o", "yaml").exit_code == 1

    result = cli(api_url, "apply", "-f", str(manifests))
    assert result.exit_code == 1
    assert "validation_error (422)" in result.output
    assert "body.4.spec: Rollout nowhere: the selector matches no known node" in result.output
    assert "document 4 is " in result.output
    assert "40-nowhere.yaml" in result.output
    for kind in ("models", "clusters", "rollouts"):
        assert data(api_url, "get", kind) == []


def test_malformed_manifests_name_the_field(api_url: str, tmp_path: Path) -> None:
    bad = rollout("detector-1")
    bad["spec"]["strategy"]["steps"][0] = {"nodes": 1, "percent": 10}
    manifests = write_manifests(tmp_path / "fleet", bad)
    result = cli(api_url, "apply", "-f", str(manifests))
    assert result.exit_code == 1
    out = result.output
    assert "validation_error (422)" in out
    # The version to upload was left out of the server's check: numbers are the user's.
    assert "body.3.spec.strategy.steps.0: Rollout detector-1: " in out
    assert "give exactly one of nodes or percent" in out
    assert "document 3 is " in out
    assert "30-rollouts.yaml" in out
    # All or nothing: no cluster applied, no artifact uploaded.
    assert data(api_url, "get", "clusters") == []
    assert data(api_url, "get", "models") == []

    # ModelVersion documents with a path are checked before anything is sent.
    model = model_doc("1.0.0", "models/missing.onnx", colour="blue")
    (manifests / "20-model.yml").write_text(yaml.safe_dump(model))
    result = cli(api_url, "apply", "-f", str(manifests), "--dry-run")
    assert result.exit_code == 1
    assert "body.2.spec.colour: ModelVersion detector-1-0-0: unknown field" in result.output
    model["spec"].pop("colour")
    (manifests / "20-model.yml").write_text(yaml.safe_dump(model))
    result = cli(api_url, "apply", "-f", str(manifests))
    assert result.exit_code == 1
    assert "body.2.spec.artifact.path: ModelVersion detector-1-0-0: no such file" in result.output

    (manifests / "30-rollouts.yaml").write_text("kind: Rollout\nspec: [unclosed\n")
    result = cli(api_url, "apply", "-f", str(manifests / "30-rollouts.yaml"))
    assert result.exit_code == 1
    assert "30-rollouts.yaml: not valid YAML at line 3" in result.output

    (manifests / "30-rollouts.yaml").write_text(
        yaml.safe_dump({"apiVersion": "edgefleet.io/v2", "kind": "Rollout"})
    )
    result = cli(api_url, "apply", "-f", str(manifests / "30-rollouts.yaml"))
    assert result.exit_code == 1
    assert "body.0.apiVersion: expected apiVersion 'edgefleet.io/v1'" in result.output

    result = cli(api_url, "apply", "-f", str(tmp_path / "nothing-here"))
    assert result.exit_code == 1
    assert "no such file or directory" in result.output


def test_apply_from_stdin(api_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # stdin's relative artifact paths resolve here
    Path("cnn.onnx").write_bytes(samples.build_cnn(seed=3))
    stream = yaml.safe_dump_all(
        [cluster_doc("lab", 2), model_doc("2.0.0", "cnn.onnx"), rollout_doc("lab-1", "2.0.0")],
        sort_keys=False,
    )
    result = cli(api_url, "apply", "-f", "-", stdin=stream)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "cluster.edgefleet.io/lab created"
    assert lines[1].startswith("modelversion.edgefleet.io/detector:2.0.0 created (uploaded ")
    assert lines[2] == "rollout.edgefleet.io/lab-1 created"
    version = data(api_url, "models", "describe", "detector", "2.0.0")
    assert version["status"] == "Ready"

    reply = yaml.safe_load(cli(api_url, "apply", "-f", "-", "-o", "yaml", stdin=stream).stdout)
    assert [r["action"] for r in reply["results"]] == ["unchanged"] * 3
    assert reply["results"][1]["artifact"]["sha256"] == version["sha256"]


def test_rollout_commands(api_url: str, tmp_path: Path) -> None:
    manifests = write_manifests(tmp_path / "fleet", rollout("other"))
    assert cli(api_url, "apply", "-f", str(manifests)).exit_code == 0

    # Nobody reports metrics: the first wave bakes forever, and a watch gives up.
    result = cli(
        api_url, "rollout", "status", "other", "--watch", "--timeout", "0.6", "--interval", "0.1"
    )
    assert result.exit_code == 1
    assert "rollout other: Progressing, wave 1/3, 1/6 node(s) (16%)" in result.stdout
    assert "timed out after 0.6 s: rollout other is still Progressing" in result.output

    # One active rollout per (model, node): a second one over the same nodes is a 409.
    (manifests / "40-intruder.yaml").write_text(yaml.safe_dump(rollout("intruder")))
    result = cli(api_url, "apply", "-f", str(manifests))
    assert result.exit_code == 1
    assert "conflict (409): document 4: rollout other is active on 6 of the selected" in (
        result.output
    )
    (manifests / "40-intruder.yaml").unlink()

    result = cli(api_url, "rollout", "pause", "other")
    assert result.exit_code == 0, result.output
    assert result.stdout == "rollout other Paused\n"
    result = cli(api_url, "rollout", "status", "other", "--watch")
    assert result.exit_code == 1  # a paused rollout waits for a human: the watch ends
    assert "rollout other (generation 1, detector:1.0.0): Paused" in result.stdout
    result = cli(api_url, "rollout", "pause", "other")
    assert result.exit_code == 1
    assert "conflict (409)" in result.output
    assert "cannot become Paused" in result.output

    result = cli(api_url, "rollout", "resume", "other")
    assert result.exit_code == 0, result.output
    assert result.stdout == "rollout other Progressing\n"
    result = cli(api_url, "rollout", "undo", "other")
    assert result.exit_code == 1
    assert "only a Succeeded rollout can be undone" in result.output

    aborted = data(api_url, "rollout", "abort", "other")
    assert aborted["phase"] == "Aborted"
    assert aborted["events"][0]["reason"] == "Aborted"
    result = cli(api_url, "rollout", "status", "other", "--watch")
    assert result.exit_code == 1
    assert "Aborted" in result.stdout
    result = cli(api_url, "rollout", "abort", "other")
    assert result.exit_code == 1
    assert "only an active rollout can be aborted" in result.output

    result = cli(api_url, "rollout", "pause", "ghost")
    assert result.exit_code == 1
    assert "not_found (404)" in result.output
    result = cli(api_url, "describe", "rollout", "ghost")
    assert result.exit_code == 1
    assert "not_found (404)" in result.output


def test_status_of_a_rolled_back_rollout(api_url: str, tmp_path: Path, settings: Settings) -> None:
    manifests = write_manifests(tmp_path / "fleet", rollout("slow"))
    assert cli(api_url, "apply", "-f", str(manifests)).exit_code == 0
    assert drive("slow", settings, metrics=lambda node: (95.0, 0))[-1] == "RolledBack"

    result = cli(api_url, "rollout", "status", "slow", "--watch", "--timeout", "10")
    assert result.exit_code == 1
    assert "rollout slow (generation 1, detector:1.0.0): RolledBack" in result.stdout
    assert "  0%" in result.stdout
    result = cli(api_url, "rollout", "status", "slow")
    assert result.exit_code == 0  # without --watch: a report, not a verdict
    assert "RolledBack" in result.stdout

    result = cli(api_url, "describe", "rollout", "slow", "--events", "50")
    assert result.exit_code == 0, result.output
    assert "GateFailed" in result.stdout
    assert "Phase:        RolledBack" in result.stdout
    assert "RolledBack=" in result.stdout

    result = cli(api_url, "rollout", "nodes", "slow")
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split() == [
        "NODE",
        "WAVE",
        "STATE",
        "DESIRED",
        "OBSERVED",
        "P95-MS",
        "AGE",
        "MESSAGE",
    ]
    assert len(rows) == 6
    assert all(" RolledBack " in row for row in rows), rows
    nodes = data(api_url, "rollout", "nodes", "slow", "--wave", "1", "--limit", "2")
    assert [n["wave"] for n in nodes] == [1, 1]
    result = cli(api_url, "rollout", "nodes", "slow", "--state", "Lost")
    assert result.exit_code == 1
    assert "query.state: Input should be 'Pending', 'Applying'" in result.output

    result = cli(api_url, "rollout", "retry", "slow")
    assert result.exit_code == 0, result.output
    assert result.stdout == "rollout slow Pending\n"
