"""The environment-configured programs answer ``--help`` with every variable they read,
named as it must be set, and name a missing one the same way."""

from __future__ import annotations

import logging
import re

import pytest

from node_agent.cluster import cli as cluster_cli
from node_agent.cluster.settings import ClusterAgentSettings


def listed(out: str) -> set[str]:
    # "  NAME  (default ...)", each followed by its description, indented further.
    return {line.split()[0] for line in out.splitlines() if re.match(r"  [A-Z]", line)}


def test_cluster_agent_help_lists_every_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("EDGEFLEET_CONTROLLER_URL", "EDGEFLEET_CLUSTER"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exc:
        cluster_cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert listed(out) == {f"EDGEFLEET_{f.upper()}" for f in ClusterAgentSettings.model_fields}
    assert "  EDGEFLEET_CONTROLLER_URL  (required)" in out.splitlines()
    assert "pull mode" in out


def test_cluster_agent_names_a_missing_setting(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("EDGEFLEET_CONTROLLER_URL", raising=False)
    monkeypatch.setenv("EDGEFLEET_CLUSTER", "edge-1")
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exc:
        cluster_cli.main([])
    assert exc.value.code == 2
    lines = {line.strip() for line in caplog.text.splitlines()}
    assert "EDGEFLEET_CONTROLLER_URL: Field required" in lines


def test_an_argument_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cluster_cli.main(["--cluster", "x"])
    assert exc.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err
