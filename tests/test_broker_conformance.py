"""MQTT 3.1.1 behaviours of the embedded broker, each checked with a real client against a
real hub: the will on protocol errors, ``$`` topics, redelivery of unacknowledged messages
to a persistent session, exactly-once QoS 2 ingress, overlapping subscriptions, and
malformed packets of every kind (refused, and nobody else disturbed).

These are the behaviours the Eclipse Paho interoperability suite checks, in the hub's own
terms (authenticated clients, the hub's ACLs)."""

from __future__ import annotations

import contextlib
import json
import signal
import struct
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.accounts import User, integration_token, register
from support.checks import NEGATIVE_WAIT_S
from support.devices import claimed_device, online_device
from support.hubs import RunningHub, spawned_hub
from support.rawmqtt import Raw, build, connect_packet, mqtt_str


def _cid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _integration(hub: RunningHub, raws: Any, user: User, **kw: Any) -> tuple[Raw, dict[str, Any]]:
    it = integration_token(hub, user)
    r = raws(Raw(hub))
    assert r.connect(kw.pop("client_id", _cid("int")), it["name"], it["token"], **kw) == 0
    return r, it


def _metric(hub: RunningHub, name: str) -> float:
    text = httpx.get(hub.base + "/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def _command_ok(hub: RunningHub, user: User, device_id: str) -> None:
    with hub.api(user.access_token) as c:
        r = c.post(f"/devices/{device_id}/relays/0", json={"state": True})
    assert r.status_code == 200, r.text


# --- the will ------------------------------------------------------------------------------
def test_protocol_error_publishes_the_will(hub: RunningHub, raws: Any) -> None:
    """A client closed for breaking the protocol (a wildcard in a PUBLISH topic) has its will
    published (MQTT-3.1.2-8); one that sends DISCONNECT has not (MQTT-3.14.4-3)."""
    user = register(hub)
    watcher, _ = _integration(hub, raws, user)
    assert watcher.subscribe("homeassistant/status", 1) == 1
    will = f"will-{uuid.uuid4().hex[:6]}".encode()
    broken, _ = _integration(hub, raws, user, will=("homeassistant/status", will, False))
    broken.publish("hexa/+/report", b"{}", qos=1)
    assert broken.closed_by_peer(5)
    got = watcher.read_publish(5)
    assert got is not None and got.payload == will, got

    polite, _ = _integration(hub, raws, user, will=("homeassistant/status", b"not-this", False))
    polite.disconnect()
    assert watcher.read_publish(NEGATIVE_WAIT_S) is None


def test_dollar_topic_publish_is_refused_without_closing(hub: RunningHub, raws: Any) -> None:
    """A publish to a ``$`` topic is acknowledged and dropped by the ACL; the client stays
    connected and its will is not published (amqtt closed it, silently, without the will)."""
    user = register(hub)
    watcher, _ = _integration(hub, raws, user)
    assert watcher.subscribe("homeassistant/status", 1) == 1
    client, _ = _integration(hub, raws, user, will=("homeassistant/status", b"gone", False))
    client.publish("$SYS/broker/uptime", b"1", qos=1)
    packet = client.read_packet(5)
    assert packet is not None and packet[0] >> 4 == 4, packet  # PUBACK
    assert client.alive()
    assert watcher.read_publish(NEGATIVE_WAIT_S) is None


def test_dollar_topics_are_not_matched_by_leading_wildcards(hub: RunningHub, raws: Any) -> None:
    """``#`` and ``+/…`` never match ``$`` topics (MQTT-4.7.2-1): the hub's retained
    ``hexa/hub/status`` reaches a ``#`` subscriber, nothing beginning with ``$`` does."""
    user = register(hub)
    r, _ = _integration(hub, raws, user)
    assert r.subscribe("#", 0) == 0x80  # outside what an integration may subscribe to
    assert r.subscribe("hexa/#", 1) == 1
    got = r.read_publish(5)
    assert got is not None and got.topic == "hexa/hub/status" and got.retain, got


# --- persistent sessions: redelivery -------------------------------------------------------
def test_unacknowledged_deliveries_are_resent_on_reconnect(hub: RunningHub, raws: Any) -> None:
    """QoS 1 deliveries a persistent session did not acknowledge are sent again, DUP set and
    with their packet ids, when it reconnects (MQTT-4.4.0-1), before what was queued while it
    was away; once acknowledged they are never sent again."""
    user = register(hub)
    _dev, m = online_device(hub, user)
    cid = _cid("redeliver")
    it = integration_token(hub, user)
    a = raws(Raw(hub))
    assert a.connect(cid, it["name"], it["token"], clean=False) == 0
    assert a.subscribe(f"hexa/{m.uid}/report", 1) == 1
    try:
        for i in range(3):
            m.publish(f"hexa/{m.uid}/report", json.dumps({"relays": [bool(i)] * 3}))
        first = [a.read_publish(5) for _ in range(3)]
        assert all(p is not None and p.qos == 1 and not p.dup for p in first), first
        a.close()  # gone without acknowledging
        m.publish(f"hexa/{m.uid}/report", json.dumps({"relays": [True, False, True]}))

        b = raws(Raw(hub))
        b.sock.sendall(connect_packet(cid, it["name"], it["token"], clean=False))
        connack = b.read_packet()
        assert connack is not None and connack[1] == b"\x01\x00", connack  # session present
        again = [b.read_publish(5) for _ in range(4)]
        assert all(p is not None for p in again), again
        assert [(p.packet_id, p.dup, p.payload) for p in again[:3]] == [  # type: ignore[union-attr]
            (p.packet_id, True, p.payload)  # type: ignore[union-attr]
            for p in first
        ]
        assert again[3] is not None and not again[3].dup
        assert b"[true, false, true]" in again[3].payload
        for p in again:
            assert p is not None and p.packet_id is not None
            b.puback(p.packet_id)
        assert b.alive()
        b.close()

        c = raws(Raw(hub))
        assert c.connect(cid, it["name"], it["token"], clean=False) == 0
        assert c.read_publish(NEGATIVE_WAIT_S) is None
    finally:
        m.close()


# --- QoS 2 ---------------------------------------------------------------------------------
def test_qos2_publish_resent_before_pubrel_is_routed_once(hub: RunningHub, raws: Any) -> None:
    """A QoS 2 PUBLISH sent again (DUP) before its PUBREL reaches subscribers once
    (MQTT-4.3.3); PUBREL is answered with PUBCOMP."""
    user = register(hub)
    _dev, m = online_device(hub, user)
    try:
        watcher, _ = _integration(hub, raws, user)
        assert watcher.subscribe(f"hexa/{m.uid}/relay/+/set", 2) == 2
        sender, _ = _integration(hub, raws, user)
        topic = f"hexa/{m.uid}/relay/2/set"
        body = mqtt_str(topic) + struct.pack("!H", 7) + b'{"state": "ON", "intent_id": "q2"}'
        sender.sock.sendall(build(0x34, body))
        sender.sock.sendall(build(0x3C, body))  # the same packet id again, DUP
        kinds = [sender.read_packet(5) for _ in range(2)]
        assert [k[0] >> 4 for k in kinds if k is not None] == [5, 5], kinds  # PUBREC twice
        sender.sock.sendall(b"\x62\x02\x00\x07")  # PUBREL
        comp = sender.read_packet(5)
        assert comp is not None and comp[0] >> 4 == 7, comp
        got = watcher.read_publish(5)
        assert got is not None and got.topic == topic, got
        assert watcher.read_publish(NEGATIVE_WAIT_S) is None
    finally:
        m.close()


# --- overlapping subscriptions -------------------------------------------------------------
def test_overlapping_subscriptions_deliver_once_at_the_highest_qos(
    hub: RunningHub, raws: Any
) -> None:
    """A client whose filters overlap gets one copy, at the highest granted QoS
    (MQTT-3.3.5-1)."""
    user = register(hub)
    _dev, m = online_device(hub, user)
    try:
        r, _ = _integration(hub, raws, user)
        assert r.subscribe(f"hexa/{m.uid}/#", 0) == 0
        assert r.subscribe(f"hexa/{m.uid}/report", 1) == 1
        while r.read_publish(1) is not None:  # the device's retained topics
            pass
        m.publish(f"hexa/{m.uid}/report", json.dumps({"relays": [False] * 3}))
        got = r.read_publish(5)
        assert got is not None and got.topic.endswith("/report") and got.qos == 1, got
        assert r.read_publish(NEGATIVE_WAIT_S) is None
    finally:
        m.close()


# --- malformed packets ---------------------------------------------------------------------
def _connected(hub: RunningHub, user: User) -> Raw:
    it = integration_token(hub, user)
    r = Raw(hub)
    assert r.connect(_cid("bad"), it["name"], it["token"]) == 0
    return r


MALFORMED_AFTER_CONNECT = {
    "remaining length over 4 bytes": b"\x30\xff\xff\xff\xff\x01",
    "QoS 3": build(0x36, mqtt_str("hexa/x/report") + b"\x00\x01{}"),
    "wildcard in topic": build(0x30, mqtt_str("hexa/#") + b"{}"),
    "zero-length topic": build(0x30, mqtt_str("") + b"{}"),
    "invalid UTF-8 topic": build(0x30, mqtt_str(b"hexa/\xff\xfe") + b"{}"),
    "U+0000 in topic": build(0x30, mqtt_str("hexa/\x00/report") + b"{}"),
    "second CONNECT": connect_packet("again", "x", "y"),
    "SUBSCRIBE with bad flags": build(0x80, b"\x00\x01" + mqtt_str("hexa/#") + b"\x01"),
    "SUBSCRIBE with QoS 3": build(0x82, b"\x00\x01" + mqtt_str("hexa/#") + b"\x03"),
    "SUBSCRIBE without a filter": build(0x82, b"\x00\x01"),
    "packet id 0": build(0x32, mqtt_str("hexa/x/report") + b"\x00\x00{}"),
    "reserved packet type": b"\xf0\x00",
    "server-to-client packet (CONNACK)": b"\x20\x02\x00\x00",
}

MALFORMED_CONNECT = {
    "packet before CONNECT": build(0x30, mqtt_str("hexa/x/report") + b"{}"),
    "wrong protocol name": build(0x10, mqtt_str("MQIsdpX") + b"\x04\x02\x00\x1e" + mqtt_str("c")),
    "truncated CONNECT": b"\x10\x20\x00\x04MQTT\x04",
}


@pytest.mark.parametrize("case", sorted(MALFORMED_AFTER_CONNECT))
def test_malformed_packet_closes_only_its_connection(hub: RunningHub, raws: Any, case: str) -> None:
    """Each malformed packet closes the connection that sent it (counted); others carry on."""
    user = register(hub)
    errors_before = _metric(hub, "hexa_mqtt_protocol_errors_total")
    bystander = raws(_connected(hub, user))
    bad = raws(_connected(hub, user))
    bad.sock.sendall(MALFORMED_AFTER_CONNECT[case])
    assert bad.closed_by_peer(5), case
    assert bystander.alive()
    assert _metric(hub, "hexa_mqtt_protocol_errors_total") > errors_before


@pytest.mark.parametrize("case", sorted(MALFORMED_CONNECT))
def test_malformed_connect_is_refused(hub: RunningHub, raws: Any, case: str) -> None:
    """A CONNECT that is not one (or a packet before it) is refused and the connection
    closed, within the CONNECT deadline."""
    bad = raws(Raw(hub))
    bad.sock.sendall(MALFORMED_CONNECT[case])
    if case == "truncated CONNECT":
        bad.sock.shutdown(1)  # no more bytes will come
    assert bad.closed_by_peer(12), case


def test_wrong_protocol_level_is_answered_with_connack_1(hub: RunningHub, raws: Any) -> None:
    """MQTT 3.1 (level 3) or 5 (level 5) CONNECTs get CONNACK 1 (MQTT-3.1.2-2)."""
    for level in (3, 5):
        bad = raws(Raw(hub))
        body = mqtt_str("MQTT") + bytes([level, 2]) + b"\x00\x1e" + mqtt_str(_cid("lvl"))
        bad.sock.sendall(build(0x10, body))
        packet = bad.read_packet(5)
        assert packet is not None and packet[0] >> 4 == 2 and packet[1][1] == 1, packet


def test_hub_serves_on_after_malformed_floods(hub: RunningHub, raws: Any) -> None:
    """After a burst of every malformed packet from many connections, devices still get
    commands."""
    user = register(hub)
    dev, m = online_device(hub, user)
    try:
        for _ in range(5):
            for data in MALFORMED_AFTER_CONNECT.values():
                bad = _connected(hub, user)
                bad.sock.sendall(data)
                bad.close()
            for data in MALFORMED_CONNECT.values():
                bad = Raw(hub)
                bad.sock.sendall(data)
                bad.close()
        _command_ok(hub, user, dev["id"])
        assert httpx.get(hub.base + "/healthz", timeout=10).status_code == 200
    finally:
        m.close()


# --- load: slow subscribers, floods, SIGTERM -----------------------------------------------
@pytest.mark.timeout(120)
def test_slow_subscriber_that_keeps_acknowledging_paces_publishers(
    tmp_path: Path, db_kind: str, raws: Any
) -> None:
    """A QoS 1 subscriber slower than the publisher, but acknowledging, gets every message
    and stays connected: the publisher is paced to it instead of filling its queue. (The
    device's own publish rate is lifted so that it can outrun the subscriber.)"""
    with spawned_hub(db_kind, tmp_path, mqtt_device_publish_rate="0") as hub:
        _slow_subscriber_paces_publisher(hub, raws)


def _slow_subscriber_paces_publisher(hub: RunningHub, raws: Any) -> None:
    user = register(hub)
    _dev, m = online_device(hub, user)
    slow_before = _metric(hub, "hexa_mqtt_slow_consumers_total")
    waits_before = _metric(hub, 'hexa_mqtt_publisher_waits_total{subscriber="client"}')
    try:
        sub, _ = _integration(hub, raws, user)
        assert sub.subscribe(f"hexa/{m.uid}/report", 1) == 1
        total = hub.settings.mqtt_max_queued_messages * 2
        payload = json.dumps({"relays": [False] * 3, "inputs": [False] * 3})
        infos = [m.c.publish(f"hexa/{m.uid}/report", payload, qos=1) for _ in range(total)]
        got = 0
        while got < total:
            publish = sub.read_publish(10)
            assert publish is not None, f"only {got} of {total} arrived"
            got += 1
            assert publish.packet_id is not None
            sub.puback(publish.packet_id)
            if got % 16 == 0:
                time.sleep(0.02)  # ~800 messages/s: slower than the device publishes
        for info in infos:
            info.wait_for_publish(10)
        assert sub.alive()
        assert _metric(hub, "hexa_mqtt_slow_consumers_total") == slow_before
        assert _metric(hub, 'hexa_mqtt_publisher_waits_total{subscriber="client"}') > waits_before
    finally:
        m.close()


@pytest.mark.timeout(120)
def test_a_device_over_its_publish_rate_is_slowed_and_loses_nothing(
    hub: RunningHub, raws: Any
) -> None:
    """A device that sends four times its rate (HEXA_MQTT_DEVICE_PUBLISH_RATE, 100/s) in one
    burst is read at its rate: every message arrives, in order, the throttle metric counts
    it, and the hub serves other devices' commands meanwhile."""
    user = register(hub)
    flooder, _ = claimed_device(hub, user)
    _other, m = online_device(hub, user)
    uid = flooder["device_uid"]
    before = _metric(hub, 'hexa_mqtt_publishes_throttled_total{kind="device"}')
    try:
        sub, _ = _integration(hub, raws, user)
        assert sub.subscribe(f"hexa/{uid}/report", 0) == 0
        r = raws(Raw(hub))
        assert r.connect(_cid("flood"), uid, flooder["device_token"]) == 0
        total = 4 * int(hub.settings.mqtt_device_publish_rate)
        bodies = [json.dumps({"relays": [n % 2 == 0, False, False]}).encode() for n in range(total)]
        r.sock.sendall(b"".join(build(0x30, mqtt_str(f"hexa/{uid}/report") + b) for b in bodies))
        got = [sub.read_publish(10) for _ in range(total // 4)]
        _command_ok(hub, user, _other["id"])  # while the flooder is still being read
        got += [sub.read_publish(10) for _ in range(total - len(got))]
        assert [g.payload if g else None for g in got] == bodies
        assert r.alive()
        assert _metric(hub, 'hexa_mqtt_publishes_throttled_total{kind="device"}') > before
    finally:
        m.close()


@pytest.mark.timeout(120)
def test_sigterm_during_a_flood_stops_the_hub_within_5_s(tmp_path: Path, db_kind: str) -> None:
    """A hub whose broker is flooded by many connections stops within 5 s of SIGTERM (the
    devices' publish rate lifted, so that the flood reaches the hub)."""
    with spawned_hub(db_kind, tmp_path, mqtt_device_publish_rate="0") as h:
        user = register(h)
        p, _dev = claimed_device(h, user)
        uid, token = p["device_uid"], p["device_token"]
        stop = threading.Event()
        floods = []
        for i in range(8):
            r = Raw(h)
            assert r.connect(f"flood{i}-{uid}", uid, token, keepalive=0) == 0
            floods.append(r)
        burst = b"".join(
            build(0x30, mqtt_str(f"hexa/{uid}/report") + b'{"relays":[true,false,true]}')
            for _ in range(2000)
        )

        def flood(r: Raw) -> None:
            with contextlib.suppress(OSError):
                while not stop.is_set():
                    r.sock.sendall(burst)

        threads = [threading.Thread(target=flood, args=(r,), daemon=True) for r in floods]
        for t in threads:
            t.start()
        try:
            time.sleep(3)
            started = time.monotonic()
            h.proc.send_signal(signal.SIGTERM)
            h.proc.wait(30)
            took = time.monotonic() - started
        finally:
            stop.set()
            for r in floods:
                r.close()
        assert h.proc.returncode == 0, h.proc.returncode
        assert took < 5, f"SIGTERM took {took:.1f} s"
