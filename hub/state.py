"""The in-memory view of devices: identity, tenancy, relay/input state, presence.

The database is the source of truth; this cache is filled from it on first use and
kept current by the relay service and presence, which are its only writers.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from hexa.hub.security import utcnow
from hexa.models import Device, DeviceInput, RelayState

#: how often last_seen_at is written for a device that keeps talking
LAST_SEEN_EVERY_S = 5.0


@dataclass
class DeviceInfo:
    id: uuid.UUID
    uid: str
    org_id: uuid.UUID | None
    relay_count: int
    input_count: int
    relays: list[bool]
    inputs: list[bool]
    online: bool = False
    fw_version: str | None = None
    seen_written: float = 0.0


class DeviceCache:
    """uid → DeviceInfo for live (not deleted) devices."""

    def __init__(self) -> None:
        self._by_uid: dict[str, DeviceInfo] = {}

    def peek(self, uid: str) -> DeviceInfo | None:
        return self._by_uid.get(uid)

    async def get(self, uid: str) -> DeviceInfo | None:
        info = self._by_uid.get(uid)
        if info is not None:
            return info
        device = await Device.get_or_none(device_uid=uid, deleted_at=None)
        if device is None:
            return None
        relays = await RelayState.filter(device_id=device.id).order_by("index")
        inputs = await DeviceInput.filter(device_id=device.id).order_by("index")
        info = DeviceInfo(
            id=device.id,
            uid=uid,
            org_id=device.org_id,
            relay_count=device.relay_count,
            input_count=device.input_count,
            relays=[r.state for r in relays] or [False] * device.relay_count,
            inputs=[i.state for i in inputs] or [False] * device.input_count,
            online=device.online,
            fw_version=device.fw_version,
        )
        return self._by_uid.setdefault(uid, info)

    async def touch(self, device: DeviceInfo, *, online: bool | None = None) -> None:
        """Record ``last_seen_at`` (and ``online`` when given); at most every few seconds
        per device unless presence changes, since every ack and report counts as seen."""
        now = time.monotonic()
        if online is None and now - device.seen_written < LAST_SEEN_EVERY_S:
            return
        device.seen_written = now
        if online is None:
            await Device.filter(id=device.id).update(last_seen_at=utcnow())
        else:
            await Device.filter(id=device.id).update(online=online, last_seen_at=utcnow())

    async def touch_uid(self, uid: str) -> None:
        device = await self.get(uid)
        if device is not None:
            await self.touch(device)

    def forget(self, uid: str) -> None:
        self._by_uid.pop(uid, None)

    def online_count(self) -> int:
        return sum(1 for d in self._by_uid.values() if d.online)
