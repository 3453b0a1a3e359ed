"""Automations: rules fed by device events that publish relay intents (source ``automation``).

A rule has one trigger, optional conditions (all must hold) and one or more actions.
``cooldown_s`` suppresses a rule for a while after it fired; ``dedupe_window_ms``
ignores repeats of the same triggering event (a button that reports a hold twice).
Relay state changes never trigger rules, so an action cannot re-trigger its own rule;
as a second guard a rule fires at most ``MAX_FIRES_PER_MINUTE`` times a minute.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from datetime import time as dtime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio
from anyio.abc import TaskStatus
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from tortoise.expressions import F

from hexa.hub import metrics, topics
from hexa.hub.audit import AuditLog
from hexa.hub.commands import Commands, Origin, RelayAction
from hexa.hub.errors import BusUnavailable, NotFound, ValidationFailed
from hexa.hub.events import DeviceOnline, Events, InputEvent, PresenceEvent
from hexa.hub.mqtt.busapi import BusLike
from hexa.hub.security import utcnow
from hexa.hub.state import DeviceCache, DeviceInfo
from hexa.models import Automation, AutomationRun, Device

log = logging.getLogger(__name__)

MAX_FIRES_PER_MINUTE = 30
RULES_TTL_S = 5.0
DEFAULT_RULE_NAME = "Hold any input 10 s: all relays off"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- triggers ---------------------------------------------------------------------------
class InputEventTrigger(_Spec):
    type: Literal["input_event"]
    device_id: uuid.UUID
    input_index: Annotated[int, Field(ge=0, le=63)] | None = None
    event: topics.InputEventName


class ButtonHoldTrigger(_Spec):
    type: Literal["button_hold"]
    device_id: uuid.UUID
    input_index: Annotated[int, Field(ge=0, le=63)] | None = None
    min_duration_ms: Annotated[int, Field(ge=0, le=600_000)] = 0


class PresenceTrigger(_Spec):
    type: Literal["device_online", "device_offline"]
    device_id: uuid.UUID


Trigger = Annotated[
    InputEventTrigger | ButtonHoldTrigger | PresenceTrigger, Field(discriminator="type")
]


# --- conditions -------------------------------------------------------------------------
def _tz(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown IANA timezone {value!r}") from None
    return value


class RelayStateCondition(_Spec):
    type: Literal["relay_state"]
    device_id: uuid.UUID
    relay_index: Annotated[int, Field(ge=0, le=63)]
    state: StrictBool


class TimeWindowCondition(_Spec):
    type: Literal["time_window"]
    start: Annotated[str, Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")]
    end: Annotated[str, Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")]
    timezone: str = "UTC"

    _check_tz = field_validator("timezone")(_tz)


class WeekdayCondition(_Spec):
    type: Literal["weekday"]
    days: Annotated[list[Annotated[int, Field(ge=0, le=6)]], Field(min_length=1, max_length=7)]
    timezone: str = "UTC"

    _check_tz = field_validator("timezone")(_tz)


Condition = Annotated[
    RelayStateCondition | TimeWindowCondition | WeekdayCondition, Field(discriminator="type")
]


# --- actions ----------------------------------------------------------------------------
class SetRelayAction(_Spec):
    type: Literal["set_relay"]
    device_id: uuid.UUID
    relay_index: Annotated[int, Field(ge=0, le=63)]
    state: StrictBool | Literal["toggle"]


class SetAllRelaysAction(_Spec):
    type: Literal["set_all_relays"]
    device_id: uuid.UUID
    state: StrictBool


Action = Annotated[SetRelayAction | SetAllRelaysAction, Field(discriminator="type")]

_trigger = TypeAdapter(Trigger)
_conditions = TypeAdapter(list[Condition])
_actions = TypeAdapter(Annotated[list[Action], Field(min_length=1, max_length=20)])


def _parse(adapter: TypeAdapter[Any], value: Any, field: str) -> Any:
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in (field, *err.get("loc", ())))
        raise ValidationFailed(f"{where}: {err['msg']}", details={"field": where}) from None


async def validate_rule(
    org_id: uuid.UUID, trigger: Any, conditions: Any, actions: Any
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Parse a rule and check every device it names is a live device of ``org_id``
    (another tenant's device is 404) and every index is in range (400)."""
    t = _parse(_trigger, trigger, "trigger")
    cs = _parse(_conditions, conditions or [], "conditions")
    acts = _parse(_actions, actions, "actions")
    for part, where in (
        (t, "trigger"),
        *((c, "conditions") for c in cs),
        *((a, "actions") for a in acts),
    ):
        device_id = getattr(part, "device_id", None)
        if device_id is None:
            continue
        device = await Device.get_or_none(id=device_id, deleted_at=None)
        if device is None or device.org_id != org_id:
            raise NotFound("device")
        index = getattr(part, "input_index", None)
        if index is not None and index >= device.input_count:
            raise ValidationFailed(
                f"{where}: input_index {index} out of range",
                details={"field": f"{where}.input_index"},
            )
        index = getattr(part, "relay_index", None)
        if index is not None and index >= device.relay_count:
            raise ValidationFailed(
                f"{where}: relay_index {index} out of range",
                details={"field": f"{where}.relay_index"},
            )
    return _dump(t), [_dump(c) for c in cs], [_dump(a) for a in acts]


def _dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json", exclude_none=True)


def default_rule(device: Device) -> dict[str, Any]:
    """The rule every claimed hexa-mini-switch-v1 gets: hold any input ≥ 10 s → all off."""
    return {
        "name": DEFAULT_RULE_NAME,
        "trigger": {"type": "button_hold", "device_id": str(device.id), "min_duration_ms": 10_000},
        "conditions": [],
        "actions": [{"type": "set_all_relays", "device_id": str(device.id), "state": False}],
        "cooldown_s": 0,
        "dedupe_window_ms": 5_000,
    }


class Engine:
    """Evaluates enabled rules against device events and runs their actions."""

    def __init__(
        self, commands: Commands, cache: DeviceCache, bus: BusLike, audit: AuditLog
    ) -> None:
        self.commands = commands
        self.cache = cache
        self.bus = bus
        self.audit = audit
        self._queue: asyncio.Queue[tuple[str, DeviceInfo, dict[str, Any], float]] = asyncio.Queue(
            10_000
        )
        self._rules: dict[uuid.UUID, list[Automation]] = {}
        self._rules_loaded = 0.0
        self._last_event: dict[tuple[uuid.UUID, str], float] = {}
        self._fires: dict[uuid.UUID, deque[float]] = {}

    def invalidate(self) -> None:
        """Reload rules on the next event (after a change through the API)."""
        self._rules_loaded = 0.0

    def subscribe(self, events: Events) -> None:
        """Hear devices come and go and their inputs (for the rest of the process)."""
        events.subscribe(PresenceEvent, self._on_presence)
        events.subscribe(InputEvent, self._on_input)

    async def _on_presence(self, e: PresenceEvent) -> None:
        name = "device_online" if isinstance(e, DeviceOnline) else "device_offline"
        await self._queue_event(name, e.device, {})

    async def _on_input(self, e: InputEvent) -> None:
        data: dict[str, Any] = {"input_index": e.input_index, "event": e.event}
        if e.duration_ms is not None:
            data["duration_ms"] = e.duration_ms
        await self._queue_event("input_event", e.device, data)

    async def _queue_event(self, name: str, device: DeviceInfo, data: dict[str, Any]) -> None:
        """Queue an event; evaluation never blocks device traffic."""
        try:
            self._queue.put_nowait((name, device, data, time.monotonic()))
        except asyncio.QueueFull:
            metrics.AUTOMATION_RUNS.labels("dropped").inc()
            log.warning("automation queue full: dropped %s from %s", name, device.uid)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with anyio.create_task_group() as tg:
            while True:
                name, device, data, seen = await self._queue.get()
                try:
                    for rule in await self._matching(name, device, data):
                        await self._evaluate(rule, name, device, data, seen, tg)
                except Exception:
                    log.exception("automations failed on %s from %s", name, device.uid)

    async def _load(self) -> None:
        if time.monotonic() - self._rules_loaded < RULES_TTL_S:
            return
        rules: dict[uuid.UUID, list[Automation]] = {}
        for rule in await Automation.filter(enabled=True):
            try:
                device_id = uuid.UUID(str(rule.trigger.get("device_id")))
            except ValueError:
                continue
            rules.setdefault(device_id, []).append(rule)
        self._rules, self._rules_loaded = rules, time.monotonic()

    async def _matching(
        self, name: str, device: DeviceInfo, data: dict[str, Any]
    ) -> list[Automation]:
        await self._load()
        out = []
        for rule in self._rules.get(device.id, []):
            t = rule.trigger
            if rule.org_id != device.org_id:
                continue
            if name in ("device_online", "device_offline"):
                if t.get("type") == name:
                    out.append(rule)
                continue
            index = t.get("input_index")
            if index is not None and index != data.get("input_index"):
                continue
            if (t.get("type") == "input_event" and t.get("event") == data.get("event")) or (
                t.get("type") == "button_hold"
                and data.get("event") == "hold"
                and (data.get("duration_ms") or 0) >= t.get("min_duration_ms", 0)
            ):
                out.append(rule)
        return out

    async def _evaluate(
        self,
        rule: Automation,
        name: str,
        device: DeviceInfo,
        data: dict[str, Any],
        seen: float,
        tg: anyio.abc.TaskGroup,
    ) -> None:
        event = {"event": name, "device_id": str(device.id), "device_uid": device.uid, **data}
        key = (rule.id, f"{name}:{data.get('input_index')}:{data.get('event')}")
        last = self._last_event.get(key)
        self._last_event[key] = seen
        if (
            rule.dedupe_window_ms
            and last is not None
            and (seen - last) * 1000 < rule.dedupe_window_ms
        ):
            await self._record(rule, "suppressed_dedupe", event, [])
            return
        if (
            rule.cooldown_s
            and rule.last_fired_at is not None
            and (utcnow() - rule.last_fired_at).total_seconds() < rule.cooldown_s
        ):
            await self._record(rule, "suppressed_cooldown", event, [])
            return
        fires = self._fires.setdefault(rule.id, deque())
        while fires and fires[0] < seen - 60:
            fires.popleft()
        if len(fires) >= MAX_FIRES_PER_MINUTE:
            await self._record(rule, "suppressed_rate", event, [])
            return
        if not await self._conditions_hold(rule):
            await self._record(rule, "skipped_condition", event, [])
            return
        fires.append(seen)
        rule.last_fired_at = utcnow()
        await Automation.filter(id=rule.id).update(last_fired_at=rule.last_fired_at)
        tg.start_soon(self._fire, rule, event)

    async def _conditions_hold(self, rule: Automation) -> bool:
        now = utcnow()
        for c in rule.conditions or []:
            kind = c.get("type")
            if kind == "relay_state":
                device = await Device.get_or_none(id=c["device_id"], deleted_at=None)
                info = await self.cache.get(device.device_uid) if device else None
                if info is None or info.relays[c["relay_index"]] != c["state"]:
                    return False
            elif kind == "time_window":
                local = (
                    now.astimezone(ZoneInfo(c.get("timezone", "UTC")))
                    .time()
                    .replace(second=0, microsecond=0)
                )
                start, end = dtime.fromisoformat(c["start"]), dtime.fromisoformat(c["end"])
                inside = start <= local < end if start <= end else (local >= start or local < end)
                if not inside:
                    return False
            elif (
                kind == "weekday"
                and now.astimezone(ZoneInfo(c.get("timezone", "UTC"))).weekday() not in c["days"]
            ):
                return False
        return True

    async def _fire(self, rule: Automation, event: dict[str, Any]) -> None:
        results: list[dict[str, Any]] = []
        for action in rule.actions:
            device = await Device.get_or_none(id=action["device_id"], deleted_at=None)
            if device is None or device.org_id != rule.org_id:
                results.append({"action": action, "status": "device_removed"})
                continue
            try:
                result = await self.commands.submit(
                    device.device_uid,
                    RelayAction.stored(action),
                    Origin(
                        "automation",
                        actor_type="automation",
                        actor_id=str(rule.id),
                        automation_id=str(rule.id),
                    ),
                )
                results.append({"action": action, "status": result.status, "relays": result.relays})
            except Exception:
                log.exception("automation %s action failed", rule.id)
                results.append({"action": action, "status": "error"})
        ok = all(r["status"] == "applied" for r in results)
        await self._record(rule, "fired" if ok else "fired_with_failures", event, results)
        await Automation.filter(id=rule.id).update(fire_count=F("fire_count") + 1)
        try:
            await self.bus.publish(
                topics.AUTOMATION_FIRED.format(),
                topics.encode(
                    topics.AutomationFired(
                        automation_id=str(rule.id),
                        org_id=str(rule.org_id),
                        device_id=event["device_id"],
                        at=topics.iso_now(),
                    )
                ),
            )
        except BusUnavailable:
            pass

    async def _record(
        self, rule: Automation, outcome: str, event: dict[str, Any], results: list[dict[str, Any]]
    ) -> None:
        metrics.AUTOMATION_RUNS.labels(outcome).inc()
        try:
            await AutomationRun.create(
                automation_id=rule.id, outcome=outcome, event=event, results=results
            )
        except Exception:
            log.exception("could not record a run of automation %s", rule.id)
        await self.audit.record(
            action="automation_run",
            source="automation",
            actor_type="automation",
            actor_id=str(rule.id),
            device_id=event.get("device_id"),
            org_id=rule.org_id,
            automation_id=rule.id,
            details={"outcome": outcome, "name": rule.name, "event": event, "results": results},
        )
