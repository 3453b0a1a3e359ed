"""The hub's bus attached in-process to the embedded broker.

The hub is a broker session like any other (same routing, same retained messages, same
ACL on delivery to others), but its messages are never encoded into MQTT packets nor
sent through a socket: publishes go straight into the broker's broadcast queue, and
deliveries to the hub arrive through a handler object instead of a connection.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import anyio
from amqtt.session import Session
from anyio.abc import TaskStatus

from hexa.broker.acl import Identity, Kind
from hexa.broker.plugins import IDENTITY
from hexa.hub.errors import BusUnavailable
from hexa.hub.mqtt.busapi import Handler, Message, topic_matches

log = logging.getLogger(__name__)


class _Deliveries:
    """Stands where amqtt expects a connection's protocol handler."""

    def __init__(self, queue: asyncio.Queue[Message]) -> None:
        self.queue = queue
        self.writer = None

    async def mqtt_publish(
        self, topic: str, data: bytes | bytearray, qos: int | None, retain: bool
    ) -> None:
        await self.queue.put(Message(topic, bytes(data), bool(retain), int(qos or 0)))

    async def deliver(
        self, topic: str, data: bytes | bytearray, qos: int | None, sender: str | None
    ) -> None:
        """A routed publish, with the identity of the session that published it."""
        await self.queue.put(Message(topic, bytes(data), False, int(qos or 0), sender))

    async def stop(self) -> None:
        return None

    async def handle_connection_closed(self) -> None:
        return None


class LocalBus:
    """Implements the hub's bus interface (``hexa.hub.mqtt.busapi.BusLike``) in-process."""

    def __init__(self, broker: Any, *, client_id: str, presence_topic: str) -> None:
        self.broker = broker
        self.client_id = client_id
        self.presence_topic = presence_topic
        self._handlers: list[tuple[str, Handler]] = []
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._session: Any = None
        self._attached = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self._session is not None

    async def subscribe(self, flt: str, handler: Handler) -> None:
        known = any(f == flt for f, _ in self._handlers)
        self._handlers.append((flt, handler))
        if self._session is not None and not known:
            await self.broker.add_subscription((flt, 1), self._session)
            await self.broker._publish_retained_messages_for_subscription((flt, 1), self._session)

    async def unsubscribe(self, flt: str, handler: Handler) -> None:
        self._handlers = [(f, h) for f, h in self._handlers if (f, h) != (flt, handler)]
        if self._session is not None and all(f != flt for f, _ in self._handlers):
            self.broker._del_subscription(flt, self._session)

    async def publish(
        self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False
    ) -> None:
        if self._session is None:
            raise BusUnavailable("the embedded broker is not running")
        data = payload.encode() if isinstance(payload, str) else payload
        if retain:
            await self.broker.retain_message(self._session, topic, data, qos)
        await self.broker._broadcast_message(self._session, topic, data)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        session = Session()
        session.client_id = self.client_id
        session.username = self.client_id
        session.clean_session = True
        session.attributes[IDENTITY] = Identity(Kind.HUB, self.client_id)
        session.transitions.connect()
        self.broker._sessions[self.client_id] = (session, _Deliveries(self._queue))
        self._session = session
        try:
            for flt in dict.fromkeys(f for f, _ in self._handlers):
                await self.broker.add_subscription((flt, 1), session)
                await self.broker._publish_retained_messages_for_subscription((flt, 1), session)
            await self.publish(self.presence_topic, b"online", retain=True)
            self._attached.set()
            task_status.started()
            while True:
                await self._dispatch(await self._queue.get())
        finally:
            self._session = None
            self._attached.clear()
            entry = self.broker._sessions.get(self.client_id)
            if entry is not None and entry[0] is session:
                with anyio.CancelScope(shield=True):
                    await self.broker._cleanup_session(self.client_id)

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
        for flt, handler in self._handlers:
            if topic_matches(flt, message.topic):
                try:
                    await handler(message)
                except Exception:
                    log.exception("bus handler for %s failed on %s", flt, message.topic)
