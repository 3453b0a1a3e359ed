"""Typed in-process events: what happened in this hub process, and who hears of it.

A service publishes an event; any other part of the process (the broker, the API's
gateways, the automation engine, bridges) subscribes to the event types it cares about
and gets back the callable that unsubscribes it, as with Home Assistant's dispatcher.
Subscribing to a base class (``DeviceEvent``) hears every subclass. Handlers of the
event's own class run first, then those of its bases, each in the order they subscribed;
the publisher awaits them, so an operation is complete —
sessions closed, caches forgotten, rules disabled — when the call that caused it returns.
A handler that fails is logged; the others still run.

Events are facts about this process only; what other processes must hear goes on the bus.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # events carry them; the broker imports this module and not those
    from hexa.hub.state import DeviceInfo
    from hexa.models import Device

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every event."""


# --- the device registry -----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DeviceEvent(Event):
    """A device's record changed (``device`` is the row after the change)."""

    device: Device


@dataclass(frozen=True, slots=True)
class DeviceClaimed(DeviceEvent):
    """An organization claimed the device."""


@dataclass(frozen=True, slots=True)
class DeviceUpdated(DeviceEvent):
    """The device's name, placement or relay names changed (``changes`` as given)."""

    changes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DeviceReleased(DeviceEvent):
    """The device left its organization (its token died with it)."""


@dataclass(frozen=True, slots=True)
class DeviceDeleted(DeviceEvent):
    """The device was deleted (soft)."""


@dataclass(frozen=True, slots=True)
class DeviceLeaving(Event):
    """The device is about to leave its organization (a release or a delete): published
    before the change, while ``device`` (the row as it is) still belongs to its
    organization, so that what only that organization may receive (Home Assistant's
    removing discovery configs) still reaches it. Not a :class:`DeviceEvent`: nothing has
    changed yet."""

    device: Device


@dataclass(frozen=True, slots=True)
class DeviceConfigChanged(Event):
    """The device's IO configuration or power-restore mode changed: ``device`` is the row
    after the change, with its new ``config_version``."""

    device: Device


@dataclass(frozen=True, slots=True)
class DeviceCredentialsRevoked(Event):
    """A device's token stopped working (release, delete, rotation): end its sessions."""

    uid: str


@dataclass(frozen=True, slots=True)
class IntegrationRevoked(Event):
    """An integration token was deleted: end its sessions."""

    token_id: str


# --- device traffic ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PresenceEvent(Event):
    """A claimed or unclaimed device came or went."""

    device: DeviceInfo


@dataclass(frozen=True, slots=True)
class DeviceOnline(PresenceEvent):
    """The device is connected."""


@dataclass(frozen=True, slots=True)
class DeviceOffline(PresenceEvent):
    """The device is gone (its will, a disconnect, or its broker session ended)."""


@dataclass(frozen=True, slots=True)
class InputEvent(Event):
    """An input of the device was pressed, released, held or double-pressed."""

    device: DeviceInfo
    input_index: int
    event: str
    duration_ms: int | None = None


@dataclass(frozen=True, slots=True)
class ConfigReported(Event):
    """A state report of the device named the configuration version it runs."""

    device: DeviceInfo
    config_version: int


E = TypeVar("E", bound=Event)
Handler = Callable[[Any], Awaitable[None]]


@dataclass
class Events:
    """The event hub of one hub process."""

    _handlers: dict[type[Event], list[Handler]] = field(default_factory=dict)

    def subscribe(
        self, kind: type[E], handler: Callable[[E], Awaitable[None]]
    ) -> Callable[[], None]:
        """Call ``handler`` with every event of ``kind`` (or a subclass); returns the
        callable that unsubscribes it."""
        handlers = self._handlers.setdefault(kind, [])
        handlers.append(handler)

        def unsubscribe() -> None:
            if handler in handlers:
                handlers.remove(handler)

        return unsubscribe

    async def publish(self, event: Event) -> None:
        """Hand ``event`` to its subscribers, in order; a failing one is logged."""
        for kind in type(event).__mro__:
            for handler in list(self._handlers.get(kind, ())):
                try:
                    await handler(event)
                except Exception:
                    log.exception("%s handler %r failed", type(event).__name__, handler)
