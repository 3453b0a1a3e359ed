"""The in-memory view of devices: identity, tenancy, relay/input state, presence.

The database is the source of truth; this cache is filled from it on first use and
kept current by the relay service and presence, which are its only writers.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from hexa.models import Device, DeviceInput, RelayState


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
    connections: set[str] = field(default_factory=set)


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

    def forget(self, uid: str) -> None:
        self._by_uid.pop(uid, None)

    def online_count(self) -> int:
        return sum(1 for d in self._by_uid.values() if d.online)
