"""Hexa's MQTT topics and payloads (contract §3) as the client reads and writes them.

The hub's own copy of this contract is ``hexa.hub.topics``; this module repeats the part
an integrator needs, with the standard library only, so that the client does not load
the hub (its settings, pydantic models, database drivers) into an integrator's process.
The test suite checks that both agree.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from typing import Any, Literal, TypeAlias, cast

from hexa.client.errors import PayloadError
from hexa.client.messages import (
    Availability,
    DeviceState,
    HubStatus,
    InputEvent,
    InputEventName,
    Message,
    RelayResult,
    RelayState,
    ResultStatus,
)

# --- topics -----------------------------------------------------------------------------
STATE = "hexa/{uid}/state"
RELAY_STATE = "hexa/{uid}/relay/{index}/state"
AVAILABILITY = "hexa/{uid}/availability"
INPUT_EVENT = "hexa/{uid}/input/{index}/event"
RESULT = "hexa/{uid}/result"
HUB_STATUS = "hexa/hub/status"
RELAY_SET = "hexa/{uid}/relay/{index}/set"
RELAYS_SET = "hexa/{uid}/relays/set"

#: the topics the client subscribes to, in the order it tries to recognise them
RECEIVED = (HUB_STATUS, STATE, RELAY_STATE, AVAILABILITY, INPUT_EVENT, RESULT)

_SEGMENT = {
    "uid": re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"),
    "index": re.compile(r"0|[1-9][0-9]{0,2}"),
}

IntentValue: TypeAlias = Literal["ON", "OFF", "TOGGLE"]


def topic_filter(template: str) -> str:
    """The subscription filter for every instance of ``template`` (placeholders → ``+``)."""
    return "/".join("+" if p.startswith("{") else p for p in template.split("/"))


def match(template: str, topic: str) -> dict[str, str] | None:
    """The placeholders of ``topic`` when it is an instance of ``template``, else None."""
    parts, wanted = topic.split("/"), template.split("/")
    if len(parts) != len(wanted):
        return None
    found: dict[str, str] = {}
    for got, want in zip(parts, wanted, strict=True):
        if want.startswith("{"):
            key = want[1:-1]
            if not _SEGMENT[key].fullmatch(got):
                return None
            found[key] = got
        elif got != want:
            return None
    return found


def valid_uid(uid: str) -> bool:
    """Whether ``uid`` can be a device uid (so a topic built from it has no wildcard)."""
    return isinstance(uid, str) and _SEGMENT["uid"].fullmatch(uid) is not None


def intent_topic(uid: str, index: int | None) -> str:
    """Where an intent for relay ``index`` (None: every relay) of ``uid`` is published."""
    if not valid_uid(uid):
        raise ValueError(f"not a device uid: {uid!r}")
    if index is None:
        return RELAYS_SET.replace("{uid}", uid)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= 999:
        raise ValueError(f"relay index must be an integer from 0 to 999, not {index!r}")
    return RELAY_SET.replace("{uid}", uid).replace("{index}", str(index))


def encode_intent(state: IntentValue, intent_id: str) -> bytes:
    """A JSON intent; the hub echoes ``intent_id`` in its result."""
    return json.dumps({"state": state, "intent_id": intent_id}).encode()


# --- payloads ---------------------------------------------------------------------------
def decode(topic: str, payload: bytes, retain: bool = False) -> Message | None:
    """The message on ``topic``, or None for a topic that is not one the client reads
    and for an empty payload (a retained topic cleared: the hub deleted the device).

    Raises :class:`PayloadError` when the payload does not have the topic's shape. Unknown
    fields in JSON documents are ignored, so a newer hub that adds fields still decodes.
    """
    if not payload:
        return None
    if topic == HUB_STATUS:
        return HubStatus(_online(topic, payload), retain)
    for template in RECEIVED[1:]:
        params = match(template, topic)
        if params is None:
            continue
        uid = params["uid"]
        if template == STATE:
            return _state(topic, uid, payload, retain)
        if template == RELAY_STATE:
            return RelayState(uid, int(params["index"]), _on(topic, payload), retain)
        if template == AVAILABILITY:
            return Availability(uid, _online(topic, payload), retain)
        if template == INPUT_EVENT:
            return _input_event(topic, uid, int(params["index"]), payload)
        return _result(topic, uid, payload)
    return None


def _on(topic: str, payload: bytes) -> bool:
    word = payload.strip().upper()
    if word not in (b"ON", b"OFF"):
        raise PayloadError(topic, "expected ON or OFF", payload)
    return word == b"ON"


def _online(topic: str, payload: bytes) -> bool:
    word = payload.strip().lower()
    if word not in (b"online", b"offline"):
        raise PayloadError(topic, "expected online or offline", payload)
    return word == b"online"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _document(topic: str, payload: bytes) -> dict[str, Any]:
    try:
        data = json.loads(payload.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise PayloadError(topic, f"not UTF-8 JSON ({exc})", payload) from None
    except RecursionError:
        raise PayloadError(topic, "JSON nested too deeply", payload) from None
    if not isinstance(data, dict):
        raise PayloadError(topic, "expected a JSON object", payload)
    return data


class _Fields:
    """Typed access to a JSON object's fields: a missing or mistyped field is a
    :class:`PayloadError` naming it; an optional field may be absent or null."""

    def __init__(self, topic: str, payload: bytes) -> None:
        self.topic, self.payload = topic, payload
        self.data = _document(topic, payload)

    def fail(self, reason: str) -> PayloadError:
        return PayloadError(self.topic, reason, self.payload)

    def _get(self, key: str) -> Any:
        value = self.data.get(key)
        if value is None:
            raise self.fail(f"{key}: missing")
        return value

    def flag(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise self.fail(f"{key}: expected true or false")
        return value

    def flags(self, key: str) -> tuple[bool, ...]:
        value = self._get(key)
        if not isinstance(value, list) or not all(isinstance(v, bool) for v in value):
            raise self.fail(f"{key}: expected a list of true/false")
        return tuple(value)

    def text(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise self.fail(f"{key}: expected a string")
        return value

    def number(self, key: str) -> float:
        value = self._get(key)
        try:  # an integer of 400 digits is valid JSON but no float: OverflowError
            number = float(value) if isinstance(value, int | float) else math.nan
        except OverflowError:
            number = math.nan
        if isinstance(value, bool) or not math.isfinite(number) or number < 0:
            raise self.fail(f"{key}: expected a non-negative number")
        return number

    def count(self, key: str) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(f"{key}: expected a non-negative integer")
        return value

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        value = self.text(key)
        if value not in allowed:
            raise self.fail(f"{key}: expected one of {', '.join(allowed)}")
        return value

    def has(self, key: str) -> bool:
        """Whether an optional field is given (absent and null both mean no)."""
        return self.data.get(key) is not None


_EVENTS: tuple[InputEventName, ...] = ("press", "release", "hold", "double_press")
_STATUSES: tuple[ResultStatus, ...] = ("applied", "timeout", "offline", "rejected")


def _state(topic: str, uid: str, payload: bytes, retain: bool) -> DeviceState:
    f = _Fields(topic, payload)
    stamp = f.text("updated_at")
    try:
        updated_at = datetime.fromisoformat(stamp)
    except ValueError:
        raise f.fail("updated_at: expected an ISO-8601 time") from None
    if updated_at.tzinfo is None:  # the contract's times are UTC
        updated_at = updated_at.replace(tzinfo=UTC)
    return DeviceState(
        uid, f.flags("relays"), f.flags("inputs"), f.flag("online"), updated_at, retain
    )


def _input_event(topic: str, uid: str, index: int, payload: bytes) -> InputEvent:
    f = _Fields(topic, payload)
    event = cast(InputEventName, f.choice("event", _EVENTS))
    duration = f.count("duration_ms") if f.has("duration_ms") else None
    return InputEvent(uid, index, event, duration)


def _result(topic: str, uid: str, payload: bytes) -> RelayResult:
    f = _Fields(topic, payload)
    return RelayResult(
        uid,
        f.text("intent_id"),
        f.flag("ok"),
        cast(ResultStatus, f.choice("status", _STATUSES)),
        relays=f.flags("relays") if f.has("relays") else None,
        latency_ms=f.number("latency_ms") if f.has("latency_ms") else None,
        command_id=f.text("command_id") if f.has("command_id") else None,
        error=f.text("error") if f.has("error") else None,
    )
