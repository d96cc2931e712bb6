from __future__ import annotations

from pydantic import BaseModel


class Deleted(BaseModel):
    """The answer of every DELETE: what is gone (the names as ``edgefleet delete`` takes them)."""

    kind: str
    name: str
    action: str = "deleted"
