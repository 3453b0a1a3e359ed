"""Device configuration: each input's wiring (type, link, rocker mode) and the power-restore
mode, versioned, validated as a whole and pushed to the device until it acknowledges.

PATCH → :func:`validate_io` (all or nothing) → one transaction that writes the inputs and
bumps ``config_version`` → audit → :class:`~hexa.hub.events.DeviceConfigChanged` → the
whole configuration on ``hexa/<uid>/cmd`` (the WebSocket gateway forwards it). The device
acks with the version it applied; the ack raises ``config_applied_version`` (never lowers
it). A device that was offline, or whose state report names another version, is sent the
current configuration again. Acks with the wrong version or an unknown command id are
refused, logged and counted, never applied.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, get_args

import anyio
from anyio.abc import TaskStatus
from tortoise.expressions import F
from tortoise.transactions import in_transaction

from hexa.hub import metrics, topics
from hexa.hub.access import DEVICE, Principal, fetch
from hexa.hub.audit import AuditLog
from hexa.hub.errors import BusUnavailable, ValidationFailed
from hexa.hub.events import (
    ConfigReported,
    DeviceConfigChanged,
    DeviceOffline,
    DeviceOnline,
    Events,
)
from hexa.hub.logs import printable
from hexa.hub.mqtt.busapi import BusLike
from hexa.hub.relay import RelayService
from hexa.hub.security import utcnow
from hexa.hub.state import DeviceCache, DeviceInfo
from hexa.models import Device, DeviceInput

log = logging.getLogger(__name__)

INPUT_TYPES: tuple[str, ...] = get_args(topics.InputType)
INPUT_LINKS: tuple[str, ...] = get_args(topics.InputLink)
ROCKER_MODES: tuple[str, ...] = get_args(topics.RockerMode)
POWER_RESTORE_MODES: tuple[str, ...] = get_args(topics.PowerRestoreMode)
_ITEM_FIELDS = ("index", "type", "link", "rocker_mode")

#: config commands whose ack is awaited, remembered (oldest forgotten first)
PUSHES_REMEMBERED = 16_384


def legacy_mode(type_: str, link: str, rocker_mode: str | None) -> str:
    """The input's older ``mode`` (kept on the input resource), derived from its wiring:
    ``detached``, ``momentary`` (a linked push button), ``toggle`` (a linked rocker the
    relay follows) or ``edge`` (a linked rocker whose every change flips the relay)."""
    if link == "detached":
        return "detached"
    if type_ == "rocker":
        return "edge" if rocker_mode == "flip" else "toggle"
    return "momentary"


def _problem(field: str, message: str) -> dict[str, str]:
    return {"field": field, "in": "body", "message": message}


def validate_io(items: Any, input_count: int) -> list[topics.InputConfig]:
    """The input settings of an io-config PATCH, checked as a whole: every problem is
    listed in one :class:`ValidationFailed` (``details.errors``), and nothing is
    returned unless all of them are acceptable."""
    problems: list[dict[str, str]] = []
    if not isinstance(items, list) or not items:
        raise ValidationFailed(
            "inputs must list at least one input",
            details={"errors": [_problem("inputs", "at least one input is required")]},
        )
    seen: set[int] = set()
    settings: list[topics.InputConfig] = []
    for n, item in enumerate(items):
        at = f"inputs.{n}"
        if not isinstance(item, dict):
            problems.append(_problem(at, "must be an object"))
            continue
        before = len(problems)
        for key in item:
            if key not in _ITEM_FIELDS:
                problems.append(_problem(f"{at}.{str(key)[:32]}", "unknown field"))
        index = item.get("index")
        if isinstance(index, bool) or not isinstance(index, int):
            problems.append(_problem(f"{at}.index", "an integer is required"))
        elif not 0 <= index < input_count:
            problems.append(
                _problem(f"{at}.index", f"out of range: the device has inputs 0-{input_count - 1}")
            )
        elif index in seen:
            problems.append(_problem(f"{at}.index", f"input {index} is listed twice"))
        else:
            seen.add(index)
        type_, link, rocker_mode = item.get("type"), item.get("link"), item.get("rocker_mode")
        if type_ not in INPUT_TYPES:
            problems.append(_problem(f"{at}.type", f"must be one of {', '.join(INPUT_TYPES)}"))
        if link not in INPUT_LINKS:
            problems.append(_problem(f"{at}.link", f"must be one of {', '.join(INPUT_LINKS)}"))
        if rocker_mode is not None and rocker_mode not in ROCKER_MODES:
            problems.append(
                _problem(f"{at}.rocker_mode", f"must be one of {', '.join(ROCKER_MODES)}")
            )
        elif type_ == "rocker" and rocker_mode is None:
            problems.append(_problem(f"{at}.rocker_mode", "required for a rocker"))
        elif type_ == "push" and rocker_mode is not None:
            problems.append(_problem(f"{at}.rocker_mode", "a push button has no rocker mode"))
        if len(problems) == before:
            settings.append(topics.InputConfig.model_validate(item))
    if problems:
        first = problems[0]
        raise ValidationFailed(
            f"{first['field']}: {first['message']}", details={"errors": problems}
        )
    return settings


def validate_power_restore(mode: Any) -> str:
    if mode not in POWER_RESTORE_MODES:
        raise ValidationFailed(
            f"mode must be one of {', '.join(POWER_RESTORE_MODES)}",
            details={"errors": [_problem("mode", "must be off, on or restore")]},
        )
    return str(mode)


@dataclass
class _Push:
    uid: str
    device_id: uuid.UUID
    version: int
    sent: float


class DeviceConfigService:
    """Writes configuration changes, pushes them, and records what devices acknowledge."""

    def __init__(
        self,
        bus: BusLike,
        cache: DeviceCache,
        audit: AuditLog,
        events: Events,
        relay: RelayService,
        *,
        timeout_s: float,
    ) -> None:
        self.bus = bus
        self.cache = cache
        self.audit = audit
        self.events = events
        self.relay = relay
        self.timeout_s = timeout_s
        #: command id → the push awaiting its ack
        self._pending: OrderedDict[str, _Push] = OrderedDict()
        #: uid → the last push sent to it: not sent again within the command timeout, so a
        #: report the device sent before it applied it does not bring a second copy
        self._last: dict[str, _Push] = {}

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        undo = [
            self.events.subscribe(DeviceConfigChanged, self._on_changed),
            self.events.subscribe(DeviceOnline, self._on_online),
            self.events.subscribe(DeviceOffline, self._on_offline),
            self.events.subscribe(ConfigReported, self._on_reported),
            self.relay.route_acks(self._on_ack),
        ]
        try:
            task_status.started()
            await anyio.sleep_forever()
        finally:
            for unsubscribe in undo:
                unsubscribe()

    # --- changes (the API) -----------------------------------------------------------
    async def set_io(
        self,
        principal: Principal,
        device_id: uuid.UUID,
        items: Sequence[dict[str, Any]],
        *,
        request_id: str | None,
        source: str = "api",
    ) -> Device:
        """Change the listed inputs (all or none) and bump ``config_version``."""
        device = await fetch(DEVICE, device_id, principal, "configure_devices")
        settings = validate_io(list(items), device.input_count)
        async with in_transaction():
            for s in settings:
                await DeviceInput.filter(device_id=device.id, index=s.index).update(
                    type=s.type,
                    link=s.link,
                    rocker_mode=s.rocker_mode,
                    mode=legacy_mode(s.type, s.link, s.rocker_mode),
                    updated_at=utcnow(),
                )
            device = await self._bump(device.id)
        details = {"inputs": [s.model_dump() for s in settings]}
        return await self._changed(principal, device, details, request_id, source)

    async def set_power_restore(
        self,
        principal: Principal,
        device_id: uuid.UUID,
        mode: Any,
        *,
        request_id: str | None,
        source: str = "api",
    ) -> Device:
        """Change the power-restore mode and bump ``config_version``."""
        device = await fetch(DEVICE, device_id, principal, "configure_devices")
        mode = validate_power_restore(mode)
        async with in_transaction():
            device = await self._bump(device.id, power_restore_mode=mode)
        return await self._changed(
            principal, device, {"power_restore_mode": mode}, request_id, source
        )

    @staticmethod
    async def _bump(device_id: uuid.UUID, **changes: Any) -> Device:
        await Device.filter(id=device_id).update(
            config_version=F("config_version") + 1, updated_at=utcnow(), **changes
        )
        return await Device.get(id=device_id)

    async def _changed(
        self,
        principal: Principal,
        device: Device,
        details: dict[str, Any],
        request_id: str | None,
        source: str,
    ) -> Device:
        info = self.cache.peek(device.device_uid)
        if info is not None:
            info.config_version = max(info.config_version, device.config_version)
        await self.audit.record(
            action="device_config_changed",
            source=source,
            actor_type="user",
            actor_id=str(principal.id),
            device_id=device.id,
            org_id=device.org_id,
            request_id=request_id,
            details={
                "device_uid": device.device_uid,
                "config_version": device.config_version,
                **details,
            },
        )
        await self.events.publish(DeviceConfigChanged(device))
        return device

    # --- pushes --------------------------------------------------------------------------
    async def _on_changed(self, event: DeviceConfigChanged) -> None:
        await self.push(event.device.device_uid, "change")

    async def _on_online(self, event: DeviceOnline) -> None:
        await self._resend_if_behind(event.device, None, "connect")

    async def _on_offline(self, event: DeviceOffline) -> None:
        self._last.pop(event.device.uid, None)  # what it missed goes out when it is back

    async def _on_reported(self, event: ConfigReported) -> None:
        await self._resend_if_behind(event.device, event.config_version, "report")

    async def _resend_if_behind(
        self, device: DeviceInfo, reported: int | None, trigger: str
    ) -> None:
        """Push the configuration again when the device has not acknowledged the current
        version, or reports running another one (versions as the device cache knows them,
        so a device that is up to date costs no database read)."""
        version = device.config_version
        if version == 0:
            return  # factory defaults: nothing to send
        if device.config_applied_version < version or reported not in (None, version):
            await self.push(device.uid, trigger, dedupe=True)

    async def push(self, uid: str, trigger: str, *, dedupe: bool = False) -> bool:
        """Send the device's whole current configuration if it is connected; True when
        sent. With ``dedupe``, a version already sent within the command timeout is not
        sent again."""
        info = await self.cache.get(uid)
        if info is None or not info.online:
            return False
        device = await Device.get_or_none(device_uid=uid, deleted_at=None)
        if device is None or device.config_version == 0:
            return False
        info.config_version = max(info.config_version, device.config_version)
        info.config_applied_version = max(
            info.config_applied_version, device.config_applied_version
        )
        last = self._last.get(uid)
        now = time.monotonic()
        if (
            dedupe
            and last is not None
            and last.version == device.config_version
            and now - last.sent < self.timeout_s
        ):
            return False
        inputs = await DeviceInput.filter(device_id=device.id).order_by("index")
        command = topics.ConfigCommand(
            command_id=uuid.uuid4().hex,
            config_version=device.config_version,
            inputs=[
                topics.InputConfig.model_validate(
                    {
                        "index": i.index,
                        "type": i.type,
                        "link": i.link,
                        "rocker_mode": i.rocker_mode,
                    }
                )
                for i in inputs
            ],
            power_restore_mode=device.power_restore_mode,  # type: ignore[arg-type]
        )
        push = _Push(uid, device.id, device.config_version, now)
        self._pending[command.command_id] = push
        while len(self._pending) > PUSHES_REMEMBERED:
            self._pending.popitem(last=False)
        self._last[uid] = push
        try:
            await self.bus.publish(topics.CMD.format(uid=uid), topics.encode_command(command))
        except BusUnavailable:
            self._pending.pop(command.command_id, None)
            self._last.pop(uid, None)
            log.warning("configuration %d of %s not sent: bus down", push.version, uid)
            return False
        metrics.CONFIG_PUSHES.labels(trigger).inc()
        return True

    # --- acks ----------------------------------------------------------------------------
    def _refuse(self, reason: str, uid: str, ack: topics.Ack, why: str) -> bool:
        metrics.CONFIG_ACKS.labels(reason).inc()
        log.warning(
            "refused config ack %s from %s: %s", printable(ack.command_id), printable(uid), why
        )
        return True

    async def _on_ack(self, uid: str, ack: topics.Ack) -> bool:
        """An ack the relay service did not recognise: True when it is a config ack
        (handled here, applied or refused), False when it is not one."""
        push = self._pending.get(ack.command_id)
        if push is None:
            if ack.config_version is None:
                return False
            return self._refuse("unknown_command", uid, ack, "no config command with that id")
        if push.uid != uid:
            return self._refuse("wrong_device", uid, ack, f"the command was sent to {push.uid}")
        if not ack.ok:
            del self._pending[ack.command_id]
            return self._refuse("device_refused", uid, ack, printable(ack.error or "ok: false"))
        if ack.config_version != push.version:
            return self._refuse(
                "wrong_version",
                uid,
                ack,
                f"config_version {ack.config_version} does not match the {push.version} sent",
            )
        del self._pending[ack.command_id]
        await Device.filter(id=push.device_id, config_applied_version__lt=push.version).update(
            config_applied_version=push.version
        )
        info = self.cache.peek(uid)
        if info is not None:
            info.config_applied_version = max(info.config_applied_version, push.version)
        metrics.CONFIG_ACKS.labels("applied").inc()
        return True
