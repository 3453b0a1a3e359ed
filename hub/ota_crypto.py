"""OTA's pure parts: semantic versions, canonical JSON, manifest signatures, key sealing
under the key-encryption key, and the staged-rollout bucket of a device.

Nothing here does I/O; the service in :mod:`hexa.hub.ota` stores and serves what these
functions make and check.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

#: the only signature algorithm: ECDSA over P-256 with SHA-256, DER-encoded signatures
ALG = "ecdsa-p256-sha256"
#: the fields of a manifest, exactly (contract §5)
MANIFEST_FIELDS = frozenset(
    {
        "release_id",
        "model",
        "version",
        "channel",
        "security_version",
        "url",
        "sha256",
        "size",
        "issued_at",
        "expires_at",
        "key_id",
        "next_key_id",
    }
)
CHANNELS = ("dev", "beta", "stable")
#: which release channels a device on each channel takes
CHANNEL_TAKES: dict[str, frozenset[str]] = {
    "stable": frozenset({"stable"}),
    "beta": frozenset({"beta", "stable"}),
    "dev": frozenset({"dev", "beta", "stable"}),
}
#: how a sealed private key starts: the version of the format
SEALED_PREFIX = "v1:"

# --- semantic versions (semver.org 2.0.0) -------------------------------------------------
_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)


@dataclass(frozen=True, order=False)
class Version:
    """A parsed semantic version; ordered by semver precedence (build metadata ignored)."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[int | str, ...]

    def key(self) -> tuple[Any, ...]:
        # a release without a pre-release ranks above any pre-release of the same triple;
        # numeric identifiers rank below alphanumeric ones (semver 11.4)
        pre: tuple[Any, ...] = tuple(
            (0, p, "") if isinstance(p, int) else (1, 0, p) for p in self.prerelease
        )
        return (self.major, self.minor, self.patch, 0 if self.prerelease else 1, pre)

    def __lt__(self, other: Version) -> bool:
        return self.key() < other.key()

    def __gt__(self, other: Version) -> bool:
        return self.key() > other.key()


@lru_cache(maxsize=1024)  # pure (Version is frozen): a fleet has few distinct versions
def parse_version(text: str | None) -> Version | None:
    """The semantic version ``text`` spells, or None when it is not one."""
    if not text:
        return None
    m = _SEMVER.match(text)
    if m is None:
        return None
    pre = tuple(int(p) if p.isdigit() else p for p in m.group(4).split(".")) if m.group(4) else ()
    return Version(int(m.group(1)), int(m.group(2)), int(m.group(3)), pre)


def is_above(candidate: str, current: str | None) -> bool:
    """Whether release version ``candidate`` is above the device's ``current`` version. A
    device whose version is unknown or not semver is below every release."""
    new = parse_version(candidate)
    if new is None:
        return False
    old = parse_version(current)
    return old is None or new > old


# --- canonical JSON and signatures ---------------------------------------------------------
def canonical(document: dict[str, Any]) -> bytes:
    """The canonical JSON of ``document``: keys sorted, separators ``,`` and ``:``, no
    whitespace, UTF-8 (non-ASCII characters as themselves, not escaped)."""
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


@lru_cache(maxsize=1024)  # pure: equal aware datetimes are the same instant
def iso(moment: datetime) -> str:
    """A time as manifests carry it: UTC, whole seconds, ``Z``."""
    return moment.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: object) -> datetime | None:
    if not isinstance(text, str) or not text.endswith("Z"):
        return None
    return _parse_iso(text)


@lru_cache(maxsize=1024)  # pure function of the text; datetimes are immutable
def _parse_iso(text: str) -> datetime | None:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def new_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@lru_cache(maxsize=64)
def load_public_key(pem: str) -> ec.EllipticCurvePublicKey | None:
    """The P-256 public key of ``pem``, or None when it is not one. Memoized by the PEM
    text itself (the same text is the same key; key objects are immutable): a fleet
    checking at once does not parse the key once per device."""
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        return None
    return key


def sign(key: ec.EllipticCurvePrivateKey, manifest: dict[str, Any]) -> str:
    """Base64 of the DER ECDSA P-256/SHA-256 signature over the canonical ``manifest``."""
    return base64.b64encode(key.sign(canonical(manifest), ec.ECDSA(hashes.SHA256()))).decode()


def verify(public: ec.EllipticCurvePublicKey, manifest: dict[str, Any], signature: str) -> bool:
    """Whether ``signature`` (base64 DER) signs the canonical ``manifest`` with ``public``."""
    try:
        raw = base64.b64decode(signature, validate=True)
        public.verify(raw, canonical(manifest), ec.ECDSA(hashes.SHA256()))
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# --- private keys at rest -----------------------------------------------------------------
def _aad(key_id: str) -> bytes:
    return b"hexa-ota-signing-key:" + key_id.encode()


def seal_private_key(kek: bytes, key_id: str, key: ec.EllipticCurvePrivateKey) -> str:
    """The private key (PKCS#8 DER) encrypted with AES-256-GCM under ``kek``, bound to
    ``key_id`` through the associated data, so a sealed key copied into another row does
    not open."""
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    nonce = os.urandom(12)
    sealed = AESGCM(kek).encrypt(nonce, der, _aad(key_id))
    return SEALED_PREFIX + base64.b64encode(nonce + sealed).decode()


def open_private_key(kek: bytes, key_id: str, text: str) -> ec.EllipticCurvePrivateKey | None:
    """The private key sealed in ``text`` for ``key_id``, or None (another KEK, another
    row's key, or damaged)."""
    if not text.startswith(SEALED_PREFIX):
        return None
    try:
        raw = base64.b64decode(text.removeprefix(SEALED_PREFIX), validate=True)
        der = AESGCM(kek).decrypt(raw[:12], raw[12:], _aad(key_id))
        key = serialization.load_der_private_key(der, password=None)
    except (ValueError, TypeError, InvalidTag):
        return None
    return key if isinstance(key, ec.EllipticCurvePrivateKey) else None


# --- staged rollout -----------------------------------------------------------------------
def rollout_bucket(device_uid: str, release_id: str) -> int:
    """The device's stable bucket 0-99 for a release: the first 8 bytes of
    SHA-256(device_uid + release_id), big-endian, modulo 100."""
    digest = hashlib.sha256((device_uid + release_id).encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100
