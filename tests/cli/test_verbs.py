"""kubectl's verbs: ``DELETE`` routes and ``edgefleet delete`` (refusing what is in use),
``edgefleet diff -f`` (the server's dry run), ``get -o wide``, ``completion``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from sqlalchemy import Connection
from typer.testing import CliRunner

from controller.api.app import create_app
from controller.cli.main import app
from controller.kube.factory import driver_for
from controller.settings import Settings
from tests.cli.test_rollouts import cli
from tests.conftest import bearer
from tests.live import serve
from tests.rollouts.helpers import apply, cluster_doc, drive, push_versions, rollout_doc


@pytest.fixture
def fleet(client: TestClient, sim_fleet: None) -> TestClient:
    assert apply(client, cluster_doc("berlin", 2)).status_code == 200
    push_versions(client, "1.0.0", "2.0.0", "3.0.0")
    return client


def test_delete_refuses_what_is_in_use_and_removes_the_rest(
    fleet: TestClient, settings: Settings
) -> None:
    assert apply(fleet, rollout_doc("good", "1.0.0")).status_code == 200
    assert drive("good", settings)[-1] == "Succeeded"
    in_use = fleet.delete("/v1/models/detector/versions/1.0.0")
    assert in_use.status_code == 409
    assert "rollout(s) good" in in_use.json()["detail"]
    assert fleet.delete("/v1/rollouts/good", headers=bearer("viewer")).status_code == 403
    gone = fleet.delete("/v1/rollouts/good", headers=bearer("operator"))
    assert gone.json() == {"kind": "Rollout", "name": "good", "action": "deleted"}
    assert fleet.get("/v1/rollouts/good").status_code == 404
    (event,) = fleet.get("/v1/events", params={"kind": "Rollout", "name": "good"}).json()
    assert (event["reason"], event["actor"]) == ("Deleted", "token:test-operator")
    # The nodes still run 1.0.0: the version stays.
    running = fleet.delete("/v1/models/detector/versions/1.0.0")
    assert running.status_code == 409
    assert "2 node assignment(s)" in running.json()["detail"]
    assert fleet.delete("/v1/models/detector/versions/2.0.0").status_code == 200
    assert fleet.get("/v1/models/detector/versions/2.0.0").status_code == 404
    assert fleet.delete("/v1/models/detector/versions/2.0.0").status_code == 404
    # A cluster whose nodes run a workload stays; one whose nodes run none goes.
    assert fleet.delete("/v1/clusters/berlin").status_code == 409
    assert apply(fleet, cluster_doc("empty", 2)).status_code == 200
    assert fleet.delete("/v1/clusters/empty", headers=bearer("operator")).status_code == 403
    assert fleet.delete("/v1/clusters/empty").status_code == 200
    assert fleet.get("/v1/clusters/empty").status_code == 404
    assert fleet.get("/v1/nodes", params={"cluster": "empty"}).json()["total"] == 0


def test_an_active_rollout_is_deleted_only_once_aborted(fleet: TestClient) -> None:
    assert apply(fleet, rollout_doc("live", "3.0.0")).status_code == 200
    assert fleet.get("/v1/rollouts/live").json()["phase"] in ("Pending", "Progressing")
    refused = fleet.delete("/v1/rollouts/live")
    assert refused.status_code == 409
    assert "abort it first" in refused.json()["detail"]
    assert fleet.post("/v1/rollouts/live/abort").status_code == 202
    assert fleet.delete("/v1/rollouts/live").status_code == 200


def test_delete_cluster_cascade_removes_its_workloads_first(
    fleet: TestClient, settings: Settings
) -> None:
    assert apply(fleet, rollout_doc("good", "1.0.0")).status_code == 200
    assert drive("good", settings)[-1] == "Succeeded"
    driver = driver_for("berlin", "simulated", cluster_doc("berlin", 2)["spec"], settings)
    nodes = ["berlin-n0", "berlin-n1"]
    assert {o.phase for o in driver.observe("detector", nodes).values()} == {"Ready"}
    refused = fleet.delete("/v1/clusters/berlin")
    assert refused.status_code == 409
    assert "delete with cascade" in refused.json()["detail"]
    # Not while a rollout in progress holds its nodes: its workloads would come back.
    assert apply(fleet, rollout_doc("live", "2.0.0")).status_code == 200
    held = fleet.delete("/v1/clusters/berlin", params={"cascade": "true"})
    assert held.status_code == 409
    assert "rollout(s) not over yet: live" in held.json()["detail"]
    assert fleet.post("/v1/rollouts/live/abort").status_code == 202
    drive("live", settings)
    operator = fleet.delete(
        "/v1/clusters/berlin", params={"cascade": "true"}, headers=bearer("operator")
    )
    assert operator.status_code == 403
    assert {o.phase for o in driver.observe("detector", nodes).values()} == {"Ready"}
    gone = fleet.delete("/v1/clusters/berlin", params={"cascade": "true"})
    assert gone.status_code == 200, gone.text
    assert {o.phase for o in driver.observe("detector", nodes).values()} == {"Absent"}
    assert fleet.get("/v1/clusters/berlin").status_code == 404
    assert fleet.get("/v1/nodes", params={"cluster": "berlin"}).json()["total"] == 0
    events = fleet.get("/v1/events", params={"kind": "Cluster", "name": "berlin"}).json()
    assert [e["reason"] for e in events[:2]] == ["Deleted", "WorkloadsRemoved"]
    assert events[1]["data"]["workloads"] == {"detector": nodes}
    assert events[0]["data"] == {"cascade": True}
    assert fleet.delete("/v1/clusters/berlin", params={"cascade": "true"}).status_code == 404


@pytest.fixture
def api_url(
    settings: Settings, connection: Connection, redis_available: None, fleet: TestClient
) -> Iterator[str]:
    with serve(create_app(settings)) as url:
        yield url


def test_cli_diff_then_delete_a_manifest(api_url: str, tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump_all([cluster_doc("lyon", 2), rollout_doc("r", "2.0.0")]))
    new = cli(api_url, "diff", "-f", str(manifest))
    assert new.exit_code == 1, new.output
    assert "cluster.edgefleet.io/lyon (created)" in new.stdout
    assert "rollout.edgefleet.io/r (created)" in new.stdout
    assert cli(api_url, "apply", "-f", str(manifest)).exit_code == 0
    same = cli(api_url, "diff", "-f", str(manifest))
    assert (same.exit_code, same.stdout) == (0, "")
    slower = rollout_doc("r", "2.0.0", gates={"maxP95LatencyMs": 90, "minSamples": 20})
    manifest.write_text(yaml.safe_dump_all([cluster_doc("lyon", 2), slower]))
    # What apply would refuse is an error (2), not a difference (1).
    refused = cli(api_url, "diff", "-f", str(manifest))
    assert refused.exit_code == 2
    assert "cannot change mid-flight" in refused.output

    # Not asked: refused without a terminal. The rollout is active: 409, nothing after it.
    unasked = cli(api_url, "delete", "-f", str(manifest))
    assert unasked.exit_code == 1
    assert "--yes" in unasked.output
    active = cli(api_url, "delete", "-f", str(manifest), "--yes")
    assert active.exit_code == 1
    assert "abort it first" in active.output
    assert cli(api_url, "rollout", "abort", "r").exit_code == 0

    changed = cli(api_url, "diff", "-f", str(manifest))
    assert changed.exit_code == 1, changed.output
    lines = changed.stdout.splitlines()
    assert lines[0] == "rollout.edgefleet.io/r (configured)"
    assert "- spec.gates.maxP95LatencyMs: 40.0" in lines
    assert "+ spec.gates.maxP95LatencyMs: 90.0" in lines
    assert "- spec.gates.maxErrorRate: 0.01" in lines
    assert not any(line.startswith("cluster.") for line in lines)
    (as_json,) = json.loads(cli(api_url, "diff", "-f", str(manifest), "-o", "json").stdout)
    assert {"path": "spec.gates.maxP95LatencyMs", "old": 40, "new": 90} in as_json["changes"]

    done = cli(api_url, "delete", "-f", str(manifest), "--yes")
    assert done.exit_code == 0, done.output
    assert done.stdout.splitlines() == [
        "rollout.edgefleet.io/r deleted",  # the last document first
        "cluster.edgefleet.io/lyon deleted",
    ]
    version = cli(api_url, "delete", "model/detector:3.0.0", "-y", "-o", "json")
    assert json.loads(version.stdout) == [
        {"kind": "ModelVersion", "name": "detector:3.0.0", "action": "deleted"}
    ]
    bad = cli(api_url, "delete", "model/detector", "-y")
    assert bad.exit_code == 1
    assert "is not KIND/NAME" in bad.output


def test_get_wide_adds_columns(api_url: str) -> None:
    narrow = cli(api_url, "get", "nodes").stdout.splitlines()
    wide = cli(api_url, "get", "nodes", "-o", "wide").stdout.splitlines()
    assert narrow[0].split() == [
        "CLUSTER", "NAME", "HEALTH", "ARCH", "CPU", "MEMORY", "LAST-HEARTBEAT"
    ]  # fmt: skip
    assert wide[0].split() == [*narrow[0].split(), "RUNTIMES", "LABELS"]
    assert "site=berlin" in wide[1]
    clusters = cli(api_url, "get", "clusters", "-o", "wide").stdout.splitlines()
    assert clusters[0].split()[-4:] == ["MODE", "SERVER", "LAST-SYNC", "LABELS"]
    assert cli(api_url, "get", "nodes", "-o", "tall").exit_code == 2


SHELLS = ("bash", "zsh", "fish")


def test_completion_scripts_and_completions() -> None:
    runner = CliRunner()
    scripts = {shell: runner.invoke(app, ["completion", shell]).stdout for shell in SHELLS}
    # typer's own --show-completion prints the same (the shell it finds: bash here).
    shown = runner.invoke(app, ["--show-completion"], prog_name="edgefleet", env={"SHELL": "bash"})
    assert shown.stdout.strip() == scripts["bash"].strip()
    assert scripts["zsh"].startswith("#compdef edgefleet")
    assert "complete --command edgefleet" in scripts["fish"]
    assert all("_EDGEFLEET_COMPLETE=complete_" in script for script in scripts.values())

    def complete(line: str) -> list[str]:
        words = line.split(" ")
        env = {
            "_EDGEFLEET_COMPLETE": "complete_bash",
            "COMP_WORDS": line,
            "COMP_CWORD": str(len(words) - 1),
        }
        return runner.invoke(app, [], prog_name="edgefleet", env=env).stdout.split()

    assert complete("edgefleet del") == ["delete"]
    assert complete("edgefleet get ") == ["rollouts", "nodes", "clusters", "models"]
    assert complete("edgefleet get nodes -o ") == ["table", "wide", "json", "yaml"]


def test_delete_names_a_document_it_cannot_place(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump_all([{"kind": "Rollout", "metadata": {}}, ["a list"]]))
    # Nothing is sent: the controller's URL leads nowhere.
    result = cli("http://127.0.0.1:9", "delete", "-f", str(manifest), "--yes")
    assert result.exit_code == 1
    assert "document 1 names no Rollout" in result.output  # the last one is read first
    assert cli("http://127.0.0.1:9", "delete", "--yes").exit_code == 1


def test_cli_delete_cluster_cascade(api_url: str, fleet: TestClient, settings: Settings) -> None:
    assert apply(fleet, rollout_doc("good", "1.0.0")).status_code == 200
    assert drive("good", settings)[-1] == "Succeeded"
    refused = cli(api_url, "delete", "cluster/berlin", "-y")
    assert refused.exit_code == 1
    assert "delete with cascade" in refused.output
    result = cli(api_url, "delete", "cluster/berlin", "--cascade", "-y")
    assert result.exit_code == 0, result.output
    assert "cluster.edgefleet.io/berlin deleted" in result.stdout
    assert fleet.get("/v1/clusters/berlin").status_code == 404
