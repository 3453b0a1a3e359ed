"""The broker's pure parts: the packet codec, topic matching (the trie against a plain
reading of MQTT-4.7) and the outbox (in-flight window, queue bound, redelivery)."""

from __future__ import annotations

import itertools
import random

import pytest

from hexa.broker import codec
from hexa.broker.outbox import Outbox
from hexa.broker.ratelimit import TokenBucket
from hexa.broker.routing import RetainedStore, Subscriptions, matches


# --- codec ---------------------------------------------------------------------------------
def _split(data: bytes, max_size: int = 1 << 20) -> list[tuple[int, int, bytes]]:
    reader = codec.PacketReader(max_size)
    reader.feed(data)
    return list(reader.packets())


def test_packets_split_across_reads_are_reassembled() -> None:
    stream = b"".join(
        codec.publish(codec.encode_topic(f"t/{i}"), b"x" * i * 50, 1, i + 1, False)
        for i in range(20)
    )
    reader = codec.PacketReader(1 << 20)
    got = []
    for i in range(0, len(stream), 7):
        reader.feed(stream[i : i + 7])
        got.extend(reader.packets())
    assert len(got) == 20 and reader.buffered == 0
    for i, (kind, flags, body) in enumerate(got):
        topic, qos, pid, retain, dup, payload = codec.decode_publish(flags, body)
        assert (kind, topic, qos, pid, retain, dup) == (
            codec.PUBLISH,
            f"t/{i}",
            1,
            i + 1,
            False,
            False,
        )
        assert payload == b"x" * i * 50


@pytest.mark.parametrize("size", [0, 127, 128, 16383, 16384, 2097151, 2097152])
def test_remaining_length_round_trips(size: int) -> None:
    packet = codec.publish(
        codec.encode_topic("a"), b"p" * (size - 3 if size >= 3 else 0), 0, None, False
    )
    ((kind, _, body),) = _split(packet, 1 << 22)
    assert kind == codec.PUBLISH and len(body) == max(size, 3)


def test_oversized_and_malformed_lengths_are_protocol_errors() -> None:
    with pytest.raises(codec.ProtocolError):
        _split(b"\x30\xff\xff\xff\xff\x01")
    with pytest.raises(codec.ProtocolError):
        _split(codec.publish(codec.encode_topic("a"), b"x" * 100, 0, None, False), 50)


@pytest.mark.parametrize(
    ("flags", "body"),
    [
        (6, codec.encode_topic("a") + b"\x00\x01"),  # QoS 3
        (0, codec.encode_topic("")),
        (0, codec.encode_topic("a/+")),
        (0, codec.encode_topic("a/#")),
        (0, b"\x00\x02\xff\xfe"),
        (0, codec.encode_topic("a\x00b")),
        (2, codec.encode_topic("a") + b"\x00\x00"),  # packet id 0
        (2, codec.encode_topic("a") + b"\x00"),  # truncated
        (0, b"\x00\x09ab"),  # topic longer than the packet
    ],
)
def test_bad_publishes_are_refused(flags: int, body: bytes) -> None:
    with pytest.raises(codec.ProtocolError):
        codec.decode_publish(flags, body)


def test_subscribe_and_unsubscribe_decode() -> None:
    body = b"\x00\x05" + codec.encode_topic("a/+") + b"\x01" + codec.encode_topic("#") + b"\x02"
    assert codec.decode_subscribe(body) == (5, [("a/+", 1), ("#", 2)])
    assert codec.decode_unsubscribe(b"\x00\x06" + codec.encode_topic("a/+")) == (6, ["a/+"])
    for bad in (b"\x00\x05", b"\x00\x05" + codec.encode_topic("a") + b"\x03", b"\x00\x00"):
        with pytest.raises(codec.ProtocolError):
            codec.decode_subscribe(bad)
    with pytest.raises(codec.ProtocolError):
        codec.check_flags(codec.SUBSCRIBE, 0)
    with pytest.raises(codec.ProtocolError):
        codec.check_flags(codec.CONNECT, 0)


@pytest.mark.parametrize(
    ("flt", "ok"),
    [
        ("a/b", True),
        ("a/+/c", True),
        ("#", True),
        ("a/#", True),
        ("+", True),
        ("/", True),
        ("", False),
        ("a/#/c", False),
        ("a#", False),
        ("a/b+", False),
        ("a/##", False),
    ],
)
def test_filter_validity(flt: str, ok: bool) -> None:
    assert codec.valid_filter(flt) is ok


# --- routing -------------------------------------------------------------------------------
def _spec_matches(topic: str, flt: str) -> bool:
    """MQTT-4.7 read plainly, independent of the trie."""
    if topic.startswith("$") and flt[0] in "+#":
        return False
    t, f = topic.split("/"), flt.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i == len(t):
            return False
        if level not in ("+", t[i]):
            return False
    return len(t) == len(f)


LEVELS = ["a", "b", "", "$x"]


def _topics() -> list[str]:
    out = []
    for n in (1, 2, 3):
        out += ["/".join(p) for p in itertools.product(LEVELS, repeat=n)]
    return [t for t in out if "$" not in t[1:]]


def _filters() -> list[str]:
    out = []
    for n in (1, 2, 3):
        out += ["/".join(p) for p in itertools.product(["a", "", "+", "#", "$x"], repeat=n)]
    return [f for f in out if codec.valid_filter(f) and "$" not in f[1:]]


def test_trie_agrees_with_the_specification_on_every_small_case() -> None:
    filters = _filters()
    subs: Subscriptions[str] = Subscriptions()
    for i, flt in enumerate(filters):
        subs.add(flt, f"c{i}", flt, i % 3)
    for topic in _topics():
        expected = {f"c{i}" for i, flt in enumerate(filters) if _spec_matches(topic, flt)}
        assert set(subs.match(topic)) == expected, topic
        for flt in filters:
            assert matches(topic, flt) == _spec_matches(topic, flt), (topic, flt)


def test_one_entry_per_client_with_the_highest_qos_and_clean_removal() -> None:
    subs: Subscriptions[str] = Subscriptions()
    subs.add("a/#", "c", "c", 0)
    subs.add("a/b", "c", "c", 2)
    subs.add("a/+", "c", "c", 1)
    assert subs.match("a/b") == {"c": ("c", 2)}
    assert len(subs) == 3
    rng = random.Random(7)
    for flt in rng.sample(["a/#", "a/b", "a/+"], 3):
        assert subs.remove(flt, "c")
        assert not subs.remove(flt, "c")
    assert subs.match("a/b") == {} and len(subs) == 0 and list(subs.filters()) == []


def test_retained_store_clears_on_empty_payload() -> None:
    store = RetainedStore()
    store.put("a/b", b"1", 1)
    store.put("a/c", b"2", 0)
    assert [r.topic for r in store.matching("a/+")] == ["a/b", "a/c"]
    store.put("a/b", b"", 0)
    assert [r.topic for r in store.matching("#")] == ["a/c"]
    assert store.matching("a/c")[0].payload == b"2"


# --- outbox --------------------------------------------------------------------------------
def _parse(out: list[bytes]) -> list[tuple[int, int, bytes]]:
    return _split(b"".join(out))


def test_window_queue_and_refill() -> None:
    sent: list[bytes] = []
    box = Outbox(max_inflight=2, max_queued=2)
    box.attach(sent.append)
    topic = codec.encode_topic("t")
    assert all(box.push(topic, bytes([i]), 1) for i in range(4))
    assert not box.push(topic, b"x", 1)  # window (2) and queue (2) full
    assert len(_parse(sent)) == 2 and box.backlog == 4
    box.puback(1)
    assert len(_parse(sent)) == 3 and box.backlog == 3
    box.push(topic, b"q0", 0)  # QoS 0 is never queued
    assert len(_parse(sent)) == 4


def test_redelivery_after_reconnect_keeps_ids_and_sets_dup() -> None:
    sent: list[bytes] = []
    box = Outbox(max_inflight=10, max_queued=10)
    box.attach(sent.append)
    topic = codec.encode_topic("t")
    box.push(topic, b"one", 1)
    box.push(topic, b"two", 2)
    box.pubrec(2)  # PUBREL sent; PUBCOMP pending
    box.detach()
    box.push(topic, b"three", 1)  # queued while away
    sent.clear()
    box.attach(sent.append)
    packets = _parse(sent)
    assert [k for k, _, _ in packets] == [codec.PUBLISH, codec.PUBREL, codec.PUBLISH]
    first = codec.decode_publish(packets[0][1], packets[0][2])
    assert first[2] == 1 and first[4] is True and first[5] == b"one"  # same id, DUP
    assert codec.packet_id(packets[1][2]) == 2
    third = codec.decode_publish(packets[2][1], packets[2][2])
    assert third[4] is False and third[5] == b"three"
    box.pubcomp(2)
    box.puback(1)
    box.puback(third[2] or 0)
    assert box.backlog == 0


def test_packet_ids_skip_those_in_flight() -> None:
    box = Outbox(max_inflight=3, max_queued=0)
    box.attach(lambda _: None)
    topic = codec.encode_topic("t")
    for _ in range(65535 + 2):
        assert box.push(topic, b"", 1)
        pid = next(reversed(box.inflight))
        if len(box.inflight) == 3:
            box.puback(next(iter(box.inflight)))
        assert 1 <= pid <= 65535


# --- the publish rate ------------------------------------------------------------------------
def test_token_bucket_allows_a_seconds_worth_then_the_rate() -> None:
    """A fresh bucket lets ``rate`` publishes through at once; each further one owes 1/rate s
    more, waits add up while the flood lasts, and a quiet second refills it (never beyond)."""
    bucket = TokenBucket(10, now=0.0)
    assert [bucket.take(0.0) for _ in range(10)] == [0.0] * 10
    assert bucket.take(0.0) == pytest.approx(0.1)
    assert bucket.take(0.0) == pytest.approx(0.2)
    assert bucket.take(0.3) == pytest.approx(0.0)  # the owed tokens arrived: due at once
    assert bucket.take(100.0) == 0.0  # a long pause refills to one second's worth only
    assert [bucket.take(100.0) for _ in range(9)] == [0.0] * 9
    assert bucket.take(100.0) > 0


def test_token_bucket_below_one_a_second_keeps_one_token() -> None:
    """A rate under 1/s still lets one publish through after a quiet period."""
    bucket = TokenBucket(0.5, now=0.0)
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == pytest.approx(2.0)
    assert bucket.take(10.0) == 0.0
