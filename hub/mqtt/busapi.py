"""What every bus offers the hub: messages, handlers, filter matching, the interface.

Two buses implement it: :class:`hexa.hub.mqtt.bus.Bus` (an MQTT client, for any broker) and
the in-process attachment to the embedded broker (``hexa.broker.local.LocalBus``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from anyio.abc import TaskStatus

from hexa.hub.topics import Decoded


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    retain: bool = False
    qos: int = 1
    #: who published it, when the bus knows (the in-process bus to the embedded broker:
    #: ``hub:…``, ``device:<uid>``, ``integration:<token id>``); None over MQTT
    sender: str | None = None
    #: the message as the hub built it, when the hub published it and the bus delivers
    #: in process (the embedded broker's): its subscribers skip parsing and decoding
    decoded: Decoded[Any] | None = None


Handler = Callable[[Message], Awaitable[None]]


def topic_matches(flt: str, topic: str) -> bool:
    """MQTT filter matching (MQTT-4.7), including ``+`` and ``#``."""
    fparts, tparts = flt.split("/"), topic.split("/")
    for i, f in enumerate(fparts):
        if f == "#":
            return not (i == 0 and topic.startswith("$"))
        if i >= len(tparts):
            return False
        if f == "+":
            if i == 0 and tparts[0].startswith("$"):
                return False
            continue
        if f != tparts[i]:
            return False
    return len(fparts) == len(tparts)


class BusLike(Protocol):
    """Publish, subscribe with handlers, presence; ``run`` keeps it connected."""

    @property
    def connected(self) -> bool: ...

    async def subscribe(self, flt: str, handler: Handler) -> None: ...

    async def unsubscribe(self, flt: str, handler: Handler) -> None: ...

    async def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        decoded: Decoded[Any] | None = None,
        paced: bool = False,
    ) -> None:
        """Publish ``payload``; ``decoded``, if given, is what it encodes (its topic
        template, placeholders and value), handed as such to the hub's own subscribers
        where the bus delivers in process. Subscribers elsewhere get the payload.
        ``paced``: return only once no subscriber it reached is behind (a burst of many
        messages from a task of its own; never from a bus handler)."""
        ...

    async def run(self, *, task_status: TaskStatus[None] = ...) -> None: ...

    async def connected_since(self, generation: int) -> int:
        """Wait until the bus has connected more often than ``generation`` times (and is
        connected); returns how many times it has."""
        ...

    async def close(self) -> None: ...
