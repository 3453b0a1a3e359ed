"""Signed firmware updates (OTA): signing keys, releases, what each device is offered, and
the fail-closed checks that run before anything is served.

- Keys are ECDSA P-256. Private keys are sealed with AES-256-GCM under a key-encryption
  key (KEK) that is not in the database: ``HEXA_OTA_KEK``, else ``<data dir>/ota/kek``
  (generated once, 0600). One key is ``active`` (it signs), at most one ``next`` (announced
  in every manifest, so devices trust it before it signs), the rest ``retired``.
- A release's manifest is signed when it is uploaded and stored with it, in canonical
  JSON. Creating a ``next`` key and rotating re-sign the releases still in use, after
  checking them, so that a rotation never strands a fleet.
- Before a manifest or an artifact is served, :meth:`Ota.verify` checks the release
  against its signed manifest (host, algorithm, key, fields, signature, expiry, the
  artifact's hash). A release that fails is not offered, a direct request for it gets 409
  ``release_integrity_failed``, and the failure is logged and counted by check.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import anyio
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ConfigDict
from tortoise.exceptions import IntegrityError
from tortoise.transactions import in_transaction

from hexa.hub import metrics, ota_crypto, topics
from hexa.hub.access import DEVICE, Principal, fetch
from hexa.hub.audit import AuditLog
from hexa.hub.config import Settings
from hexa.hub.errors import Conflict, DeviceOffline, HubError, NotFound, ValidationFailed
from hexa.hub.mqtt.busapi import BusLike
from hexa.hub.security import token_hash, utcnow
from hexa.hub.state import DeviceCache
from hexa.models import Device, OtaKey, OtaRelease, OtaReport

log = logging.getLogger(__name__)

#: what a device may report about a release
REPORT_STATES = ("downloading", "verified", "installing", "applied", "failed")
#: releases in these states keep a valid signature through key changes
SIGNED_STATES = ("draft", "published", "halted")
#: the labels of ``hexa_ota_integrity_failures_total``: one per fail-closed check
CHECKS = ("host", "algorithm", "key", "fields", "signature", "expired", "artifact")
#: a release halts only once at least this many devices reported on it
HALT_MIN_REPORTS = 5
DEFAULT_LIFETIME = timedelta(days=90)

# every label exported from the start (at 0), so that the first failure shows as an increase
for _check in CHECKS:
    metrics.OTA_INTEGRITY_FAILURES.labels(_check)
for _status in REPORT_STATES:
    metrics.OTA_REPORTS.labels(_status)
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


class NoUpdate(NotFound):
    """No release is offered to this device now."""

    code = "no_update"

    def __init__(self) -> None:
        HubError.__init__(self, "no update for this device", details=None)
        self.kind, self.ident = "update", None


class NoSigningKey(Conflict):
    """A release cannot be signed: the hub has no active key yet."""

    code = "no_signing_key"


class OtaCommand(BaseModel):
    """``hexa/<uid>/cmd`` (and ``/ws/device``): check for an update now."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["ota"] = "ota"
    command_id: str
    release_id: str
    manifest_url: str


class SingleFlight:
    """Concurrent callers asking the same question share one database query.

    Not a cache: a caller never gets an answer from a query that finished before it asked;
    it joins one still running, or starts its own. A fleet checking at once thus costs a
    few queries instead of one per device, and a changed row is seen by the next query.
    """

    def __init__(self) -> None:
        self._running: dict[Any, asyncio.Future[Any]] = {}

    async def run(self, key: Any, query: Callable[[], Any]) -> Any:
        running = self._running.get(key)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._running[key] = future
        try:
            result = await query()
        except BaseException as exc:
            future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("cancelled"))
            future.exception()  # retrieved: joiners re-raise it, nobody else must
            raise
        finally:
            self._running.pop(key, None)
        future.set_result(result)
        return result


#: the fields of a device the OTA routes use: a device authenticated for them is read with
#: these alone (a full row, with its dates and metadata, cost a fleet's checks a tenth of
#: their CPU); reading any other field of it raises AttributeError
DEVICE_FIELDS = (
    "id",
    "device_uid",
    "model",
    "fw_version",
    "token_hash",
    "ota_channel",
    "ota_security_version",
)


class DeviceBatches:
    """Device lookups by uid, batched: at most one ``WHERE device_uid IN (…)`` query runs at
    a time, and the lookups made while it runs become the next one (HTTP Basic auth of a
    fleet at once). An idle hub answers a lookup at once, a busy one in few queries.

    Not a cache: every lookup is answered by a query that started after it was made."""

    #: uids per query (well under SQLite's and PostgreSQL's limits on parameters)
    MAX_BATCH = 500

    def __init__(self) -> None:
        self._waiting: dict[str, list[asyncio.Future[Device | None]]] = {}
        self._flight: asyncio.Task[None] | None = None

    async def get(self, uid: str) -> Device | None:
        future: asyncio.Future[Device | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(uid, []).append(future)
        if self._flight is None:
            self._flight = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            await asyncio.sleep(0)  # the other lookups of this turn join the first batch
            while self._waiting:
                uids = list(self._waiting)[: self.MAX_BATCH]
                batch = {uid: self._waiting.pop(uid) for uid in uids}
                try:
                    rows = await Device.filter(device_uid__in=uids, deleted_at=None).only(
                        *DEVICE_FIELDS
                    )
                except Exception as exc:  # noqa: BLE001 - each caller of the batch re-raises it
                    _fail(batch, exc)
                    continue
                found = {d.device_uid: d for d in rows}
                for uid, waiting in batch.items():
                    for f in waiting:
                        if not f.done():
                            # each caller its own copy: a route may change its device
                            f.set_result(_copy(found[uid]) if uid in found else None)
        except BaseException as exc:  # cancelled (the hub stops): nobody waits forever
            _fail(self._waiting, exc)
            self._waiting = {}
            raise
        finally:
            self._flight = None


def _fail(batch: dict[str, list[asyncio.Future[Device | None]]], exc: BaseException) -> None:
    for waiting in batch.values():
        for f in waiting:
            if not f.done():
                f.set_exception(RuntimeError(f"device lookup failed: {exc!r}"))
                f.exception()  # retrieved: the caller re-raises it, nobody else must


def _copy(device: Device) -> Device:
    clone = Device.__new__(Device)
    clone.__dict__.update(device.__dict__)
    return clone


@dataclass(frozen=True)
class Offer:
    """A release offered to a device, with what ``/ota/check`` tells it."""

    release: OtaRelease
    manifest_url: str


class Ota:
    """The OTA service of one hub process."""

    def __init__(
        self,
        settings: Settings,
        audit: AuditLog,
        bus: BusLike,
        cache: DeviceCache,
        *,
        api_base: Callable[[], str],
    ) -> None:
        self.settings = settings
        self.audit = audit
        self.bus = bus
        self.cache = cache
        #: the API's public base (``http://host:port/api/v1``), known once the server listens
        self._api_base = api_base
        self._kek: bytes | None = settings.ota_kek
        #: key id → (public PEM, sealed private key) that were checked to belong together
        self._key_checked: dict[str, tuple[str, str, bool]] = {}
        #: artifact path → ((size, mtime, ctime, inode), sha256)
        self._hashes: dict[Path, tuple[tuple[int, int, int, int], str]] = {}
        self._hashing = SingleFlight()
        #: (key id, manifest, signature) → verified
        self._signatures: dict[tuple[str, str, str, str], bool] = {}
        self._logged: dict[tuple[uuid.UUID, str], float] = {}
        self._paths: dict[uuid.UUID, Path] = {}
        self._queries = SingleFlight()
        self._devices = DeviceBatches()

    async def authenticate(self, device_uid: str, token: str) -> Device | None:
        """The live device of an HTTP Basic pair, or None (wrong, revoked, deleted), with
        :data:`DEVICE_FIELDS` only. Lookups of many devices at once share queries; nothing
        is cached."""
        if not device_uid or not token or len(device_uid) > 64:
            return None
        device = await self._devices.get(device_uid)
        if device is None or not hmac.compare_digest(device.token_hash, token_hash(token)):
            return None
        return device

    # --- storage ---------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return self.settings.data_dir / "ota"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def artifact_path(self, release_id: uuid.UUID) -> Path:
        path = self._paths.get(release_id)  # the path only: the file is checked on every use
        if path is None:
            path = self._paths[release_id] = self.artifacts / f"{release_id}.bin"
        return path

    def prepare_storage(self) -> None:
        """``<data dir>/ota/artifacts``, 0700."""
        self.artifacts.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root.chmod(0o700)

    def kek(self) -> bytes:
        """The key-encryption key: the setting, else ``<data dir>/ota/kek`` (created once,
        0600, base64 of 32 random bytes)."""
        if self._kek is not None:
            return self._kek
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.root / "kek"
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

    def api_base(self) -> str:
        if self.settings.ota_base_url:
            return self.settings.ota_base_url + "/api/v1"
        return self._api_base()

    def artifact_url(self, release_id: uuid.UUID) -> str:
        return f"{self.api_base()}/ota/artifacts/{release_id}"

    def manifest_url(self, device_uid: str) -> str:
        return f"{self.api_base()}/ota/manifest/{device_uid}"

    def allowed_hosts(self) -> tuple[str, ...]:
        if self.settings.ota_allowed_hosts:
            return self.settings.ota_allowed_hosts
        host = urlsplit(self.api_base()).hostname
        return (host.lower(),) if host else ()

    # --- keys ------------------------------------------------------------------------------
    async def keys(self) -> list[OtaKey]:
        return list(await OtaKey.all().order_by("created_at", "id"))

    async def create_key(self, principal: Principal, *, request_id: str | None) -> OtaKey:
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
            key = await OtaKey.create(
                id=key_id,
                status=status,
                public_key_pem=ota_crypto.public_pem(private),
                private_key_sealed=ota_crypto.seal_private_key(kek, str(key_id), private),
                activated_at=utcnow() if status == "active" else None,
            )
        await self._audit(
            principal, "ota_key_created", request_id, key_id=str(key_id), status=status
        )
        if status == "next":  # announce it in every manifest, signed by the active key
            await self.resign(principal, request_id)
        return key

    async def rotate(self, principal: Principal, *, request_id: str | None) -> list[OtaKey]:
        """``next`` becomes ``active``, ``active`` becomes ``retired``; the releases in use
        are re-signed with the new active key (409 without a next key)."""
        now = utcnow()
        async with in_transaction():
            nxt = await OtaKey.filter(status="next").first()
            if nxt is None:
                raise Conflict("there is no next key to rotate to: POST /ota/keys first")
            old = await OtaKey.filter(status="active").first()
            # verify the releases under the keys as they are, before the change
            checked = await self._verified_releases()
            if old is not None:
                await OtaKey.filter(id=old.id).update(status="retired", retired_at=now)
            await OtaKey.filter(id=nxt.id).update(status="active", activated_at=now)
        await self._audit(
            principal,
            "ota_keys_rotated",
            request_id,
            key_id=str(nxt.id),
            retired_key_id=str(old.id) if old else None,
        )
        await self.resign(principal, request_id, releases=checked)
        return await self.keys()

    async def _signer(self) -> tuple[OtaKey, ec.EllipticCurvePrivateKey, OtaKey | None]:
        active = await OtaKey.filter(status="active").first()
        if active is None:
            raise NoSigningKey("the hub has no active OTA signing key: POST /ota/keys first")
        private = ota_crypto.open_private_key(self.kek(), str(active.id), active.private_key_sealed)
        if private is None or ota_crypto.public_pem(private) != active.public_key_pem:
            raise Conflict("the active OTA signing key cannot be opened with this hub's KEK")
        nxt = await OtaKey.filter(status="next").first()
        return active, private, nxt

    def _key_intact(self, key: OtaKey) -> bool:
        """Whether the stored public key is the one of the sealed private key (so a row
        whose public key was swapped is not trusted); checked once per stored pair."""
        kid = str(key.id)
        seen = self._key_checked.get(kid)
        if seen is not None and seen[:2] == (key.public_key_pem, key.private_key_sealed):
            return seen[2]
        private = ota_crypto.open_private_key(self.kek(), kid, key.private_key_sealed)
        ok = private is not None and ota_crypto.public_pem(private) == key.public_key_pem
        self._key_checked[kid] = (key.public_key_pem, key.private_key_sealed, ok)
        return ok

    # --- releases --------------------------------------------------------------------------
    def _manifest(self, release: OtaRelease, issued_at: datetime) -> dict[str, Any]:
        return {
            "release_id": str(release.id),
            "model": release.model,
            "version": release.version,
            "channel": release.channel,
            "security_version": release.security_version,
            "url": self.artifact_url(release.id),
            "sha256": release.sha256,
            "size": release.size,
            "issued_at": ota_crypto.iso(issued_at),
            "expires_at": ota_crypto.iso(release.expires_at),
            "key_id": release.key_id,
            "next_key_id": release.next_key_id,
        }

    async def _sign_into(self, release: OtaRelease) -> None:
        active, private, nxt = await self._signer()
        release.key_id = str(active.id)
        release.next_key_id = str(nxt.id) if nxt else None
        manifest = self._manifest(release, utcnow())
        release.manifest = ota_crypto.canonical(manifest).decode()
        release.alg = ota_crypto.ALG
        release.signature = ota_crypto.sign(private, manifest)

    async def upload(
        self,
        principal: Principal,
        *,
        model: str,
        version: str,
        channel: str,
        security_version: int,
        notes: str | None,
        expires_at: datetime | None,
        staged: Path,
        sha256: str,
        size: int,
        request_id: str | None,
    ) -> OtaRelease:
        """Store an uploaded artifact (``staged``, already hashed, on the same file system)
        as a draft release, with its manifest signed by the active key."""
        now = utcnow()
        expires = (expires_at or now + DEFAULT_LIFETIME).replace(microsecond=0)
        if expires <= now:
            raise ValidationFailed(
                "expires_at must be in the future", details={"field": "expires_at"}
            )
        if await OtaRelease.filter(model=model, version=version).exists():
            raise Conflict(f"{model} {version} exists already", details={"field": "version"})
        release = OtaRelease(
            id=uuid.uuid4(),
            model=model,
            version=version,
            channel=channel,
            security_version=security_version,
            notes=notes,
            sha256=sha256,
            size=size,
            expires_at=expires,
            created_by=principal.id,
        )
        await self._sign_into(release)
        path = self.artifact_path(release.id)
        await anyio.Path(staged).replace(path)
        try:
            await release.save(force_create=True)
        except IntegrityError:
            path.unlink(missing_ok=True)
            raise Conflict(
                f"{model} {version} exists already", details={"field": "version"}
            ) from None
        await self._audit(
            principal,
            "ota_release_uploaded",
            request_id,
            release_id=str(release.id),
            model=model,
            version=version,
            channel=channel,
            security_version=security_version,
            sha256=sha256,
            size=size,
        )
        return release

    async def update(
        self,
        principal: Principal,
        release_id: uuid.UUID,
        changes: dict[str, Any],
        *,
        request_id: str | None,
    ) -> OtaRelease:
        """Publish, withdraw or resume a release, or change its rollout and halt threshold."""
        release = await OtaRelease.get_or_none(id=release_id)
        if release is None:
            raise NotFound("release")
        before = release.status
        status = changes.get("status")
        now = utcnow()
        if status is not None and status != before:
            if before == "withdrawn":
                raise Conflict("a withdrawn release stays withdrawn")
            if status == "published":
                if release.expires_at <= now:
                    raise Conflict("the release has expired")
                await self.verify(release)  # nothing unsigned or tampered goes out
                release.published_at = release.published_at or now
                if before == "halted":
                    release.resumed_at = now
                    release.halted_at = None
            release.status = status
        for name in ("rollout_percent", "halt_failure_percent"):
            if changes.get(name) is not None:
                setattr(release, name, changes[name])
        await release.save()
        await self._audit(
            principal,
            "ota_release_updated",
            request_id,
            release_id=str(release.id),
            version=release.version,
            status_from=before,
            status=release.status,
            rollout_percent=release.rollout_percent,
            halt_failure_percent=release.halt_failure_percent,
        )
        return release

    async def _verified_releases(self) -> list[OtaRelease]:
        good = []
        for release in await OtaRelease.filter(status__in=SIGNED_STATES):
            try:
                await self.verify(release, count=False)
            except ReleaseIntegrityFailed as exc:
                if exc.check == "expired":
                    continue
                log.error("release %s not re-signed: %s", release.id, exc.message)
                metrics.OTA_INTEGRITY_FAILURES.labels(exc.check).inc()
                continue
            good.append(release)
        return good

    async def resign(
        self,
        principal: Principal,
        request_id: str | None,
        releases: Sequence[OtaRelease] | None = None,
    ) -> int:
        """Sign the releases in use again with the active key (announcing the next one).
        Only releases that pass every check are re-signed: a tampered one stays refused."""
        todo = list(releases) if releases is not None else await self._verified_releases()
        for release in todo:
            await self._sign_into(release)
            await release.save(
                update_fields=["key_id", "next_key_id", "manifest", "alg", "signature"]
            )
        if todo:
            await self._audit(principal, "ota_releases_resigned", request_id, count=len(todo))
        return len(todo)

    # --- the fail-closed checks ------------------------------------------------------------
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
            or (parts.hostname or "").lower() not in self.allowed_hosts()
        ):
            raise fail("host", "the artifact URL's host is not allowed")
        if release.alg != ota_crypto.ALG:
            raise fail("algorithm", f"algorithm {release.alg!r} is not {ota_crypto.ALG}")
        key_id = _uuid(manifest.get("key_id"))
        keys = await self._queries.run("keys", lambda: OtaKey.all())
        key = next((k for k in keys if k.id == key_id), None)
        if key is None or key.status == "retired" or not self._key_intact(key):
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
        digest = await self._artifact_hash(self.artifact_path(release.id), release.size)
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

    # --- what a device is offered ----------------------------------------------------------
    async def candidates(self, device: Device) -> list[OtaRelease]:
        """Published, unexpired releases for the device's model and channel, highest first."""
        takes = ota_crypto.CHANNEL_TAKES.get(device.ota_channel, frozenset({"stable"}))
        published = await self._queries.run(
            ("published", device.model),
            lambda: OtaRelease.filter(model=device.model, status="published"),
        )
        now = utcnow()
        rows = [r for r in published if r.channel in takes and r.expires_at > now]
        versioned = [(ota_crypto.parse_version(r.version), r) for r in rows]
        ranked = [(v, r) for v, r in versioned if v is not None]
        ranked.sort(key=lambda pair: pair[0].key(), reverse=True)
        return [r for _, r in ranked]

    @staticmethod
    def eligible(release: OtaRelease, device: Device, fw_version: str | None) -> bool:
        """Contract §5's rules for one release (status, channel and expiry are the query's):
        above the device's version, not below its security version, inside the rollout."""
        return (
            ota_crypto.is_above(release.version, fw_version)
            and release.security_version >= device.ota_security_version
            and ota_crypto.rollout_bucket(device.device_uid, str(release.id))
            < release.rollout_percent
        )

    async def select(self, device: Device, fw_version: str | None) -> OtaRelease | None:
        """The release the device gets: the highest eligible one (not yet verified)."""
        for release in await self.candidates(device):
            if self.eligible(release, device, fw_version):
                return release
        return None

    async def offer(self, device: Device, fw_version: str | None) -> Offer | None:
        """The verified release offered to the device, or None. A selected release that
        fails a check is not offered, and nothing older is offered in its place."""
        release = await self.select(device, fw_version)
        if release is None:
            return None
        try:
            await self.verify(release)
        except ReleaseIntegrityFailed:
            return None
        return Offer(release, self.manifest_url(device.device_uid))

    async def signed_manifest(self, device: Device) -> dict[str, Any]:
        """The signed manifest of the release offered to the device (404 ``no_update``,
        409 ``release_integrity_failed``)."""
        release = await self.select(device, device.fw_version)
        if release is None:
            raise NoUpdate()
        manifest = await self.verify(release)
        return {
            "manifest": manifest,
            "alg": release.alg,
            "key_id": manifest["key_id"],
            "signature": release.signature,
        }

    async def artifact(self, device: Device, release_id: uuid.UUID) -> tuple[Path, OtaRelease]:
        """The artifact file of a release the device is offered: 404 for a release of
        another model or one not offered to it, 409 when the release fails a check."""
        release = await OtaRelease.get_or_none(id=release_id, model=device.model)
        if release is None:
            raise NotFound("release")
        await self.verify(release)
        if not self.offered(release, device):
            raise NotFound("release")
        return self.artifact_path(release.id), release

    def offered(self, release: OtaRelease, device: Device) -> bool:
        """Whether the device may have ``release`` now: published, unexpired, on a channel it
        takes and eligible by the rules of :meth:`eligible` — not necessarily the highest
        (a device that started on one release finishes it when a newer one appears)."""
        takes = ota_crypto.CHANNEL_TAKES.get(device.ota_channel, frozenset({"stable"}))
        return (
            release.status == "published"
            and release.expires_at > utcnow()
            and release.channel in takes
            and self.eligible(release, device, device.fw_version)
        )

    # --- reports ---------------------------------------------------------------------------
    async def report(
        self, device: Device, release_id: uuid.UUID, status: str, error: str | None
    ) -> None:
        """Record a device's report. A release it was never offered is 404: accepted are
        releases it reported on before, and those it may have now (:meth:`offered`)."""
        release = await OtaRelease.get_or_none(id=release_id, model=device.model)
        if release is None:
            raise NotFound("release")
        now = utcnow()
        existing = await OtaReport.get_or_none(device_id=device.id, release_id=release.id)
        if existing is None:
            if not self.offered(release, device):
                raise NotFound("release")
            try:
                await OtaReport.create(
                    device_id=device.id, release_id=release.id, status=status, error=error
                )
            except IntegrityError:  # the same device reporting twice at once
                await OtaReport.filter(device_id=device.id, release_id=release.id).update(
                    status=status, error=error, updated_at=now
                )
        else:
            await OtaReport.filter(id=existing.id).update(
                status=status, error=error, updated_at=now
            )
        changes: dict[str, Any] = {
            "ota_release_id": release.id,
            "ota_status": status,
            "ota_error": error,
            "ota_updated_at": now,
        }
        if status == "applied":
            changes["fw_version"] = release.version
            changes["ota_security_version"] = max(
                device.ota_security_version, release.security_version
            )
            cached = self.cache.peek(device.device_uid)
            if cached is not None:
                cached.fw_version = release.version
        await Device.filter(id=device.id).update(**changes)
        metrics.OTA_REPORTS.labels(status).inc()
        if status == "failed":
            await self._maybe_halt(release)

    async def _maybe_halt(self, release: OtaRelease) -> None:
        """Halt a published release once at least ``HALT_MIN_REPORTS`` devices reported
        (since it was last resumed) and more than ``halt_failure_percent`` of them failed."""
        reports = OtaReport.filter(release_id=release.id)
        if release.resumed_at is not None:
            reports = reports.filter(updated_at__gte=release.resumed_at)
        total = await reports.count()
        failed = await reports.filter(status="failed").count()
        if total < HALT_MIN_REPORTS or failed * 100 <= release.halt_failure_percent * total:
            return
        halted = await OtaRelease.filter(id=release.id, status="published").update(
            status="halted", halted_at=utcnow()
        )
        if not halted:
            return
        metrics.OTA_HALTS.inc()
        log.warning(
            "OTA release %s (%s %s) halted: %d of %d devices failed",
            release.id,
            release.model,
            release.version,
            failed,
            total,
        )
        await self.audit.record(
            action="ota_release_halted",
            source="system",
            actor_type="system",
            details={
                "release_id": str(release.id),
                "version": release.version,
                "failed": failed,
                "reported": total,
                "halt_failure_percent": release.halt_failure_percent,
            },
        )

    # --- telling a device to check ---------------------------------------------------------
    async def tell_device(
        self, principal: Principal, device_id: uuid.UUID, *, request_id: str | None
    ) -> tuple[OtaCommand, OtaRelease]:
        """Send ``{"type":"ota",…}`` to a connected device offered a release (404
        ``no_update`` when none is, 503 ``device_offline`` when it is not connected)."""
        device = await fetch(DEVICE, device_id, principal, "configure_devices")
        release = await self.select(device, device.fw_version)
        if release is None:
            raise NoUpdate()
        await self.verify(release)
        if not device.online:
            raise DeviceOffline(device.device_uid)
        command = OtaCommand(
            command_id=uuid.uuid4().hex,
            release_id=str(release.id),
            manifest_url=self.manifest_url(device.device_uid),
        )
        await self.bus.publish(topics.CMD.format(uid=device.device_uid), topics.encode(command))
        await self.audit.by_user(
            principal.id,
            "ota_update_requested",
            org_id=device.org_id,
            device_id=device.id,
            request_id=request_id,
            details={
                "device_uid": device.device_uid,
                "release_id": str(release.id),
                "version": release.version,
                "command_id": command.command_id,
            },
        )
        return command, release

    async def _audit(
        self, principal: Principal, action: str, request_id: str | None, **details: Any
    ) -> None:
        await self.audit.by_user(
            principal.id, action, org_id=None, request_id=request_id, details=details
        )


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
