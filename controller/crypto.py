"""Secrets at rest (cluster credentials): Fernet with a key derived from the controller
secret. Rotating EDGEFLEET_SECRET_KEY means re-applying the Cluster manifests."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from typing import Any

from cryptography.fernet import Fernet, InvalidToken


def _fernet(secret: str) -> Fernet:
    digest = hashlib.sha256(b"edgefleet/credentials/v1\x00" + secret.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


def encrypt_json(secret: str, value: dict[str, Any]) -> bytes:
    return _fernet(secret).encrypt(json.dumps(value, sort_keys=True).encode())


def decrypt_json(secret: str, token: bytes) -> dict[str, Any]:
    try:
        result: dict[str, Any] = json.loads(_fernet(secret).decrypt(token))
    except InvalidToken as exc:
        raise ValueError(
            "cannot decrypt stored credentials: EDGEFLEET_SECRET_KEY changed since the "
            "Cluster was applied; apply its manifest again"
        ) from exc
    return result


def fingerprint(value: dict[str, Any], secret: str) -> str:
    """A keyed hash to tell whether credentials changed, without storing them twice."""
    payload = json.dumps(value, sort_keys=True).encode()
    return hashlib.blake2b(payload, key=secret.encode()[:64], digest_size=16).hexdigest()


# Artifact tokens: what an inference pod shows to download its model. Scoped to one
# cluster and expiring; stateless (an HMAC under the controller secret), so replicas need
# no shared table and rotating EDGEFLEET_SECRET_KEY revokes them all.
ARTIFACT_TOKEN_PREFIX = "efa1"
_EXPIRES = re.compile(r"[0-9]{1,12}")
_MAC = re.compile(r"[0-9a-f]{64}")


def _artifact_mac(secret: str, cluster: str, expires: int) -> str:
    key = hashlib.sha256(b"edgefleet/artifact-token/v1\x00" + secret.encode()).digest()
    return hmac.new(key, f"{cluster}\x00{expires}".encode(), hashlib.sha256).hexdigest()


def mint_artifact_token(secret: str, cluster: str, *, now: float, ttl_s: float) -> str:
    """A token valid for at least ``ttl_s / 2`` and at most ``ttl_s`` seconds. The expiry
    is quantised to half-lifetimes, so every mint within one half-lifetime gives the same
    token: the driver rewrites its Secret about twice per lifetime, not once per step."""
    half = max(int(ttl_s // 2), 1)
    expires = (int(now) // half + 2) * half
    return f"{ARTIFACT_TOKEN_PREFIX}.{cluster}.{expires}.{_artifact_mac(secret, cluster, expires)}"


def verify_artifact_token(secret: str, token: str, *, now: float) -> str | None:
    """The cluster the token was minted for, or None (malformed, forged or expired)."""
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != ARTIFACT_TOKEN_PREFIX:
        return None
    _, cluster, expires_text, mac = parts
    # ASCII digits and hex only (str.isdigit takes "²", compare_digest refuses non-ASCII).
    if not (_EXPIRES.fullmatch(expires_text) and _MAC.fullmatch(mac)):
        return None
    expires = int(expires_text)
    if expires <= now:
        return None
    if not hmac.compare_digest(mac, _artifact_mac(secret, cluster, expires)):
        return None
    return cluster
