"""The HomeKit bridge: one HAP bridge per organization that enables it (contract §6).

Each enabled organization gets a HAP server (HAP-python, adapted in
:mod:`hexa.bridges.homekit_hap`) with one bridged accessory per claimed device and one
``Switch`` per relay. It changes relays only by publishing intents (source ``homekit``)
and answers a controller once the relay service's result is in. It learns relay state
and availability from the bus's retained ``hexa/<uid>/relay/<n>/state`` and
``hexa/<uid>/availability`` topics, so it works when the relay service runs in another
process, and device lifecycle from the hub's typed events. Settings come from the
database through :mod:`hexa.hub.homekit`, where the REST API stores them.

Everything runs in the hub's event loop, in tasks of this bridge's task group: a bridge
per organization, each with its state saver, its mDNS advertiser and its write queue.
mDNS is best effort: where multicast does not work the bridge is still reachable at its
address and port, and a zeroconf failure never stops the hub.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
from anyio.abc import TaskGroup, TaskStatus
from pyhap.util import get_local_address

from hexa.bridges.homekit_hap import DeviceAccessory, hap_name
from hexa.bridges.homekit_mdns import Advertiser
from hexa.bridges.homekit_org import OrgBridge
from hexa.hub import topics
from hexa.hub.errors import HubError
from hexa.hub.events import DeviceEvent, DeviceLeaving
from hexa.hub.homekit import HomeKitChanged, seal_stored_states
from hexa.hub.mqtt import inbox
from hexa.hub.mqtt.busapi import Message
from hexa.models import HomeKitBridge, Organization

if TYPE_CHECKING:
    from hexa.hub.config import Settings
    from hexa.hub.runtime import Hub

log = logging.getLogger(__name__)
#: ``HEXA_HOMEKIT_BIND`` values that keep the bridges of this hub process off
OFF = frozenset({"off", "none", "disabled"})


class HomeKit:
    """The HomeKit extension of the hub: the bridges of every organization that enabled
    one, started with the hub and changed as settings and devices change."""

    name: ClassVar[str] = "homekit"

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.advertiser = Advertiser()
        self._bridges: dict[uuid.UUID, OrgBridge] = {}
        self._accessories: dict[str, tuple[DeviceAccessory, OrgBridge]] = {}
        self._tg: TaskGroup | None = None
        self._org_locks: dict[uuid.UUID, asyncio.Lock] = {}
        self._bus_lock = asyncio.Lock()
        self._following = False
        self._on_relay_state = inbox.on(topics.RELAY_STATE, self._relay_state)
        self._on_availability = inbox.on(topics.AVAILABILITY, self._availability)

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        """On unless ``HEXA_HOMEKIT_BIND=off`` (for all but one instance of a scaled-out
        hub): each organization turns its own bridge on (``PUT /orgs/{id}/homekit``)."""
        return (settings.homekit_bind or "").lower() not in OFF

    @property
    def secret(self) -> str:
        """The hub's secret, which seals the bridges' HAP keys in the database."""
        secret = self.hub.settings.jwt_secret
        assert secret is not None  # generated or set before the hub starts
        return secret

    def bind_host(self) -> str:
        settings = self.hub.settings
        return settings.homekit_bind or settings.http_host

    def addresses(self) -> list[str]:
        """The addresses controllers are told (mDNS): the bind address, or this host's
        address when the bridge listens on every interface."""
        host = self.bind_host()
        if host not in ("", "0.0.0.0", "::"):  # noqa: S104 - compared, not bound
            return [host]
        try:
            return [get_local_address()]
        except OSError:  # no route: only the loopback is known
            return ["127.0.0.1"]

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        events = self.hub.events
        unsubscribe: list[Callable[[], None]] = [
            events.subscribe(HomeKitChanged, self._changed),
            events.subscribe(DeviceEvent, self._device_changed),
            events.subscribe(DeviceLeaving, self._device_leaving),
        ]
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                if sealed := await seal_stored_states(self.secret):
                    log.info("HomeKit: sealed the keys of %d bridges stored in clear", sealed)
                rows = await HomeKitBridge.filter(
                    enabled=True, org__deleted_at__isnull=True
                ).prefetch_related("org")
                for row in rows:
                    try:
                        await self._start(row)
                    except (HubError, OSError) as exc:
                        log.error("the HomeKit bridge of %s did not start: %s", row.org_id, exc)
                await self._follow_bus()
                task_status.started()
                await anyio.sleep_forever()
        finally:
            for undo in unsubscribe:
                undo()
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self._follow_bus()
                await self.advertiser.close()

    async def _follow_bus(self) -> None:
        """Hear relay states and availability on the bus while a bridge runs, and only
        then: a hub without HomeKit bridges pays nothing per message."""
        async with self._bus_lock:
            wanted = bool(self._bridges)
            if wanted == self._following:
                return
            for topic, handler in (
                (topics.RELAY_STATE, self._on_relay_state),
                (topics.AVAILABILITY, self._on_availability),
            ):
                if wanted:  # retained messages bring the current states at once
                    await self.hub.bus.subscribe(topic.filter(), handler)
                else:
                    await self.hub.bus.unsubscribe(topic.filter(), handler)
            self._following = wanted

    async def _start(self, row: HomeKitBridge) -> None:
        assert self._tg is not None
        org = row.org if isinstance(row.org, Organization) else await row.org
        bridge = OrgBridge(self, row, hap_name(f"Hexa {org.name}", "Hexa"))
        self._bridges[row.org_id] = bridge
        try:
            await self._tg.start(bridge.run)
        except BaseException:
            self.forget(bridge)
            raise

    def forget(self, bridge: OrgBridge) -> None:
        if self._bridges.get(bridge.org_id) is bridge:
            del self._bridges[bridge.org_id]
        for uid, (_, owner) in list(self._accessories.items()):
            if owner is bridge:
                del self._accessories[uid]

    def index(self, accessory: DeviceAccessory, bridge: OrgBridge) -> None:
        self._accessories[accessory.uid] = (accessory, bridge)

    def unindex(self, accessory: Any) -> None:
        if not isinstance(accessory, DeviceAccessory):
            return
        found = self._accessories.get(accessory.uid)
        if found is not None and found[0] is accessory:
            del self._accessories[accessory.uid]

    # --- settings -----------------------------------------------------------------------
    async def _changed(self, event: HomeKitChanged) -> None:
        lock = self._org_locks.setdefault(event.org_id, asyncio.Lock())
        async with lock:
            try:
                applied = await self._apply(event)
            except Exception as exc:
                if not isinstance(exc, HubError):
                    log.exception("HomeKit settings of %s not applied", event.org_id)
                if not event.reply.done():
                    event.reply.set_exception(exc)
                return
            finally:
                await self._follow_bus()
        if applied and not event.reply.done():
            event.reply.set_result(None)

    async def _apply(self, event: HomeKitChanged) -> bool:
        """Apply the stored settings; False when there was nothing to act on here (the
        pairings of a bridge that is not running: the database alone holds them)."""
        running = self._bridges.get(event.org_id)
        if event.forget_pairings:
            if running is None:
                return False
            await running.forget_pairings()
            return True
        row = await HomeKitBridge.get_or_none(
            org_id=event.org_id, org__deleted_at__isnull=True
        ).prefetch_related("org")
        if running is not None:
            moved = bool(row and row.requested_port and row.requested_port != running.port)
            if row is not None and row.enabled and not moved:
                return True
            await running.stop()
        if row is not None and row.enabled:
            await self._start(row)
        return True

    # --- devices ----------------------------------------------------------------------------
    async def _device_changed(self, event: DeviceEvent) -> None:
        device = event.device
        owners = {b for b in self._bridges.values() if b.org_id == device.org_id}
        found = self._accessories.get(device.device_uid)
        if found is not None:
            owners.add(found[1])
        for bridge in owners:
            await bridge.sync()

    async def _device_leaving(self, event: DeviceLeaving) -> None:
        """A device is about to be released or deleted: its accessory goes at once, so a
        controller's write that comes before the change is stored and synced answers
        -70409 instead of switching a device that is leaving the organization."""
        found = self._accessories.get(event.device.device_uid)
        if found is not None:
            found[1].withdraw(found[0])

    async def _relay_state(self, params: dict[str, str], state: bool, msg: Message) -> None:
        found = self._accessories.get(params["uid"])
        if found is None:
            return
        chars = found[0].relay_chars
        index = int(params["index"])
        if index < len(chars):
            chars[index].set_value(state)

    async def _availability(self, params: dict[str, str], online: bool, msg: Message) -> None:
        found = self._accessories.get(params["uid"])
        if found is not None:
            found[0].online = online
