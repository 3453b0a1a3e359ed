"""The typed messages an integrator receives from the hub (contract §3, hub → everyone).

Each is a frozen dataclass named after what it says, carrying the device uid from its
topic. Lists in payloads become tuples, so messages are hashable and cannot be changed
by whoever else holds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal, TypeAlias

#: what an input reported (``hexa/<uid>/input/<n>/event``)
InputEventName: TypeAlias = Literal["press", "release", "hold", "double_press"]
#: how the relay service answered an intent (``hexa/<uid>/result``)
ResultStatus: TypeAlias = Literal["applied", "timeout", "offline", "rejected"]


@dataclass(frozen=True, slots=True)
class DeviceState:
    """A device's whole state (``hexa/<uid>/state``, retained): every relay and input,
    whether the hub sees it online, and when the hub last changed it."""

    uid: str
    relays: tuple[bool, ...]
    inputs: tuple[bool, ...]
    online: bool
    updated_at: datetime
    #: True when replayed by the broker on subscribe rather than published just now
    retained: bool = False


@dataclass(frozen=True, slots=True)
class RelayState:
    """One relay's state (``hexa/<uid>/relay/<n>/state``, retained): ``on`` is True for
    ``ON``. ``index`` is 0-based."""

    uid: str
    index: int
    on: bool
    retained: bool = False


@dataclass(frozen=True, slots=True)
class Availability:
    """Whether a device is connected (``hexa/<uid>/availability``, retained; the device's
    last will or the hub publishes ``offline``)."""

    uid: str
    online: bool
    retained: bool = False


@dataclass(frozen=True, slots=True)
class InputEvent:
    """An input was pressed, released, held or double-pressed
    (``hexa/<uid>/input/<n>/event``); ``duration_ms`` comes with holds."""

    uid: str
    index: int
    event: InputEventName
    duration_ms: int | None = None


@dataclass(frozen=True, slots=True)
class RelayResult:
    """The relay service's answer to an intent (``hexa/<uid>/result``): anybody's intent
    for the device, not only this client's; ``intent_id`` tells them apart.

    ``status`` is ``applied`` (the device acked; ``relays`` is its new state), ``timeout``
    (no ack within the hub's command timeout), ``offline`` (no command sent) or
    ``rejected`` (``error`` says why).
    """

    uid: str
    intent_id: str
    ok: bool
    status: ResultStatus
    relays: tuple[bool, ...] | None = None
    latency_ms: float | None = None
    command_id: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class HubStatus:
    """Whether the hub itself is up (``hexa/hub/status``, retained; its last will says
    ``offline``). While it is down, no intent is carried out."""

    online: bool
    retained: bool = False


#: anything :meth:`HexaClient.messages` yields
Message: TypeAlias = DeviceState | RelayState | Availability | InputEvent | RelayResult | HubStatus
