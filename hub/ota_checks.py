"""The fail-closed checks of contract §5 that run before any part of a release is served.

:meth:`ReleaseChecks.verify` checks a release as stored against its signed manifest: the
artifact URL's host, the algorithm, the signing key, the fields, the signature, the expiry
and the artifact's hash. A release that fails is not offered, a direct request for it gets
409 ``release_integrity_failed``, and the failure is logged and counted by check. What is
memoized (signatures, artifact hashes) is keyed by the exact text or file state checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio

from hexa.hub import metrics, ota_crypto
from hexa.hub.errors import Conflict
from hexa.hub.ota_keys import SigningKeys
from hexa.hub.ota_lookups import SingleFlight
from hexa.hub.security import utcnow
from hexa.models import OtaKey, OtaRelease

log = logging.getLogger(__name__)

#: the labels of ``hexa_ota_integrity_failures_total``: one per fail-closed check
CHECKS = ("host", "algorithm", "key", "fields", "signature", "expired", "artifact")
# every label exported from the start (at 0), so that the first failure shows as an increase
for _check in CHECKS:
    metrics.OTA_INTEGRITY_FAILURES.labels(_check)
#: one log line per release and failed check at most this often (a fleet checking a
#: tampered release would otherwise write one line per device)
LOG_EVERY_S = 60.0


# --- errors callers must handle -------------------------------------------------------------
class ReleaseIntegrityFailed(Conflict):
    """A release failed a fail-closed check: nothing of it is served."""

    code = "release_integrity_failed"

    def __init__(self, release_id: uuid.UUID, check: str, reason: str) -> None:
        super().__init__(
            f"release {release_id} failed its {check} check: {reason}",
            details={"release_id": str(release_id), "check": check},
        )
        self.release_id, self.check, self.reason = release_id, check, reason


class ReleaseChecks:
    """The checks of one hub process, with what they memoize."""

    def __init__(
        self,
        keys: SigningKeys,
        *,
        allowed_hosts: Callable[[], tuple[str, ...]],
        artifact_path: Callable[[uuid.UUID], Path],
    ) -> None:
        self._keys = keys
        self._allowed_hosts = allowed_hosts
        self._artifact_path = artifact_path
        #: artifact path → ((size, mtime, ctime, inode), sha256)
        self._hashes: dict[Path, tuple[tuple[int, int, int, int], str]] = {}
        self._hashing = SingleFlight()
        #: (key id, manifest, signature) → verified
        self._signatures: dict[tuple[str, str, str, str], bool] = {}
        self._logged: dict[tuple[uuid.UUID, str], float] = {}
        #: the key rows: checks made at once share one query
        self._queries = SingleFlight()

    async def verify(self, release: OtaRelease, *, count: bool = True) -> dict[str, Any]:
        """Every check of contract §5 on a release as stored; its manifest when all pass.
        Raises :class:`ReleaseIntegrityFailed` (logged and counted unless ``count`` is
        False) naming the first check that failed."""
        try:
            return await self._verify(release)
        except ReleaseIntegrityFailed as exc:
            if count:
                metrics.OTA_INTEGRITY_FAILURES.labels(exc.check).inc()
                key = (release.id, exc.check)
                now = time.monotonic()
                if now - self._logged.get(key, -LOG_EVERY_S) >= LOG_EVERY_S:
                    self._logged[key] = now
                    log.error("OTA release refused: %s", exc.message)
            raise

    async def _verify(self, release: OtaRelease) -> dict[str, Any]:
        def fail(check: str, reason: str) -> ReleaseIntegrityFailed:
            return ReleaseIntegrityFailed(release.id, check, reason)

        try:
            manifest = _loads(release.manifest)
        except ValueError:
            raise fail("fields", "the stored manifest is not a JSON object") from None
        if set(manifest) != ota_crypto.MANIFEST_FIELDS:
            raise fail("fields", "the stored manifest does not have the manifest's fields")
        url = manifest["url"]
        parts = urlsplit(url) if isinstance(url, str) else None
        if (
            parts is None
            or parts.scheme not in ("http", "https")
            or (parts.hostname or "").lower() not in self._allowed_hosts()
        ):
            raise fail("host", "the artifact URL's host is not allowed")
        if release.alg != ota_crypto.ALG:
            raise fail("algorithm", f"algorithm {release.alg!r} is not {ota_crypto.ALG}")
        key_id = _uuid(manifest.get("key_id"))
        keys = await self._queries.run("keys", lambda: OtaKey.all())
        key = next((k for k in keys if k.id == key_id), None)
        if key is None or key.status == "retired" or not self._keys.intact(key):
            raise fail("key", "the signing key is unknown, retired or damaged")
        public = ota_crypto.load_public_key(key.public_key_pem)
        if public is None:
            raise fail("key", "the signing key is not a P-256 public key")
        stored = {
            "release_id": str(release.id),
            "model": release.model,
            "version": release.version,
            "channel": release.channel,
            "security_version": release.security_version,
            "sha256": release.sha256,
            "size": release.size,
            "expires_at": ota_crypto.iso(release.expires_at),
            "key_id": release.key_id,
            "next_key_id": release.next_key_id,
        }
        for name, value in stored.items():
            if manifest[name] != value or type(manifest[name]) is not type(value):
                raise fail("fields", f"the stored {name} differs from the signed manifest")
        if not url.endswith(f"/ota/artifacts/{release.id}"):
            raise fail("fields", "the signed URL does not point at this release's artifact")
        cache_key = (str(key.id), key.public_key_pem, release.manifest, release.signature)
        good = self._signatures.get(cache_key)
        if good is None:
            good = ota_crypto.verify(public, manifest, release.signature)
            if len(self._signatures) > 10_000:
                self._signatures.clear()
            self._signatures[cache_key] = good
        if not good:
            raise fail("signature", "the signature does not verify")
        expires = ota_crypto.parse_iso(manifest["expires_at"])
        if expires is None or expires <= utcnow():
            raise fail("expired", "the manifest has expired")
        digest = await self._artifact_hash(self._artifact_path(release.id), release.size)
        if digest != manifest["sha256"]:
            raise fail("artifact", "the stored artifact does not match the signed hash and size")
        return manifest

    async def _artifact_hash(self, path: Path, size: int) -> str | None:
        """SHA-256 of the artifact, recomputed whenever the file changed (size, mtime, ctime
        or inode); None when it is missing or not ``size`` bytes."""
        try:
            st = os.stat(path)  # a cheap syscall, on every check: the file may have changed
        except OSError:
            return None
        if st.st_size != size:
            return None
        stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        cached = self._hashes.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]

        async def rehash() -> str:
            try:
                digest = await anyio.to_thread.run_sync(_sha256_file, path)
            except OSError:
                return ""
            self._hashes[path] = (stamp, digest)
            return digest

        return await self._hashing.run(path, rehash) or None


def _loads(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("not an object")
    return value


def _uuid(value: object) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()
