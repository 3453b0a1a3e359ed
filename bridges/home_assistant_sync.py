"""Keeping one broker's Home Assistant discovery configs equal to the devices they describe.

Both Home Assistant bridges (discovery on the hub's own bus, and the outbound bridge to a
separate broker) use :class:`Discovery` to publish a device's configs, remove them, and
republish everything, and :class:`Births` to answer Home Assistant's birth messages.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace

import anyio
from anyio.abc import TaskStatus

from hexa.bridges import home_assistant_config
from hexa.bridges.home_assistant_config import (
    DeviceView,
    config_topics,
    configs,
    encode,
    load,
    load_many,
)
from hexa.hub import topics
from hexa.hub.events import (
    DeviceClaimed,
    DeviceDeleted,
    DeviceEvent,
    DeviceLeaving,
    DeviceReleased,
    DeviceUpdated,
    Events,
)
from hexa.hub.logs import printable
from hexa.hub.state import DeviceCache, DeviceInfo
from hexa.models import Device

log = logging.getLogger(__name__)

#: publish one retained message: (topic, payload, retain)
Publish = Callable[[str, bytes, bool], Awaitable[None]]
#: bring one device's discovery up to date: (the device as its event names it, whether
#: its current states go along, as for a claim)
Changed = Callable[[Device, bool], Awaitable[None]]

#: a republish follows Home Assistant's birth by this long, plus up to BIRTH_JITTER_S, so
#: that the births of a flood (several HA instances, a restart loop) make one republish
BIRTH_DELAY_S = 1.0
BIRTH_JITTER_S = 1.0


class Discovery:
    """The discovery configs one broker holds for the hub's devices (of one organization,
    when ``org_id`` is given).

    :meth:`reconcile` is the one operation: it re-reads the device and publishes what it
    should have now — its configs if it is claimed (and of the organization), empty
    retained payloads for every config it should not have. It runs under one lock and
    reads ownership inside it, so a republish (after a birth) and a release cannot
    interleave: whichever runs second sees the other's result. A device that is leaving
    its organization (:meth:`leaving`, from the moment before the change until
    :meth:`settled`) counts as gone, although the database still names its organization.
    """

    def __init__(
        self,
        publish: Publish,
        *,
        org_id: uuid.UUID | None = None,
        prefix: str = topics.HA_PREFIX,
        paced: Publish | None = None,
    ) -> None:
        self._publish = publish
        #: what a republish publishes with: ``publish``, waiting for subscribers that are
        #: behind (thousands of messages in a burst), if the broker needs that said
        self._paced = paced or publish
        self.org_id = org_id
        #: Home Assistant's discovery prefix
        self.prefix = prefix
        self._lock = asyncio.Lock()
        self._leaving: set[str] = set()
        #: uid → the config topics this broker was last given for it
        self._published: dict[str, frozenset[str]] = {}
        #: uid → the firmware version its configs were last published with
        self._versions: dict[str, str | None] = {}
        #: uid → the firmware version the device last reported
        self._reported: dict[str, str] = {}

    def follow(self, events: Events, changed: Changed) -> Callable[[], None]:
        """Call ``changed`` for every device event that changes what this broker should
        describe, after noting whether the device is leaving; returns what unsubscribes.

        A release or delete is handled twice: at :class:`DeviceLeaving`, before the
        registry moves the device out of its organization (afterwards the hub broker's
        delivery ACL no longer maps the device to that organization and would refuse the
        empty configs to its Home Assistant, which would keep the entities), and again
        once the change is made (by then nobody else may receive them anyway)."""

        async def on_claimed(event: DeviceClaimed) -> None:
            self.settled(event.device.device_uid)
            await changed(event.device, True)

        async def on_updated(event: DeviceUpdated) -> None:
            await changed(event.device, False)

        async def on_leaving(event: DeviceLeaving) -> None:
            self.leaving(event.device.device_uid)
            await changed(event.device, False)

        async def on_left(event: DeviceEvent) -> None:
            self.settled(event.device.device_uid)
            await changed(event.device, False)

        undo = [
            events.subscribe(DeviceClaimed, on_claimed),
            events.subscribe(DeviceUpdated, on_updated),
            events.subscribe(DeviceLeaving, on_leaving),
            events.subscribe(DeviceReleased, on_left),
            events.subscribe(DeviceDeleted, on_left),
        ]

        def unsubscribe() -> None:
            for step in undo:
                step()

        return unsubscribe

    def describes(self, uid: str) -> bool:
        """Whether this broker was given configs for the device (and not their removal)."""
        return bool(self._published.get(uid))

    def leaving(self, uid: str) -> None:
        """The device is about to leave its organization: treat it as gone from now."""
        self._leaving.add(uid)

    def settled(self, uid: str) -> None:
        """The device's organization is what the database says (after a release,
        delete or claim)."""
        self._leaving.discard(uid)

    async def wanted(self, uid: str) -> DeviceView | None:
        """The device, if this broker should describe it now."""
        if uid in self._leaving:
            return None
        return await load(uid, self.org_id)

    async def reconcile(
        self,
        uid: str,
        *,
        relay_count: int = 0,
        input_count: int = 0,
    ) -> DeviceView | None:
        """Publish the device's configs, or remove them; the device if it is described.
        ``relay_count`` and ``input_count`` name the topics to remove when this broker's
        configs for the device are not known (published before the hub started)."""
        async with self._lock:
            return await self._reconcile(uid, relay_count, input_count)

    async def _reconcile(
        self,
        uid: str,
        relay_count: int,
        input_count: int,
        view: DeviceView | None = None,
        *,
        paced: bool = False,
    ) -> DeviceView | None:
        """:meth:`reconcile` under the lock; ``view``: the device as just read, if it was."""
        fresh = view is not None
        while True:
            if not fresh:
                view = await self.wanted(uid)
            fresh = False
            reported = self._reported.get(uid)
            if view is not None and reported:  # it may not be stored yet
                view = replace(view, sw_version=reported)
            await self._publish_configs(uid, view, relay_count, input_count, paced)
            # a version reported meanwhile found the old one recorded: once more
            if view is None or self._reported.get(uid) == reported:
                return view

    async def _publish_configs(
        self,
        uid: str,
        view: DeviceView | None,
        relay_count: int,
        input_count: int,
        paced: bool = False,
    ) -> None:
        publish = self._paced if paced else self._publish
        wanted = configs(view, self.prefix) if view is not None else {}
        before = self._published.get(uid)
        if before is None:
            before = frozenset(config_topics(uid, relay_count, input_count, self.prefix))
        for topic in sorted(before - wanted.keys()):
            await publish(topic, encode(None), True)
        for topic, config in wanted.items():
            await publish(topic, encode(config), True)
        self._published[uid] = frozenset(wanted)
        if view is None:
            self._versions.pop(uid, None)
        else:
            self._versions[uid] = view.sw_version

    def reported(self, uid: str, fw_version: str | None) -> bool:
        """Note the firmware version a device reports (once connected, so usually after
        its claim); whether its published configs name another one."""
        if not fw_version:
            return False
        self._reported[uid] = fw_version
        return uid in self._versions and self._versions[uid] != fw_version

    async def uids(self) -> list[str]:
        """The claimed, live devices (of the organization)."""
        query = Device.filter(deleted_at=None, org_id__isnull=False)
        if self.org_id is not None:
            query = query.filter(org_id=self.org_id)
        return [str(uid) for uid in await query.values_list("device_uid", flat=True)]

    async def republish(self, states: Callable[[list[DeviceView]], Awaitable[None]]) -> int:
        """Every device's configs, then its current ``states``; returns how many devices.

        Devices go by ``home_assistant_config.LOAD_BATCH``: each batch is read in a few
        queries and its configs published under the lock (so a release meanwhile is never
        undone: it runs before the batch, and is seen, or after it), then ``states`` are
        published for the batch's described devices. Both wait for subscribers that are
        behind (a paced publish) and let the event loop run between devices."""
        count = 0
        uids = await self.uids()
        batch = home_assistant_config.LOAD_BATCH
        for i in range(0, len(uids), batch):
            views = await self._reconcile_batch(uids[i : i + batch])
            if views:
                await states(views)
                count += len(views)
        return count

    async def _reconcile_batch(self, uids: list[str]) -> list[DeviceView]:
        """:meth:`reconcile` for each of ``uids``, read together; the described ones."""
        async with self._lock:
            loaded = await load_many([uid for uid in uids if uid not in self._leaving], self.org_id)
            views: list[DeviceView] = []
            for uid in uids:
                view = loaded.get(uid) if uid not in self._leaving else None
                if view is None:  # read again: what it had is removed
                    await self._reconcile(uid, 0, 0, paced=True)
                    continue
                view = await self._reconcile(uid, 0, 0, view, paced=True)
                if view is not None:
                    views.append(view)
                await yield_turn()
            return views


async def yield_turn() -> None:
    """Let the event loop run between two devices' messages: a republish publishes a
    dozen per device without waiting for anything, and the broker's connections (their
    acknowledgements, their sockets) must keep up with it, as must everything else."""
    await asyncio.sleep(0)


async def cached(cache: DeviceCache, views: list[DeviceView]) -> list[DeviceInfo]:
    """The cached devices of ``views`` (live ones, in order); those not cached yet are
    loaded together (a few queries for them all, not a few each)."""
    found = {view.uid: cache.peek(view.uid) for view in views}
    missing = [uid for uid, device in found.items() if device is None]
    if missing:  # asked in one loop turn: the cache loads them as one batch
        found.update(zip(missing, await asyncio.gather(*map(cache.get, missing)), strict=True))
    return [device for device in (found[view.uid] for view in views) if device is not None]


class Births:
    """Home Assistant's birth (``homeassistant/status`` = ``online``) asks for every config
    again; births heard within a short delay are answered by one republish."""

    def __init__(self, delay_s: float = BIRTH_DELAY_S, jitter_s: float = BIRTH_JITTER_S) -> None:
        self.delay_s = delay_s
        self.jitter_s = jitter_s
        self._due = asyncio.Event()

    def heard(self) -> None:
        self._due.set()

    def status(self, payload: bytes) -> None:
        """A message on Home Assistant's status topic: ``online`` is a birth, ``offline``
        its will; anything else is someone else's and is logged and ignored."""
        try:
            online = topics.HA_STATUS.decode(payload)
        except topics.PayloadError:
            log.info("ignored Home Assistant status %s", printable(payload[:32]))
            return
        if online:
            self.heard()

    async def run(
        self,
        republish: Callable[[], Awaitable[object]],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Call ``republish`` a little after each burst of births, until cancelled."""
        task_status.started()
        while True:
            await self._due.wait()
            # jitter: hubs that hear the same birth do not all answer at the same instant
            await anyio.sleep(self.delay_s + random.uniform(0, self.jitter_s))
            self._due.clear()  # births heard until now are answered by this republish
            try:
                await republish()
            except Exception:  # the bus or the database went away: the next birth retries
                log.warning("Home Assistant discovery not republished", exc_info=True)
