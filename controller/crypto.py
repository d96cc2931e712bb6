"""Secrets at rest (cluster credentials): Fernet with a key derived from the controller
secret. Rotating EDGEFLEET_SECRET_KEY means re-applying the Cluster manifests."""

from __future__ import annotations

import base64
import hashlib
import json
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
