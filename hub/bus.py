"""The bus: an MQTT connection (aiomqtt) with reconnect, presence and dispatch.

Handlers subscribe to topic filters; every message is dispatched to every matching
handler in arrival order. Handlers must return quickly (they hand work to queues), so
one slow consumer never stalls the connection. Subscriptions are replayed on every
reconnect. A presence topic (for the hub ``hexa/hub/status``) is ``online`` while
connected and ``offline`` as the connection's will. The hub has one Bus; the device
simulator gives each simulated device its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt
import anyio
from anyio.abc import TaskStatus

from hexa.hub import metrics, topics
from hexa.hub.busapi import Handler, Message, topic_matches
from hexa.hub.errors import BusUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def from_url(cls, url: str) -> BrokerAddress:
        parts = urlsplit(url)
        tls = parts.scheme == "mqtts"
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or (8883 if tls else 1883),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=tls,
        )


def _nodelay(sock: Any) -> None:
    # Neither paho nor aiomqtt sets TCP_NODELAY: without it every request/reply over
    # MQTT waits 40 ms for the peer's delayed ACK (Nagle).
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


class Bus:
    """One supervised MQTT client connection shared by every hub service."""

    def __init__(
        self,
        address: BrokerAddress,
        *,
        client_id: str,
        presence_topic: str | None = None,
        keepalive: int = 30,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.address = address
        self.client_id = client_id
        self.presence_topic = presence_topic if presence_topic else topics.HUB_STATUS.format()
        self.keepalive = keepalive
        self.max_backoff_s = max_backoff_s
        self._handlers: list[tuple[str, Handler]] = []
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def subscribe(self, flt: str, handler: Handler) -> None:
        """Register a handler; it takes effect now if connected, and on every reconnect."""
        known = any(f == flt for f, _ in self._handlers)
        self._handlers.append((flt, handler))
        client = self._client
        if client is not None and self.connected and not known:
            try:
                await client.subscribe(flt, qos=1)
            except aiomqtt.MqttError:
                log.warning("subscribe %s failed; it is replayed on reconnect", flt)

    async def unsubscribe(self, flt: str, handler: Handler) -> None:
        """Remove a handler; the broker subscription ends with the filter's last handler."""
        self._handlers = [(f, h) for f, h in self._handlers if (f, h) != (flt, handler)]
        client = self._client
        if client is not None and self.connected and all(f != flt for f, _ in self._handlers):
            try:
                await client.unsubscribe(flt)
            except aiomqtt.MqttError:
                log.warning("unsubscribe %s failed", flt)

    async def publish(
        self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False
    ) -> None:
        client = self._client
        if client is None or not self.connected:
            raise BusUnavailable("the message bus is not connected")
        try:
            await client.publish(topic, payload, qos=qos, retain=retain, timeout=10)
        except aiomqtt.MqttError as exc:
            raise BusUnavailable(f"publish failed: {exc}") from exc

    def _make_client(self) -> aiomqtt.Client:
        a = self.address
        tls = ssl.create_default_context() if a.tls else None
        client = aiomqtt.Client(
            a.host,
            a.port,
            username=a.username,
            password=a.password,
            identifier=self.client_id,
            keepalive=self.keepalive,
            clean_session=True,
            tls_context=tls,
            will=aiomqtt.Will(self.presence_topic, b"offline", qos=1, retain=True),
            timeout=10,
        )
        client.pending_calls_threshold = 10_000
        paho = client._client
        original = paho.on_socket_open

        def on_socket_open(c: Any, userdata: Any, sock: Any) -> None:
            _nodelay(sock)
            if original is not None:
                original(c, userdata, sock)

        paho.on_socket_open = on_socket_open
        return client

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect, and stay connected until cancelled; ready after the first connect."""
        backoff = 0.1
        started = False
        while True:
            client = self._make_client()
            try:
                async with client:
                    self._client = client
                    for flt in dict.fromkeys(f for f, _ in self._handlers):
                        await client.subscribe(flt, qos=1)
                    await client.publish(self.presence_topic, b"online", qos=1, retain=True)
                    self._connected.set()
                    backoff = 0.1
                    log.debug(
                        "bus %s connected to %s:%s",
                        self.client_id,
                        self.address.host,
                        self.address.port,
                    )
                    if not started:
                        started = True
                        task_status.started()
                    async for message in client.messages:
                        await self._dispatch(message)
            except aiomqtt.MqttError as exc:
                self._connected.clear()
                self._client = None
                if not started:
                    log.warning("bus cannot connect yet: %s", exc)
                else:
                    metrics.BUS_RECONNECTS.inc()
                    log.warning("bus connection lost: %s; reconnecting in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
            finally:
                self._connected.clear()
                self._client = None

    async def close(self) -> None:
        """Publish ``offline`` on the presence topic (best effort); run() then ends on cancel."""
        client = self._client
        if client is not None and self.connected:
            try:
                await client.publish(self.presence_topic, b"offline", qos=1, retain=True, timeout=2)
            except aiomqtt.MqttError:
                log.warning("could not publish offline on %s", self.presence_topic)

    def abort(self) -> None:
        """Drop the TCP connection without DISCONNECT (the will fires); run() reconnects."""
        client = self._client
        if client is not None:
            sock = client._client.socket()
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    async def _dispatch(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = message.payload
        if not isinstance(payload, bytes):
            payload = b"" if payload is None else str(payload).encode()
        msg = Message(topic, payload, bool(message.retain), int(message.qos))
        for flt, handler in self._handlers:
            if topic_matches(flt, topic):
                try:
                    await handler(msg)
                except Exception:
                    log.exception("bus handler for %s failed on %s", flt, topic)
