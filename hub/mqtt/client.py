"""A lean MQTT 3.1.1 client on asyncio transports, for the hub's bus.

The hub sends and receives about a dozen packets per relay intent. paho-mqtt (under
aiomqtt) spends a ``recv`` per packet header and body, a ``send`` per packet and an
event-loop writer registration per write burst; measured, that was half of the hub's CPU
per intent against Mosquitto. This client keeps the wire work small:

- incoming bytes are read in large chunks and every complete packet in them is parsed
  in one pass;
- outgoing packets are coalesced: everything written during one event-loop turn leaves
  in one ``transport.write``;
- asyncio transports set TCP_NODELAY on TCP sockets and work the same under uvloop.

Scope: what a bus client needs — CONNECT (clean session, will, credentials, keepalive),
PUBLISH QoS 0/1 in both directions, SUBSCRIBE/UNSUBSCRIBE, PINGREQ, DISCONNECT. Inbound
QoS 2 is acknowledged (PUBREC/PUBREL/PUBCOMP) so a broker that sends it is never stuck;
the hub subscribes with QoS 1, so brokers downgrade to that anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl as _ssl
import struct
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

from hexa.hub.mqtt.busapi import Message

# packet types (high nibble of the fixed header)
CONNECT: Final = 0x10
CONNACK: Final = 0x20
PUBLISH: Final = 0x30
PUBACK: Final = 0x40
PUBREC: Final = 0x50
PUBREL: Final = 0x60
PUBCOMP: Final = 0x70
SUBSCRIBE: Final = 0x80
SUBACK: Final = 0x90
UNSUBSCRIBE: Final = 0xA0
UNSUBACK: Final = 0xB0
PINGREQ: Final = 0xC0
PINGRESP: Final = 0xD0
DISCONNECT: Final = 0xE0

MAX_PACKET: Final = 256 * 1024 * 1024 - 1  # the largest remaining length MQTT can express

CONNACK_REASONS: Final = {
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}


class MqttError(Exception):
    """The connection failed or was lost; the message says why."""


class ConnectRefused(MqttError):
    """The broker answered CONNECT with a non-zero return code."""

    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(f"connection refused: {CONNACK_REASONS.get(code, f'code {code}')}")


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def _varint(n: int) -> bytes:
    if not 0 <= n <= MAX_PACKET:
        raise ValueError(f"MQTT packets carry at most {MAX_PACKET} bytes")
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    if len(raw) > 0xFFFF:
        raise ValueError("MQTT strings are at most 65535 bytes")
    return struct.pack("!H", len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _varint(len(body)) + body


def encode_connect(
    client_id: str,
    *,
    keepalive: int,
    username: str | None = None,
    password: str | None = None,
    will: Will | None = None,
    clean_session: bool = True,
) -> bytes:
    flags = 0x02 if clean_session else 0
    payload = _str(client_id)
    if will is not None:
        if will.qos not in (0, 1, 2):
            raise ValueError("will QoS must be 0, 1 or 2")
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        payload += _str(will.topic) + _str(will.payload)
    if username is not None:
        flags |= 0x80
        payload += _str(username)
        if password is not None:
            flags |= 0x40
            payload += _str(password)
    header = _str("MQTT") + bytes((4, flags)) + struct.pack("!H", keepalive)
    return _packet(CONNECT, header + payload)


def encode_publish(topic: str, payload: bytes, qos: int, retain: bool, packet_id: int) -> bytes:
    body = _str(topic)
    if qos:
        body += struct.pack("!H", packet_id)
    body += payload
    return _packet(PUBLISH | (qos << 1) | (1 if retain else 0), body)


class MqttConnection(asyncio.Protocol):
    """One connected MQTT session. Build it with :func:`connect`."""

    def __init__(self, keepalive: int) -> None:
        self.keepalive = keepalive
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._next_id = 0
        self._acks: dict[int, tuple[int, asyncio.Future[bytes]]] = {}  # id → (ack type, …)
        self._connack: asyncio.Future[int] = self._loop.create_future()
        self._inbox: deque[Message] = deque()
        self._inbox_waiter: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._error: MqttError | None = None
        self._last_in = self._last_out = self._loop.time()
        self._ping: asyncio.TimerHandle | None = None
        self._ping_sent = False
        self._qos2_in: set[int] = set()
        self._writable = asyncio.Event()
        self._writable.set()

    # --- asyncio protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._last_in = self._loop.time()
        buf = self._buf
        buf += data
        pos, end = 0, len(buf)
        try:
            while end - pos >= 2:
                length, multiplier, i, complete = 0, 1, pos + 1, False
                while i < end:
                    byte = buf[i]
                    i += 1
                    length += (byte & 0x7F) * multiplier
                    if byte < 0x80:
                        complete = True
                        break
                    multiplier *= 128
                    if multiplier > 128**3:
                        raise MqttError("malformed remaining length")
                if not complete or end - i < length:
                    break  # wait for the rest of the packet
                self._handle(buf[pos], bytes(buf[i : i + length]))
                pos = i + length
        except (MqttError, IndexError, struct.error) as exc:
            self._fail(exc if isinstance(exc, MqttError) else MqttError(f"malformed packet: {exc}"))
            return
        del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        reason = MqttError(f"connection lost: {exc}" if exc else "connection closed")
        self._fail(reason)

    def pause_writing(self) -> None:  # the socket buffer is full: publishers wait
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # --- packets in ----------------------------------------------------------------------
    def _handle(self, first: int, body: bytes) -> None:
        kind = first & 0xF0
        if kind == PUBLISH:
            qos = (first >> 1) & 0x03
            tlen = (body[0] << 8) | body[1]
            if qos == 3 or 2 + tlen + (2 if qos else 0) > len(body):
                raise MqttError("malformed PUBLISH (QoS 3 or topic beyond the packet)")
            try:
                topic = body[2 : 2 + tlen].decode()
            except UnicodeDecodeError as exc:
                raise MqttError("PUBLISH topic is not UTF-8") from exc
            pos = 2 + tlen
            if qos:
                packet_id = (body[pos] << 8) | body[pos + 1]
                pos += 2
                if qos == 1:
                    self._write(bytes((PUBACK, 2, body[pos - 2], body[pos - 1])))
                else:
                    self._write(bytes((PUBREC, 2, body[pos - 2], body[pos - 1])))
                    if packet_id in self._qos2_in:
                        return  # a resent QoS 2 message that was already delivered
                    self._qos2_in.add(packet_id)
            # Never pause reading for a full inbox: the consumer may be awaiting a PUBACK
            # that only reading can deliver. Back-pressure is the broker's queue limit.
            self._inbox.append(Message(topic, body[pos:], bool(first & 0x01), qos))
            waiter = self._inbox_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif kind in (PUBACK, SUBACK, UNSUBACK):
            packet_id = (body[0] << 8) | body[1]
            expected = self._acks.get(packet_id)
            if expected is None:
                return  # e.g. the PUBACK of a publish whose caller gave up: harmless
            if expected[0] != kind:
                raise MqttError(f"packet type 0x{kind:02x} answers packet id {packet_id}")
            del self._acks[packet_id]
            if not expected[1].done():
                expected[1].set_result(body[2:])
        elif kind == PUBREL:
            self._qos2_in.discard((body[0] << 8) | body[1])
            self._write(bytes((PUBCOMP, 2, body[0], body[1])))
        elif kind == CONNACK:
            if self._connack.done() or len(body) != 2:
                raise MqttError("unexpected or malformed CONNACK")
            self._connack.set_result(body[1])
        elif kind == PINGRESP:
            self._ping_sent = False
        else:
            raise MqttError(f"unexpected packet type 0x{kind:02x} from the broker")

    # --- packets out ---------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        if not out:
            return
        self._last_out = self._loop.time()
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(b"".join(out) if len(out) > 1 else out[0])

    def _packet_id(self) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._acks:
                return self._next_id
        raise MqttError("no free packet identifier: 65535 acknowledgements outstanding")

    def _check(self) -> None:
        if self._error is not None:
            raise MqttError(str(self._error)) from self._error

    def _expect(self, ack: int) -> tuple[int, asyncio.Future[bytes]]:
        packet_id = self._packet_id()
        fut: asyncio.Future[bytes] = self._loop.create_future()
        self._acks[packet_id] = (ack, fut)
        return packet_id, fut

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Send a message; with QoS 1 return once the broker acknowledged it. Waits
        while the socket's send buffer is full."""
        self._check()
        if not self._writable.is_set():
            await self._writable.wait()
            self._check()
        if qos == 0:
            self._write(encode_publish(topic, payload, 0, retain, 0))
            return
        if qos != 1:
            raise ValueError("the bus publishes with QoS 0 or 1")
        packet_id, fut = self._expect(PUBACK)
        self._write(encode_publish(topic, payload, 1, retain, packet_id))
        await fut

    async def subscribe(self, filters: list[str], qos: int = 1) -> list[int]:
        """Subscribe to filters in one packet; returns the granted QoS per filter
        (0x80: refused)."""
        if not filters or qos not in (0, 1, 2):
            raise ValueError("subscribe needs at least one filter and a QoS of 0, 1 or 2")
        self._check()
        packet_id, fut = self._expect(SUBACK)
        body = struct.pack("!H", packet_id) + b"".join(_str(f) + bytes((qos,)) for f in filters)
        self._write(_packet(SUBSCRIBE | 0x02, body))
        return list(await fut)

    async def unsubscribe(self, filters: list[str]) -> None:
        if not filters:
            raise ValueError("unsubscribe needs at least one filter")
        self._check()
        packet_id, fut = self._expect(UNSUBACK)
        body = struct.pack("!H", packet_id) + b"".join(_str(f) for f in filters)
        self._write(_packet(UNSUBSCRIBE | 0x02, body))
        await fut

    async def receive(self) -> list[Message]:
        """Every message received since the last call (waits for at least one). One
        consumer only: the bus's dispatcher."""
        if self._inbox_waiter is not None:
            raise RuntimeError("receive() is already being awaited")
        while not self._inbox:
            self._check()
            waiter = self._inbox_waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._inbox_waiter = None
        batch = list(self._inbox)
        self._inbox.clear()
        return batch

    async def disconnect(self) -> None:
        """Send DISCONNECT (the will is discarded) and close."""
        if self._error is None and self._transport is not None:
            self._write(bytes((DISCONNECT, 0)))
            self._flush()
            self._transport.close()
            try:
                await asyncio.wait_for(asyncio.shield(self._closed), 2)
            except MqttError:
                pass
            except TimeoutError:  # the broker does not read any more: drop the socket
                self._fail(MqttError("disconnect timed out"))

    def abort(self) -> None:
        """Drop the connection without DISCONNECT: the broker publishes the will."""
        if self._transport is not None:
            self._transport.abort()

    @property
    def closed(self) -> bool:
        return self._error is not None

    async def wait_closed(self) -> None:
        with contextlib.suppress(MqttError):
            await asyncio.shield(self._closed)

    # --- lifecycle -----------------------------------------------------------------------
    def _keepalive_tick(self) -> None:
        """PINGREQ when either direction has been quiet for most of the keepalive (the
        broker drops a client silent for 1.5 x keepalive); give up on a broker that has
        said nothing, not even PINGRESP, for 1.5 x keepalive."""
        if self._error is not None:
            return
        now, keepalive = self._loop.time(), self.keepalive
        if now - self._last_in > 1.5 * keepalive:
            self._fail(MqttError("broker silent for 1.5 x keepalive"))
            return
        quiet = now - min(self._last_out, self._last_in)
        if quiet >= 0.5 * keepalive and not self._ping_sent:
            self._ping_sent = True
            self._write(bytes((PINGREQ, 0)))
        self._ping = self._loop.call_later(keepalive / 4, self._keepalive_tick)

    def _start_keepalive(self) -> None:
        if self.keepalive > 0:
            # spread the ticks of many clients that connected together
            first = self.keepalive / 4 * random.uniform(0.5, 1.0)
            self._ping = self._loop.call_later(first, self._keepalive_tick)

    def _fail(self, exc: MqttError) -> None:
        if self._error is not None:
            return
        self._error = exc
        if self._ping is not None:
            self._ping.cancel()
        if self._transport is not None:
            self._transport.abort()
        self._buf.clear()
        self._writable.set()  # waiting publishers wake up and see the error
        for _, ack in self._acks.values():
            if not ack.done():
                ack.set_exception(exc)
        self._acks.clear()
        waiters: tuple[asyncio.Future[Any] | None, ...] = (self._connack, self._inbox_waiter)
        for waiter in waiters:
            if waiter is not None and not waiter.done():
                waiter.set_exception(exc)
                waiter.exception()  # retrieved: nobody may be waiting any more
        if not self._closed.done():
            self._closed.set_exception(exc)
            self._closed.exception()


async def connect(
    host: str,
    port: int,
    *,
    client_id: str,
    username: str | None = None,
    password: str | None = None,
    keepalive: int = 30,
    will: Will | None = None,
    ssl: _ssl.SSLContext | None = None,
    handshake_s: float = 10.0,
) -> MqttConnection:
    """Open a TCP (or TLS) connection and complete the MQTT handshake."""
    loop = asyncio.get_running_loop()
    conn: MqttConnection | None = None
    try:
        async with asyncio.timeout(handshake_s):
            _, conn = await loop.create_connection(
                lambda: MqttConnection(keepalive),
                host,
                port,
                ssl=ssl,
                server_hostname=host if ssl is not None else None,
            )
            conn._write(
                encode_connect(
                    client_id,
                    keepalive=keepalive,
                    username=username,
                    password=password,
                    will=will,
                )
            )
            code = await conn._connack
    except BaseException as exc:
        if conn is not None:
            conn.abort()
        if isinstance(exc, TimeoutError):
            raise MqttError(f"no CONNACK from {host}:{port} within {handshake_s:g}s") from exc
        if isinstance(exc, OSError):
            raise MqttError(f"cannot connect to {host}:{port}: {exc}") from exc
        raise
    if code != 0:
        conn.abort()
        raise ConnectRefused(code)
    conn._start_keepalive()
    return conn
