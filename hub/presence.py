"""Presence and device reports: availability, last seen, state reports, input events."""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup, TaskStatus

from hexa.hub import metrics, topics
from hexa.hub.audit import AuditLog
from hexa.hub.errors import BusUnavailable
from hexa.hub.events import ConfigReported, DeviceOffline, DeviceOnline, Events, InputEvent
from hexa.hub.mqtt import inbox
from hexa.hub.mqtt.busapi import BusLike, Message
from hexa.hub.relay import RelayService
from hexa.hub.state import DeviceCache, DeviceInfo
from hexa.models import Device

log = logging.getLogger(__name__)
P = TypeVar("P")

#: messages of one device waiting to be handled; beyond this the device is flooding
LANE_LIMIT = 256


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
        await self.cache.set_online(device, online)
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

    async def _on_availability(self, uid: str, online: bool) -> None:
        device = await self.cache.get(uid)
        if device is not None:
            await self.set_online(device, online)

    async def _on_report(self, uid: str, report: topics.Report) -> None:
        device = await self.cache.get(uid)
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
