"""Home Assistant MQTT discovery on the hub's own bus (contract §6).

Home Assistant connects to the hub's broker (embedded, or the external one the hub uses)
with an integration token of kind ``home_assistant`` and finds every claimed device by
itself: a switch per relay and a device trigger per input event, kept as retained
configs under ``homeassistant/``. The broker's ACL delivers each device's configs only to
integrations of its organization. The configs follow the devices: republished on claim,
rename and relay rename, removed on release and delete, and republished with the current
states after Home Assistant's birth and whenever the hub (re)connects to its bus.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, ClassVar

import anyio
from anyio.abc import TaskStatus

from hexa.bridges.home_assistant_config import DeviceView
from hexa.bridges.home_assistant_sync import Births, Discovery, cached, yield_turn
from hexa.hub import topics
from hexa.hub.errors import BusUnavailable
from hexa.hub.mqtt import inbox
from hexa.hub.mqtt.busapi import Handler, Message
from hexa.hub.relay import state_messages
from hexa.models import Device

if TYPE_CHECKING:
    from hexa.hub.config import Settings
    from hexa.hub.runtime import Hub

log = logging.getLogger(__name__)


class HomeAssistant:
    """Discovery configs, and states after a birth, on the hub's own bus."""

    name: ClassVar[str] = "home_assistant"

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.prefix = hub.settings.ha_discovery_prefix
        self.discovery = Discovery(self._publish, prefix=self.prefix, paced=self._publish_paced)
        self.births = Births()
        self._status_topic = topics.ha_topic(topics.HA_STATUS.format(), self.prefix)
        self._on_status = self._status_handler()
        self._on_report = inbox.on(topics.REPORT, self._report)

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        return settings.ha_discovery

    async def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        await self.hub.bus.publish(topic, payload, retain=retain)

    async def _publish_paced(self, topic: str, payload: bytes, retain: bool) -> None:
        await self.hub.bus.publish(topic, payload, retain=retain, paced=True)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        unfollow = self.discovery.follow(self.hub.events, self._changed)
        await self.hub.bus.subscribe(self._status_topic, self._on_status)
        await self.hub.bus.subscribe(topics.REPORT.filter(), self._on_report)
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(self.births.run, self.republish)
                tg.start_soon(self._after_connects)
                task_status.started()
        finally:
            unfollow()
            with anyio.CancelScope(shield=True):
                await self.hub.bus.unsubscribe(self._status_topic, self._on_status)
                await self.hub.bus.unsubscribe(topics.REPORT.filter(), self._on_report)

    async def _after_connects(self) -> None:
        """Home Assistant's birth is not retained: a hub that connects after Home
        Assistant (its start, a bus reconnect, a broker that lost its retained messages)
        publishes everything on its own."""
        generation = 0
        while True:
            generation = await self.hub.bus.connected_since(generation)
            try:
                count = await self.republish()
            except Exception:  # the bus or the database went away: the next connect retries
                log.warning("Home Assistant discovery not published", exc_info=True)
            else:
                log.info("Home Assistant discovery published for %d devices", count)

    async def republish(self) -> int:
        """Every claimed device's configs and current state."""
        return await self.discovery.republish(self._republished_states)

    async def _republished_states(self, views: list[DeviceView]) -> None:
        """The devices' relay states, retained, for a Home Assistant that just
        subscribed. Not their availability: on this bus that topic is the device's own
        (its ``online`` and its will, retained by the broker, and the hub's ``online``
        after a reconnect). Publishing the hub's cached view of it here could overwrite a
        fresher ``online`` from a device that is connecting at this moment with a stale
        ``offline``."""
        for device in await cached(self.hub.cache, views):
            for topic, payload in state_messages(device):
                await self._publish_paced(topic, payload, True)
            await yield_turn()

    def _status_handler(self) -> Handler:
        """Home Assistant's status (under the configured prefix): ``online`` is a birth."""

        async def on_status(msg: Message) -> None:
            if msg.topic == self._status_topic:
                self.births.status(bytes(msg.payload))

        return on_status

    async def _report(self, params: dict[str, str], report: topics.Report, msg: Message) -> None:
        """A new firmware version (the device's first report after its claim, or an
        update) is shown as the device's ``sw_version``."""
        uid = params["uid"]
        if self.discovery.reported(uid, report.fw_version):
            try:
                await self.discovery.reconcile(uid)
            except BusUnavailable:
                log.warning("discovery of %s not republished: bus down", uid)

    async def _changed(self, device: Device, with_states: bool) -> None:
        """A device event: its configs now (and its states, after a claim)."""
        try:
            view = await self.discovery.reconcile(
                device.device_uid, relay_count=device.relay_count, input_count=device.input_count
            )
        except BusUnavailable:  # published again when the bus is back
            log.warning("discovery of %s not published: bus down", device.device_uid)
            return
        if view is not None and with_states:
            info = await self.hub.cache.get(view.uid)
            if info is not None:
                await self.hub.relay.publish_state(info)
