"""The HAP bridge of one organization: its socket, accessories, saved state and writes.

An :class:`OrgBridge` binds its port, builds one bridged accessory per claimed device
(AIDs stored, never reused), keeps HAP-python's state saved to the database and its mDNS
record current, and turns controllers' writes into intents (source ``homekit``) answered
after the relay service's result. Its tasks run in a task group of its own inside the
HomeKit extension's, so stopping one organization's bridge leaves the others running.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup, TaskStatus
from pyhap.accessory import Bridge

from hexa.bridges.homekit_hap import (
    COMMUNICATION_FAILURE,
    MAX_NAME,
    NO_SUCH_RESOURCE,
    RESOURCE_BUSY,
    SUCCESS,
    TIMED_OUT,
    DeviceAccessory,
    HubDriver,
    RelayWrite,
    WriteRequest,
    hap_name,
)
from hexa.hub import topics
from hexa.hub.commands import Origin, RelayAction
from hexa.hub.errors import BusUnavailable, Conflict, ValidationFailed
from hexa.hub.homekit import MAX_DEVICES, open_state, seal_state
from hexa.models import Device, HomeKitAccessory, HomeKitBridge, RelayState

if TYPE_CHECKING:
    from hexa.bridges.homekit import HomeKit

log = logging.getLogger(__name__)

#: controllers give up on a request after about 10 s, so a write whose result is not in
#: after 9 s answers "timed out" (only with HEXA_COMMAND_TIMEOUT_MS above about 7 s); the
#: intent goes on, and the relay service records how it ends
WRITE_DEADLINE_S = 9.0
#: controller writes waiting for their relay results, per bridge (more: -70403 busy)
MAX_PENDING_WRITES = 64


@dataclass(frozen=True)
class _Spec:
    """What a device looks like to HomeKit; a change rebuilds its accessory."""

    uid: str
    name: str
    model: str
    fw_version: str | None
    relay_names: tuple[str, ...]


class OrgBridge:
    """The HAP bridge of one organization, from bind to stop."""

    def __init__(self, homekit: HomeKit, row: HomeKitBridge, display_name: str) -> None:
        self.homekit = homekit
        self.hub = homekit.hub
        self.org_id: uuid.UUID = row.org_id
        self.row = row
        self.display_name = display_name
        self.driver: HubDriver | None = None
        self._specs: dict[int, _Spec] = {}
        self._skipped: set[uuid.UUID] = set()
        self._sync_lock = asyncio.Lock()
        self._dirty = asyncio.Event()
        self._readvertise = asyncio.Event()
        #: handed over by HAP-python's request handler; ``_unanswered`` bounds them
        self._writes: asyncio.Queue[WriteRequest] = asyncio.Queue()
        self._unanswered = 0
        #: controllers paired (True) or removed (False) through HAP, for the audit log
        self._pairings: asyncio.Queue[tuple[str, bool]] = asyncio.Queue()
        self._scope: anyio.CancelScope | None = None
        self._stopped = anyio.Event()

    @property
    def port(self) -> int | None:
        return None if self.driver is None else self.driver.port

    # --- lifecycle ----------------------------------------------------------------------
    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind, build the accessories, serve; ``task_status.started()`` once controllers
        can connect. A failure after that stops this bridge only, logged."""
        started = False
        try:
            with anyio.CancelScope() as scope:
                self._scope = scope
                sock = self._bind()
                driver = self.driver = HubDriver(
                    sock=sock,
                    addresses=self.homekit.addresses(),
                    hap_id=self.row.hap_id,
                    setup_code=self.row.setup_code,
                    setup_id=self.row.setup_id,
                    hap_state=open_state(self.homekit.secret, self.org_id, self.row.hap_state),
                    on_change=self._dirty.set,
                    on_advertise=self._readvertise.set,
                    on_write=self._accept,
                    on_pairing=self._paired,
                )
                driver.add_accessory(Bridge(driver, self.display_name))
                driver.bridge.set_info_service(
                    manufacturer="Hexa",
                    model="Hexa Hub HomeKit bridge",
                    serial_number=str(self.org_id),
                )
                try:
                    await self.sync()
                    await driver.async_start()
                    self.row.port = driver.port
                    await self._save()
                    await self.homekit.advertiser.advertise(driver)
                    log.info("HomeKit bridge of %s on port %d", self.org_id, driver.port)
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._keep_saved)
                        tg.start_soon(self._keep_advertised)
                        tg.start_soon(self._audit_pairings)
                        tg.start_soon(self._serve_writes, tg)
                        started = True
                        task_status.started()
                        await anyio.sleep_forever()
                finally:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                        await self._shutdown(driver)
        except Exception:
            if not started:
                raise  # the caller's answer (a port that is taken)
            log.exception("the HomeKit bridge of %s failed", self.org_id)
        finally:
            self._stopped.set()

    async def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
        await self._stopped.wait()

    async def _shutdown(self, driver: HubDriver) -> None:
        await driver.async_stop()
        for request in self._pending_requests():
            request.answer()
        await self.homekit.advertiser.withdraw(driver)
        if self._dirty.is_set():
            await self._save()
        self.homekit.forget(self)

    def _pending_requests(self) -> list[WriteRequest]:
        pending = []
        while not self._writes.empty():
            request = self._writes.get_nowait()
            for write in request.writes:
                if write.status is None:
                    write.status = COMMUNICATION_FAILURE
            pending.append(request)
        return pending

    def _bind(self) -> socket.socket:
        """The listening socket: the port asked for (or the one chosen before); when that
        was "any free port" and it is taken now, another free one."""
        host = self.homekit.bind_host()
        fixed = self.row.requested_port
        wanted = fixed or self.row.port or 0
        try:
            return _listen(host, wanted)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and not fixed:
                log.warning(
                    "HomeKit: port %d of %s is taken; moving to a free port (controllers "
                    "find it again through mDNS)",
                    wanted,
                    self.org_id,
                )
                return _listen(host, 0)
            if exc.errno == errno.EADDRINUSE:
                raise Conflict(
                    f"port {wanted} on {host} is taken: choose another (0 picks a free one)",
                    details={"field": "port"},
                ) from None
            raise ValidationFailed(
                f"cannot listen on {host}:{wanted}: {exc.strerror or exc}",
                details={"field": "port"},
            ) from None

    # --- state saving and advertising ---------------------------------------------------
    async def _keep_saved(self) -> None:
        while True:
            await self._dirty.wait()
            try:
                await self._save()
            except Exception:
                log.warning("HomeKit state of %s not saved (retried)", self.org_id, exc_info=True)
                await anyio.sleep(1)

    async def _save(self) -> None:
        assert self.driver is not None
        self._dirty.clear()
        stored = seal_state(self.homekit.secret, self.org_id, self.driver.snapshot())
        self.row.hap_state = stored
        await HomeKitBridge.filter(id=self.row.id).update(hap_state=stored, port=self.driver.port)

    async def _keep_advertised(self) -> None:
        while True:
            await self._readvertise.wait()
            self._readvertise.clear()
            assert self.driver is not None
            await self.homekit.advertiser.advertise(self.driver)

    def _paired(self, controller: str, added: bool) -> None:
        self._pairings.put_nowait((controller, added))

    async def _audit_pairings(self) -> None:
        while True:
            controller, added = await self._pairings.get()
            await self.hub.audit.record(
                action="homekit_controller_paired" if added else "homekit_controller_unpaired",
                source="homekit",
                actor_type="homekit_controller",
                actor_id=controller,
                org_id=self.org_id,
            )

    async def forget_pairings(self) -> None:
        """Forget every controller, end their sessions, and save before answering."""
        assert self.driver is not None
        self.driver.forget_pairings()
        await self._save()

    # --- accessories ----------------------------------------------------------------------
    async def sync(self) -> None:
        """Make the bridged accessories match the organization's devices: a stored AID
        for each (at most ``MAX_DEVICES``), accessories built or rebuilt where a device
        changed, removed where it left; then the configuration number follows."""
        async with self._sync_lock:
            await self._sync()

    async def _sync(self) -> None:
        driver = self.driver
        assert driver is not None
        devices = await Device.filter(org_id=self.org_id, deleted_at=None).order_by(
            "claimed_at", "created_at"
        )
        live = {d.id: d for d in devices}
        rows = await HomeKitAccessory.filter(bridge_id=self.row.id)
        gone = [r.id for r in rows if r.device_id not in live]
        if gone:
            await HomeKitAccessory.filter(id__in=gone).delete()
        aids = {r.device_id: r.aid for r in rows if r.device_id in live}
        for device in devices:
            if device.id in aids:
                continue
            if len(aids) >= MAX_DEVICES:
                await self._not_bridged(device)
                continue
            aids[device.id] = await self._allocate(device)
        relays = await RelayState.filter(device_id__in=list(aids)).order_by("index")
        names: dict[uuid.UUID, dict[int, str | None]] = {}
        states: dict[uuid.UUID, dict[int, bool]] = {}
        for relay in relays:
            names.setdefault(relay.device_id, {})[relay.index] = relay.name
            states.setdefault(relay.device_id, {})[relay.index] = relay.state
        bridge = driver.bridge
        wanted: dict[int, _Spec] = {}
        for device_id, aid in aids.items():
            device = live[device_id]
            spec = _spec_of(device, names.get(device_id, {}))
            wanted[aid] = spec
            if self._specs.get(aid) == spec and aid in bridge.accessories:
                continue
            old = bridge.accessories.get(aid)
            current = states.get(device_id, {})
            relay_states = [current.get(i, False) for i in range(device.relay_count)]
            if isinstance(old, DeviceAccessory) and len(old.relay_chars) == len(relay_states):
                relay_states = [bool(c.get_value()) for c in old.relay_chars]
            bridge.accessories.pop(aid, None)
            accessory = DeviceAccessory(
                driver,
                aid=aid,
                uid=spec.uid,
                name=spec.name,
                model=spec.model,
                fw_version=spec.fw_version,
                relay_names=list(spec.relay_names),
                relays=relay_states,
                online=device.online if old is None else old.online,
            )
            bridge.add_accessory(accessory)
            self.homekit.index(accessory, self)
        for aid in [a for a in bridge.accessories if a not in wanted]:
            gone_accessory = bridge.accessories.pop(aid)
            self.homekit.unindex(gone_accessory)
        self._specs = wanted
        self._skipped &= set(live)
        if driver.aio_stop_event is not None:  # started: tell controllers
            driver.refresh()

    def withdraw(self, accessory: DeviceAccessory) -> None:
        """Take ``accessory`` out now (its device is leaving): the sync that follows the
        change removes it for good (should the change fail, the next sync of the
        organization puts it back with its AID)."""
        assert self.driver is not None
        if self.driver.bridge.accessories.get(accessory.aid) is accessory:
            del self.driver.bridge.accessories[accessory.aid]
        self.homekit.unindex(accessory)

    async def _allocate(self, device: Device) -> int:
        """A new AID for ``device``, never one used before in this bridge."""
        aid = self.row.next_aid
        self.row.next_aid = aid + 1
        await HomeKitBridge.filter(id=self.row.id).update(next_aid=self.row.next_aid)
        await HomeKitAccessory.create(bridge_id=self.row.id, device_id=device.id, aid=aid)
        return aid

    async def _not_bridged(self, device: Device) -> None:
        if device.id in self._skipped:
            return
        self._skipped.add(device.id)
        reason = f"a HomeKit bridge serves at most {MAX_DEVICES} devices"
        log.warning(
            "HomeKit: device %s of %s not bridged: %s", device.device_uid, self.org_id, reason
        )
        await self.hub.audit.record(
            action="homekit_not_bridged",
            source="homekit",
            actor_type="system",
            device_id=device.id,
            org_id=self.org_id,
            details={"reason": reason, "limit": MAX_DEVICES},
        )

    # --- writes from controllers ----------------------------------------------------------
    def _accept(self, request: WriteRequest) -> bool:
        """Take a controller's write unless ``MAX_PENDING_WRITES`` are still unanswered."""
        if self._unanswered >= MAX_PENDING_WRITES:
            return False
        self._unanswered += 1
        self._writes.put_nowait(request)
        return True

    async def _serve_writes(self, tg: TaskGroup) -> None:
        while True:
            request = await self._writes.get()
            tg.start_soon(self._write, request)

    async def _write(self, request: WriteRequest) -> None:
        """Switch the relays of one request and answer it; whatever goes wrong fails
        this write (-70402), never the bridge and its other controllers."""
        try:
            async with anyio.create_task_group() as tg:
                for write in request.writes:
                    if write.status is None:
                        tg.start_soon(self._switch, write, request.controller)
        except Exception:
            log.exception("a HomeKit write to the bridge of %s failed", self.org_id)
            for write in request.writes:
                if write.status is None:
                    write.status = COMMUNICATION_FAILURE
        finally:
            self._unanswered -= 1
        request.answer()

    async def _switch(self, write: RelayWrite, controller: str | None) -> None:
        asked = write.accessory
        assert asked is not None and self.driver is not None
        accessory = self.driver.bridge.accessories.get(write.aid)
        if not isinstance(accessory, DeviceAccessory) or accessory.uid != asked.uid:
            write.status = NO_SUCH_RESOURCE  # released since the controller asked
            return
        if write.index >= len(accessory.relay_chars):
            write.status = NO_SUCH_RESOURCE
            return
        origin = Origin(source="homekit", actor_type="homekit_controller", actor_id=controller)
        action = RelayAction.of(write.index, write.value)
        result = None
        with anyio.move_on_after(WRITE_DEADLINE_S):
            try:
                result = await self.hub.commands.submit(accessory.uid, action, origin)
            except BusUnavailable:
                write.status = COMMUNICATION_FAILURE
                return
        if result is None:  # still on its way: the relay service records how it ends
            write.status = TIMED_OUT
            return
        write.status = _status_of(result)
        if result.status == "applied" and result.relays is not None:
            for index, state in enumerate(result.relays[: len(accessory.relay_chars)]):
                accessory.relay_chars[index].set_value(state)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _spec_of(device: Device, relay_names: dict[int, str | None]) -> _Spec:
    name = hap_name(device.name or "", hap_name(device.device_uid, "Hexa device"))
    return _Spec(
        uid=device.device_uid,
        name=name,
        model=hap_name(device.model, "Hexa"),
        fw_version=device.fw_version,
        relay_names=tuple(
            hap_name(relay_names.get(i) or "", _unnamed_relay(name, i))
            for i in range(device.relay_count)
        ),
    )


def _unnamed_relay(device_name: str, index: int) -> str:
    """``<device name> relay <n>`` (n from 1), the device name shortened to fit."""
    suffix = f" relay {index + 1}"
    return device_name[: MAX_NAME - len(suffix)].rstrip() + suffix


def _status_of(result: topics.Result) -> int:
    """The HAP status of a relay service's result."""
    if result.status == "applied":
        return SUCCESS
    if result.status == "timeout":
        return TIMED_OUT
    if result.status == "rejected":
        error = result.error or ""
        if error.startswith("unknown device"):
            return NO_SUCH_RESOURCE
        if error.startswith("device busy"):
            return RESOURCE_BUSY
    return COMMUNICATION_FAILURE  # offline, or refused by the device
