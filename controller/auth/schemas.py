from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from controller.db.models import ApiToken, Role

TokenName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")]


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: TokenName = Field(description="Unique name: lowercase letters, digits, '-' and '.'")
    role: Role
    expires: str | None = Field(
        None,
        max_length=32,
        description="Lifetime as a duration (90d, 12h); null for a token that never expires.",
    )


class TokenOut(BaseModel):
    name: str
    role: Role
    created_at: datetime
    created_by: str | None
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    active: bool

    @classmethod
    def of(cls, t: ApiToken, *, now: datetime) -> TokenOut:
        return cls(
            name=t.name,
            role=Role(t.role),
            created_at=t.created_at,
            created_by=t.created_by,
            expires_at=t.expires_at,
            revoked_at=t.revoked_at,
            last_used_at=t.last_used_at,
            active=t.revoked_at is None and (t.expires_at is None or t.expires_at > now),
        )


class TokenCreated(TokenOut):
    """The token itself is in this answer only: the controller keeps its sha256."""

    token: str


class WhoAmI(BaseModel):
    actor: str
    role: Role | None
