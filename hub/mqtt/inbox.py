"""The bus edge: a handler bound to one topic receives its payload decoded.

A payload that does not decode is counted (``hexa_bad_payloads_total{kind}``), logged as
one line with the topic and its first bytes, and dropped here, once for every handler
of the hub; domain code never sees it. A message the hub itself published and its bus
delivers in process carries what it was built from (``Message.decoded``): the handler
gets those placeholders and that value, nothing is parsed or decoded again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from hexa.hub import metrics, topics
from hexa.hub.logs import printable
from hexa.hub.mqtt.busapi import Handler, Message

log = logging.getLogger(__name__)

P = TypeVar("P")
#: (the topic's placeholders, the decoded payload, the message as it came)
Typed = Callable[[dict[str, str], P, Message], Awaitable[None]]
#: what to do besides counting and logging when a payload does not decode
Malformed = Callable[[dict[str, str], topics.PayloadError, Message], Awaitable[None]]


def on(
    topic: topics.Topic[P],
    handle: Typed[P],
    *,
    kind: str | None = None,
    malformed: Malformed | None = None,
) -> Handler:
    """A bus handler for ``topic`` that hands ``handle`` the decoded payload."""
    label = kind or topic.name

    async def on_message(msg: Message) -> None:
        decoded = msg.decoded
        if decoded is not None and decoded.topic is topic:  # the hub's own, in process
            await handle(dict(decoded.params), decoded.value, msg)
            return
        params = topic.parse(msg.topic)
        if params is None:
            return
        try:
            payload = topic.decode(msg.payload)
        except topics.PayloadError as exc:
            metrics.BAD_PAYLOADS.labels(label).inc()
            log.info(
                "dropped a malformed %s on %s: %s (%s)",
                label,
                printable(msg.topic),
                printable(exc),
                printable(bytes(msg.payload[:64])),
            )
            if malformed is not None:
                await malformed(params, exc, msg)
            return
        await handle(params, payload, msg)

    return on_message
