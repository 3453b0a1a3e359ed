"""The MQTT 3.1.1 packets of a connection after its CONNECT, encoded and decoded here.

The broker's hot path (PUBLISH and its acknowledgements, SUBSCRIBE, UNSUBSCRIBE, PINGREQ,
DISCONNECT) is parsed from a byte buffer in one pass, many packets per read, without a
task or an object per packet; CONNECT and CONNACK stay with amqtt. Every violation of the
specification that obliges the server to close the connection raises
:class:`ProtocolError` with the rule it breaks.
"""

from __future__ import annotations

import secrets
from collections.abc import Generator
from dataclasses import dataclass

CONNECT = 1
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
UNSUBSCRIBE = 10
PINGREQ = 12
DISCONNECT = 14

PINGRESP = b"\xd0\x00"
#: the fixed-header flags each packet type must carry (MQTT-2.2.2-1, -2); PUBLISH varies
_FLAGS = {
    PUBACK: 0,
    PUBREC: 0,
    PUBREL: 2,
    PUBCOMP: 0,
    SUBSCRIBE: 2,
    UNSUBSCRIBE: 2,
    PINGREQ: 0,
    DISCONNECT: 0,
}
SUBACK_FAILURE = 0x80


class ProtocolError(Exception):
    """The client broke the protocol: the connection is closed (its will is published)."""


class Refused(ProtocolError):
    """A CONNECT answered with a CONNACK refusal code before the connection is closed."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


#: CONNACK return codes (MQTT-3.2.2.3)
UNACCEPTABLE_PROTOCOL = 1
IDENTIFIER_REJECTED = 2
BAD_CREDENTIALS = 4
NOT_AUTHORIZED = 5


@dataclass(slots=True)
class Connect:
    """A decoded CONNECT."""

    client_id: str
    clean_session: bool
    keep_alive: int
    username: str | None
    password: str | None
    will_topic: str | None = None
    will_payload: bytes = b""
    will_qos: int = 0
    will_retain: bool = False


def decode_connect(body: bytes) -> Connect:
    """A CONNECT, validated (MQTT-3.1): a violation raises :class:`ProtocolError` (the
    connection is closed) or :class:`Refused` (answered with a CONNACK code first)."""
    name, pos = _string(body, 0)
    if name != "MQTT":
        raise ProtocolError(f"protocol name {name!r} (MQTT-3.1.2-1)")
    if len(body) < pos + 4:
        raise ProtocolError("truncated CONNECT")
    level, flags = body[pos], body[pos + 1]
    keep_alive = (body[pos + 2] << 8) | body[pos + 3]
    pos += 4
    if level != 4:
        raise Refused(UNACCEPTABLE_PROTOCOL, f"protocol level {level} (MQTT-3.1.2-2)")
    if flags & 1:
        raise ProtocolError("reserved CONNECT flag set (MQTT-3.1.2-3)")
    clean = bool(flags & 2)
    will = bool(flags & 4)
    will_qos = (flags >> 3) & 3
    will_retain = bool(flags & 32)
    if not will and (will_qos or will_retain):
        raise ProtocolError("will QoS or retain without a will (MQTT-3.1.2-11, -13)")
    if will_qos == 3:
        raise ProtocolError("will QoS 3 (MQTT-3.1.2-14)")
    if flags & 64 and not flags & 128:
        raise ProtocolError("password without user name (MQTT-3.1.2-22)")
    client_id, pos = _string(body, pos)
    connect = Connect(client_id, clean, keep_alive, None, None)
    if will:
        connect.will_topic, pos = _string(body, pos)
        connect.will_payload, pos = _bytes(body, pos)
        connect.will_qos, connect.will_retain = will_qos, will_retain
        if not connect.will_topic or "+" in connect.will_topic or "#" in connect.will_topic:
            raise ProtocolError("invalid will topic (MQTT-3.1.3-10)")
    if flags & 128:
        connect.username, pos = _string(body, pos)
    if flags & 64:
        password, pos = _bytes(body, pos)
        try:
            connect.password = password.decode()
        except UnicodeDecodeError:
            raise Refused(BAD_CREDENTIALS, "password is not UTF-8") from None
    if pos != len(body):
        raise ProtocolError("trailing bytes in CONNECT")
    if not client_id:
        if not clean:  # MQTT-3.1.3-8
            raise Refused(IDENTIFIER_REJECTED, "empty client id with clean session 0")
        connect.client_id = "auto-" + secrets.token_hex(8)  # MQTT-3.1.3-6
    return connect


def connack(session_present: bool, code: int = 0) -> bytes:
    return bytes((0x20, 2, 1 if session_present and not code else 0, code))


class PacketReader:
    """Splits a byte stream into packets: ``feed`` bytes, then iterate :meth:`packets`."""

    __slots__ = ("_buf", "max_size")

    def __init__(self, max_size: int) -> None:
        self._buf = bytearray()
        self.max_size = max_size

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_packet(self) -> tuple[int, int, bytes] | None:
        """The first complete packet buffered, or None."""
        packets = self.packets()
        try:
            return next(packets, None)
        finally:
            packets.close()

    def packets(self) -> Generator[tuple[int, int, bytes], None, None]:
        """(packet type, flags, body) of each complete packet buffered so far."""
        buf = self._buf
        pos = 0
        end = len(buf)
        try:
            while end - pos >= 2:
                first = buf[pos]
                length = 0
                shift = 0
                i = pos + 1
                while True:
                    if i >= end:
                        return
                    byte = buf[i]
                    length |= (byte & 0x7F) << shift
                    i += 1
                    if not byte & 0x80:
                        break
                    shift += 7
                    if shift > 21:
                        raise ProtocolError("malformed remaining length (MQTT-2.2.3)")
                if length > self.max_size:
                    raise ProtocolError(f"packet of {length} bytes exceeds {self.max_size}")
                if end - i < length:
                    return
                body = bytes(buf[i : i + length])
                pos = i + length
                yield first >> 4, first & 0x0F, body
        finally:
            if pos:
                del buf[:pos]


def _remaining(n: int) -> bytes:
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _string(data: bytes, pos: int) -> tuple[str, int]:
    """A length-prefixed UTF-8 string at ``pos`` (MQTT-1.5.3) and the position after it."""
    if len(data) < pos + 2:
        raise ProtocolError("truncated string")
    n = (data[pos] << 8) | data[pos + 1]
    end = pos + 2 + n
    if len(data) < end:
        raise ProtocolError("truncated string")
    try:
        text = data[pos + 2 : end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("invalid UTF-8 (MQTT-1.5.3-1)") from exc
    if "\x00" in text:
        raise ProtocolError("U+0000 in a string (MQTT-1.5.3-2)")
    return text, end


def _bytes(data: bytes, pos: int) -> tuple[bytes, int]:
    """Length-prefixed binary data at ``pos`` and the position after it."""
    if len(data) < pos + 2:
        raise ProtocolError("truncated field")
    end = pos + 2 + ((data[pos] << 8) | data[pos + 1])
    if len(data) < end:
        raise ProtocolError("truncated field")
    return data[pos + 2 : end], end


def check_flags(kind: int, flags: int) -> None:
    """The fixed-header flags are the ones the packet type requires."""
    expected = _FLAGS.get(kind)
    if expected is None:
        raise ProtocolError(f"packet type {kind} not allowed from a client")
    if flags != expected:
        raise ProtocolError(f"bad flags {flags:#x} on packet type {kind} (MQTT-2.2.2-2)")


def decode_publish(flags: int, body: bytes) -> tuple[str, int, int | None, bool, bool, bytes]:
    """(topic, qos, packet id, retain, dup, payload) of a PUBLISH."""
    qos = (flags >> 1) & 3
    if qos == 3:
        raise ProtocolError("QoS 3 (MQTT-3.3.1-4)")
    topic, pos = _string(body, 0)
    if not topic:
        raise ProtocolError("empty topic name (MQTT-4.7.3-1)")
    if "+" in topic or "#" in topic:
        raise ProtocolError("wildcard in a topic name (MQTT-3.3.2-2)")
    packet_id = None
    if qos:
        if len(body) < pos + 2:
            raise ProtocolError("truncated PUBLISH")
        packet_id = (body[pos] << 8) | body[pos + 1]
        if not packet_id:
            raise ProtocolError("packet id 0 (MQTT-2.3.1-1)")
        pos += 2
    return topic, qos, packet_id, bool(flags & 1), bool(flags & 8), body[pos:]


def packet_id(body: bytes) -> int:
    """The packet id of an acknowledgement (PUBACK, PUBREC, PUBREL, PUBCOMP)."""
    if len(body) != 2:
        raise ProtocolError("malformed acknowledgement")
    return (body[0] << 8) | body[1]


def valid_filter(flt: str) -> bool:
    """Whether a topic filter is well formed (MQTT-4.7.1-2, -3, MQTT-4.7.3-1)."""
    if not flt:
        return False
    levels = flt.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def decode_subscribe(body: bytes) -> tuple[int, list[tuple[str, int]]]:
    """(packet id, [(filter, requested QoS)]) of a SUBSCRIBE."""
    pid = _pid(body)
    pos, wanted = 2, []
    while pos < len(body):
        flt, pos = _string(body, pos)
        if pos >= len(body):
            raise ProtocolError("truncated SUBSCRIBE")
        options = body[pos]
        pos += 1
        if options & 0xFC or options == 3:
            raise ProtocolError("bad requested QoS (MQTT-3.8.3-4)")
        wanted.append((flt, options))
    if not wanted:
        raise ProtocolError("SUBSCRIBE without a filter (MQTT-3.8.3-3)")
    return pid, wanted


def decode_unsubscribe(body: bytes) -> tuple[int, list[str]]:
    """(packet id, [filter]) of an UNSUBSCRIBE."""
    pid = _pid(body)
    pos, filters = 2, []
    while pos < len(body):
        flt, pos = _string(body, pos)
        filters.append(flt)
    if not filters:
        raise ProtocolError("UNSUBSCRIBE without a filter (MQTT-3.10.3-2)")
    return pid, filters


def _pid(body: bytes) -> int:
    if len(body) < 2:
        raise ProtocolError("truncated packet")
    pid = (body[0] << 8) | body[1]
    if not pid:
        raise ProtocolError("packet id 0 (MQTT-2.3.1-1)")
    return pid


def encode_topic(topic: str) -> bytes:
    """A topic name as it goes on the wire (length-prefixed UTF-8), for :func:`publish`."""
    raw = topic.encode()
    return len(raw).to_bytes(2, "big") + raw


def publish(
    topic: bytes, payload: bytes, qos: int, packet_id: int | None, retain: bool, dup: bool = False
) -> bytes:
    """A PUBLISH packet; ``topic`` from :func:`encode_topic`."""
    first = 0x30 | (qos << 1) | (8 if dup else 0) | (1 if retain else 0)
    if qos:
        assert packet_id is not None
        size = len(topic) + 2 + len(payload)
        return b"".join(
            (bytes((first,)), _remaining(size), topic, packet_id.to_bytes(2, "big"), payload)
        )
    return b"".join((bytes((first,)), _remaining(len(topic) + len(payload)), topic, payload))


def ack(kind: int, pid: int) -> bytes:
    """PUBACK, PUBREC, PUBREL, PUBCOMP or UNSUBACK for a packet id."""
    first = {PUBACK: 0x40, PUBREC: 0x50, PUBREL: 0x62, PUBCOMP: 0x70, UNSUBSCRIBE: 0xB0}[kind]
    return bytes((first, 2, pid >> 8, pid & 0xFF))


def suback(pid: int, codes: list[int]) -> bytes:
    """A SUBACK with one return code per filter."""
    return bytes((0x90,)) + _remaining(2 + len(codes)) + pid.to_bytes(2, "big") + bytes(codes)
