"""Signed firmware updates (OTA): releases, what each device is offered, what devices
report, and telling a device to check now.

The service composes the signing keys (:mod:`hexa.hub.ota_keys`), the fail-closed checks
that run before anything of a release is served (:mod:`hexa.hub.ota_checks`) and the
lookups the fleet's routes share (:mod:`hexa.hub.ota_lookups`). A release's manifest is
signed when it is uploaded and stored with it, in canonical JSON. Creating a ``next`` key
and rotating re-sign the releases still in use, after checking them, so that a rotation
never strands a fleet.
"""

from __future__ import annotations

import hmac
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import anyio
from pydantic import BaseModel, ConfigDict
from tortoise.exceptions import IntegrityError

from hexa.hub import metrics, ota_crypto, ota_offers, topics
from hexa.hub.access import DEVICE, Principal, fetch
from hexa.hub.audit import AuditLog
from hexa.hub.config import Settings
from hexa.hub.errors import Conflict, DeviceOffline, HubError, NotFound, ValidationFailed
from hexa.hub.mqtt.busapi import BusLike
from hexa.hub.ota_checks import ReleaseChecks, ReleaseIntegrityFailed
from hexa.hub.ota_keys import SigningKeys
from hexa.hub.ota_lookups import DeviceBatches, SingleFlight
from hexa.hub.ota_reports import Reports
from hexa.hub.security import token_hash, utcnow
from hexa.hub.state import DeviceCache
from hexa.models import Device, OtaKey, OtaRelease

log = logging.getLogger(__name__)

#: releases in these states keep a valid signature through key changes
SIGNED_STATES = ("draft", "published", "halted")
DEFAULT_LIFETIME = timedelta(days=90)


# --- errors callers must handle -------------------------------------------------------------
class NoUpdate(NotFound):
    """No release is offered to this device now."""

    code = "no_update"

    def __init__(self) -> None:
        HubError.__init__(self, "no update for this device", details=None)
        self.kind, self.ident = "update", None


class OtaCommand(BaseModel):
    """``hexa/<uid>/cmd`` (and ``/ws/device``): check for an update now."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["ota"] = "ota"
    command_id: str
    release_id: str
    manifest_url: str


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
        self._paths: dict[uuid.UUID, Path] = {}
        self._keys = SigningKeys(self.root, settings.ota_kek)
        self._checks = ReleaseChecks(
            self._keys, allowed_hosts=self.allowed_hosts, artifact_path=self.artifact_path
        )
        #: the published releases of a model: checks made at once share one query
        self._queries = SingleFlight()
        self._devices = DeviceBatches()
        self._reports = Reports(cache, audit)

    async def authenticate(self, device_uid: str, token: str) -> Device | None:
        """The live device of an HTTP Basic pair, or None (wrong, revoked, deleted), with
        :data:`~hexa.hub.ota_lookups.DEVICE_FIELDS` only. Lookups of many devices at once
        share queries; nothing is cached."""
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
    async def create_key(self, principal: Principal, *, request_id: str | None) -> OtaKey:
        """A new key: ``active`` when there is none, else ``next`` (409 when there is one)."""
        key = await self._keys.create()
        status = str(key.status)
        await self._audit(
            principal, "ota_key_created", request_id, key_id=str(key.id), status=status
        )
        if status == "next":  # announce it in every manifest, signed by the active key
            await self.resign(principal, request_id)
        return key

    async def rotate(self, principal: Principal, *, request_id: str | None) -> list[OtaKey]:
        """``next`` becomes ``active``, ``active`` becomes ``retired``; the releases in use
        are re-signed with the new active key (409 without a next key)."""
        # the releases are verified under the keys as they are, before the change
        nxt, old, checked = await self._keys.rotate(self._verified_releases)
        await self._audit(
            principal,
            "ota_keys_rotated",
            request_id,
            key_id=str(nxt.id),
            retired_key_id=str(old.id) if old else None,
        )
        await self.resign(principal, request_id, releases=checked)
        return await self._keys.all()

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
        active, private, nxt = await self._keys.signer()
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
                await self._checks.verify(release)  # nothing unsigned or tampered goes out
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
                await self._checks.verify(release, count=False)
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

    # --- what a device is offered ----------------------------------------------------------
    async def candidates(self, device: Device) -> list[OtaRelease]:
        """Published, unexpired releases for the device's model and channel, highest first."""
        published = await self._queries.run(
            ("published", device.model),
            lambda: OtaRelease.filter(model=device.model, status="published"),
        )
        return ota_offers.ranked(published, device)

    async def select(self, device: Device, fw_version: str | None) -> OtaRelease | None:
        """The release the device gets: the highest eligible one (not yet verified)."""
        for release in await self.candidates(device):
            if ota_offers.eligible(release, device, fw_version):
                return release
        return None

    async def offer(self, device: Device, fw_version: str | None) -> Offer | None:
        """The verified release offered to the device, or None. A selected release that
        fails a check is not offered, and nothing older is offered in its place."""
        release = await self.select(device, fw_version)
        if release is None:
            return None
        try:
            await self._checks.verify(release)
        except ReleaseIntegrityFailed:
            return None
        return Offer(release, self.manifest_url(device.device_uid))

    async def signed_manifest(self, device: Device) -> dict[str, Any]:
        """The signed manifest of the release offered to the device (404 ``no_update``,
        409 ``release_integrity_failed``)."""
        release = await self.select(device, device.fw_version)
        if release is None:
            raise NoUpdate()
        manifest = await self._checks.verify(release)
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
        await self._checks.verify(release)
        if not ota_offers.offered(release, device):
            raise NotFound("release")
        return self.artifact_path(release.id), release

    # --- reports ---------------------------------------------------------------------------
    async def report(
        self, device: Device, release_id: uuid.UUID, status: str, error: str | None
    ) -> None:
        """Record a device's report (:meth:`hexa.hub.ota_reports.Reports.record`)."""
        await self._reports.record(device, release_id, status, error)

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
        await self._checks.verify(release)
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
