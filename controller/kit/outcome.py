from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ApplyOutcome:
    kind: str
    name: str
    action: str  # created | configured | unchanged
    generation: int | None = None
    changes: list[dict[str, Any]] = field(default_factory=list)
    plan: dict[str, Any] | None = None
    problems: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "name": self.name, "action": self.action}
        if self.generation is not None:
            out["generation"] = self.generation
        if self.changes:
            out["changes"] = self.changes
        if self.plan is not None:
            out["plan"] = self.plan
        if self.problems:
            out["problems"] = self.problems
        return out
