"""docker-compose.yml as data: loading, the ${...} interpolation Compose applies, and the
environment a service's container would start with (the image's ENV, then the
service's ``environment``)."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.cli import REPO
from tests.deploy.dockerfile import Dockerfile

COMPOSE_FILE = REPO / "docker-compose.yml"

_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_]\w*))"
)


class MissingVariable(Exception):
    """A ``${VAR:?message}`` whose variable is unset: Compose refuses to start."""


def load() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def compose_spec_schema() -> dict[str, Any]:
    """The Compose Specification's JSON schema, as vendored by check-jsonschema (which
    ships it from compose-spec/compose-spec for its `check-compose-spec` hook)."""
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads((vendor / "compose-spec.json").read_text())
    return schema


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default},
    ${VAR:?error}, ${VAR?error}."""

    def one(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("name") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        value = variables.get(name)
        unset_or_empty = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in ("-", ":-"):
            return arg if unset_or_empty else str(value)
        if op in ("?", ":?") and unset_or_empty:
            raise MissingVariable(f"{name}: {arg}")
        return value or ""

    return _INTERPOLATION.sub(one, value)


def interpolate_all(data: Any, variables: dict[str, str]) -> Any:
    if isinstance(data, str):
        return interpolate(data, variables)
    if isinstance(data, dict):
        return {k: interpolate_all(v, variables) for k, v in data.items()}
    if isinstance(data, list):
        return [interpolate_all(v, variables) for v in data]
    return data


def service_dockerfile(service: dict[str, Any]) -> Dockerfile | None:
    build = service.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        return Dockerfile.parse(REPO / build / "Dockerfile")
    return Dockerfile.parse(
        REPO / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
    )


def service_command(service: dict[str, Any]) -> list[str]:
    """What the container runs: the service's command (exec form), else the image's."""
    command = service.get("command")
    dockerfile = service_dockerfile(service)
    if command is None:
        assert dockerfile is not None, "a service without command must build our image"
        return dockerfile.command(dockerfile.final)
    assert isinstance(command, list), f"use the exec form for commands, not {command!r}"
    if dockerfile is not None:
        entrypoint = dockerfile.entrypoint(dockerfile.final)
        return [*entrypoint, *command]
    return [str(c) for c in command]


def service_environment(service: dict[str, Any]) -> dict[str, str]:
    """The image's ENV overlaid with the service's environment (a map or KEY=value list)."""
    env: dict[str, str] = {}
    dockerfile = service_dockerfile(service)
    if dockerfile is not None:
        env.update(dockerfile.env(dockerfile.final))
    declared = service.get("environment") or {}
    if isinstance(declared, list):
        declared = dict(item.split("=", 1) for item in declared)
    env.update({k: "" if v is None else str(v) for k, v in declared.items()})
    return env


def named_volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Named volumes of a service: volume name -> mount path in the container."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            target = rest.split(":")[0]
        else:
            source, target = volume.get("source", ""), volume["target"]
        if source and not source.startswith((".", "/", "~")):
            mounts[source] = target
    return mounts


def copied_paths(dockerfile: Dockerfile) -> dict[str, Path]:
    """Container path -> repo path of what the final stage copies from the context."""
    return {
        str(dest): REPO / src
        for src, dest, ins in dockerfile.copies(dockerfile.final)
        if "from" not in ins.flags
    }
