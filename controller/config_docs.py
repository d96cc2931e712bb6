"""docs/configuration.md, rendered from the settings classes themselves, so the page
cannot drift from the code: ``python -m controller.config_docs > docs/configuration.md``
(tests/test_config_docs.py fails while the committed page differs).

Three classes, one section each: the controller's ``Settings``, the node agent's
``AgentSettings`` and the inference server's ``ServeSettings`` (the controller may import
the edge side; the edge side never imports the controller).

Only the classes' declarations are read (names, annotations, defaults, constraints,
descriptions); nothing is instantiated, so the page does not depend on the environment
or a ``.env`` file of the machine that renders it.
"""

from __future__ import annotations

import enum
import json
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt
from pydantic import AliasChoices, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from controller.settings import Settings
from node_agent.agent.settings import AgentSettings
from node_agent.server.settings import ServeSettings

COMMAND = "python -m controller.config_docs > docs/configuration.md"
SECRET = "(set me)"

HEADER = f"""\
# Configuration

<!-- Generated from the settings classes by `{COMMAND}`.
     Do not edit: change the Field descriptions in the code and run the command again. -->

Every setting is an environment variable. Unset variables take the default shown.
Lists are written as JSON (`EDGEFLEET_KUBE_RETRY_BACKOFF_S='[0.5, 1, 2]'`). Secrets never
show their default here: set them.
"""

CONTROLLER = """\
## Controller

`controller/settings.py`: read by the API, the Celery workers, beat and the CLI's
process commands (`edgefleet server | worker | beat | demo | db | tokens create`) from
the environment or a `.env` file in the working directory. The defaults are the embedded
setup (SQLite, tasks in-process, artifacts under `./.edgefleet`), so `edgefleet demo`
needs no server. Production sets `EDGEFLEET_ENVIRONMENT=production`, a Postgres URL, a
Redis URL and a real secret key: a default secret outside development refuses to start.
"""

AGENT = """\
## Node agent

`node_agent/agent/settings.py`: read by `edgefleet-agent` from the environment only (no
`.env` file). The chart (`helm/edgefleet-agent`) sets the node's name, the cluster, the
controller's URL, the join token and `EDGEFLEET_DISCOVERY=kubernetes`. What the agent does
with them: [edge.md](edge.md#the-node-agent).
"""

SERVE = """\
## Inference server

`node_agent/server/settings.py`: read by `edgefleet-serve` from its flags first (the
common settings have one, named after the setting: `--max-body-bytes`; `edgefleet-serve
--help` lists them), then the environment, then the defaults below. Give
`EDGEFLEET_SERVE_MODEL_URL` with `EDGEFLEET_SERVE_SHA256`, or `EDGEFLEET_SERVE_MODEL_PATH`.
What the server does with them: [edge.md](edge.md#the-inference-server).
"""

FOOTER = """\
The CLI (`edgefleet`) reads settings of its own: see [operations.md](operations.md).
"""

SECTIONS: list[tuple[str, type[BaseSettings]]] = [
    (CONTROLLER, Settings),
    (AGENT, AgentSettings),
    (SERVE, ServeSettings),
]


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "unset"
    origin = get_origin(annotation)
    if origin is Literal:
        return " or ".join(f"`{a}`" for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(annotation))
    if origin is list:
        (item,) = get_args(annotation)
        return f"list of {_type_name(item)}"
    if annotation is SecretStr:
        return "secret"
    if annotation is Path:
        return "path"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " or ".join(f"`{m.value}`" for m in annotation)
    return str(getattr(annotation, "__name__", annotation))


def _bounds(field: FieldInfo) -> str:
    parts = []
    for meta in field.metadata:
        if isinstance(meta, Ge):
            parts.append(f"≥ {_plain(meta.ge)}")
        elif isinstance(meta, Gt):
            parts.append(f"> {_plain(meta.gt)}")
        elif isinstance(meta, Le):
            parts.append(f"≤ {_plain(meta.le)}")
        elif isinstance(meta, Lt):
            parts.append(f"< {_plain(meta.lt)}")
    return f" ({', '.join(parts)})" if parts else ""


def _plain(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _human_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def _default(name: str, field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if _is_secret(field.annotation):
        return SECRET
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, list):
        return f"`{json.dumps(value)}`"
    if value == "":
        return "empty"
    shown = f"`{_plain(value)}`"
    if name.endswith("_bytes") and isinstance(value, int):
        shown += f" ({_human_bytes(value)})"
    return shown


def _is_secret(annotation: Any) -> bool:
    return annotation is SecretStr or SecretStr in get_args(annotation)


def _env_names(cls: type[BaseSettings], name: str, field: FieldInfo) -> str:
    alias = field.validation_alias or field.alias
    if isinstance(alias, str):
        names = [alias]
    elif isinstance(alias, AliasChoices):
        names = [c for c in alias.choices if isinstance(c, str)]
    else:
        names = [f"{cls.model_config.get('env_prefix', '')}{name}"]
    return " or ".join(f"`{n.upper()}`" for n in names)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render_settings(cls: type[BaseSettings]) -> str:
    """One table row per field of ``cls``, in declaration order."""
    rows = [
        "| variable | type | default | description |",
        "| --- | --- | --- | --- |",
    ]
    for name, field in cls.model_fields.items():
        if not field.description:
            raise ValueError(f"{cls.__name__}.{name} has no description")
        rows.append(
            "| "
            + " | ".join(
                [
                    _env_names(cls, name, field),
                    _cell(_type_name(field.annotation) + _bounds(field)),
                    _cell(_default(name, field)),
                    _cell(field.description),
                ]
            )
            + " |"
        )
    return "\n".join(rows) + "\n"


def render() -> str:
    sections = [part for intro, cls in SECTIONS for part in (intro, render_settings(cls))]
    return "\n".join([HEADER, *sections, FOOTER])


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
