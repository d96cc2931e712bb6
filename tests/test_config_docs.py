"""docs/configuration.md is exactly what ``controller.config_docs.render()`` gives, so the
page cannot drift from the settings classes (the controller's ``Settings``, the agent's
``AgentSettings``, the inference server's ``ServeSettings``). After a change of one, run
``python -m controller.config_docs > docs/configuration.md`` and commit the result."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from controller import config_docs
from controller.settings import DEV_SECRET, Settings
from node_agent.agent.settings import AgentSettings
from node_agent.server.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "configuration.md"


def test_committed_page_equals_the_rendered_one() -> None:
    assert PAGE.read_text() == config_docs.render(), (
        f"docs/configuration.md is stale: run {config_docs.COMMAND}"
    )


def test_the_module_prints_the_page() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "controller.config_docs"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert out.stdout == config_docs.render()


@pytest.mark.parametrize(
    ("cls", "prefix"),
    [(Settings, "EDGEFLEET_"), (AgentSettings, "EDGEFLEET_"), (ServeSettings, "EDGEFLEET_SERVE_")],
)
def test_every_setting_is_on_the_page_with_its_description(
    cls: type[BaseSettings], prefix: str
) -> None:
    page = config_docs.render()
    for name, field in cls.model_fields.items():
        assert f"`{prefix}{name.upper()}`" in page, name
        assert field.description, f"{cls.__name__}.{name} needs a description"
        assert " ".join(field.description.split()).replace("|", "\\|") in page, name


def test_an_alias_is_shown_beside_the_variable() -> None:
    row = next(line for line in config_docs.render().splitlines() if "`NODE_NAME`" in line)
    assert row.startswith("| `EDGEFLEET_NODE_NAME` or `NODE_NAME` | str | required |")


def test_edge_md_links_to_the_page_instead_of_copying_it() -> None:
    edge = (ROOT / "docs" / "edge.md").read_text()
    assert "configuration.md#node-agent" in edge
    assert "configuration.md#inference-server" in edge
    assert "| `EDGEFLEET_" not in edge


def test_secrets_never_show_their_value() -> None:
    page = config_docs.render()
    assert DEV_SECRET not in page
    row = next(line for line in page.splitlines() if "`EDGEFLEET_SECRET_KEY`" in line)
    assert f"| {config_docs.SECRET} |" in row


def test_rows_show_types_defaults_and_bounds() -> None:
    class Example(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="EX_")

        size_bytes: int = Field(4 * 1024 * 1024, ge=1, le=1 << 30, description="A size.")
        url: str | None = Field(None, description="Maybe | a URL.")
        hosts: list[str] = Field(default_factory=lambda: ["a"], description="Hosts.")
        token: SecretStr = Field(SecretStr("hunter2"), description="A secret.")
        maybe: SecretStr | None = Field(None, description="An optional secret.")
        on: bool = Field(False, description="A switch.")
        where: str = Field(description="Required.")

    rows = config_docs.render_settings(Example).splitlines()[2:]
    assert rows == [
        "| `EX_SIZE_BYTES` | int (≥ 1, ≤ 1073741824) | `4194304` (4 MiB) | A size. |",
        "| `EX_URL` | str or unset | unset | Maybe \\| a URL. |",
        '| `EX_HOSTS` | list of str | `["a"]` | Hosts. |',
        "| `EX_TOKEN` | secret | (set me) | A secret. |",
        "| `EX_MAYBE` | secret or unset | unset | An optional secret. |",
        "| `EX_ON` | bool | `false` | A switch. |",
        "| `EX_WHERE` | str | required | Required. |",
    ]


def test_a_setting_without_description_is_refused() -> None:
    class Bare(BaseSettings):
        undocumented: int = 1

    with pytest.raises(ValueError, match=r"Bare\.undocumented has no description"):
        config_docs.render_settings(Bare)
