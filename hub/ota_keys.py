"""OTA signing keys: ECDSA P-256, their private halves sealed with AES-256-GCM under a
key-encryption key (KEK) that is not in the database.

The KEK is ``HEXA_OTA_KEK``, else ``<data dir>/ota/kek`` (generated once, 0600). One key
is ``active`` (it signs), at most one ``next`` (announced in every manifest, so devices
trust it before it signs), the rest ``retired``. Re-signing the releases when a key is
created or rotated is the service's (:class:`hexa.hub.ota.Ota`).
"""

from __future__ import annotations

import base64
import logging
import os
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric import ec
from tortoise.transactions import in_transaction

from hexa.hub import ota_crypto
from hexa.hub.errors import Conflict
from hexa.hub.security import utcnow
from hexa.models import OtaKey

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class NoSigningKey(Conflict):
    """A release cannot be signed: the hub has no active key yet."""

    code = "no_signing_key"


class SigningKeys:
    """The hub's signing keys and the KEK that opens them."""

    def __init__(self, root: Path, kek: bytes | None) -> None:
        #: ``<data dir>/ota``, where the KEK is generated when the settings give none
        self._root = root
        self._kek = kek
        #: key id → (public PEM, sealed private key) that were checked to belong together
        self._checked: dict[str, tuple[str, str, bool]] = {}

    def kek(self) -> bytes:
        """The key-encryption key: the setting, else ``<data dir>/ota/kek`` (created once,
        0600, base64 of 32 random bytes)."""
        if self._kek is not None:
            return self._kek
        self._root.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._root / "kek"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.unlink(missing_ok=True)
            with os.fdopen(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600), "w") as f:
                f.write(base64.b64encode(os.urandom(32)).decode() + "\n")
            tmp.replace(path)
            log.warning(
                "generated the OTA key-encryption key %s: back it up (without it the signing "
                "keys cannot be opened)",
                path,
            )
        try:
            key = base64.b64decode(path.read_text().strip(), validate=True)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise Conflict(f"{path} is not base64 of 32 bytes")
        self._kek = key
        return key

    async def all(self) -> list[OtaKey]:
        """Every key, oldest first."""
        return list(await OtaKey.all().order_by("created_at", "id"))

    async def create(self) -> OtaKey:
        """A new key: ``active`` when there is none, else ``next`` (409 when there is one)."""
        private = ota_crypto.new_private_key()
        key_id = uuid.uuid4()
        kek = self.kek()
        async with in_transaction():
            rows = await OtaKey.filter(status__in=("active", "next")).only("status")
            statuses = {str(k.status) for k in rows}
            if "next" in statuses:
                raise Conflict("there is a next key already: rotate first")
            status = "next" if "active" in statuses else "active"
            return await OtaKey.create(
                id=key_id,
                status=status,
                public_key_pem=ota_crypto.public_pem(private),
                private_key_sealed=ota_crypto.seal_private_key(kek, str(key_id), private),
                activated_at=utcnow() if status == "active" else None,
            )

    async def rotate(self, before: Callable[[], Awaitable[_T]]) -> tuple[OtaKey, OtaKey | None, _T]:
        """``next`` becomes ``active``, ``active`` becomes ``retired``, in one transaction
        (409 without a next key). ``before`` runs in it under the keys as they are, before
        the change. Returns the new active key, the retired one and what ``before`` gave."""
        now = utcnow()
        async with in_transaction():
            nxt = await OtaKey.filter(status="next").first()
            if nxt is None:
                raise Conflict("there is no next key to rotate to: POST /ota/keys first")
            old = await OtaKey.filter(status="active").first()
            checked = await before()
            if old is not None:
                await OtaKey.filter(id=old.id).update(status="retired", retired_at=now)
            await OtaKey.filter(id=nxt.id).update(status="active", activated_at=now)
        return nxt, old, checked

    async def signer(self) -> tuple[OtaKey, ec.EllipticCurvePrivateKey, OtaKey | None]:
        """The active key, its opened private half and the next key (409
        ``no_signing_key`` without an active key, 409 when the KEK does not open it)."""
        active = await OtaKey.filter(status="active").first()
        if active is None:
            raise NoSigningKey("the hub has no active OTA signing key: POST /ota/keys first")
        private = ota_crypto.open_private_key(self.kek(), str(active.id), active.private_key_sealed)
        if private is None or ota_crypto.public_pem(private) != active.public_key_pem:
            raise Conflict("the active OTA signing key cannot be opened with this hub's KEK")
        nxt = await OtaKey.filter(status="next").first()
        return active, private, nxt

    def intact(self, key: OtaKey) -> bool:
        """Whether the stored public key is the one of the sealed private key (so a row
        whose public key was swapped is not trusted); checked once per stored pair."""
        kid = str(key.id)
        seen = self._checked.get(kid)
        if seen is not None and seen[:2] == (key.public_key_pem, key.private_key_sealed):
            return seen[2]
        private = ota_crypto.open_private_key(self.kek(), kid, key.private_key_sealed)
        ok = private is not None and ota_crypto.public_pem(private) == key.public_key_pem
        self._checked[kid] = (key.public_key_pem, key.private_key_sealed, ok)
        return ok
