"""The device registry: provisioning, claiming, configuration and credentials."""

from __future__ import annotations

import secrets
import uuid
from typing import Any

from tortoise.exceptions import IntegrityError
from tortoise.transactions import in_transaction

from hexa.hub import catalog
from hexa.hub.access import DEVICE, Principal, fetch
from hexa.hub.audit import AuditLog
from hexa.hub.errors import Conflict, NotFound, ValidationFailed
from hexa.hub.events import (
    DeviceClaimed,
    DeviceCredentialsRevoked,
    DeviceDeleted,
    DeviceLeaving,
    DeviceReleased,
    DeviceUpdated,
    Events,
)
from hexa.hub.security import new_token, token_hash, utcnow
from hexa.models import Area, Device, DeviceInput, Organization, RelayState, Site

_CLAIM_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I


def new_device_uid() -> str:
    return f"hx-{secrets.token_hex(4)}"


#: the token hash of a released device: no token matches it until a new owner claims the
#: device and is given a fresh token (see :meth:`Registry.release`)
RELEASED = "released:"


def new_claim_code() -> str:
    raw = "".join(secrets.choice(_CLAIM_ALPHABET) for _ in range(12))
    return "-".join(raw[i : i + 4] for i in range(0, 12, 4))


def _claim_hash(code: str) -> str:
    return token_hash(code.strip().upper().replace(" ", ""))


class Registry:
    """Device operations shared by the REST API, the broker's auth and the CLI.

    Every change made for a principal is audited (source ``api``) with the request id.
    """

    def __init__(self, audit: AuditLog, events: Events) -> None:
        self.audit = audit
        self.events = events

    async def _audit(
        self,
        principal: Principal,
        action: str,
        device: Device,
        org_id: uuid.UUID | None,
        request_id: str | None,
        details: dict[str, Any] | None = None,
    ) -> None:
        await self.audit.by_user(
            principal.id,
            action,
            device_id=device.id,
            org_id=org_id,
            request_id=request_id,
            details={"device_uid": device.device_uid, **(details or {})},
        )

    async def _close_sessions(self, uid: str) -> None:
        await self.events.publish(DeviceCredentialsRevoked(uid))

    async def provision(
        self, model: str, serial: str | None, fw_version: str | None
    ) -> tuple[Device, str, str]:
        """Create an unclaimed device; returns it with its token and claim code (shown once)."""
        spec = catalog.lookup(model)
        if spec is None:
            raise ValidationFailed(
                f"unknown model {model!r}",
                details={"field": "model", "known": sorted(catalog.CATALOG)},
            )
        token, code = new_token("hxd_"), new_claim_code()
        for _ in range(5):
            try:
                async with in_transaction():
                    device = await Device.create(
                        device_uid=new_device_uid(),
                        model=spec.name,
                        device_class=spec.device_class,
                        serial=serial,
                        fw_version=fw_version,
                        token_hash=token_hash(token),
                        claim_code_hash=_claim_hash(code),
                        relay_count=spec.relay_count,
                        input_count=spec.input_count,
                    )
                    await RelayState.bulk_create(
                        [RelayState(device=device, index=i) for i in range(spec.relay_count)]
                    )
                    await DeviceInput.bulk_create(
                        [
                            DeviceInput(device=device, index=i, mode=spec.default_input_mode)
                            for i in range(spec.input_count)
                        ]
                    )
                return device, token, code
            except IntegrityError:  # a uid collision: 32 random bits, so retry
                continue
        raise Conflict("could not allocate a device uid")

    async def claim(
        self,
        principal: Principal,
        claim_code: str,
        org_id: uuid.UUID | None,
        site_id: uuid.UUID | None,
        area_id: uuid.UUID | None,
        name: str | None,
        *,
        request_id: str | None = None,
    ) -> tuple[Device, str | None]:
        """Claim a device by its code: (the device, a new token when it was released before
        and needs one installed, else None)."""
        if org_id is None:
            org_id = await self._default_org(principal, site_id)
        principal.require(org_id, "manage_devices")
        if not await Organization.filter(id=org_id, deleted_at=None).exists():
            raise NotFound("organization")
        site, area = await self._placement(org_id, site_id, area_id)
        async with in_transaction():
            device = await Device.get_or_none(
                claim_code_hash=_claim_hash(claim_code), deleted_at=None
            )
            if device is None:
                raise NotFound("claim code")
            if device.org_id is not None:
                raise Conflict("this device is already claimed")
            claimed = await Device.filter(id=device.id, org_id=None).update(
                org_id=org_id,
                site_id=site.id if site else None,
                area_id=area.id if area else None,
                name=name or device.name or device.device_uid,
                claimed_at=utcnow(),
            )
            if not claimed:
                raise Conflict("this device is already claimed")
            token = None
            if device.token_hash.startswith(RELEASED):  # released before: a fresh token
                token = new_token("hxd_")
                await Device.filter(id=device.id).update(token_hash=token_hash(token))
        device = await Device.get(id=device.id)
        await self.events.publish(DeviceClaimed(device))
        await self._audit(principal, "device_claimed", device, org_id, request_id)
        return device, token

    async def _default_org(self, principal: Principal, site_id: uuid.UUID | None) -> uuid.UUID:
        if site_id is not None:
            site = await Site.get_or_none(id=site_id, deleted_at=None)
            if site is None or not principal.can_see(site.org_id):
                raise NotFound("site")
            return site.org_id
        owned = [org for org, role in principal.roles.items() if role.name == "owner"]
        personal = await Organization.filter(id__in=owned, personal=True, deleted_at=None).first()
        if personal is not None:
            return personal.id
        if len(principal.roles) == 1:
            return next(iter(principal.roles))
        raise ValidationFailed("org_id is required", details={"field": "org_id"})

    async def _placement(
        self, org_id: uuid.UUID, site_id: uuid.UUID | None, area_id: uuid.UUID | None
    ) -> tuple[Site | None, Area | None]:
        site = area = None
        if site_id is not None:
            site = await Site.get_or_none(id=site_id, org_id=org_id, deleted_at=None)
            if site is None:
                raise NotFound("site")
        if area_id is not None:
            area = await Area.get_or_none(id=area_id, deleted_at=None).prefetch_related("site")
            if area is None or area.site.org_id != org_id or area.site.deleted_at is not None:
                raise NotFound("area")
            if site is not None and area.site_id != site.id:
                raise ValidationFailed("area is not in that site", details={"field": "area_id"})
            site = site or area.site
        return site, area

    async def get_for(self, principal: Principal, device_id: uuid.UUID, action: str) -> Device:
        """The claimed device, if ``principal`` may perform ``action`` on it (404/403)."""
        return await fetch(DEVICE, device_id, principal, action)

    async def update(
        self,
        principal: Principal,
        device_id: uuid.UUID,
        changes: dict[str, Any],
        *,
        request_id: str | None = None,
    ) -> Device:
        device = await self.get_for(principal, device_id, "configure_devices")
        org_id = device.org_id
        assert org_id is not None  # get_for only returns claimed devices
        async with in_transaction():
            if "site_id" in changes or "area_id" in changes:
                site_id = changes.get("site_id", device.site_id)
                area_id = changes.get("area_id", device.area_id)
                if "site_id" in changes and "area_id" not in changes and site_id != device.site_id:
                    area_id = None
                site, area = await self._placement(org_id, site_id, area_id)
                device.site_id = site.id if site else None
                device.area_id = area.id if area else None
            if "name" in changes:
                device.name = changes["name"]
            if "ota_channel" in changes:
                device.ota_channel = changes["ota_channel"]
            await device.save()
            names = changes.get("relay_names")
            if names is not None:
                if len(names) > device.relay_count:
                    raise ValidationFailed(
                        f"the device has {device.relay_count} relays",
                        details={"field": "relay_names"},
                    )
                for index, relay_name in enumerate(names):
                    if relay_name is not None:
                        await RelayState.filter(device_id=device.id, index=index).update(
                            name=relay_name
                        )
        await self._audit(
            principal,
            "device_updated",
            device,
            org_id,
            request_id,
            {"changes": {k: str(v) if isinstance(v, uuid.UUID) else v for k, v in changes.items()}},
        )
        await self.events.publish(DeviceUpdated(device, dict(changes)))
        return device

    async def release(
        self, principal: Principal, device_id: uuid.UUID, *, request_id: str | None = None
    ) -> Device:
        device = await self.get_for(principal, device_id, "manage_devices")
        org_id = device.org_id
        # A release hands the device over: its token dies now (whoever learnt it while the
        # device was this organization's is locked out), and the next owner, who claims it
        # with the code printed on it, is given a fresh token to install. The claim code
        # stays valid.
        await self.events.publish(DeviceLeaving(device))
        await Device.filter(id=device.id).update(
            org_id=None,
            site_id=None,
            area_id=None,
            claimed_at=None,
            token_hash=RELEASED + secrets.token_hex(24),
        )
        device = await Device.get(id=device.id)
        await self.events.publish(DeviceReleased(device))
        await self._close_sessions(device.device_uid)
        await self._audit(principal, "device_released", device, org_id, request_id)
        return device

    async def delete(
        self, principal: Principal, device_id: uuid.UUID, *, request_id: str | None = None
    ) -> None:
        device = await self.get_for(principal, device_id, "manage_devices")
        await self.events.publish(DeviceLeaving(device))
        await Device.filter(id=device.id).update(
            deleted_at=utcnow(), token_hash=token_hash(new_token()), claim_code_hash=None
        )
        await self.events.publish(DeviceDeleted(device))
        await self._close_sessions(device.device_uid)
        await self._audit(principal, "device_deleted", device, device.org_id, request_id)

    async def rotate_token(
        self, principal: Principal, device_id: uuid.UUID, *, request_id: str | None = None
    ) -> str:
        device = await self.get_for(principal, device_id, "manage_devices")
        token = new_token("hxd_")
        await Device.filter(id=device.id).update(token_hash=token_hash(token))
        await self._close_sessions(device.device_uid)
        await self._audit(principal, "device_token_rotated", device, device.org_id, request_id)
        return token

    @staticmethod
    async def authenticate(device_uid: str, token: str) -> Device | None:
        """The live device these credentials belong to, or None."""
        if not device_uid or not token:
            return None
        device = await Device.get_or_none(device_uid=device_uid, deleted_at=None)
        if device is None or not secrets.compare_digest(device.token_hash, token_hash(token)):
            return None
        return device
