"""The lean MQTT 3.1.1 client: wire encodings, the incremental parser (on a fake
transport), failure handling, and the client against a tiny in-test fake broker."""

from __future__ import annotations

import asyncio
import gc
import struct
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import pytest

from hexa.hub.mqtt import client as mqtt
from hexa.hub.mqtt.busapi import Message
from hexa.hub.mqtt.client import ConnectRefused, MqttConnection, MqttError, Will, _varint

T = TypeVar("T")

# generous safety nets against hangs; never asserted as performance bounds
SAFETY_S = 10.0


# --- helpers ---------------------------------------------------------------------------
def rl(n: int) -> bytes:
    """Remaining length, written out independently of the module (MQTT 3.1.1, 2.2.3)."""
    out = bytearray()
    while True:
        digit, n = n % 128, n // 128
        out.append(digit | 0x80 if n > 0 else digit)
        if n == 0:
            return bytes(out)


def s16(raw: bytes) -> bytes:
    """A UTF-8 string / binary field: two length bytes, then the bytes."""
    return len(raw).to_bytes(2, "big") + raw


def pub(
    topic: bytes,
    payload: bytes = b"",
    *,
    qos: int = 0,
    packet_id: int = 0,
    retain: bool = False,
    dup: bool = False,
) -> bytes:
    """A PUBLISH packet as a broker would send it."""
    body = s16(topic) + (packet_id.to_bytes(2, "big") if qos else b"") + payload
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    return bytes((first,)) + rl(len(body)) + body


def split_packets(data: bytes) -> list[tuple[int, bytes]]:
    """(first byte, body) of every packet in a byte string; it must end on a boundary."""
    packets, pos = [], 0
    while pos < len(data):
        first, i, length, mult = data[pos], pos + 1, 0, 1
        while True:
            byte = data[i]
            i += 1
            length += (byte & 0x7F) * mult
            if byte < 0x80:
                break
            mult *= 128
        packets.append((first, data[i : i + length]))
        pos = i + length
    assert pos == len(data), "trailing partial packet"
    return packets


class FakeTransport:
    """Just enough of an asyncio transport for MqttConnection."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False
        self.aborted = False
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closing, "write after close/abort"
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.aborted = self.closing = True

    def close(self) -> None:
        self.closed = self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    @property
    def packets(self) -> list[tuple[int, bytes]]:
        return split_packets(b"".join(self.writes))


def make_conn(keepalive: int = 0) -> tuple[MqttConnection, FakeTransport]:
    conn = MqttConnection(keepalive)
    transport = FakeTransport()
    conn.connection_made(transport)
    return conn, transport


async def turn() -> None:
    """Let the event loop run one round (coalesced writes flush with call_soon)."""
    await asyncio.sleep(0)


async def settle(rounds: int = 5) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


async def within(aw: Awaitable[T]) -> T:
    """Await with a safety net so that a bug fails the test instead of hanging it."""
    return await asyncio.wait_for(aw, SAFETY_S)


@pytest.fixture
async def loop_errors(anyio_backend: str) -> AsyncIterator[list[dict[str, Any]]]:
    """Everything the event loop would log: unretrieved future/task exceptions, failing
    callbacks, destroyed pending tasks. Each test must leave none."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    try:
        yield errors
        await settle()
        gc.collect()
        await settle()
        assert [e.get("message") for e in errors] == []
    finally:
        loop.set_exception_handler(previous)


# --- 1. encodings ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "encoded"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16383, b"\xff\x7f"),
        (16384, b"\x80\x80\x01"),
        (2097151, b"\xff\xff\x7f"),
        (2097152, b"\x80\x80\x80\x01"),
        (268435455, b"\xff\xff\xff\x7f"),
    ],
)
def test_varint_spec_examples(n: int, encoded: bytes) -> None:
    """The remaining-length examples of MQTT 3.1.1 table 2.4, edges included."""
    assert _varint(n) == encoded
    assert rl(n) == encoded


def test_varint_refuses_lengths_mqtt_cannot_express() -> None:
    """A body longer than 256 MiB - 1 cannot be framed; encoding it must fail loudly."""
    with pytest.raises(ValueError):
        _varint(mqtt.MAX_PACKET + 1)


def test_encode_publish_qos0() -> None:
    """QoS 0: no packet identifier, flags 0, topic length-prefixed, payload raw."""
    assert mqtt.encode_publish("a/b", b"hi", 0, False, 0) == (b"\x30\x07" + b"\x00\x03a/b" + b"hi")


def test_encode_publish_qos1_retain() -> None:
    """QoS 1 + retain: flags 0b0011, the packet identifier after the topic."""
    assert mqtt.encode_publish("a/b", b"hi", 1, True, 0x1234) == (
        b"\x33\x09" + b"\x00\x03a/b" + b"\x12\x34" + b"hi"
    )


def test_encode_publish_utf8_topic_and_long_payload() -> None:
    """Topic length counts UTF-8 bytes; a 200-byte body takes a 2-byte remaining length."""
    payload = bytes(range(256))[:194]
    packet = mqtt.encode_publish("ä", payload, 0, False, 0)
    # body = 2 + 2 (topic "ä" is 2 bytes) + 194 = 198 = 0x46 + 1 * 128
    assert packet[:3] == b"\x30\xc6\x01"
    assert packet[3:7] == b"\x00\x02\xc3\xa4"
    assert packet[7:] == payload


def test_encode_connect_minimal() -> None:
    """Protocol name MQTT, level 4, clean session only, keepalive big-endian, client id."""
    packet = mqtt.encode_connect("c1", keepalive=30)
    assert packet == (
        b"\x10\x0e" + b"\x00\x04MQTT" + b"\x04" + b"\x02" + b"\x00\x1e" + b"\x00\x02c1"
    )


def test_encode_connect_everything() -> None:
    """Will QoS 1 + retain, user name and password: flags and payload order (3.1.3)."""
    will = Will("hexa/hub/status", b"offline", qos=1, retain=True)
    packet = mqtt.encode_connect(
        "hub", keepalive=0x0102, username="u", password="p\u00e9", will=will
    )
    body = (
        b"\x00\x04MQTT\x04"
        + bytes((0x80 | 0x40 | 0x20 | 0x08 | 0x04 | 0x02,))
        + b"\x01\x02"
        + s16(b"hub")
        + s16(b"hexa/hub/status")
        + s16(b"offline")
        + s16(b"u")
        + s16("p\u00e9".encode())
    )
    assert packet == b"\x10" + rl(len(body)) + body
    assert packet[9] == 0xEE


@pytest.mark.parametrize(
    ("kwargs", "flags"),
    [
        ({"will": Will("w", b"x", qos=0, retain=False)}, 0x06),
        ({"will": Will("w", b"x", qos=2, retain=False)}, 0x16),
        ({"will": Will("w", b"x", qos=0, retain=True)}, 0x26),
        ({"username": "u"}, 0x82),
        # MQTT-3.1.2-22: no password flag without the user name flag
        ({"password": "p"}, 0x02),
        ({"clean_session": False}, 0x00),
    ],
)
def test_encode_connect_flags(kwargs: dict[str, Any], flags: int) -> None:
    """Each CONNECT flag bit in isolation (3.1.2.3)."""
    packet = mqtt.encode_connect("c", keepalive=60, **kwargs)
    assert packet[2:9] == b"\x00\x04MQTT\x04"
    assert packet[9] == flags
    assert packet[10:12] == b"\x00\x3c"
    if "password" in kwargs:
        assert packet[12:] == s16(b"c")  # the password is not sent either


def test_encode_publish_refuses_oversized_topic() -> None:
    """Topic names are MQTT strings: at most 65535 bytes."""
    with pytest.raises(ValueError):
        mqtt.encode_publish("t" * 65536, b"", 0, False, 0)


# --- 2. parsing on a fake transport ------------------------------------------------------
@pytest.mark.anyio
async def test_several_packets_in_one_chunk(loop_errors: list[Any]) -> None:
    """Every complete packet in one read is handled, in order; PINGRESP is silent."""
    conn, transport = make_conn()
    conn.data_received(pub(b"a", b"1") + b"\xd0\x00" + pub(b"b", b"2") + pub(b"c", b"3"))
    assert await within(conn.receive()) == [
        Message("a", b"1", False, 0),
        Message("b", b"2", False, 0),
        Message("c", b"3", False, 0),
    ]
    await turn()
    assert transport.writes == []
    assert not conn.closed


@pytest.mark.anyio
async def test_packet_split_byte_by_byte(loop_errors: list[Any]) -> None:
    """A packet that arrives one byte at a time is delivered once, when complete."""
    conn, transport = make_conn()
    rx = asyncio.create_task(conn.receive())
    data = pub(b"hexa/x/state", b"payload!", qos=1, packet_id=0x0102, retain=True)
    for byte in data[:-1]:
        conn.data_received(bytes((byte,)))
        await turn()
        assert not rx.done()
    assert transport.writes == []
    conn.data_received(data[-1:])
    assert await within(rx) == [Message("hexa/x/state", b"payload!", True, 1)]
    await turn()
    assert transport.writes == [b"\x40\x02\x01\x02"]


@pytest.mark.anyio
async def test_packets_split_across_chunk_boundaries(loop_errors: list[Any]) -> None:
    """Chunks that cut packets anywhere (also inside the remaining length) still parse."""
    conn, _ = make_conn()
    big = bytes(range(256)) * 3  # a 2-byte remaining length
    stream = pub(b"t/1", big) + pub(b"t/2", b"") + pub(b"t/3", b"z", retain=True)
    for cut in range(0, len(stream), 7):
        conn.data_received(stream[cut : cut + 7])
    assert await within(conn.receive()) == [
        Message("t/1", big, False, 0),
        Message("t/2", b"", False, 0),
        Message("t/3", b"z", True, 0),
    ]


@pytest.mark.anyio
async def test_publish_qos0_is_not_acknowledged(loop_errors: list[Any]) -> None:
    """QoS 0 in: delivered, nothing written back."""
    conn, transport = make_conn()
    conn.data_received(pub(b"a/b", b"x"))
    await turn()
    assert transport.writes == []
    assert await within(conn.receive()) == [Message("a/b", b"x", False, 0)]


@pytest.mark.anyio
async def test_publish_qos1_is_acknowledged_after_flush(loop_errors: list[Any]) -> None:
    """QoS 1 in: PUBACK with the same packet id, written on the next loop turn, and the
    acknowledgements of one read leave in one write."""
    conn, transport = make_conn()
    conn.data_received(pub(b"a", b"1", qos=1, packet_id=0xBEEF))
    assert transport.writes == []  # coalesced: nothing written synchronously
    await turn()
    assert transport.writes == [b"\x40\x02\xbe\xef"]
    conn.data_received(pub(b"b", b"2", qos=1, packet_id=1) + pub(b"c", b"3", qos=1, packet_id=2))
    await turn()
    assert transport.writes[1:] == [b"\x40\x02\x00\x01" + b"\x40\x02\x00\x02"]
    assert await within(conn.receive()) == [
        Message("a", b"1", False, 1),
        Message("b", b"2", False, 1),
        Message("c", b"3", False, 1),
    ]


@pytest.mark.anyio
async def test_publish_qos2_exactly_once(loop_errors: list[Any]) -> None:
    """QoS 2 in: PUBREC, a resend is acknowledged again but not delivered twice, PUBREL
    gets PUBCOMP, and afterwards the id starts a new message (4.3.3, method B)."""
    conn, transport = make_conn()
    conn.data_received(pub(b"q2", b"once", qos=2, packet_id=7))
    await turn()
    assert transport.packets == [(0x50, b"\x00\x07")]
    assert await within(conn.receive()) == [Message("q2", b"once", False, 2)]

    conn.data_received(pub(b"q2", b"once", qos=2, packet_id=7, dup=True))
    await turn()
    assert transport.packets[1:] == [(0x50, b"\x00\x07")]
    rx = asyncio.create_task(conn.receive())
    await turn()
    assert not rx.done()

    conn.data_received(b"\x62\x02\x00\x07")  # PUBREL
    await turn()
    assert transport.packets[2:] == [(0x70, b"\x00\x07")]

    conn.data_received(pub(b"q2", b"again", qos=2, packet_id=7))
    assert await within(rx) == [Message("q2", b"again", False, 2)]


@pytest.mark.anyio
async def test_retain_flag_and_binary_payloads(loop_errors: list[Any]) -> None:
    """The retain bit is reported; payloads are bytes, verbatim (NULs, 0xFF, empty)."""
    conn, _ = make_conn()
    binary = bytes(range(256)) + b"\x00\x00\xff"
    conn.data_received(
        pub(b"r", binary, retain=True) + pub(b"n", b"\x00", qos=1, packet_id=3) + pub(b"e")
    )
    assert await within(conn.receive()) == [
        Message("r", binary, True, 0),
        Message("n", b"\x00", False, 1),
        Message("e", b"", False, 0),
    ]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("size", "header"),
    [
        # body = 2 + 3 ("big") + size
        (195, b"\x30\xc8\x01"),  # 200 = 72 + 1 * 128: 2 length bytes
        (19995, b"\x30\xa0\x9c\x01"),  # 20000 = 32 + 28 * 128 + 1 * 16384: 3 length bytes
    ],
)
async def test_multibyte_remaining_length(size: int, header: bytes, loop_errors: list[Any]) -> None:
    """Payloads over 127 and over 16383 bytes, fed in 1000-byte chunks."""
    payload = bytes(i % 251 for i in range(size))
    data = pub(b"big", payload)
    assert data.startswith(header)
    conn, _ = make_conn()
    rx = asyncio.create_task(conn.receive())
    for cut in range(0, len(data), 1000):
        conn.data_received(data[cut : cut + 1000])
    assert await within(rx) == [Message("big", payload, False, 0)]


@pytest.mark.anyio
async def test_receive_returns_every_queued_message_in_order(loop_errors: list[Any]) -> None:
    """receive() drains the whole inbox in arrival order, then waits for the next one."""
    conn, _ = make_conn()
    for i in range(5):
        conn.data_received(pub(f"t/{i}".encode(), str(i).encode(), qos=i % 2, packet_id=i + 1))
    batch = await within(conn.receive())
    assert [(m.topic, m.payload, m.qos) for m in batch] == [
        (f"t/{i}", str(i).encode(), i % 2) for i in range(5)
    ]
    rx = asyncio.create_task(conn.receive())
    await settle()
    assert not rx.done()
    conn.data_received(pub(b"t/5", b"5"))
    assert await within(rx) == [Message("t/5", b"5", False, 0)]


@pytest.mark.anyio
async def test_cancelled_receive_loses_nothing(loop_errors: list[Any]) -> None:
    """A receive() cancelled while waiting leaves later messages for the next call."""
    conn, _ = make_conn()
    rx = asyncio.create_task(conn.receive())
    await turn()
    rx.cancel()
    with pytest.raises(asyncio.CancelledError):
        await rx
    conn.data_received(pub(b"a", b"1"))
    assert await within(conn.receive()) == [Message("a", b"1", False, 0)]


@pytest.mark.anyio
async def test_outgoing_packets_and_acks(loop_errors: list[Any]) -> None:
    """publish/subscribe/unsubscribe write spec packets and return on their own ack."""
    conn, transport = make_conn()
    p0 = asyncio.create_task(conn.publish("q0", b"fire", qos=0, retain=True))
    p1 = asyncio.create_task(conn.publish("q1", b"wait", qos=1))
    sub = asyncio.create_task(conn.subscribe(["a/#", "b/+"], qos=1))
    unsub = asyncio.create_task(conn.unsubscribe(["c"]))
    await settle()
    assert p0.done() and p0.result() is None
    assert len(transport.writes) == 1  # written in one loop turn, sent in one write
    assert transport.packets == [
        (0x31, s16(b"q0") + b"fire"),
        (0x32, s16(b"q1") + b"\x00\x01" + b"wait"),
        (0x82, b"\x00\x02" + s16(b"a/#") + b"\x01" + s16(b"b/+") + b"\x01"),
        (0xA2, b"\x00\x03" + s16(b"c")),
    ]
    conn.data_received(b"\x40\x02\x00\x09")  # an ack for an id nobody waits for: ignored
    await settle()
    assert not (p1.done() or sub.done() or unsub.done())
    conn.data_received(b"\xb0\x02\x00\x03" + b"\x90\x04\x00\x02\x01\x80" + b"\x40\x02\x00\x01")
    assert await within(sub) == [1, 0x80]
    assert await within(p1) is None
    assert await within(unsub) is None
    assert not conn.closed


@pytest.mark.anyio
async def test_packet_ids_wrap_and_skip_ids_in_use(loop_errors: list[Any]) -> None:
    """Ids run 1..65535, never 0, and skip ids still awaiting their ack."""
    conn, transport = make_conn()
    first = asyncio.create_task(conn.publish("t", b"", qos=1))
    await settle()
    conn._next_id = 65534  # fast-forward the counter
    more = [asyncio.create_task(conn.publish("t", b"", qos=1)) for _ in range(2)]
    await settle()
    ids = [int.from_bytes(body[3:5], "big") for _, body in transport.packets]
    assert ids == [1, 65535, 2]
    conn.data_received(b"".join(b"\x40\x02" + i.to_bytes(2, "big") for i in ids))
    await within(asyncio.gather(first, *more))


@pytest.mark.anyio
async def test_cancelled_publish_frees_its_id_on_the_late_ack(loop_errors: list[Any]) -> None:
    """A QoS 1 publish cancelled before its PUBACK: the late ack is absorbed, no error."""
    conn, transport = make_conn()
    p = asyncio.create_task(conn.publish("t", b"x", qos=1))
    await settle()
    p.cancel()
    with pytest.raises(asyncio.CancelledError):
        await p
    assert transport.packets == [(0x32, s16(b"t") + b"\x00\x01x")]
    conn.data_received(b"\x40\x02\x00\x01")
    await settle()
    assert not conn.closed
    conn._next_id = 0
    p2 = asyncio.create_task(conn.publish("t", b"y", qos=1))
    await settle()
    assert transport.packets[-1] == (0x32, s16(b"t") + b"\x00\x01y")  # id 1 reusable
    conn.data_received(b"\x40\x02\x00\x01")
    await within(p2)


@pytest.mark.anyio
async def test_publish_refuses_qos2(loop_errors: list[Any]) -> None:
    """The client publishes QoS 0 or 1 only, and says so before writing anything."""
    conn, transport = make_conn()
    with pytest.raises(ValueError):
        await conn.publish("t", b"", qos=2)
    await turn()
    assert transport.writes == []


# --- 3. errors ---------------------------------------------------------------------------
BAD_INPUT = {
    "remaining length with 5 bytes": b"\x30\xff\xff\xff\xff\x01",
    "remaining length with 4 continuation bytes, incomplete": b"\x30\x80\x80\x80\x80",
    "topic not UTF-8": pub(b"\xff\xfe/x", b"p"),
    "CONNECT from broker": b"\x10\x00",
    "SUBSCRIBE from broker": b"\x82\x00",
    "UNSUBSCRIBE from broker": b"\xa2\x00",
    "PINGREQ from broker": b"\xc0\x00",
    "DISCONNECT from broker": b"\xe0\x00",
    "reserved type 0": b"\x00\x00",
    "reserved type 15": b"\xf0\x00",
    "PUBACK body truncated": b"\x40\x01\x00",
    "SUBACK empty": b"\x90\x00",
    "PUBREL empty": b"\x62\x00",
    "PUBLISH body of one byte": b"\x30\x01\x00",
    "PUBLISH QoS 1 without a whole packet id": b"\x32\x04\x00\x01a\x00",
}


@pytest.mark.anyio
@pytest.mark.parametrize("bad", list(BAD_INPUT.values()), ids=list(BAD_INPUT))
async def test_malformed_input_fails_the_connection(bad: bytes, loop_errors: list[Any]) -> None:
    """A protocol violation fails everything pending with MqttError and aborts the
    transport; later calls raise at once."""
    conn, transport = make_conn()
    pending_pub = asyncio.create_task(conn.publish("t", b"x", qos=1))
    pending_sub = asyncio.create_task(conn.subscribe(["f"]))
    rx = asyncio.create_task(conn.receive())
    await turn()
    conn.data_received(bad)
    assert conn.closed
    assert transport.aborted
    for task in (pending_pub, pending_sub, rx):
        with pytest.raises(MqttError):
            await within(task)
    with pytest.raises(MqttError):
        await conn.publish("t", b"x", qos=0)
    with pytest.raises(MqttError):
        await conn.receive()
    await conn.wait_closed()


@pytest.mark.anyio
async def test_messages_before_a_failure_are_still_received(loop_errors: list[Any]) -> None:
    """Messages parsed before the bad packet are handed out; then receive() raises."""
    conn, transport = make_conn()
    conn.data_received(pub(b"ok", b"1") + b"\xf0\x00")
    assert transport.aborted
    assert await within(conn.receive()) == [Message("ok", b"1", False, 0)]
    with pytest.raises(MqttError, match="unexpected packet type 0xf0"):
        await conn.receive()


@pytest.mark.anyio
@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(b"\x30\x04\x00\x09ab", id="topic length beyond the body"),
        pytest.param(pub(b"t", b"x", qos=3, packet_id=1), id="QoS bits 11"),
    ],
)
async def test_malformed_publish_fails_the_connection(bad: bytes, loop_errors: list[Any]) -> None:
    """Malformed PUBLISH packets are protocol violations, not messages."""
    conn, transport = make_conn()
    conn.data_received(bad)
    await turn()
    assert conn.closed and transport.aborted


@pytest.mark.anyio
async def test_truncated_packet_then_connection_lost(loop_errors: list[Any]) -> None:
    """A packet cut off by the end of the connection is never delivered."""
    conn, _ = make_conn()
    rx = asyncio.create_task(conn.receive())
    conn.data_received(pub(b"topic", b"0123456789")[:-3])
    await turn()
    assert not rx.done()
    conn.connection_lost(None)
    with pytest.raises(MqttError, match="connection closed"):
        await within(rx)


@pytest.mark.anyio
async def test_connection_lost_fails_pending_acks(loop_errors: list[Any]) -> None:
    """connection_lost(exc) fails every outstanding publish/subscribe/unsubscribe."""
    conn, _ = make_conn()
    tasks = [
        asyncio.create_task(conn.publish("t", b"x", qos=1)),
        asyncio.create_task(conn.subscribe(["a"])),
        asyncio.create_task(conn.unsubscribe(["b"])),
        asyncio.create_task(conn.receive()),
    ]
    await turn()
    conn.connection_lost(ConnectionResetError("peer reset"))
    for task in tasks:
        with pytest.raises(MqttError, match="connection lost: peer reset"):
            await within(task)
    assert conn.closed
    await conn.disconnect()  # a no-op on a failed connection


@pytest.mark.anyio
async def test_a_second_receiver_is_refused_and_the_first_woken_by_a_failure(
    loop_errors: list[Any],
) -> None:
    """receive() has one consumer: a second concurrent one is refused at once (it could
    never be woken), and the waiting one is woken by a failed connection."""
    conn, _ = make_conn()
    first = asyncio.create_task(conn.receive())
    await turn()
    second = asyncio.create_task(conn.receive())
    await turn()
    assert second.done() and isinstance(second.exception(), RuntimeError)
    assert not first.done()
    conn.connection_lost(None)
    await settle()
    try:
        assert first.done() and isinstance(first.exception(), MqttError)
    finally:
        for task in (first, second):
            task.cancel()
        await asyncio.gather(first, second, return_exceptions=True)


class StuckCloseTransport(FakeTransport):
    """close() that never completes, like a TLS close_notify or a full send buffer
    towards a broker that stopped reading: connection_lost does not come."""


@pytest.mark.anyio
async def test_disconnect_with_a_stuck_close_neither_raises_nor_leaks(
    loop_errors: list[Any],
) -> None:
    """disconnect() is best effort: it returns and the transport ends up aborted."""
    conn = MqttConnection(0)
    transport = StuckCloseTransport()
    conn.connection_made(transport)
    try:
        await conn.disconnect()
        assert transport.aborted and conn.closed
    finally:
        conn.connection_lost(None)


# --- 4. against a fake broker ------------------------------------------------------------
class FakeBroker:
    """A one-connection-at-a-time MQTT broker stub on 127.0.0.1, port chosen by the OS."""

    def __init__(
        self,
        *,
        connack: int | None = 0,
        silent_after_connack: bool = False,
        granted: list[int] | None = None,
    ) -> None:
        self.connack = connack
        self.silent_after_connack = silent_after_connack
        self.granted = granted
        self.puback_gate: asyncio.Event | None = None
        self.log: list[tuple[int, bytes]] = []
        self.packets: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        self.ended = asyncio.Event()
        self.writer: asyncio.StreamWriter | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> FakeBroker:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def connect(self, **kwargs: Any) -> MqttConnection:
        kwargs.setdefault("client_id", "test-client")
        kwargs.setdefault("keepalive", 0)
        return await mqtt.connect("127.0.0.1", self.port, **kwargs)

    async def next(self, kind: int) -> tuple[int, bytes]:
        """The next packet of a type (high nibble) the client sent."""
        while True:
            first, body = await within(self.packets.get())
            if first & 0xF0 == kind:
                return first, body

    def send(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.writer = writer
        try:
            while True:
                first = (await reader.readexactly(1))[0]
                length, mult = 0, 1
                while True:
                    byte = (await reader.readexactly(1))[0]
                    length += (byte & 0x7F) * mult
                    if byte < 0x80:
                        break
                    mult *= 128
                body = await reader.readexactly(length)
                self.log.append((first, body))
                self.packets.put_nowait((first, body))
                await self._answer(first, body, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.ended.set()
            writer.close()

    async def _answer(self, first: int, body: bytes, writer: asyncio.StreamWriter) -> None:
        kind = first & 0xF0
        if kind == mqtt.CONNECT:
            if self.connack is not None:
                writer.write(bytes((0x20, 2, 0, self.connack)))
            return
        if self.silent_after_connack:
            return
        if kind == mqtt.PINGREQ:
            writer.write(b"\xd0\x00")
        elif kind == mqtt.PUBLISH and first & 0x06:
            tlen = struct.unpack("!H", body[:2])[0]
            packet_id = body[2 + tlen : 4 + tlen]
            if self.puback_gate is not None:
                await self.puback_gate.wait()
            writer.write(b"\x40\x02" + packet_id)
        elif kind == mqtt.SUBSCRIBE:
            pos, requested = 2, []
            while pos < len(body):
                flen = struct.unpack("!H", body[pos : pos + 2])[0]
                requested.append(body[pos + 2 + flen])
                pos += 3 + flen
            codes = bytes(self.granted if self.granted is not None else requested)
            writer.write(b"\x90" + rl(2 + len(codes)) + body[:2] + codes)
        elif kind == mqtt.UNSUBSCRIBE:
            writer.write(b"\xb0\x02" + body[:2])


@pytest.mark.anyio
async def test_connect_succeeds_on_connack_0(loop_errors: list[Any]) -> None:
    """CONNECT goes out exactly as encode_connect builds it; CONNACK 0 gives a session."""
    will = Will("w/status", b"offline")
    async with FakeBroker() as broker:
        conn = await broker.connect(
            client_id="hub-1", username="user", password="pw", keepalive=30, will=will
        )
        assert not conn.closed
        assert (
            broker.log[0]
            == split_packets(
                mqtt.encode_connect(
                    "hub-1", keepalive=30, username="user", password="pw", will=will
                )
            )[0]
        )
        await conn.disconnect()


@pytest.mark.anyio
async def test_connect_refused_with_code_5(loop_errors: list[Any]) -> None:
    """A non-zero CONNACK code is ConnectRefused (an MqttError) carrying the code, and
    the connection is dropped."""
    async with FakeBroker(connack=5) as broker:
        with pytest.raises(ConnectRefused, match="not authorized") as refused:
            await broker.connect()
        assert refused.value.code == 5
        assert isinstance(refused.value, MqttError)
        await within(broker.ended.wait())


@pytest.mark.anyio
async def test_connect_times_out_without_connack(loop_errors: list[Any]) -> None:
    """A server that never answers CONNECT: MqttError (not a bare TimeoutError), and the
    socket is closed."""
    async with FakeBroker(connack=None) as broker:
        with pytest.raises(MqttError, match="no CONNACK") as failed:
            await broker.connect(handshake_s=0.3)
        assert not isinstance(failed.value, ConnectRefused)
        await within(broker.ended.wait())


@pytest.mark.anyio
async def test_connect_to_a_closed_port(loop_errors: list[Any]) -> None:
    """Connection refused by the OS is an MqttError too."""
    async with FakeBroker() as broker:
        port = broker.port
    with pytest.raises(MqttError, match="cannot connect"):
        await mqtt.connect("127.0.0.1", port, client_id="c", keepalive=0, handshake_s=5)


@pytest.mark.anyio
async def test_cancelled_connect_closes_the_socket(loop_errors: list[Any]) -> None:
    """Cancelling connect() while it waits for CONNACK drops the TCP connection."""
    async with FakeBroker(connack=None) as broker:
        task = asyncio.create_task(broker.connect())
        await broker.next(mqtt.CONNECT)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await within(broker.ended.wait())


@pytest.mark.anyio
async def test_qos1_publish_returns_after_puback(loop_errors: list[Any]) -> None:
    """publish(qos=1) is still waiting after the broker has the PUBLISH, and returns once
    the PUBACK arrives."""
    async with FakeBroker() as broker:
        broker.puback_gate = asyncio.Event()
        conn = await broker.connect()
        task = asyncio.create_task(conn.publish("a/b", b"\x00payload", qos=1, retain=True))
        first, body = await broker.next(mqtt.PUBLISH)
        assert (first, body) == split_packets(
            mqtt.encode_publish("a/b", b"\x00payload", 1, True, 1)
        )[0]
        await settle()
        assert not task.done()
        broker.puback_gate.set()
        assert await within(task) is None
        await conn.disconnect()


@pytest.mark.anyio
async def test_subscribe_returns_granted_qos(loop_errors: list[Any]) -> None:
    """subscribe() returns SUBACK's return codes, failure (0x80) included."""
    async with FakeBroker(granted=[1, 0, 0x80]) as broker:
        conn = await broker.connect()
        granted = await within(conn.subscribe(["a/#", "b/+", "$SYS/#"], qos=1))
        assert granted == [1, 0, 0x80]
        first, _ = await broker.next(mqtt.SUBSCRIBE)
        assert first == 0x82  # reserved flags 0010 (MQTT-3.8.1-1)
        await within(conn.unsubscribe(["a/#"]))
        first, _ = await broker.next(mqtt.UNSUBSCRIBE)
        assert first == 0xA2
        await conn.disconnect()


@pytest.mark.anyio
async def test_messages_from_the_broker_are_received_and_acked(loop_errors: list[Any]) -> None:
    """Over real TCP: a QoS 1 message is delivered and its PUBACK reaches the broker."""
    async with FakeBroker() as broker:
        conn = await broker.connect()
        broker.send(pub(b"x/y", b"hello", qos=1, packet_id=42) + pub(b"x/z", b"zz"))
        got: list[Message] = []
        while len(got) < 2:
            got += await within(conn.receive())
        assert got == [Message("x/y", b"hello", False, 1), Message("x/z", b"zz", False, 0)]
        assert await broker.next(mqtt.PUBACK) == (0x40, b"\x00\x2a")
        await conn.disconnect()


@pytest.mark.anyio
async def test_broker_closing_fails_receive(loop_errors: list[Any]) -> None:
    """The broker closing the socket wakes a waiting receive() with MqttError."""
    async with FakeBroker() as broker:
        conn = await broker.connect()
        rx = asyncio.create_task(conn.receive())
        await settle()
        assert broker.writer is not None
        broker.writer.close()
        with pytest.raises(MqttError, match="connection"):
            await within(rx)
        assert conn.closed


@pytest.mark.anyio
async def test_keepalive_with_a_broker_that_answers_pings(loop_errors: list[Any]) -> None:
    """keepalive=1 against a broker answering PINGREQ: still up after ~2 s, and the
    client did ping."""
    async with FakeBroker() as broker:
        conn = await broker.connect(keepalive=1)
        await asyncio.sleep(2.0)
        assert not conn.closed
        assert any(first == 0xC0 and body == b"" for first, body in broker.log)
        await conn.publish("still/up", b"", qos=1)
        await conn.disconnect()


@pytest.mark.anyio
async def test_keepalive_gives_up_on_a_silent_broker(loop_errors: list[Any]) -> None:
    """A broker that says nothing after CONNACK (not even PINGRESP) fails the
    connection with MqttError; the client pinged it first."""
    async with FakeBroker(silent_after_connack=True) as broker:
        conn = await broker.connect(keepalive=1)
        rx = asyncio.create_task(conn.receive())
        await within(conn.wait_closed())
        assert conn.closed
        with pytest.raises(MqttError, match="silent"):
            await within(rx)
        with pytest.raises(MqttError):
            await conn.publish("t", b"", qos=0)
        assert any(first == 0xC0 for first, _ in broker.log)
        await within(broker.ended.wait())


@pytest.mark.anyio
async def test_disconnect_sends_disconnect(loop_errors: list[Any]) -> None:
    """disconnect() sends E0 00 as the last packet, then closes the socket."""
    async with FakeBroker() as broker:
        conn = await broker.connect()
        await conn.publish("t", b"q0", qos=0)
        await conn.disconnect()
        await within(broker.ended.wait())
        assert broker.log[-1] == (0xE0, b"")
        assert broker.log[-2] == (0x30, s16(b"t") + b"q0")
        assert conn.closed
        with pytest.raises(MqttError):
            await conn.publish("t", b"", qos=0)


@pytest.mark.anyio
async def test_abort_closes_without_disconnect(loop_errors: list[Any]) -> None:
    """abort() drops the socket without DISCONNECT, so the broker publishes the will."""
    async with FakeBroker() as broker:
        conn = await broker.connect()
        conn.abort()
        await within(conn.wait_closed())
        await within(broker.ended.wait())
        assert conn.closed
        assert [first for first, _ in broker.log] == [0x10]
