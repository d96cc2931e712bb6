"""The three images, read from their Dockerfiles (no Docker engine here): what they are
built from, who they run as, what they run, and what the build context lets in."""

from __future__ import annotations

import configparser
import re
from pathlib import Path, PurePosixPath

import pytest

from controller.settings import Settings
from tests.deploy.cli import REPO, check_command, console_scripts, script_package
from tests.deploy.dockerfile import Dockerfile, DockerIgnore

DOCKER = REPO / "docker"
BASE_IMAGE = "python:3.11-slim"
UID = "10001"
API_PORT = Settings.model_fields["api_port"].default

# image -> (pip extra it installs, console script it runs)
IMAGES = {
    "controller": ("controller", "edgefleet"),
    "agent": ("agent", "edgefleet-agent"),
    "inference": ("agent", "edgefleet-serve"),
}


def parse(image: str) -> Dockerfile:
    return Dockerfile.parse(DOCKER / f"{image}.Dockerfile")


@pytest.fixture(params=sorted(IMAGES))
def image(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def test_parser_reads_stages_and_continuations() -> None:
    df = parse("controller")
    assert [s.name for s in df.stages] == ["build", "runtime"]
    assert df.directives == {"syntax": "docker/dockerfile:1"}
    run = df.stage("build").all("RUN")[-1]
    assert 'pip install ".[controller]"' in run.args  # a continued line, joined
    healthcheck = df.final.last("HEALTHCHECK")
    assert healthcheck is not None
    assert healthcheck.flags["interval"] == "30s"


def test_parser_resolves_args_env_and_stage_inheritance(tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        "# syntax=docker/dockerfile:1\n"
        "ARG BASE=python:3.11-slim\n"
        "ARG UID=42\n"
        "FROM ${BASE} AS base\n"
        "ENV ROOT=/srv \\\n"
        "    # a comment inside a continuation is dropped\n"
        "    MODE=prod\n"
        "ENV LEGACY some value\n"
        "FROM base AS final\n"
        "ARG UID\n"
        "WORKDIR $ROOT\n"
        "COPY a.txt b.txt conf/\n"
        "COPY --from=base /etc/hosts /etc/hosts\n"
        "USER ${UID}:${UID}\n"
        "ENV DATA=${ROOT}/data\n"
        "CMD echo shell form\n"
    )
    df = Dockerfile.parse(dockerfile)
    assert [(s.name, s.base) for s in df.stages] == [("base", BASE_IMAGE), ("final", "base")]
    assert df.env(df.final) == {
        "ROOT": "/srv",
        "MODE": "prod",
        "LEGACY": "some value",
        "DATA": "/srv/data",
    }
    assert df.user(df.final) == "42:42"
    copies = [(src, str(dest), ins.flags.get("from")) for src, dest, ins in df.copies(df.final)]
    assert copies == [
        ("a.txt", "/srv/conf/a.txt", None),
        ("b.txt", "/srv/conf/b.txt", None),
        ("/etc/hosts", "/etc/hosts", "base"),
    ]
    with pytest.raises(ValueError, match="exec form"):
        df.command(df.final)


def test_multi_stage_on_the_slim_python_base(image: str) -> None:
    df = parse(image)
    assert len(df.stages) >= 2, "build in one stage, run in another"
    for stage in df.stages:
        earlier = {s.name for s in df.stages[: stage.index]}
        assert stage.base == BASE_IMAGE or stage.base in earlier, stage.base
    assert df.final.base == BASE_IMAGE
    copied_from = {i.flags.get("from") for i in df.final.all("COPY")}
    assert df.stages[0].name in copied_from, "the runtime stage takes the built venv"
    assert "syntax" in df.directives


def test_multi_arch_friendly(image: str) -> None:
    """buildx builds linux/amd64 and linux/arm64 from the same file: nothing may name an
    architecture or download a binary; the usage comment says how to build both."""
    text = (DOCKER / f"{image}.Dockerfile").read_text()
    assert "docker buildx build --platform linux/amd64,linux/arm64" in text
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"amd64|x86_64|aarch64|arm64|armv7", code)
    assert not re.search(r"\b(ADD|curl|wget)\b.*https?://", code)
    assert "--platform" not in code  # FROM --platform would pin one architecture


def test_runs_as_non_root_uid(image: str) -> None:
    df = parse(image)
    user = df.user(df.final)
    assert user is not None, "the final stage must set USER"
    uid, _, gid = user.partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can verify it without /etc/passwd.
    assert uid == UID
    assert gid in ("", UID)
    # USER comes after every RUN: nothing runs as root after it, and nothing before it
    # is left for the user to do.
    last_user = max(i.line for i in df.final.all("USER"))
    assert all(i.line < last_user for i in df.final.all("RUN"))


def test_installs_its_extra_only(image: str) -> None:
    extra, _ = IMAGES[image]
    df = parse(image)
    installs = [
        run.args for stage in df.stages for run in stage.all("RUN") if "pip install" in run.args
    ]
    extras = set(re.findall(r'"\.\[([a-z,-]+)\]"', " ".join(installs)))
    assert extras == {extra}, installs
    assert all("-e " not in cmd and "--editable" not in cmd for cmd in installs)


def test_entry_command_is_a_console_script(image: str) -> None:
    _, script = IMAGES[image]
    df = parse(image)
    argv = df.command(df.final)
    assert argv[0] == script
    assert script in console_scripts()
    check_command(argv)
    # The script's package is in the image: copied into the stage that installs it.
    package = script_package(script)
    build_sources = {src for src, _, _ in df.copies(df.stages[0])}
    assert package in build_sources


@pytest.mark.parametrize("edge_image", ["agent", "inference"])
def test_edge_images_leave_the_controller_out(edge_image: str) -> None:
    df = parse(edge_image)
    sources = {src for stage in df.stages for src, _, _ in df.copies(stage)}
    assert "controller" not in sources
    assert "migrations" not in sources


def test_ports_match_the_settings(image: str) -> None:
    """EXPOSE and HEALTHCHECK name the default port of what the image runs: the API port
    for the controller, the inference server's port for the inference image; the agent
    listens on nothing, so it declares no port at all."""
    df = parse(image)
    exposed = {
        int(p.split("/")[0]) for _, text in df.resolved(df.final, "EXPOSE") for p in text.split()
    }
    healthchecks = df.final.all("HEALTHCHECK")
    if image == "agent":
        assert exposed == set()
        assert healthchecks == []
        return
    if image == "inference":
        from node_agent.server.settings import DEFAULT_PORT

        assert exposed == {DEFAULT_PORT}
        assert len(healthchecks) == 1
        command = " ".join(healthchecks[0].exec_form or [healthchecks[0].args])
        found = re.findall(r"http://127\.0\.0\.1:(\d+)(/\w+)", command)
        assert found == [(str(DEFAULT_PORT), "/healthz")]
        return
    assert exposed == {API_PORT}
    argv = df.command(df.final)
    assert argv[argv.index("--port") + 1] == str(API_PORT)
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert len(healthchecks) == 1
    probe = healthchecks[0].exec_form
    assert probe is not None, "HEALTHCHECK CMD in exec form"
    urls = re.findall(r"http://(?:127\.0\.0\.1|localhost):(\d+)(/\w+)", " ".join(probe))
    assert urls == [(str(API_PORT), "/healthz")]
    for flag in ("interval", "timeout", "start-period", "retries"):
        assert flag in healthchecks[0].flags


def test_controller_image_finds_its_migrations() -> None:
    """`edgefleet db upgrade` in an image with a regular (non-editable) install needs
    EDGEFLEET_MIGRATIONS_DIR pointing at the copied migrations/; `alembic upgrade head`
    needs alembic.ini beside it."""
    df = parse("controller")
    env = df.env(df.final)
    copied = {src: dest for src, dest, ins in df.copies(df.final) if "from" not in ins.flags}
    assert PurePosixPath(env["EDGEFLEET_MIGRATIONS_DIR"]) == copied["migrations"]
    assert (REPO / "migrations" / "env.py").is_file()
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(REPO / "alembic.ini")
    assert ini["alembic"]["script_location"] == "%(here)s/migrations"
    assert copied["alembic.ini"].parent == copied["migrations"].parent
    assert env["EDGEFLEET_ARTIFACT_DIR"] == "/var/lib/edgefleet/artifacts"
    # The artifact directory is created (and chowned) in the image, so a fresh named
    # volume mounted there is writable by the non-root user.
    assert any(
        "/var/lib/edgefleet/artifacts" in run.args and "chown -R ${EDGEFLEET_UID}" in run.args
        for run in df.final.all("RUN")
    )


def test_build_context_holds_what_the_images_copy(image: str) -> None:
    ignore = DockerIgnore.parse(REPO / ".dockerignore")
    df = parse(image)
    for stage in df.stages:
        for src, _, ins in df.copies(stage):
            if "from" not in ins.flags:
                assert (REPO / src).exists(), src
                assert not ignore.excluded(src), f"{src} is excluded by .dockerignore"


def test_dockerignore_keeps_secrets_and_clutter_out() -> None:
    ignore = DockerIgnore.parse(REPO / ".dockerignore")
    for path in (
        ".git/config",
        ".venv/bin/python",
        ".env",
        ".edgefleet/edgefleet.db",
        "tests/conftest.py",
        "helm/edgefleet/values.yaml",
        "docker-compose.yml",
        "controller/__pycache__/settings.cpython-311.pyc",
        "node_agent/__pycache__/probe.cpython-311.pyc",
    ):
        assert ignore.excluded(path), path
    for path in ("pyproject.toml", "README.md", "controller/settings.py", "migrations/env.py"):
        assert not ignore.excluded(path), path


def test_every_file_the_wheel_needs_is_in_the_context() -> None:
    """pyproject.toml names README.md as the readme: a build without it fails."""
    ignore = DockerIgnore.parse(REPO / ".dockerignore")
    for path in Path(REPO / "controller").rglob("*.py"):
        if "__pycache__" not in path.parts:
            assert not ignore.excluded(str(path.relative_to(REPO))), path
    assert not ignore.excluded("README.md")


def test_controller_image_keeps_agent_connections_open() -> None:
    """The API's idle-connection timeout (EDGEFLEET_API_KEEPALIVE_TIMEOUT_S, handed to
    uvicorn by `edgefleet server`: tests/deploy/test_cli.py) outlasts the agents'
    heartbeat interval; uvicorn's own default (5 s) would close every agent's connection
    between two heartbeats, and each heartbeat would pay a TCP (and TLS) handshake."""
    df = parse("controller")
    assert df.command(df.final)[:2] == ["edgefleet", "server"]
    env = df.env(df.final)
    default = Settings.model_fields["api_keepalive_timeout_s"].default
    keepalive = int(env.get("EDGEFLEET_API_KEEPALIVE_TIMEOUT_S", default))
    assert keepalive > Settings.model_fields["agent_heartbeat_interval_s"].default
