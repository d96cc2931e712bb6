"""The command-line check the image, compose and chart tests rely on: it must refuse
what the CLI would refuse, or those tests prove nothing."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.cli import check_command, console_scripts, installed_script


@pytest.mark.parametrize(
    "argv",
    [
        ["edgefleet", "server", "--host", "0.0.0.0", "--port", "8080"],
        ["edgefleet", "worker", "--concurrency", "2"],
        ["edgefleet", "beat"],
        ["edgefleet", "db", "upgrade"],
        ["edgefleet-agent"],
        ["edgefleet-serve"],
    ],
)
def test_accepts_real_commands(argv: list[str]) -> None:
    check_command(argv)


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["celery", "worker"], "not a console script"),
        (["edgefleet", "wrker"], "no command 'wrker'"),
        (["edgefleet", "db"], "subcommand is required"),
        (["edgefleet", "db", "upgrade", "head", "extra"], "unexpected extra argument"),
        (["edgefleet", "worker", "--concurrency", "two"], "valid integer"),
        (["edgefleet", "server", "--bind", "0.0.0.0"], "No such option"),
        (["edgefleet", "server", "--help"], "only prints"),
        (["edgefleet-agent", "--node", "x"], "takes no arguments"),
    ],
)
def test_refuses_what_the_cli_refuses(argv: list[str], why: str) -> None:
    with pytest.raises(AssertionError, match=why):
        check_command(argv)


def test_console_scripts_are_installed() -> None:
    for name in console_scripts():
        assert installed_script(name).is_file()


def test_server_hands_uvicorn_the_keepalive_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every deployment (image, compose, chart) runs `edgefleet server`: that is where the
    keep-alive setting reaches uvicorn (whose own default, 5 s, is shorter than the
    agents' heartbeat interval: every heartbeat would open a new connection)."""
    import uvicorn
    from typer.testing import CliRunner

    from controller.cli.main import app
    from controller.settings import Settings

    runs: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *_a, **kw: runs.append(kw))
    for keepalive, warned in ((120, False), (5, True)):
        settings = Settings(_env_file=None, api_keepalive_timeout_s=keepalive)
        monkeypatch.setattr("controller.settings.get_settings", lambda s=settings: s)
        result = CliRunner().invoke(app, ["server", "--host", "127.0.0.1", "--port", "8080"])
        assert result.exit_code == 0, result.output
        assert runs.pop()["timeout_keep_alive"] == keepalive
        # Not above the agents' interval: said at startup, not refused.
        assert ("EDGEFLEET_API_KEEPALIVE_TIMEOUT_S" in result.output) == warned
    default = Settings.model_fields["api_keepalive_timeout_s"].default
    assert default > Settings.model_fields["agent_heartbeat_interval_s"].default
