"""Presence and device reports: availability, last seen, state reports, input events."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup, TaskStatus
from tortoise import connections

from hexa.hub import metrics, topics
from hexa.hub.audit import AuditLog
from hexa.hub.batch import Batched
from hexa.hub.errors import BusUnavailable
from hexa.hub.events import ConfigReported, DeviceOffline, DeviceOnline, Events, InputEvent
from hexa.hub.mqtt import inbox
from hexa.hub.mqtt.busapi import BusLike, Message
from hexa.hub.relay import RelayService
from hexa.hub.security import utcnow
from hexa.hub.state import DeviceCache, DeviceInfo
from hexa.models import Device, DeviceInput, RelayState

log = logging.getLogger(__name__)
P = TypeVar("P")

#: messages of one device waiting to be handled; beyond this the device is flooding
LANE_LIMIT = 256
#: devices loaded into the cache with one set of queries at most (SQL parameters)
LOAD_BATCH = 500


Job = Callable[[], Awaitable[None]]


class _Lanes:
    """One ordered lane per device: a device's messages are handled in arrival order,
    different devices concurrently (so their database writes share commits), and a
    device that floods fills only its own bounded lane."""

    def __init__(self, limit: int = LANE_LIMIT) -> None:
        self.limit = limit
        self._lanes: dict[str, deque[tuple[str, Job]]] = {}
        self._flooding: set[str] = set()  # warned about once per full-lane episode
        self._tg: TaskGroup | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            await anyio.sleep_forever()

    def submit(self, uid: str, kind: str, job: Job, *, supersedes: bool = False) -> bool:
        """Queue ``job`` on ``uid``'s lane. When the lane is full: with ``supersedes``
        the job replaces the lane's last waiting job if that is of the same ``kind`` (a
        newer snapshot makes the older one pointless), otherwise it is dropped. False
        when something was dropped."""
        lane = self._lanes.get(uid)
        if lane is None:
            assert self._tg is not None, "lanes are not running"
            if self._tg.cancel_scope.cancel_called:  # stopping: no new work
                return False
            lane = self._lanes[uid] = deque(((kind, job),))
            self._tg.start_soon(self._drain, uid, lane, name=f"device-lane-{uid}")
            return True
        if len(lane) < self.limit:
            lane.append((kind, job))
            return True
        if supersedes and len(lane) > 1 and lane[-1][0] == kind:
            lane[-1] = (kind, job)  # lane[0] is running; the tail only waits
        if uid not in self._flooding:
            self._flooding.add(uid)
            log.warning("%s floods: its queue is full, messages are being dropped", uid)
        return False

    async def _drain(self, uid: str, lane: deque[tuple[str, Job]]) -> None:
        try:
            handled = 0
            while lane:
                try:
                    await lane[0][1]()
                except Exception:
                    log.exception("handling a message of %s failed", uid)
                lane.popleft()  # only now: a non-empty lane means "a worker is on it"
                handled += 1
                if handled % 16 == 0:
                    # jobs that change nothing never suspend: a flooded lane would
                    # otherwise neither let others run nor notice it was cancelled
                    await anyio.lowlevel.checkpoint()
        finally:
            if self._lanes.get(uid) is lane:
                del self._lanes[uid]
            self._flooding.discard(uid)


class Presence:
    """Keeps ``online``/``last_seen_at`` current and ingests reports and input events."""

    def __init__(
        self,
        bus: BusLike,
        cache: DeviceCache,
        relay: RelayService,
        audit: AuditLog,
        events: Events,
    ) -> None:
        self.bus = bus
        self.audit = audit
        self.cache = cache
        self.relay = relay
        self.events = events
        self._lanes = _Lanes()
        #: devices not cached yet, loaded together (a connect storm is thousands)
        self._loads = Batched(self._load)
        #: online/offline changes, written together
        self._online_writes = Batched(_write_online)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(self._lanes.run)
            availability, report, event = topics.AVAILABILITY, topics.REPORT, topics.EVENT
            await self.bus.subscribe(
                availability.filter(),
                inbox.on(availability, self._queued(availability, self._on_availability)),
            )
            await self.bus.subscribe(
                report.filter(), inbox.on(report, self._queued(report, self._on_report))
            )
            await self.bus.subscribe(
                event.filter(), inbox.on(event, self._queued(event, self._on_event))
            )
            task_status.started()
            await anyio.sleep_forever()

    def _queued(
        self, topic: topics.Topic[P], handle: Callable[[str, P], Awaitable[None]]
    ) -> inbox.Typed[P]:
        """A typed handler that puts the payload on its device's lane and returns at once."""
        kind = topic.name
        # a report is a snapshot: under a flood the newest one replaces the waiting one,
        # so the state the hub ends up with is the device's last word
        snapshot = topic is topics.REPORT

        async def on_payload(params: dict[str, str], payload: P, msg: Message) -> None:
            uid = params["uid"]
            if not self._lanes.submit(uid, kind, lambda: handle(uid, payload), supersedes=snapshot):
                metrics.FLOOD_DROPS.labels(kind).inc()

        return on_payload

    @staticmethod
    async def reset() -> None:
        """At start nobody is connected yet: devices come back online as they connect."""
        await Device.filter(online=True).update(online=False)

    async def set_online(self, device: DeviceInfo, online: bool) -> None:
        if device.online == online:
            await self.cache.touch(device)
            return
        device.online = online
        _cache_online(self.cache, device, online)
        await self._online_writes.one((device.id, online))
        metrics.DEVICES_ONLINE.set(self.cache.online_count())
        await self.relay.publish_state(device, only=[])
        name = "device_online" if online else "device_offline"
        if device.org_id is not None:
            await self.audit.record(
                action=name,
                source="device",
                actor_type="device",
                actor_id=device.uid,
                device_id=device.id,
                org_id=device.org_id,
            )
        await self.events.publish(DeviceOnline(device) if online else DeviceOffline(device))

    async def _device(self, uid: str) -> DeviceInfo | None:
        """The cached device; one not cached yet is loaded together with the others
        that came at the same time (three queries for them all, not three each)."""
        device = self.cache.peek(uid)
        if device is None:
            device = await self._loads.one(uid)
        return device

    async def _load(self, uids: list[str]) -> dict[str, DeviceInfo]:
        found: dict[str, DeviceInfo] = {}
        for i in range(0, len(uids), LOAD_BATCH):
            for info in await _load_devices(uids[i : i + LOAD_BATCH]):
                found[info.uid] = _adopt(self.cache, info)
        return found

    async def _on_availability(self, uid: str, online: bool) -> None:
        device = await self._device(uid)
        if device is not None:
            await self.set_online(device, online)

    async def _on_report(self, uid: str, report: topics.Report) -> None:
        device = await self._device(uid)
        if device is None:
            return
        metrics.STATE_REPORTS.inc()
        if not device.online:
            await self.set_online(device, True)
        if report.fw_version and report.fw_version != device.fw_version:
            await Device.filter(id=device.id).update(fw_version=report.fw_version)
            device.fw_version = report.fw_version
        if report.config_version is not None:
            await self.events.publish(ConfigReported(device, report.config_version))
        relays = (
            report.relays if report.relays and len(report.relays) == device.relay_count else None
        )
        inputs = (
            report.inputs if report.inputs and len(report.inputs) == device.input_count else None
        )
        if (relays is None or relays == device.relays) and (
            inputs is None or inputs == device.inputs
        ):
            await self.cache.touch(device)
            return
        before = list(device.relays)
        await self.relay.apply_state(device, relays or device.relays, inputs)
        if relays is not None and relays != before and device.org_id is not None:
            await self.audit.record(
                action="state_report",
                source="device",
                actor_type="device",
                actor_id=uid,
                device_id=device.id,
                org_id=device.org_id,
                details={"before": before, "relays": relays},
            )

    async def _on_event(self, uid: str, event: topics.InputEvent) -> None:
        device = await self.cache.get(uid)
        if device is None or event.input_index >= device.input_count:
            metrics.BAD_PAYLOADS.labels("event").inc()
            return
        metrics.INPUT_EVENTS.labels(event.event).inc()
        payload: dict[str, Any] = {"event": event.event}
        if event.duration_ms is not None:
            payload["duration_ms"] = event.duration_ms
        try:
            await self.bus.publish(
                topics.INPUT_EVENT.format(uid=uid, index=event.input_index),
                json.dumps(payload).encode(),
            )
        except BusUnavailable:
            log.warning("input event of %s not republished: bus down", uid)
        await self.events.publish(
            InputEvent(device, event.input_index, event.event, event.duration_ms)
        )


async def _load_devices(uids: list[str]) -> list[DeviceInfo]:
    """The live devices among ``uids`` as the cache keeps them, in three queries."""
    rows = await Device.filter(device_uid__in=uids, deleted_at=None).values(
        "id",
        "device_uid",
        "org_id",
        "relay_count",
        "input_count",
        "online",
        "fw_version",
        "config_version",
        "config_applied_version",
    )
    if not rows:
        return []
    ids = [_uuid(row["id"]) for row in rows]
    relays: dict[uuid.UUID, list[bool]] = {}
    inputs: dict[uuid.UUID, list[bool]] = {}
    for model, states in ((RelayState, relays), (DeviceInput, inputs)):
        for device_id, state in (
            await model.filter(device_id__in=ids)
            .order_by("device_id", "index")
            .values_list("device_id", "state")
        ):
            states.setdefault(_uuid(device_id), []).append(bool(state))
    return [
        DeviceInfo(
            id=device_id,
            uid=row["device_uid"],
            org_id=None if row["org_id"] is None else _uuid(row["org_id"]),
            relay_count=row["relay_count"],
            input_count=row["input_count"],
            relays=relays.get(device_id) or [False] * row["relay_count"],
            inputs=inputs.get(device_id) or [False] * row["input_count"],
            online=bool(row["online"]),
            fw_version=row["fw_version"],
            config_version=row["config_version"],
            config_applied_version=row["config_applied_version"],
        )
        for row, device_id in zip(rows, ids, strict=True)
    ]


def _uuid(value: Any) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


async def _write_online(changes: list[tuple[uuid.UUID, bool]]) -> dict[Any, None]:
    """Write devices' ``online`` (and ``last_seen_at``) in one statement batch."""
    now = utcnow()
    rows = [[online, now, str(device_id)] for device_id, online in changes]
    client = connections.get("default")
    sql = _SET_ONLINE_PG if client.capabilities.dialect == "postgres" else _SET_ONLINE
    if len(rows) == 1:
        await client.execute_query(sql, rows[0])
    else:
        await client.execute_many(sql, rows)
    return {}


_SET_ONLINE = 'UPDATE "devices" SET "online"=?,"last_seen_at"=? WHERE "id"=?'
_SET_ONLINE_PG = 'UPDATE "devices" SET "online"=$1,"last_seen_at"=$2 WHERE "id"=$3'


# What follows is DeviceCache's bookkeeping (hub/state.py) for devices loaded and
# changed in batches, as its get() and touch(online=...) do it for one device at a time.
def _cache_online(cache: DeviceCache, device: DeviceInfo, online: bool) -> None:
    """The cache's side of :meth:`DeviceCache.touch` with ``online``; the row is written
    by :func:`_write_online`."""
    device.seen_written = time.monotonic()
    (cache._online.add if online else cache._online.discard)(device.uid)
    cache._seen.pop(device.id, None)


def _adopt(cache: DeviceCache, info: DeviceInfo) -> DeviceInfo:
    """Put a device loaded in a batch into the cache, as :meth:`DeviceCache.get` does
    for the one it loads (the cache has no batch load of its own yet); a device the
    cache meanwhile loaded itself is kept."""
    info = cache._by_uid.setdefault(info.uid, info)
    if info.online:
        cache._online.add(info.uid)
    return info
