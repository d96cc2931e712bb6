"""``edgefleet rollout schedule`` and a dry-run's expected times, against a real server."""

from __future__ import annotations

from pathlib import Path

import yaml

from controller.registry import samples
from controller.schedules.windows import TIMEZONE_LABEL
from tests.cli.test_rollouts import api_url, cli, data, model_doc  # noqa: F401 (a fixture)
from tests.rollouts.helpers import cluster_doc, rollout_doc

NIGHT = {"windows": [{"cron": "0 1 * * *", "duration": "4h"}]}


def manifests(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "detector.onnx").write_bytes(samples.build_cnn())
    docs = [
        cluster_doc("nyc", 2, labels={TIMEZONE_LABEL: "America.New_York"}),
        cluster_doc("tokyo", 2, labels={TIMEZONE_LABEL: "Asia.Tokyo"}),
        model_doc("1.0.0", "detector.onnx"),
        {
            "apiVersion": "edgefleet.io/v1",
            "kind": "FreezePeriod",
            "metadata": {"name": "new-year"},
            "spec": {"cron": "0 0 1 1 *", "duration": "1d", "reason": "new year"},
        },
        rollout_doc(
            "nightly",
            "1.0.0",
            strategy={"steps": [{"percent": 50}, {"percent": 100}]},
            schedule=NIGHT,
        ),
    ]
    path = root / "fleet.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def test_schedule_show_set_cancel(api_url: str, tmp_path: Path) -> None:  # noqa: F811
    path = manifests(tmp_path / "fleet")
    result = cli(api_url, "apply", "-f", str(path), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "freezeperiod.edgefleet.io/new-year created" in result.stdout
    expected = [line for line in result.stdout.splitlines() if "expected start" in line]
    assert len(expected) == 2
    assert "America/New_York" in expected[0] or "Asia/Tokyo" in expected[0]

    result = cli(api_url, "apply", "-f", str(path))
    assert result.exit_code == 0, result.output

    shown = data(api_url, "rollout", "schedule", "nightly")
    assert shown["schedule"]["windows"] == NIGHT["windows"]
    zones = {z["timeZone"] for w in shown["waves"] for z in w["zones"]}
    assert zones == {"America/New_York", "Asia/Tokyo"}
    result = cli(api_url, "rollout", "schedule", "nightly")
    assert result.exit_code == 0, result.output
    assert "TIME ZONE" in result.stdout
    assert "window '0 1 * * *' for 4h" in result.stdout

    changed = data(
        api_url,
        "rollout",
        "schedule",
        "nightly",
        "--at",
        "2030-01-02T03:00:00Z",
        "--window",
        "0 2 * * 1-5",
        "--duration",
        "3h",
        "--tz",
        "Europe/Berlin",
    )
    assert changed["schedule"] == {
        "startAt": "2030-01-02T03:00:00Z",
        "timeZone": "Europe/Berlin",
        "windows": [{"cron": "0 2 * * 1-5", "duration": "3h"}],
        "bakeInWindowsOnly": False,
    }
    assert {z["reason"] for w in changed["waves"] for z in w["zones"]} == {"before-start"}

    result = cli(api_url, "rollout", "schedule", "nightly", "--window", "0 1 * * *")
    assert result.exit_code == 1
    assert "1 --window but 0 --duration" in result.output
    result = cli(
        api_url, "rollout", "schedule", "nightly", "--window", "nonsense", "--duration", "1h"
    )
    assert result.exit_code == 1
    assert "cron" in result.output

    cancelled = data(api_url, "rollout", "schedule", "nightly", "--cancel")
    assert cancelled["schedule"] is None
    result = cli(api_url, "rollout", "schedule", "nightly")
    assert "no schedule" in result.stdout


def test_delete_freeze(api_url: str, tmp_path: Path) -> None:  # noqa: F811
    path = manifests(tmp_path / "fleet")
    assert cli(api_url, "apply", "-f", str(path)).exit_code == 0
    result = cli(api_url, "delete", "freeze/new-year", "--yes")
    assert result.exit_code == 0, result.output
    assert "freezeperiod.edgefleet.io/new-year deleted" in result.stdout
    result = cli(api_url, "delete", "freeze/new-year", "--yes")
    assert result.exit_code == 1
    assert "freeze period 'new-year' not found" in result.output
