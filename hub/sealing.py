"""Secrets kept in the database, sealed with a key that is not in the database.

Some rows must hold a secret the hub needs back in clear (not a hash): the HomeKit
bridges' long-term key pairs, for one. A :class:`Sealer` encrypts such a payload with
AES-256-GCM under a key derived (HKDF-SHA256) from the hub's JWT secret, which lives in
``secrets.json`` or the environment, so a copy of the database alone reveals nothing.
Each use has its own ``purpose`` (so one use's key never opens another's payloads) and
binds a payload to its row through associated data (so a sealed value copied into
another row does not open).
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

#: how a sealed value starts: the version of the format, for a later change of cipher
SEALED_PREFIX = "v1:"


class Sealer:
    """Seals JSON objects for one purpose with a key derived from ``secret``."""

    def __init__(self, secret: str, purpose: bytes) -> None:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(
            secret.encode()
        )
        self._aead = AESGCM(key)

    def seal(self, payload: dict[str, Any], aad: bytes) -> str:
        """``payload`` encrypted for the row ``aad`` names (a fresh nonce every time)."""
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, json.dumps(payload).encode(), aad)
        return SEALED_PREFIX + base64.b64encode(nonce + sealed).decode()

    def open(self, text: str, aad: bytes) -> dict[str, Any] | None:
        """The payload, or None when ``text`` was not sealed with this key for this row."""
        if not text.startswith(SEALED_PREFIX):
            return None
        try:
            raw = base64.b64decode(text.removeprefix(SEALED_PREFIX), validate=True)
            payload = json.loads(self._aead.decrypt(raw[:12], raw[12:], aad))
        except (ValueError, InvalidTag):
            return None
        return payload if isinstance(payload, dict) else None
