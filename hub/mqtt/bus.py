"""The bus: an MQTT connection with reconnect, presence and dispatch.

Handlers subscribe to topic filters; every message is dispatched to every matching
handler in arrival order. Handlers must return quickly (they hand work to queues), so
one slow consumer never stalls the connection. Subscriptions are replayed on every
reconnect. A presence topic (for the hub ``hexa/hub/status``) is ``online`` while
connected and ``offline`` as the connection's will. The hub has one Bus; the device
simulator gives each simulated device its own. The wire protocol is
:mod:`hexa.hub.mqtt.client` (why not paho/aiomqtt: see there).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
from anyio.abc import TaskStatus

from hexa.hub import metrics, topics
from hexa.hub.errors import BusUnavailable
from hexa.hub.mqtt import client as mqtt
from hexa.hub.mqtt.busapi import Handler, Message, topic_matches
from hexa.hub.topics import Decoded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None  # PEM file of the CA(s) to trust; None: the system's

    @classmethod
    def from_url(cls, url: str, *, ca_file: str | None = None) -> BrokerAddress:
        parts = urlsplit(url)
        tls = parts.scheme == "mqtts"
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or (8883 if tls else 1883),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=tls,
            ca_file=ca_file,
        )


class Bus:
    """One supervised MQTT client connection shared by every hub service."""

    def __init__(
        self,
        address: BrokerAddress,
        *,
        client_id: str,
        presence_topic: str | None = None,
        announce: bool = True,
        keepalive: int = 30,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.address = address
        self.client_id = client_id
        self.presence_topic = presence_topic if presence_topic else topics.HUB_STATUS.format()
        #: whether ``online``/``offline`` (and the will) go to the presence topic; a load
        #: generator standing in for an integration must not look like Home Assistant
        #: coming online, which makes the hub republish every device's discovery
        self.announce = announce
        self.keepalive = keepalive
        self.max_backoff_s = max_backoff_s
        self._handlers: list[tuple[str, Handler]] = []
        self._routes: dict[str, list[tuple[str, Handler]]] = {}
        self._conn: mqtt.MqttConnection | None = None
        self._connected = asyncio.Event()
        self._generation = 0
        self._new_connection = asyncio.Condition()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def subscribe(self, flt: str, handler: Handler) -> None:
        """Register a handler; it takes effect now if connected, and on every reconnect."""
        known = any(f == flt for f, _ in self._handlers)
        self._handlers.append((flt, handler))
        self._routes.clear()
        conn = self._conn
        if conn is not None and self.connected and not known:
            try:
                self._check_granted([flt], await conn.subscribe([flt]))
            except mqtt.MqttError:
                log.warning("subscribe %s failed; it is replayed on reconnect", flt)

    async def unsubscribe(self, flt: str, handler: Handler) -> None:
        """Remove a handler; the broker subscription ends with the filter's last handler."""
        self._handlers = [(f, h) for f, h in self._handlers if (f, h) != (flt, handler)]
        self._routes.clear()
        conn = self._conn
        if conn is not None and self.connected and all(f != flt for f, _ in self._handlers):
            try:
                await conn.unsubscribe([flt])
            except mqtt.MqttError:
                log.warning("unsubscribe %s failed", flt)

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
        """``decoded`` is not used: over a broker every subscriber, the hub's own too,
        gets the payload. Every publish is ``paced``: QoS 1 waits for the broker."""
        conn = self._conn
        if conn is None or not self.connected:
            raise BusUnavailable("the message bus is not connected")
        if isinstance(payload, str):
            payload = payload.encode()
        try:
            await conn.publish(topic, payload, qos=qos, retain=retain)
        except mqtt.MqttError as exc:
            raise BusUnavailable(f"publish failed: {exc}") from exc

    async def _connect(self) -> mqtt.MqttConnection:
        a = self.address
        return await mqtt.connect(
            a.host,
            a.port,
            client_id=self.client_id,
            username=a.username,
            password=a.password,
            keepalive=self.keepalive,
            will=(
                mqtt.Will(self.presence_topic, b"offline", qos=1, retain=True)
                if self.announce
                else None
            ),
            ssl=ssl.create_default_context(cafile=a.ca_file) if a.tls else None,
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect, and stay connected until cancelled; ready after the first connect."""
        backoff = 0.1
        started = False
        while True:
            try:
                conn = await self._connect()
            except mqtt.MqttError as exc:
                log.warning("bus cannot connect to %s:%s: %s", *self._where(), exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            try:
                self._conn = conn
                filters = list(dict.fromkeys(f for f, _ in self._handlers))
                if filters:
                    self._check_granted(filters, await conn.subscribe(filters))
                if self.announce:
                    await conn.publish(self.presence_topic, b"online", qos=1, retain=True)
                self._connected.set()
                # handlers added while the first SUBSCRIBE was on its way were neither in
                # it nor subscribed by subscribe() (not connected yet): subscribe them now
                late = [f for f in dict.fromkeys(f for f, _ in self._handlers) if f not in filters]
                if late:
                    self._check_granted(late, await conn.subscribe(late))
                async with self._new_connection:
                    self._generation += 1
                    self._new_connection.notify_all()
                backoff = 0.1
                log.debug("bus %s connected to %s:%s", self.client_id, *self._where())
                if not started:
                    started = True
                    task_status.started()
                while True:
                    for message in await conn.receive():
                        await self._dispatch(message)
            except mqtt.MqttError as exc:
                self._connected.clear()
                self._conn = None
                metrics.BUS_RECONNECTS.inc()
                log.warning("bus connection lost: %s; reconnecting in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
            finally:
                self._connected.clear()
                self._conn = None
                if not conn.closed:
                    with anyio.CancelScope(shield=True):
                        await conn.disconnect()

    async def connected_since(self, generation: int) -> int:
        """Wait for a connection newer than ``generation``; returns its number."""
        async with self._new_connection:
            await self._new_connection.wait_for(
                lambda: self._generation > generation and self.connected
            )
            return self._generation

    @staticmethod
    def _check_granted(filters: list[str], granted: list[int]) -> None:
        for flt, code in zip(filters, granted, strict=False):
            if code == 0x80:
                log.error("the broker refused the subscription to %s (check its ACL)", flt)

    def _where(self) -> tuple[str, int]:
        return self.address.host, self.address.port

    async def close(self) -> None:
        """Publish ``offline`` on the presence topic (best effort); run() then ends on cancel."""
        conn = self._conn
        if conn is not None and self.connected and self.announce:
            try:
                await asyncio.wait_for(
                    conn.publish(self.presence_topic, b"offline", qos=1, retain=True), 2
                )
            except (mqtt.MqttError, TimeoutError):
                log.warning("could not publish offline on %s", self.presence_topic)

    def abort(self) -> None:
        """Drop the TCP connection without DISCONNECT (the will fires); run() reconnects."""
        conn = self._conn
        if conn is not None:
            conn.abort()

    async def _dispatch(self, msg: Message) -> None:
        topic = msg.topic
        routes = self._routes.get(topic)
        if routes is None:
            routes = [(f, h) for f, h in self._handlers if topic_matches(f, topic)]
            if len(self._routes) > 50_000:
                self._routes.clear()
            self._routes[topic] = routes
        for flt, handler in routes:
            try:
                await handler(msg)
            except Exception:
                log.exception("bus handler for %s failed on %s", flt, topic)
