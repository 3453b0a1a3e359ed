"""Bridges to other ecosystems (Home Assistant, HomeKit, Alexa): extensions of the hub.

A bridge is a class made from the hub (``Bridge(hub)``) with ``async run(*, task_status)``:
it hears the hub's typed events (``hub.events``) and the bus, and changes relays only by
publishing intents (``hub.commands``), like every other source. ``hexa serve`` starts
the bridges whose settings enable them in the hub's task group, after the hub's own
services; :data:`BRIDGES` lists them, in start order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Protocol

import anyio
from anyio.abc import TaskStatus

if TYPE_CHECKING:
    from hexa.hub.config import Settings
    from hexa.hub.runtime import Hub, Service


class Bridge(Protocol):
    """What a bridge offers the composition root."""

    #: short name, used in logs and metrics
    name: ClassVar[str]

    def __init__(self, hub: Hub) -> None: ...

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        """Whether the settings turn this bridge on."""
        ...

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; call ``task_status.started()`` once ready."""
        ...


from hexa.bridges.home_assistant import HomeAssistant  # noqa: E402  (needs Bridge above)
from hexa.bridges.home_assistant_remote import RemoteHomeAssistant  # noqa: E402
from hexa.bridges.homekit import HomeKit  # noqa: E402  (after Bridge, which it satisfies)

#: every bridge of the hub, in start order
BRIDGES: tuple[type[Bridge], ...] = (HomeAssistant, RemoteHomeAssistant, HomeKit)


def enabled(hub: Hub, known: tuple[type[Bridge], ...] = BRIDGES) -> list[Service]:
    """The ``run`` of every bridge the hub's settings enable."""
    return [cls(hub).run for cls in known if cls.enabled(hub.settings)]
