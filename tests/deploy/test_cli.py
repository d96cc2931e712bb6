"""The command-line check the image, compose and chart tests rely on: it must refuse
what the CLI would refuse, or those tests prove nothing."""

from __future__ import annotations

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
