"""The hub's bus attached in-process to the embedded broker.

The hub is a broker session like any other (same routing, same retained messages, same
ACL on delivery to others), but its messages are never encoded into MQTT packets nor
sent through a socket: publishes are routed by the broker's engine in the publishing
task, and deliveries to the hub are put on its queue by a plain function (no task, no
copy of the payload).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus

from hexa.broker import metrics
from hexa.broker.acl import Identity, Kind
from hexa.broker.engine import Client
from hexa.broker.waiters import Waiters
from hexa.hub.errors import BusUnavailable
from hexa.hub.mqtt.busapi import Handler, Message, topic_matches
from hexa.hub.topics import Decoded

if TYPE_CHECKING:
    from hexa.broker.server import HexaBroker

log = logging.getLogger(__name__)

#: topics whose handlers are remembered (a few per device)
MAX_ROUTES = 100_000
#: messages waiting for the hub beyond which publishing clients wait, and until which
QUEUE_HIGH, QUEUE_LOW = 4096, 1024
#: messages handled before other tasks get a turn
BATCH = 64


class LocalBus:
    """Implements the hub's bus interface (``hexa.hub.mqtt.busapi.BusLike``) in-process."""

    def __init__(self, broker: HexaBroker, *, client_id: str, presence_topic: str) -> None:
        self.broker = broker
        self.client_id = client_id
        self.presence_topic = presence_topic
        self._handlers: list[tuple[str, Handler]] = []
        #: topic → the handlers whose filter matches it (cleared when handlers change)
        self._routes: dict[str, list[tuple[str, Handler]]] = {}
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._session: Client | None = None
        self._attached = asyncio.Event()
        self._waiters = Waiters()
        self._received_hub = metrics.RECEIVED_BY_KIND["hub"]

    @property
    def connected(self) -> bool:
        return self._session is not None

    async def subscribe(self, flt: str, handler: Handler) -> None:
        known = any(f == flt for f, _ in self._handlers)
        self._handlers.append((flt, handler))
        self._routes.clear()
        if self._session is not None and not known:
            await self.broker.engine.subscribe(self._session, flt, 1)
            await self.broker.engine.replay_retained(self._session, flt, 1)

    async def unsubscribe(self, flt: str, handler: Handler) -> None:
        self._handlers = [(f, h) for f, h in self._handlers if (f, h) != (flt, handler)]
        self._routes.clear()
        if self._session is not None and all(f != flt for f, _ in self._handlers):
            self.broker.engine.unsubscribe(self._session, flt)

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
        """Route a message of the hub's: outside subscribers get ``payload``, the hub's own
        handlers also ``decoded`` (what it was built from) when given. ``paced``: then wait
        for the subscribers it left congested, as a client publisher does."""
        if self._session is None:
            raise BusUnavailable("the embedded broker is not running")
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        self._received_hub.inc()
        congested = await self.broker.engine.route(self._session, topic, data, qos, retain, decoded)
        if paced:
            for drains in congested:
                await drains.drained()

    def deliver(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        sender: str,
        decoded: Decoded[Any] | None = None,
    ) -> bool:
        """A message routed to the hub (the broker calls this); True when the hub is
        behind, so that the publishing client waits (:meth:`drained`)."""
        queue = self._queue
        if retain:  # a retained copy (replayed, or stored): who sent it is not known
            queue.put_nowait(Message(topic, data, retain, qos, None, decoded))
        else:
            queue.put_nowait(Message(topic, data, retain, qos, sender, decoded))
        return queue.qsize() >= QUEUE_HIGH

    async def drained(self) -> None:
        """Return once the hub has caught up (its queue down to ``QUEUE_LOW``)."""
        if self._queue.qsize() <= QUEUE_LOW:
            return
        await self._waiters.wait()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        queue = self._queue
        session = self.broker.attach_local(self.client_id, Identity(Kind.HUB, self.client_id), self)
        self._session = session
        try:
            for flt in dict.fromkeys(f for f, _ in self._handlers):
                await self.broker.engine.subscribe(session, flt, 1)
                await self.broker.engine.replay_retained(session, flt, 1)
            await self.publish(self.presence_topic, b"online", retain=True)
            self._attached.set()
            task_status.started()
            handled = 0
            while True:
                await self._dispatch(await queue.get())
                handled += 1
                if self._waiters and queue.qsize() <= QUEUE_LOW:
                    self._waiters.wake()
                if handled % BATCH == 0:
                    await asyncio.sleep(0)  # a full queue never suspends get(): yield
        finally:
            self._session = None
            self._attached.clear()
            self._waiters.wake()
            self.broker.detach_local(session)

    async def connected_since(self, generation: int) -> int:
        """The in-process attachment connects once, when it starts, and never drops."""
        if generation >= 1:
            await anyio.sleep_forever()
        await self._attached.wait()
        return 1

    async def close(self) -> None:
        """Publish ``offline`` on the presence topic."""
        if self._session is not None:
            await self.publish(self.presence_topic, b"offline", retain=True)

    async def _dispatch(self, message: Message) -> None:
        routes = self._routes.get(message.topic)
        if routes is None:
            if len(self._routes) >= MAX_ROUTES:
                self._routes.clear()
            routes = self._routes[message.topic] = [
                (flt, handler)
                for flt, handler in self._handlers
                if topic_matches(flt, message.topic)
            ]
        for flt, handler in routes:
            try:
                await handler(message)
            except Exception:
                log.exception("bus handler for %s failed on %s", flt, message.topic)
