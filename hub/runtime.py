"""The Hub object: the domain services of one hub process and their lifecycle."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from hexa.hub import catalog, topics
from hexa.hub.accounts import Accounts
from hexa.hub.audit import AuditLog
from hexa.hub.automations import Engine, default_rule
from hexa.hub.backup_service import Backups
from hexa.hub.commands import Commands
from hexa.hub.config import Settings
from hexa.hub.device_config import DeviceConfigService
from hexa.hub.devices import Registry
from hexa.hub.errors import BusUnavailable
from hexa.hub.events import (
    DeviceClaimed,
    DeviceDeleted,
    DeviceEvent,
    DeviceReleased,
    Events,
    IntegrationRevoked,
)
from hexa.hub.mqtt.bus import BrokerAddress, Bus
from hexa.hub.mqtt.busapi import BusLike
from hexa.hub.ota import Ota
from hexa.hub.presence import Presence
from hexa.hub.relay import RelayService
from hexa.hub.schedules import Scheduler
from hexa.hub.security import utcnow
from hexa.hub.state import DeviceCache
from hexa.models import Automation, Device, Schedule

log = logging.getLogger(__name__)

#: a long-running service: ``async def run(*, task_status)``, started with ``tg.start``
Service = Callable[..., Coroutine[Any, Any, None]]


class Hub:
    """Owns the bus client, the relay service, presence and the registries.

    The composition root (``hexa serve``) opens the database, starts the broker, calls
    :meth:`start` inside its task group, and serves the API over this object.
    """

    def __init__(
        self,
        settings: Settings,
        bus_address: BrokerAddress,
        *,
        instance: str,
        bus: BusLike | None = None,
    ) -> None:
        self.settings = settings
        self.instance = instance
        #: when this hub object was made, for the admin overview's uptime
        self.started_at = utcnow()
        self.accounts = Accounts(settings)
        self.cache = DeviceCache()
        self.broker_address = bus_address
        #: an MQTT client unless the composition root attaches the hub in-process
        self.bus: BusLike = bus or Bus(bus_address, client_id=f"hexa-hub-{instance}")
        self.audit = AuditLog()
        #: typed in-process events (device lifecycle, presence, inputs, revocations)
        self.events = Events()
        self.registry = Registry(self.audit, self.events)
        seal = topics.seal_key(settings.jwt_secret or "")
        self.relay = RelayService(
            self.bus, self.cache, self.audit, timeout_s=settings.command_timeout_s, seal_key=seal
        )
        self.commands = Commands(self.bus, timeout_s=settings.command_timeout_s, seal_key=seal)
        self.presence = Presence(self.bus, self.cache, self.relay, self.audit, self.events)
        self.ota = Ota(settings, self.audit, self.bus, self.cache, api_base=self.api_base_url)
        self.device_config = DeviceConfigService(
            self.bus,
            self.cache,
            self.audit,
            self.events,
            self.relay,
            timeout_s=settings.command_timeout_s,
        )
        self.scheduler = Scheduler(
            self.commands,
            self.audit,
            tick_s=settings.scheduler_tick_s,
            grace_s=settings.scheduler_grace_s,
        )
        self.automations = Engine(self.commands, self.cache, self.bus, self.audit)
        self.automations.subscribe(self.events)
        #: scheduled and requested backups (HEXA_BACKUP_SCHEDULE, POST /admin/backups)
        self.backups = Backups(settings, self.audit)
        self._services: anyio.CancelScope | None = None
        self._services_done = anyio.Event()
        self.mqtt_port: int | None = None
        self.mqtt_tls_port: int | None = None
        self.http_port: int | None = None
        self.events.subscribe(DeviceEvent, self._on_device_change)
        self.events.subscribe(DeviceEvent, self._rules_follow_device)

    async def prepare(self) -> None:
        """Database-side start-up: presence reset, bootstrap admin."""
        await Presence.reset()
        admin = await self.accounts.ensure_bootstrap_admin()
        if admin is not None:
            log.info("bootstrap admin %s ready", admin.email)

    async def start(
        self,
        tg: TaskGroup,
        *,
        extensions: Sequence[Service] = (),
        wait_for_bus: bool = True,
    ) -> None:
        """Start, each in order and ready before the next: the audit writer, the last-seen
        writer and the bus in ``tg``; then, in a task group of their own (stopped first
        by :meth:`shutdown`), the relay service, presence, the retained-state keeper,
        the scheduler, automations and ``extensions`` (the API's gateways, bridges)."""
        await tg.start(self.audit.run)
        await tg.start(self.cache.run)
        if wait_for_bus:
            await tg.start(self.bus.run)
        else:
            tg.start_soon(self.bus.run)
        await tg.start(self._run_services, list(extensions))

    async def _run_services(
        self,
        extensions: list[Service],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            async with anyio.create_task_group() as group:
                self._services = group.cancel_scope
                await group.start(self.relay.run)
                await self.commands.start()
                await group.start(self.presence.run)
                await group.start(self.device_config.run)
                await group.start(self.keep_retained_truth)
                await group.start(self.scheduler.run)
                await group.start(self.automations.run)
                await group.start(self.backups.run)
                for run in extensions:
                    await group.start(run)
                task_status.started()
        finally:
            self._services_done.set()

    async def keep_retained_truth(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """At start and after every bus reconnect, republish the retained state of every
        device from the database: a broker may have lost it (amqtt keeps no retained
        message across a restart; an external broker may have been replaced)."""
        task_status.started()
        generation = 0
        while True:
            generation = await self.bus.connected_since(generation)
            try:
                count = await self.republish()
            except Exception:  # the database or the bus went away: the next connect retries
                log.warning("retained state not republished", exc_info=True)
            else:
                log.info("republished the retained state of %d devices", count)

    async def republish(self) -> int:
        """Publish each device's per-relay and aggregate state, and ``online`` for those
        the hub knows to be; returns how many devices."""
        count = 0
        for uid in await Device.filter(deleted_at=None).values_list("device_uid", flat=True):
            if not self.bus.connected:
                raise BusUnavailable("the bus dropped while republishing")
            device = await self.cache.get(str(uid))
            if device is None:
                continue
            await self.relay.publish_state(device)
            if device.online:
                await self.bus.publish(
                    topics.AVAILABILITY.format(uid=device.uid),
                    topics.encode_availability(True),
                    retain=True,
                )
            count += 1
        return count

    async def _on_device_change(self, event: DeviceEvent) -> None:
        device = event.device
        self.cache.forget(device.device_uid)
        if isinstance(event, DeviceDeleted):
            for index in range(device.relay_count):
                await self._clear_retained(
                    topics.RELAY_STATE.format(uid=device.device_uid, index=index)
                )
            await self._clear_retained(topics.STATE.format(uid=device.device_uid))
            await self._clear_retained(topics.AVAILABILITY.format(uid=device.device_uid))

    async def _rules_follow_device(self, event: DeviceEvent) -> None:
        """A claimed switch gets the default hold rule; a device that leaves its organization
        disables the schedules and automations that use it."""
        device = event.device
        if isinstance(event, DeviceClaimed):
            spec = catalog.lookup(device.model)
            if spec is not None and spec.default_hold_rule:
                await Automation.create(
                    org_id=device.org_id,
                    device_id=device.id,
                    is_default=True,
                    **default_rule(device),
                )
        elif isinstance(event, DeviceReleased | DeviceDeleted):
            await Schedule.filter(device_id=device.id).update(
                enabled=False, next_execution=None, last_result="device_removed"
            )
            uid = str(device.id)
            for rule in await Automation.filter(enabled=True):
                if rule.device_id == device.id or uid in json.dumps(
                    [rule.trigger, rule.conditions, rule.actions]
                ):
                    await Automation.filter(id=rule.id).update(enabled=False)
        else:
            return
        self.automations.invalidate()

    async def _clear_retained(self, topic: str) -> None:
        try:
            await self.bus.publish(topic, b"", retain=True)  # MQTT-3.3.1-10: empty clears
        except BusUnavailable:
            pass

    # --- used by the API -----------------------------------------------------------------
    def bus_ready(self) -> bool:
        return self.bus.connected

    def mqtt_endpoint(self) -> dict[str, Any]:
        """Where devices connect: the embedded broker, or the external one."""
        s = self.settings
        if s.broker_url:
            a = self.broker_address
            return {
                "host": s.public_host or a.host,
                "port": None if a.tls else a.port,
                "tls_port": a.port if a.tls else None,
            }
        return {
            "host": s.advertised_host,
            "port": self.mqtt_port
            if self.mqtt_port is not None
            else (s.mqtt_port if s.mqtt_plain_listener else None),
            "tls_port": self.mqtt_tls_port,
        }

    def api_base_url(self) -> str:
        """The REST API's base URL as devices reach it (OTA manifests point into it)."""
        return self._public_http("https", "http") + "/api/v1"

    def ws_device_url(self) -> str:
        return self._public_http("wss", "ws") + "/ws/device"

    def _public_http(self, secure: str, plain: str) -> str:
        """`scheme://host:port` of the HTTP listener as devices reach it."""
        s = self.settings
        wildcard = s.http_host in ("0.0.0.0", "::")  # noqa: S104 - a comparison, not a bind
        host = s.public_host or ("127.0.0.1" if wildcard else s.http_host)
        port = self.http_port if self.http_port is not None else s.http_port
        scheme = secure if s.enforce_https or s.https else plain
        return f"{scheme}://{host}:{port}"

    async def publish_availability(self, uid: str, online: bool) -> None:
        """Availability on behalf of a device bridged by the API (WebSocket)."""
        try:
            await self.bus.publish(
                topics.AVAILABILITY.format(uid=uid),
                topics.encode_availability(online),
                retain=True,
            )
        except BusUnavailable:
            log.warning("availability of %s not published: bus down", uid)

    async def touch_device(self, uid: str) -> None:
        """Record that a device (bridged by the API) was heard from."""
        await self.cache.touch_uid(uid)

    async def close_integration_sessions(self, token_id: str) -> None:
        """An integration token was deleted: whoever holds its sessions ends them."""
        await self.events.publish(IntegrationRevoked(token_id))

    async def shutdown(self) -> None:
        """Stop in order, after the HTTP server stopped taking requests: the relay service
        takes no more intents and finishes those it has (bounded by the command timeout);
        the other services stop; relay state, audit and last-seen writes are flushed; the
        hub's ``offline`` goes out while the bus is still up. Nothing a REST 200 or a
        ``result`` message reported is lost."""
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self.settings.command_timeout_s + 1):
                await self.relay.drain()
            if self._services is not None:
                self._services.cancel()
                with anyio.move_on_after(10):
                    await self._services_done.wait()
            with anyio.move_on_after(5):
                await self.audit.flush()
            with anyio.move_on_after(3):
                await self.cache.flush_seen()
            with anyio.move_on_after(3):
                await self.bus.close()
