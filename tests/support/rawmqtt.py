"""A raw MQTT 3.1.1 client: bytes built here, independent of every library, for tests that
do what no library would (malformed packets, never acknowledging, racing CONNECTs)."""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from support.hubs import RunningHub


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def build(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + varint(len(body)) + body


def connect_packet(
    client_id: str,
    username: str | None = None,
    password: str | None = None,
    *,
    keepalive: int = 30,
    clean: bool = True,
    will: tuple[str, bytes, bool] | None = None,
) -> bytes:
    flags = 0x02 if clean else 0
    payload = mqtt_str(client_id)
    if will is not None:
        flags |= 0x04 | 0x08 | (0x20 if will[2] else 0)  # will, QoS 1, retain
        payload += mqtt_str(will[0]) + mqtt_str(will[1])
    if username is not None:
        flags |= 0x80
        payload += mqtt_str(username)
    if password is not None:
        flags |= 0x40
        payload += mqtt_str(password)
    return build(
        0x10, mqtt_str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + payload
    )


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes
    qos: int
    packet_id: int | None
    dup: bool
    retain: bool


class Raw:
    """One MQTT connection over a plain socket."""

    def __init__(self, hub: RunningHub, *, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", hub.mqtt_port))
        self.buf = b""
        self.packet_id = 0

    def connect(self, client_id: str, username: str | None, password: str | None, **kw: Any) -> int:
        """Send CONNECT; the CONNACK return code (-1 when the broker just closed)."""
        self.sock.sendall(connect_packet(client_id, username, password, **kw))
        packet = self.read_packet()
        if packet is None:
            return -1
        kind, body = packet
        assert kind >> 4 == 2, kind
        return body[1]

    def read_packet(self, timeout: float = 10) -> tuple[int, bytes] | None:
        self.sock.settimeout(timeout)
        while True:
            if len(self.buf) >= 2:
                length, mult, i = 0, 1, 1
                while i < len(self.buf):
                    length += (self.buf[i] & 0x7F) * mult
                    mult *= 128
                    i += 1
                    if not self.buf[i - 1] & 0x80:
                        break
                else:
                    i = -1
                if i > 0 and len(self.buf) >= i + length:
                    kind, body = self.buf[0], self.buf[i : i + length]
                    self.buf = self.buf[i + length :]
                    return kind, body
            try:
                chunk = self.sock.recv(65536)
            except (TimeoutError, OSError):
                return None
            if not chunk:
                return None
            self.buf += chunk

    def subscribe(self, flt: str, qos: int = 1) -> int:
        self.packet_id += 1
        self.sock.sendall(
            build(0x82, struct.pack("!H", self.packet_id) + mqtt_str(flt) + bytes([qos]))
        )
        while True:
            packet = self.read_packet()
            assert packet is not None, "no SUBACK"
            if packet[0] >> 4 == 9:
                return packet[1][2]

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        header = mqtt_str(topic)
        if qos:
            self.packet_id += 1
            header += struct.pack("!H", self.packet_id)
        self.sock.sendall(build(0x30 | (qos << 1), header + payload))

    def read_publish(self, timeout: float = 5) -> Publish | None:
        """The next PUBLISH received (other packets are skipped), or None."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            packet = self.read_packet(left)
            if packet is None:
                return None
            kind, body = packet
            if kind >> 4 != 3:
                continue
            qos = (kind >> 1) & 3
            n = struct.unpack("!H", body[:2])[0]
            topic, rest = body[2 : 2 + n].decode(), body[2 + n :]
            pid = None
            if qos:
                pid, rest = struct.unpack("!H", rest[:2])[0], rest[2:]
            return Publish(topic, rest, qos, pid, bool(kind & 8), bool(kind & 1))
        return None

    def puback(self, pid: int) -> None:
        self.sock.sendall(b"\x40\x02" + struct.pack("!H", pid))

    def alive(self) -> bool:
        """Whether the connection still answers a PINGREQ."""
        try:
            self.sock.sendall(b"\xc0\x00")
        except OSError:
            return False
        while (packet := self.read_packet(5)) is not None:
            if packet[0] >> 4 == 13:
                return True
        return False

    def disconnect(self) -> None:
        self.sock.sendall(b"\xe0\x00")
        self.close()

    def closed_by_peer(self, timeout: float) -> bool:
        """Whether the broker closes the connection within ``timeout`` (reads are drained)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                continue
            except OSError:
                return True
        return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@pytest.fixture
def raws() -> Iterator[Callable[[Raw], Raw]]:
    opened: list[Raw] = []

    def add(r: Raw) -> Raw:
        opened.append(r)
        return r

    yield add
    for r in opened:
        r.close()
