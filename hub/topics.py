"""The MQTT topic contract (contract.md §3): every topic and payload, in one module.

Nothing else in the code base formats a topic string: build topics with
``Topic.format()``, subscribe with ``Topic.filter()``, recognise them with
``Topic.parse()``, and turn payloads into typed objects with the ``decode_*`` codecs,
which raise :class:`PayloadError` for anything malformed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

ROOT = "hexa"
UID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_SEGMENT_RE = {"uid": UID_RE, "index": re.compile(r"^(0|[1-9][0-9]{0,2})$")}


M = TypeVar("M", bound="BaseModel")


class PayloadError(ValueError):
    """A payload that does not decode to its topic's type."""


P = TypeVar("P")


@dataclass(frozen=True)
class Codec(Generic[P]):
    """How one topic's payloads are read (raising :class:`PayloadError`) and written."""

    decode: Callable[[bytes], P]
    encode: Callable[[P], bytes]


#: one level of a topic template: (the literal text, or None for a placeholder; the
#: placeholder's name; the pattern its value must match, if any)
_Level = tuple[str | None, str, re.Pattern[str] | None]


@dataclass(frozen=True)
class Topic(Generic[P]):
    """A topic template such as ``hexa/{uid}/relay/{index}/set``, bound to its payload
    type (``codec``), whether it is retained, and its QoS."""

    name: str
    template: str
    retained: bool = False
    codec: Codec[P] | None = None
    qos: int = 1
    _levels: tuple[_Level, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # the template split once: parse and format run for every message
        levels: list[_Level] = []
        for part in self.template.split("/"):
            if part.startswith("{"):
                key = part[1:-1]
                levels.append((None, key, _SEGMENT_RE.get(key)))
            else:
                levels.append((part, part, None))
        object.__setattr__(self, "_levels", tuple(levels))

    def decode(self, payload: bytes) -> P:
        """The payload as this topic's type; :class:`PayloadError` if it is not one."""
        if self.codec is None:
            raise TypeError(f"topic {self.name} has no payload codec")
        return self.codec.decode(payload)

    def encode(self, value: P) -> bytes:
        if self.codec is None:
            raise TypeError(f"topic {self.name} has no payload codec")
        return self.codec.encode(value)

    def format(self, **params: object) -> str:
        out = []
        levels = self._levels
        for literal, key, _ in levels:
            if literal is None:
                value = str(params[key])
                if not value or "/" in value or "+" in value or "#" in value:
                    raise ValueError(f"bad topic segment {value!r}")
                out.append(value)
            else:
                out.append(literal)
        return "/".join(out)

    def filter(self, **params: object) -> str:
        """A subscription filter: unnamed placeholders become ``+``."""
        levels = self._levels
        return "/".join(
            literal if literal is not None else str(params.get(key, "+"))
            for literal, key, _ in levels
        )

    def parse(self, topic: str) -> dict[str, str] | None:
        """The placeholders of ``topic`` if it is an instance of this template."""
        return self.parse_levels(topic.split("/"))

    def parse_levels(self, parts: list[str]) -> dict[str, str] | None:
        """:meth:`parse` of a topic already split at ``/``."""
        levels = self._levels
        if len(parts) != len(levels):
            return None
        for got, (literal, _, _) in zip(parts, levels, strict=True):
            if literal is not None and got != literal:
                return None
        found: dict[str, str] = {}
        for got, (literal, key, check) in zip(parts, levels, strict=True):
            if literal is None:
                if check is not None and not check.match(got):
                    return None
                found[key] = got
        return found


@dataclass(frozen=True, slots=True)
class Decoded(Generic[P]):
    """A message as the hub built it, handed to the hub's own subscribers in process
    beside its payload: the template it was formatted from, the placeholders, and the
    value the payload encodes (so none of them parses or decodes it again)."""

    topic: Topic[P]
    params: dict[str, str]
    value: P


def device_of(topic: str) -> str | None:
    """The device uid a ``hexa/<uid>/...`` topic is about, or None."""
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != ROOT:
        return None
    for t in PER_DEVICE:
        params = t.parse_levels(parts)
        if params is not None:
            return params["uid"]
    return None


def ha_object_id(uid: str, index: int) -> str:
    return f"hexa_{uid}_{index}"


def ha_trigger_object_id(uid: str, input_index: int, event: str) -> str:
    """The object id of one input event's Home Assistant device trigger."""
    return f"hexa_{uid}_input{input_index}_{event}"


# greedy: the uid is everything before the one ``_input<n>_<event>`` suffix the id ends in
# (no proper suffix of such a suffix is one itself, so every uid parses back to itself)
_HA_TRIGGER_RE = re.compile(
    r"^hexa_(?P<uid>.+)_input(?:0|[1-9][0-9]?)_(?:press|hold|double_press)$"
)


# --- payloads ---------------------------------------------------------------------------
class _Ours(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Theirs(BaseModel):
    """A payload written by firmware: unknown fields are ignored for forward compatibility."""

    model_config = ConfigDict(extra="ignore", frozen=True)


RelayValue = bool | Literal["toggle"]


class SetRelay(_Ours):
    type: Literal["set_relay"] = "set_relay"
    command_id: str
    relay_index: int
    state: RelayValue


class SetAllRelays(_Ours):
    type: Literal["set_all_relays"] = "set_all_relays"
    command_id: str
    state: bool


InputType = Literal["push", "rocker"]
InputLink = Literal["linked", "detached"]
RockerMode = Literal["follow", "flip"]
PowerRestoreMode = Literal["off", "on", "restore"]


class InputConfig(_Ours):
    """How one input is wired (docs/protocol.md, "Device configuration")."""

    index: int
    type: InputType
    link: InputLink
    rocker_mode: RockerMode | None = None


class ConfigCommand(_Ours):
    """The device's whole IO configuration and power-restore mode, at ``config_version``."""

    type: Literal["config"] = "config"
    command_id: str
    config_version: Annotated[int, Field(ge=1)]
    inputs: list[InputConfig]
    power_restore_mode: PowerRestoreMode


Command = Annotated[SetRelay | SetAllRelays | ConfigCommand, Field(discriminator="type")]


class Ack(_Theirs):
    command_id: Annotated[str, Field(min_length=1, max_length=64)]
    ok: StrictBool
    relays: list[StrictBool] | None = None
    error: str | None = None
    #: set in the ack of a ``config`` command: the version the device applied
    config_version: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None


class Report(_Theirs):
    relays: list[StrictBool] | None = None
    inputs: list[StrictBool] | None = None
    fw_version: Annotated[str, Field(max_length=64)] | None = None
    uptime_s: Annotated[float, Field(ge=0)] | None = None
    #: the configuration version the device runs (0: factory defaults)
    config_version: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None


InputEventName = Literal["press", "release", "hold", "double_press"]


class InputEvent(_Theirs):
    input_index: Annotated[int, Field(ge=0, le=63)]
    event: InputEventName
    duration_ms: Annotated[int, Field(ge=0)] | None = None


IntentValue = Literal["ON", "OFF", "TOGGLE"]


class Intent(_Ours):
    """A relay intent. ``relay_index`` is None for an all-relays intent."""

    state: IntentValue
    source: Annotated[str, Field(max_length=32)] = "mqtt"
    intent_id: Annotated[str, Field(min_length=1, max_length=64)] = Field(
        default_factory=lambda: uuid.uuid4().hex
    )
    request_id: Annotated[str, Field(max_length=128)] | None = None
    actor_type: Annotated[str, Field(max_length=32)] | None = None
    actor_id: Annotated[str, Field(max_length=64)] | None = None
    automation_id: str | None = None
    schedule_id: str | None = None
    #: when the hub sealed it (Unix ms) and its HMAC (:func:`seal_intent`); the hub's only
    sealed_at: int | None = None
    seal: Annotated[str, Field(max_length=64)] | None = None


#: a sealed intent older than this is not trusted (a replay)
SEAL_MAX_AGE_S = 30.0


def seal_key(secret: str) -> bytes:
    """The intent-sealing key, derived from the hub's secret (the same on every instance)."""
    return hmac.new(secret.encode(), b"hexa intent seal v1", hashlib.sha256).digest()


def _seal_of(intent: Intent, topic: str, key: bytes) -> str:
    # the whole intent on its topic: a seal copied onto another device, relay or state
    # does not verify
    body = intent.model_dump_json(exclude={"seal"})
    return hmac.new(key, f"{topic}\x1f{body}".encode(), hashlib.sha256).hexdigest()[:32]


def seal_intent(intent: Intent, topic: str, key: bytes) -> Intent:
    """The intent, stamped now and sealed by the hub for ``topic``."""
    stamped = intent.model_copy(update={"sealed_at": int(time.time() * 1000), "seal": None})
    return stamped.model_copy(update={"seal": _seal_of(stamped, topic, key)})


def sealed_by(intent: Intent, topic: str, key: bytes) -> bool:
    """Whether the hub (holder of ``key``) sealed this intent for ``topic``, recently."""
    if intent.seal is None or intent.sealed_at is None:
        return False
    if abs(time.time() * 1000 - intent.sealed_at) > SEAL_MAX_AGE_S * 1000:
        return False
    return hmac.compare_digest(intent.seal, _seal_of(intent, topic, key))


def unattributed(
    intent: Intent, *, actor_type: str, actor_id: str | None, source: str = "mqtt"
) -> Intent:
    """The intent with who and where replaced by what the broker knows of its publisher
    (``source``: the audit source of such publishers)."""
    return intent.model_copy(
        update={
            "source": source,
            "request_id": None,
            "actor_type": actor_type,
            "actor_id": actor_id,
            "automation_id": None,
            "schedule_id": None,
            "sealed_at": None,
            "seal": None,
        }
    )


ResultStatus = Literal["applied", "timeout", "offline", "rejected"]


class Result(_Ours):
    intent_id: str
    ok: bool
    status: ResultStatus
    relays: list[bool] | None = None
    latency_ms: float | None = None
    command_id: str | None = None
    error: str | None = None


class DeviceState(_Ours):
    relays: list[bool]
    inputs: list[bool]
    online: bool
    updated_at: str


def _json(payload: bytes) -> Any:
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise PayloadError(f"not UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise PayloadError("JSON nested too deeply") from None


def _model(cls: type[M], payload: bytes) -> M:
    data = _json(payload)
    if not isinstance(data, dict):
        raise PayloadError("expected a JSON object")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise PayloadError(_brief(exc)) from None


def _brief(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "payload"
    return f"{where}: {err.get('msg')}"


def decode_ack(payload: bytes) -> Ack:
    return _model(Ack, payload)


def decode_report(payload: bytes) -> Report:
    return _model(Report, payload)


def decode_event(payload: bytes) -> InputEvent:
    return _model(InputEvent, payload)


def decode_result(payload: bytes) -> Result:
    return _model(Result, payload)


def decode_state(payload: bytes) -> DeviceState:
    return _model(DeviceState, payload)


def decode_onoff(payload: bytes) -> bool:
    text = payload.strip().upper()
    if text in (b"ON", b"OFF"):
        return text == b"ON"
    raise PayloadError("state must be 'ON' or 'OFF'")


def _decode_command(payload: bytes) -> SetRelay | SetAllRelays | ConfigCommand:
    data = _json(payload)
    if isinstance(data, dict) and data.get("type") == "set_all_relays":
        return _model(SetAllRelays, payload)
    if isinstance(data, dict) and data.get("type") == "config":
        return _model(ConfigCommand, payload)
    return _model(SetRelay, payload)


def decode_availability(payload: bytes) -> bool:
    """``online`` → True, ``offline`` → False."""
    text = payload.strip().lower()
    if text == b"online":
        return True
    if text == b"offline":
        return False
    raise PayloadError("availability must be 'online' or 'offline'")


def decode_intent(payload: bytes, *, all_relays: bool) -> Intent:
    """A plain ``ON``/``OFF``/``TOGGLE`` or a JSON intent document."""
    text = payload.strip()
    if text.upper() in (b"ON", b"OFF", b"TOGGLE"):
        intent = Intent(state=text.upper().decode())  # type: ignore[arg-type]
    else:
        data = _json(payload)
        if not isinstance(data, dict):
            raise PayloadError("expected ON, OFF, TOGGLE or a JSON object")
        if isinstance(data.get("state"), str):
            data["state"] = data["state"].upper()
        elif isinstance(data.get("state"), bool):
            data["state"] = "ON" if data["state"] else "OFF"
        try:
            intent = Intent.model_validate(data)
        except ValidationError as exc:
            raise PayloadError(_brief(exc)) from None
    if all_relays and intent.state == "TOGGLE":
        raise PayloadError("TOGGLE is not allowed for all relays")
    return intent


def encode(model: BaseModel) -> bytes:
    return model.model_dump_json(exclude_none=True).encode()


def encode_intent(intent: Intent) -> bytes:
    return encode(intent)


def encode_command(command: SetRelay | SetAllRelays | ConfigCommand) -> bytes:
    return command.model_dump_json().encode()


def encode_onoff(state: bool) -> bytes:
    return b"ON" if state else b"OFF"


def encode_availability(online: bool) -> bytes:
    return b"online" if online else b"offline"


def iso_now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def uid_of_ha_object(object_id: str) -> str | None:
    """The device uid inside ``hexa_<uid>_<n>`` or ``hexa_<uid>_input<n>_<event>``, or None."""
    if not object_id.startswith("hexa_"):
        return None
    trigger = _HA_TRIGGER_RE.match(object_id)
    if trigger is not None:
        return trigger["uid"] if UID_RE.match(trigger["uid"]) else None
    uid, _, index = object_id[5:].rpartition("_")
    if not index.isdigit() or not UID_RE.match(uid):
        return None
    return uid


# --- device ↔ hub ---------------------------------------------------------------------
CMD: Topic[SetRelay | SetAllRelays | ConfigCommand] = Topic(
    "cmd", "hexa/{uid}/cmd", codec=Codec(_decode_command, encode_command)
)
ACK: Topic[Ack] = Topic("ack", "hexa/{uid}/ack", codec=Codec(decode_ack, encode))
REPORT: Topic[Report] = Topic("report", "hexa/{uid}/report", codec=Codec(decode_report, encode))
EVENT: Topic[InputEvent] = Topic("event", "hexa/{uid}/event", codec=Codec(decode_event, encode))
AVAILABILITY: Topic[bool] = Topic(
    "availability",
    "hexa/{uid}/availability",
    retained=True,
    codec=Codec(decode_availability, encode_availability),
)
# --- intents (anyone allowed → the relay service) ----------------------------------------
RELAY_SET: Topic[Intent] = Topic(
    "relay_set",
    "hexa/{uid}/relay/{index}/set",
    codec=Codec(lambda p: decode_intent(p, all_relays=False), encode_intent),
)
RELAYS_SET: Topic[Intent] = Topic(
    "relays_set",
    "hexa/{uid}/relays/set",
    codec=Codec(lambda p: decode_intent(p, all_relays=True), encode_intent),
)
# --- hub → everyone -------------------------------------------------------------------
RELAY_STATE: Topic[bool] = Topic(
    "relay_state",
    "hexa/{uid}/relay/{index}/state",
    retained=True,
    codec=Codec(decode_onoff, encode_onoff),
)
STATE: Topic[DeviceState] = Topic(
    "state", "hexa/{uid}/state", retained=True, codec=Codec(decode_state, encode)
)
RESULT: Topic[Result] = Topic("result", "hexa/{uid}/result", codec=Codec(decode_result, encode))
INPUT_EVENT: Topic[Any] = Topic("input_event", "hexa/{uid}/input/{index}/event")
HUB_STATUS: Topic[bool] = Topic(
    "hub_status",
    "hexa/hub/status",
    retained=True,
    codec=Codec(decode_availability, encode_availability),
)
# --- Home Assistant -------------------------------------------------------------------
HA_SWITCH_CONFIG: Topic[Any] = Topic(
    "ha_switch_config", "homeassistant/switch/{object_id}/config", True
)
HA_TRIGGER_CONFIG: Topic[Any] = Topic(
    "ha_trigger_config", "homeassistant/device_automation/{object_id}/config", True
)
#: the discovery config topics, by component
HA_CONFIGS: tuple[Topic[Any], ...] = (HA_SWITCH_CONFIG, HA_TRIGGER_CONFIG)
#: Home Assistant's default discovery prefix, the first level of the topics above
#: (``HEXA_HA_DISCOVERY_PREFIX`` may name another: :func:`ha_topic`)
HA_PREFIX = "homeassistant"
HA_STATUS: Topic[bool] = Topic(
    "ha_status", "homeassistant/status", codec=Codec(decode_availability, encode_availability)
)


def ha_topic(topic: str, prefix: str) -> str:
    """A Home Assistant topic or filter (formatted from the topics above) under the
    discovery ``prefix`` instead of ``homeassistant``."""
    if prefix == HA_PREFIX or not topic.startswith(HA_PREFIX + "/"):
        return topic
    return prefix + topic[len(HA_PREFIX) :]


def ha_config_object(topic: str) -> str | None:
    """The object id of a discovery config topic (a switch or a device trigger) under
    any discovery prefix, or None."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[3] != "config" or parts[0] == ROOT:
        return None
    for config in HA_CONFIGS:
        params = config.parse("/".join([HA_PREFIX, *parts[1:]]))
        if params is not None:
            return params["object_id"]
    return None


DEVICE_TOPICS: tuple[Topic[Any], ...] = (CMD, ACK, REPORT, EVENT, AVAILABILITY)
INTENT_TOPICS: tuple[Topic[Intent], ...] = (RELAY_SET, RELAYS_SET)
#: what a device may publish about itself
DEVICE_PUBLISH: tuple[Topic[Any], ...] = (ACK, REPORT, EVENT, AVAILABILITY)
#: every per-device topic, used to find the device a topic is about
PER_DEVICE: tuple[Topic[Any], ...] = (
    CMD,
    ACK,
    REPORT,
    EVENT,
    AVAILABILITY,
    RELAY_SET,
    RELAYS_SET,
    RELAY_STATE,
    STATE,
    RESULT,
    INPUT_EVENT,
)


def intent_value(state: bool | str) -> IntentValue:
    """``True``/``False``/``"toggle"`` (any case) as an intent's ``ON``/``OFF``/``TOGGLE``."""
    if isinstance(state, bool):
        return "ON" if state else "OFF"
    upper = state.upper()
    if upper == "ON":
        return "ON"
    if upper == "OFF":
        return "OFF"
    if upper == "TOGGLE":
        return "TOGGLE"
    raise ValueError("state must be true, false or 'toggle'")


#: hub-internal: an automation fired (for the WebSocket clients of its organization).
#: Only hub sessions may read it (the broker's ACL denies it to devices and integrations).
AUTOMATION_FIRED: Topic[AutomationFired] = Topic(
    "automation_fired",
    "hexa/hub/automation_fired",
    codec=Codec(lambda p: decode_automation_fired(p), encode),
)


class AutomationFired(_Ours):
    automation_id: str
    org_id: str
    device_id: str | None = None
    at: str


def decode_automation_fired(payload: bytes) -> AutomationFired:
    return _model(AutomationFired, payload)
