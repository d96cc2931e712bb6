"""API tokens and roles.

Threat model (what this protects, what it does not):
- Every API route needs a credential. Tokens carry one role: ``viewer`` reads,
  ``operator`` also applies ModelVersion and Rollout manifests, pushes and optimizes
  models and drives rollouts, ``admin`` also applies Clusters (their credentials reach
  remote API servers), resets nodes and manages tokens. Tokens are 256 random bits; only
  their sha256 is stored, so a database dump does not let anyone call the API.
- The first admin token comes from ``edgefleet tokens create``, which writes the
  database directly: whoever can do that already owns the controller.
- Node agents use their own node credential (see controller/agents/service.py) and
  inference pods an expiring, cluster-scoped artifact token (controller/crypto.py); they
  can do nothing else. A stolen token is revoked with ``edgefleet tokens revoke``.
- Out of scope: TLS (terminate it in front of the controller, e.g. the chart's ingress),
  rate limiting of token guesses (256-bit tokens make guessing pointless)."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from controller.audit import record_event
from controller.auth import repository as repo
from controller.db.base import utcnow
from controller.db.models import ApiToken, Role
from controller.errors import Conflict, InvalidInput, NotFound
from controller.kit.durations import parse_duration

TOKEN_PREFIX = "eft_"
# How stale last_used_at may get before a request writes it again: a token used by CI
# many times a second must not turn every read into a write.
_LAST_USED_RESOLUTION = timedelta(seconds=60)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: ``token:<name>``, ``node:<cluster>/<node>``, ``artifact:<cluster>``
    or ``anonymous`` (a route made public by a setting), and the role, for API tokens."""

    actor: str
    role: Role | None = None
    # For a node credential or an artifact token: whose. Such callers may download only
    # what their node or cluster is meant to run (or benchmark).
    cluster: str | None = None
    node: str | None = None


ANONYMOUS = Principal("anonymous")


def parse_expiry(text: str | None, *, now: datetime) -> datetime | None:
    if text is None or text.strip() in ("", "never"):
        return None
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise InvalidInput(
            f"expires: {exc}; use a duration such as 30d or 12h, or 'never'",
            loc=("body", "expires"),
        ) from exc
    if not 60 <= seconds <= 10 * 365 * 86400:
        raise InvalidInput("expires: a token lives between 1m and 3650d", loc=("body", "expires"))
    return now + timedelta(seconds=seconds)


def create_token(
    session: Session,
    *,
    name: str,
    role: Role,
    expires: str | None,
    created_by: str | None,
) -> tuple[ApiToken, str]:
    """A new token and its secret value (shown once). A revoked token's name may be
    reused; an active one's may not."""
    now = utcnow()
    expires_at = parse_expiry(expires, now=now)
    existing = repo.by_name(session, name, lock=True)
    if existing is not None:
        if existing.revoked_at is None and (
            existing.expires_at is None or existing.expires_at > now
        ):
            raise Conflict(f"a token named {name!r} exists: revoke it first or pick another name")
        session.delete(existing)
        session.flush()
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(
        name=name,
        role=role.value,
        token_hash=hash_token(token),
        expires_at=expires_at,
        created_by=created_by,
    )
    session.add(row)
    session.flush()
    record_event(
        session,
        kind="ApiToken",
        name=name,
        reason="Created",
        message=f"role {role.value}, "
        + (f"expires {expires_at:%Y-%m-%d %H:%M} UTC" if expires_at else "never expires"),
        actor=created_by,
    )
    return row, token


def revoke_token(session: Session, name: str) -> ApiToken:
    row = repo.by_name(session, name, lock=True)
    if row is None:
        raise NotFound(f"no token named {name!r}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
        record_event(session, kind="ApiToken", name=name, reason="Revoked")
    return row


def authenticate(session: Session, token: str) -> Principal | None:
    """The principal of an API token, or None (unknown, revoked or expired)."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 128:
        return None
    row = repo.by_hash(session, hash_token(token))
    now = utcnow()
    if row is None or row.revoked_at is not None:
        return None
    if row.expires_at is not None and row.expires_at <= now:
        return None
    if row.last_used_at is None or now - row.last_used_at > _LAST_USED_RESOLUTION:
        row.last_used_at = now
    return Principal(f"token:{row.name}", Role(row.role))


# Dashboard sessions: the cookie holds no token, only the token's name, an expiry and an
# HMAC over the token's hash, so it dies with the token (revoked, expired) and by itself
# after SESSION_TTL_S, and a stolen cookie is no API credential.
SESSION_TTL_S = 12 * 3600


def _session_mac(secret: str, token_hash: str, expires: int) -> str:
    key = hashlib.sha256(b"edgefleet/dashboard-session/v1\x00" + secret.encode()).digest()
    return hmac.new(key, f"{token_hash}\x00{expires}".encode(), hashlib.sha256).hexdigest()


def open_session(session: Session, token: str, secret: str, *, now: float) -> str | None:
    """A session cookie value for a valid API token, or None."""
    principal = authenticate(session, token)
    if principal is None:
        return None
    name = principal.actor.removeprefix("token:")
    expires = int(now) + SESSION_TTL_S
    return f"{name}.{expires}.{_session_mac(secret, hash_token(token), expires)}"


def session_principal(session: Session, value: str, secret: str, *, now: float) -> Principal | None:
    name, _, rest = value.rpartition(".")
    name, _, expires_text = name.rpartition(".")
    if not (_SESSION_EXPIRES.fullmatch(expires_text) and _SESSION_MAC.fullmatch(rest)):
        return None
    if int(expires_text) <= now:
        return None
    row = repo.by_name(session, name)
    if row is None or row.revoked_at is not None:
        return None
    if row.expires_at is not None and row.expires_at <= utcnow():
        return None
    if not hmac.compare_digest(rest, _session_mac(secret, row.token_hash, int(expires_text))):
        return None
    return Principal(f"token:{row.name}", Role(row.role))


_SESSION_EXPIRES = re.compile(r"[0-9]{1,12}")
_SESSION_MAC = re.compile(r"[0-9a-f]{64}")
