"""A small Dockerfile reader: instructions, stages, and the variable substitution BuildKit
applies, enough to check what an image will run without a Docker engine. Also the
.dockerignore matcher, to check what the build context will hold."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z]+)\s*=\s*(.+?)\s*$")
_VARIABLE = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_]\w*)(?::?-(?P<default>[^}]*))?\}|(?P<bare>[A-Za-z_]\w*))"
)
# Instructions whose arguments BuildKit expands with ARG and ENV values. RUN, CMD,
# ENTRYPOINT and HEALTHCHECK are left to the shell (or to nothing, in exec form).
_EXPANDED = {
    "ADD",
    "COPY",
    "ENV",
    "EXPOSE",
    "FROM",
    "LABEL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    """Upper case: FROM, RUN, COPY, ..."""
    args: str
    """Everything after the keyword and its --flags, continuation lines joined."""
    flags: dict[str, str]
    line: int

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON array form of RUN/CMD/ENTRYPOINT/HEALTHCHECK CMD, else None."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = text.removeprefix("CMD").strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"line {self.line}: exec form must be a JSON array of strings")
        return value


@dataclass
class Stage:
    base: str
    name: str | None
    index: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def expand(text: str, variables: dict[str, str]) -> str:
    """${VAR}, $VAR and ${VAR:-default} as BuildKit expands them (unset expands to "")."""

    def one(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("bare")
        value = variables.get(name)
        if value:
            return value
        default = match.group("default")
        return default if default is not None else (value or "")

    return _VARIABLE.sub(one, text)


@dataclass
class Dockerfile:
    path: Path
    directives: dict[str, str]
    global_args: dict[str, str]
    stages: list[Stage]

    @classmethod
    def parse(cls, path: Path) -> Dockerfile:
        directives: dict[str, str] = {}
        global_args: dict[str, str] = {}
        stages: list[Stage] = []
        in_header = True
        for line_no, text in _logical_lines(path.read_text()):
            if in_header and (m := _DIRECTIVE.match(text)):
                directives[m.group(1).lower()] = m.group(2)
                continue
            in_header = False
            if text.lstrip().startswith("#") or not text.strip():
                continue
            keyword, _, rest = text.strip().partition(" ")
            keyword = keyword.upper()
            flags, args = _split_flags(rest.strip())
            instruction = Instruction(keyword, args, flags, line_no)
            if keyword == "FROM":
                words = args.split()
                if len(words) not in (1, 3) or (len(words) == 3 and words[1].upper() != "AS"):
                    raise ValueError(f"{path}:{line_no}: malformed FROM {args!r}")
                base = expand(words[0], global_args)
                stages.append(Stage(base, words[2] if len(words) == 3 else None, len(stages)))
                stages[-1].instructions.append(instruction)
            elif not stages:
                if keyword != "ARG":
                    raise ValueError(f"{path}:{line_no}: only ARG may come before FROM")
                name, _, default = args.partition("=")
                global_args[name.strip()] = default.strip().strip('"')
            else:
                stages[-1].instructions.append(instruction)
        if not stages:
            raise ValueError(f"{path}: no FROM")
        return cls(path, directives, global_args, stages)

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def resolved(self, stage: Stage, keyword: str) -> list[tuple[Instruction, str]]:
        """Each ``keyword`` instruction of ``stage`` with its arguments as BuildKit expands
        them: ARG defaults (a global ARG only once redeclared in the stage) and ENV set
        earlier in the stage, or inherited from a parent stage."""
        out = []
        variables = self._inherited_env(stage)
        for instruction in stage.instructions:
            if instruction.keyword == keyword:
                text = instruction.args
                if keyword in _EXPANDED:
                    text = expand(text, variables)
                out.append((instruction, text))
            self._apply(instruction, variables)
        return out

    def env(self, stage: Stage) -> dict[str, str]:
        """The environment the image's processes start with (ENV only, not ARG)."""
        env: dict[str, str] = {}
        for parent in self._lineage(stage):
            variables = dict(env)  # ARGs are per stage; ENV is inherited
            for instruction in parent.instructions:
                if instruction.keyword == "ENV":
                    env.update(_env_pairs(expand(instruction.args, variables)))
                self._apply(instruction, variables)
        return env

    def user(self, stage: Stage) -> str | None:
        users = self.resolved(stage, "USER")
        return users[-1][1].strip() if users else None

    def workdir_at(self, stage: Stage, instruction: Instruction) -> PurePosixPath:
        workdir = PurePosixPath("/")
        variables = self._inherited_env(stage)
        for candidate in stage.instructions:
            if candidate is instruction:
                break
            if candidate.keyword == "WORKDIR":
                workdir = workdir / expand(candidate.args, variables)
            self._apply(candidate, variables)
        return workdir

    def copies(self, stage: Stage) -> list[tuple[str, PurePosixPath, Instruction]]:
        """COPY/ADD of ``stage``, one entry per source: (source, the absolute path it
        lands at, instruction)."""
        out = []
        for keyword in ("COPY", "ADD"):
            for instruction, text in self.resolved(stage, keyword):
                words = json.loads(text) if text.startswith("[") else shlex.split(text)
                *sources, dest = words
                base = PurePosixPath(dest)
                if not base.is_absolute():
                    base = self.workdir_at(stage, instruction) / dest
                into_directory = dest.endswith("/") or len(sources) > 1
                for source in sources:
                    target = base / PurePosixPath(source).name if into_directory else base
                    out.append((source, target, instruction))
        return out

    def command(self, stage: Stage) -> list[str]:
        """ENTRYPOINT + CMD of ``stage`` (both exec form, or the test fails)."""
        entrypoint = self._exec(stage, "ENTRYPOINT")
        cmd = self._exec(stage, "CMD")
        return [*entrypoint, *cmd]

    def entrypoint(self, stage: Stage) -> list[str]:
        return self._exec(stage, "ENTRYPOINT")

    # ---------------------------------------------------------------- internals

    def _exec(self, stage: Stage, keyword: str) -> list[str]:
        for parent in reversed(self._lineage(stage)):
            instruction = parent.last(keyword)
            if instruction is not None:
                value = instruction.exec_form
                if value is None:
                    raise ValueError(f"line {instruction.line}: {keyword} must use the exec form")
                return value
        return []

    def _lineage(self, stage: Stage) -> list[Stage]:
        """The stage and the stages it is built FROM, base first."""
        chain = [stage]
        names = {s.name: s for s in self.stages if s.name}
        while chain[0].base in names and names[chain[0].base].index < chain[0].index:
            chain.insert(0, names[chain[0].base])
        return chain

    def _inherited_env(self, stage: Stage) -> dict[str, str]:
        variables: dict[str, str] = {}
        for parent in self._lineage(stage)[:-1]:
            for instruction in parent.instructions:
                if instruction.keyword == "ENV":
                    self._apply(instruction, variables)
        return variables

    def _apply(self, instruction: Instruction, variables: dict[str, str]) -> None:
        if instruction.keyword == "ARG":
            name, has_default, default = instruction.args.partition("=")
            name = name.strip()
            if has_default:
                variables[name] = expand(default.strip().strip('"'), variables)
            elif name in self.global_args:
                variables[name] = self.global_args[name]
        elif instruction.keyword == "ENV":
            variables.update(_env_pairs(expand(instruction.args, variables)))


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Join continuation lines; comment lines inside a continuation are dropped, as
    BuildKit does."""
    out: list[tuple[int, str]] = []
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        if buffer and raw.lstrip().startswith("#"):
            continue
        if not buffer:
            start = number
        if raw.rstrip().endswith("\\") and not raw.lstrip().startswith("#"):
            buffer.append(raw.rstrip()[:-1])
            continue
        buffer.append(raw)
        out.append((start, " ".join(part.strip() for part in buffer)))
        buffer = []
    if buffer:
        out.append((start, " ".join(part.strip() for part in buffer)))
    return out


def _split_flags(text: str) -> tuple[dict[str, str], str]:
    flags: dict[str, str] = {}
    while text.startswith("--"):
        word, _, text = text.partition(" ")
        name, _, value = word[2:].partition("=")
        flags[name] = value
        text = text.strip()
    return flags, text


def _env_pairs(text: str) -> dict[str, str]:
    words = shlex.split(text)
    if len(words) >= 2 and "=" not in words[0]:  # legacy `ENV KEY value`
        return {words[0]: " ".join(words[1:])}
    pairs = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep:
            raise ValueError(f"ENV {text!r}: {word!r} is not KEY=value")
        pairs[key] = value
    return pairs


# ---------------------------------------------------------------- .dockerignore


@dataclass(frozen=True)
class DockerIgnore:
    """The .dockerignore rules: a path is excluded when the last rule matching it, or one
    of its parent directories, is an exclusion (``!`` rules re-include)."""

    rules: tuple[tuple[str, bool], ...]

    @classmethod
    def parse(cls, path: Path) -> DockerIgnore:
        rules = []
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negated = line.startswith("!")
            pattern = str(PurePosixPath(line.removeprefix("!").strip().lstrip("/")))
            rules.append((pattern, negated))
        return cls(tuple(rules))

    def excluded(self, relative: str) -> bool:
        parts = PurePosixPath(relative).parts
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        excluded = False
        for pattern, negated in self.rules:
            if any(_match(pattern, candidate) for candidate in candidates):
                excluded = not negated
        return excluded


def _match(pattern: str, path: str) -> bool:
    if pattern.startswith("**/"):
        rest = pattern[3:]
        segments = path.split("/")
        return any(fnmatch.fnmatchcase("/".join(segments[i:]), rest) for i in range(len(segments)))
    return (
        len(pattern.split("/")) == len(path.split("/")) and fnmatch.fnmatchcase(path, pattern)
    ) or (pattern == path)
