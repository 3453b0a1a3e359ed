"""The embedded broker under attack and misuse: refused and clean connection floods leave
nothing behind, client ids belong to one identity, keepalive is enforced, a device whose
connection ends is offline, a stalled subscriber cannot make the broker buffer without
bound, and hostile strings never reach the log as more than one escaped line.

Raw sockets stand in for attackers and broken clients (they do what no library would);
paho stands in for well-behaved devices and integrations."""

from __future__ import annotations

import json
import logging
import re
import struct
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.accounts import User, integration_token, register
from support.checks import NEGATIVE_WAIT_S, wait_until
from support.devices import claimed_device, online_device
from support.hubs import RunningHub, spawned_hub
from support.mqtt import MqttClient, MqttDevice
from support.rawmqtt import Raw, connect_packet


def sessions(hub: RunningHub) -> dict[str, float]:
    """The broker's session gauge from ``/metrics``."""
    text = httpx.get(hub.base + "/metrics", timeout=10).text
    found = re.findall(r'^hexa_mqtt_sessions\{state="(\w+)"\} ([\d.e+]+)$', text, re.M)
    return {state: float(n) for state, n in found}


def command(hub: RunningHub, user: User, device_id: str, state: bool = True) -> httpx.Response:
    with hub.api(user.access_token) as c:
        return c.post(f"/devices/{device_id}/relays/0", json={"state": state})


def online(hub: RunningHub, user: User, device_id: str) -> bool:
    with hub.api(user.access_token) as c:
        return bool(c.get(f"/devices/{device_id}").json()["online"])


class Captured(logging.Handler):
    """Log records of the in-process hub's broker, for one test."""

    def __init__(self, *names: str) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.loggers = [logging.getLogger(n) for n in names]

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> Captured:
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.addHandler(self)
            if lg.name != "root":
                lg.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        for lg, level in zip(self.loggers, self.levels, strict=True):
            lg.removeHandler(self)
            lg.setLevel(level)

    def mentioning(self, text: str) -> list[str]:
        return [r.getMessage() for r in self.records if text in r.getMessage()]


# --- 1, 2: refused and clean connections leave nothing ------------------------------------
def test_refused_and_clean_connects_leave_no_session(hub: RunningHub, raws: Any) -> None:
    """Refused CONNECTs store nothing and clean sessions are gone when they end."""
    user = register(hub)
    it = integration_token(hub, user)
    before = sessions(hub)
    for i in range(200):
        r = raws(Raw(hub))
        assert r.connect(f"nobody-{uuid.uuid4().hex}", "nobody", "wrong") == 5, i
        r.close()
    for i in range(200):
        r = raws(Raw(hub))
        assert r.connect(f"clean-{uuid.uuid4().hex}", it["name"], it["token"]) == 0, i
        r.disconnect()
    settled = wait_until(lambda: all(n <= before[state] for state, n in sessions(hub).items()), 5)
    assert settled, (before, sessions(hub))


def test_refused_connect_does_not_lock_the_client_id(hub: RunningHub, raws: Any) -> None:
    """A refused CONNECT under a device's client id does not keep the device out."""
    user = register(hub)
    p, dev = claimed_device(hub, user)
    uid = p["device_uid"]
    squatter = raws(Raw(hub))
    assert squatter.connect(f"sim-{uid}", uid, "not-the-token") == 5
    squatter.close()
    m = MqttDevice(hub, uid, p["device_token"], client_id=f"sim-{uid}")
    try:
        assert m.ok(), m.rc
        assert wait_until(lambda: online(hub, user, dev["id"]), 5)
        r = command(hub, user, dev["id"])
        assert r.status_code == 200, r.text
    finally:
        m.close()


#: measured connect cycles of the memory test: in full on SQLite; fewer on PostgreSQL (the
#: same broker, another driver behind the same lookups), where amqtt's old cost (~62 KB a
#: cycle) would still be 186 MB against the 40 MB bound
FLOOD_CYCLES = {"sqlite": 10_000, "postgres": 3_000}


@pytest.mark.timeout(300)
def test_memory_flat_under_connect_floods(tmp_path: Path, db_kind: str) -> None:
    """10 000 refused and 10 000 clean connect/disconnect cycles (3 000 of each on
    PostgreSQL) do not grow the hub."""
    import psutil

    with spawned_hub(db_kind, tmp_path) as h:
        user = register(h)
        it = integration_token(h, user)
        proc = psutil.Process(h.proc.pid)

        def cycles(n: int) -> None:
            for _ in range(n):
                r = Raw(h)
                try:
                    assert r.connect(f"x-{uuid.uuid4().hex}", "nobody", "wrong") == 5
                finally:
                    r.close()
                r = Raw(h)
                try:
                    assert r.connect(f"c-{uuid.uuid4().hex}", it["name"], it["token"]) == 0
                    r.disconnect()
                finally:
                    r.close()

        cycles(1000)  # warm-up: caches, allocator arenas
        base = proc.memory_info().rss
        cycles(FLOOD_CYCLES[db_kind])
        assert wait_until(lambda: sessions(h).get("connected") == 0, 10), sessions(h)
        grown = proc.memory_info().rss - base
        # amqtt kept ~35 KB per refused and ~27 KB per clean client id: 620 MB here
        assert grown < 40 * 1024 * 1024, f"hub grew by {grown / 1e6:.1f} MB"
        assert sessions(h) == {"connected": 0.0, "persisted": 0.0}, sessions(h)


def test_persistent_sessions_expire(tmp_path: Path, db_kind: str) -> None:
    """A persistent session whose client stays away past HEXA_MQTT_SESSION_EXPIRY_S is gone:
    the client comes back to a fresh session (CONNACK session present = 0)."""
    with spawned_hub(db_kind, tmp_path, mqtt_session_expiry_s="1") as h:
        user = register(h)
        it = integration_token(h, user)
        cid = f"expire-{uuid.uuid4().hex[:8]}"
        r = Raw(h)
        assert r.connect(cid, it["name"], it["token"], clean=False) == 0
        r.close()
        assert wait_until(lambda: sessions(h).get("persisted") == 1, 5), sessions(h)
        assert wait_until(lambda: sessions(h).get("persisted") == 0, 10), sessions(h)
        back = Raw(h)
        back.sock.sendall(connect_packet(cid, it["name"], it["token"], clean=False))
        packet = back.read_packet()
        assert packet is not None and packet[1] == b"\x00\x00", packet  # no session present
        back.close()


# --- 3: client ids belong to one identity --------------------------------------------------
def test_persistent_session_queue_never_crosses_identities(hub: RunningHub, raws: Any) -> None:
    """Another org's client reusing a persistent client id is refused and gets nothing of its
    queue; the owner reconnects and gets its queued messages."""
    owner, stranger = register(hub), register(hub)
    mine, theirs = integration_token(hub, owner), integration_token(hub, stranger)
    _dev, m = online_device(hub, owner)
    cid = f"persist-{uuid.uuid4().hex[:8]}"
    a = raws(Raw(hub))
    assert a.connect(cid, mine["name"], mine["token"], clean=False) == 0
    assert a.subscribe(f"hexa/{m.uid}/report", 1) == 1
    a.close()  # away: the session keeps QoS 1 messages for it
    try:
        m.report()
        thief = raws(Raw(hub))
        assert thief.connect(cid, theirs["name"], theirs["token"], clean=False) == 2
        assert thief.read_packet(NEGATIVE_WAIT_S) is None
        back = raws(Raw(hub))
        assert back.connect(cid, mine["name"], mine["token"], clean=False) == 0
        packet = back.read_packet(5)
        assert packet is not None and packet[0] >> 4 == 3, packet
        assert f"hexa/{m.uid}/report".encode() in packet[1]
    finally:
        m.close()


def test_live_session_is_not_taken_over_by_another_device(hub: RunningHub, raws: Any) -> None:
    """A device reusing another device's live (non-reserved) client id is refused; the owner
    keeps working."""
    user = register(hub)
    dev, m = online_device(hub, user, client_id=f"shared-{uuid.uuid4().hex[:8]}")
    try:
        other, _ = claimed_device(hub, user)
        thief = raws(Raw(hub))
        assert (
            thief.connect(m.c._client_id.decode(), other["device_uid"], other["device_token"]) == 2
        )
        assert command(hub, user, dev["id"]).status_code == 200
        assert not m.disconnected.is_set()
    finally:
        m.close()


def test_racing_reconnects_leave_one_connection_that_revocation_closes(
    hub: RunningHub, raws: Any
) -> None:
    """Several CONNECTs racing for one live client id end with one connection, and a token
    rotation closes it: no connection survives unregistered."""
    user = register(hub)
    p, dev = claimed_device(hub, user)
    uid, token, cid = p["device_uid"], p["device_token"], f"dev-{p['device_uid']}"
    first = raws(Raw(hub))
    assert first.connect(cid, uid, token) == 0
    racers = [raws(Raw(hub)) for _ in range(5)]
    for r in racers:
        r.sock.sendall(connect_packet(cid, uid, token))
    for r in racers:
        assert r.read_packet() is not None, "no CONNACK"
    everyone = [first, *racers]
    closed = [r for r in everyone if r.closed_by_peer(1.0)]
    assert len(closed) == len(everyone) - 1, len(closed)
    with hub.api(user.access_token) as c:
        assert c.post(f"/devices/{dev['id']}/token/rotate").status_code == 200
    survivor = next(r for r in everyone if r not in closed)
    assert survivor.closed_by_peer(5), "a connection outlived its revoked token"


def test_client_ids_naming_a_device_are_reserved(hub: RunningHub, raws: Any) -> None:
    """Only a device may use a client id that ends in its uid, even while it is offline."""
    user = register(hub)
    p, _dev = claimed_device(hub, user)
    other, _ = claimed_device(hub, user)
    it = integration_token(hub, user)
    uid = p["device_uid"]
    for who in ((it["name"], it["token"]), (other["device_uid"], other["device_token"])):
        for cid in (uid, f"sim-{uid}", f"dev-{uid}"):
            r = raws(Raw(hub))
            assert r.connect(cid, *who) == 2, (who[0], cid)
            r.close()
    m = MqttDevice(hub, uid, p["device_token"], client_id=f"sim-{uid}")
    try:
        assert m.ok(), m.rc
    finally:
        m.close()


def test_sessions_per_identity_are_limited(hub: RunningHub, raws: Any) -> None:
    """An identity holds at most HEXA_MQTT_MAX_SESSIONS_PER_IDENTITY sessions at once."""
    user = register(hub)
    it = integration_token(hub, user)
    limit = hub.settings.mqtt_max_sessions_per_identity
    live = [raws(Raw(hub)) for _ in range(limit)]
    for i, r in enumerate(live):
        assert r.connect(f"many-{i}-{uuid.uuid4().hex[:6]}", it["name"], it["token"]) == 0
    extra = raws(Raw(hub))
    assert extra.connect(f"many-x-{uuid.uuid4().hex[:6]}", it["name"], it["token"]) == 2
    live[0].disconnect()
    wait_until(lambda: False, NEGATIVE_WAIT_S)
    again = raws(Raw(hub))
    assert again.connect(f"many-y-{uuid.uuid4().hex[:6]}", it["name"], it["token"]) == 0


# --- 4: keepalive and presence -------------------------------------------------------------
def test_silent_device_is_dropped_and_its_will_published(hub: RunningHub, raws: Any) -> None:
    """A device silent for 1.5 x keepalive is disconnected, its will published and commands
    to it answered 503 at once."""
    user = register(hub)
    p, dev = claimed_device(hub, user)
    uid = p["device_uid"]
    r = raws(Raw(hub))
    will = (f"hexa/{uid}/availability", b"offline", True)
    assert r.connect(f"dev-{uid}", uid, p["device_token"], keepalive=1, will=will) == 0
    r.publish(f"hexa/{uid}/availability", b"online", qos=0)
    assert wait_until(lambda: online(hub, user, dev["id"]), 5)
    assert r.closed_by_peer(8), "the broker kept a silent client"
    assert wait_until(lambda: not online(hub, user, dev["id"]), 5)
    res = command(hub, user, dev["id"])
    assert res.status_code == 503 and res.json()["code"] == "device_offline", res.text


def test_device_back_without_a_will_is_offline_again_after_disconnect(
    hub: RunningHub, raws: Any
) -> None:
    """A device whose will left a retained "offline", back without a will and saying "online"
    without retaining it, is offline again once it DISCONNECTs: the broker's presence is not
    fooled by the stale retained value."""
    user = register(hub)
    p, dev = claimed_device(hub, user)
    uid, token = p["device_uid"], p["device_token"]
    r = raws(Raw(hub))
    will = (f"hexa/{uid}/availability", b"offline", True)
    assert r.connect(f"dev-{uid}", uid, token, will=will) == 0
    r.publish(f"hexa/{uid}/availability", b"online", qos=0)
    assert wait_until(lambda: online(hub, user, dev["id"]), 5)
    r.close()  # the will: a retained "offline"
    assert wait_until(lambda: not online(hub, user, dev["id"]), 5)
    again = raws(Raw(hub))
    assert again.connect(f"dev-{uid}", uid, token) == 0
    again.publish(f"hexa/{uid}/availability", b"online", qos=0)
    assert wait_until(lambda: online(hub, user, dev["id"]), 5)
    again.disconnect()
    assert wait_until(lambda: not online(hub, user, dev["id"]), 5)


def test_device_without_will_is_offline_after_disconnect(hub: RunningHub, raws: Any) -> None:
    """A device that set no will, or left with DISCONNECT, is offline once its session ends."""
    user = register(hub)
    for how in ("disconnect", "drop"):
        p, dev = claimed_device(hub, user)
        uid = p["device_uid"]
        r = raws(Raw(hub))
        assert r.connect(f"dev-{uid}", uid, p["device_token"]) == 0
        r.publish(f"hexa/{uid}/availability", b"online", qos=0)
        assert wait_until(lambda d=dev: online(hub, user, d["id"]), 5), how
        if how == "disconnect":
            r.disconnect()
        else:
            r.close()
        assert wait_until(lambda d=dev: not online(hub, user, d["id"]), 5), how
        assert command(hub, user, dev["id"]).status_code == 503, how


def test_silence_within_keepalive_keeps_the_session(hub: RunningHub, raws: Any) -> None:
    """A client that pings within its keepalive stays connected."""
    user = register(hub)
    it = integration_token(hub, user)
    r = raws(Raw(hub))
    assert r.connect(f"ping-{uuid.uuid4().hex[:8]}", it["name"], it["token"], keepalive=1) == 0
    for _ in range(6):
        time.sleep(0.5)
        r.sock.sendall(b"\xc0\x00")  # PINGREQ
        packet = r.read_packet(2)
        assert packet is not None and packet[0] >> 4 == 13, packet


def test_client_that_stops_pinging_is_dropped_and_others_kept(hub: RunningHub, raws: Any) -> None:
    """A client that kept pinging, then falls silent, is disconnected within its limit,
    while one that goes on pinging stays: the keepalive watch looks at a connection again
    where its limit moved to, not once and never again."""
    user = register(hub)
    it = integration_token(hub, user)
    stops = raws(Raw(hub))
    goes_on = raws(Raw(hub))
    for r in (stops, goes_on):
        assert r.connect(f"ka-{uuid.uuid4().hex[:8]}", it["name"], it["token"], keepalive=1) == 0
    for _ in range(5):  # 2.5 s: past the first limit of each, 1.5 s after connecting
        time.sleep(0.5)
        for r in (stops, goes_on):
            r.sock.sendall(b"\xc0\x00")  # PINGREQ
            packet = r.read_packet(2)
            assert packet is not None and packet[0] >> 4 == 13, packet
    silent_since = time.monotonic()
    while time.monotonic() - silent_since < 3:
        time.sleep(0.5)
        goes_on.sock.sendall(b"\xc0\x00")
        assert goes_on.read_packet(2) is not None, "a client that pings was disconnected"
    assert stops.closed_by_peer(6), "the broker kept a client that stopped pinging"


# --- 6: a stalled subscriber ------------------------------------------------------------
@pytest.mark.timeout(180)
def test_stalled_subscriber_is_disconnected_and_others_unaffected(
    hub: RunningHub, raws: Any
) -> None:
    """A QoS 1 subscriber that neither reads nor acks is disconnected after a bounded backlog,
    with one log line, and other devices' commands keep working."""
    user = register(hub)
    it = integration_token(hub, user)
    _dev, m = online_device(hub, user)
    other_dev, other = online_device(hub, user)
    cid = f"stall-{uuid.uuid4().hex[:8]}"
    stalled = raws(Raw(hub, rcvbuf=4096))
    assert stalled.connect(cid, it["name"], it["token"], keepalive=0) == 0
    assert stalled.subscribe(f"hexa/{m.uid}/#", 1) == 1
    limit = hub.settings.mqtt_max_queued_messages
    try:
        with Captured("hexa.broker", "amqtt") as logs:
            payload = json.dumps({"relays": [False] * 3, "inputs": [False] * 3, "pad": "x" * 200})
            for _ in range(limit + 200):
                m.c.publish(f"hexa/{m.uid}/report", payload, qos=1)
            assert stalled.closed_by_peer(30), "the stalled subscriber was never disconnected"
            r = command(hub, user, other_dev["id"])
            assert r.status_code == 200, r.text
        lines = logs.mentioning(cid)
        assert len(lines) == 1, lines
        assert not [r for r in logs.records if r.exc_info], "a traceback was logged"
    finally:
        m.close()
        other.close()


def test_hostile_username_and_topic_are_logged_as_one_escaped_line(
    tmp_path: Path, db_kind: str
) -> None:
    """In the log of `hexa serve`, newlines in a user name or topic never make a second line,
    a 64 KB user name is cut, and a refused login is logged once."""
    log = tmp_path / "hub.log"
    marker = uuid.uuid4().hex
    with spawned_hub(db_kind, tmp_path, log=log, log_level="INFO") as h:
        user = register(h)
        it = integration_token(h, user)
        r = Raw(h)
        huge = f"{marker}\nFORGED ERROR line\r\n" + "u" * 65000
        assert r.connect(f"h-{marker}", huge, "wrong") == 5
        r.close()
        ok = Raw(h)
        assert ok.connect(f"t-{marker}", it["name"], it["token"]) == 0
        ok.publish(f"hexa/{marker}\nFORGED/relay/0/set", b"ON", qos=0)
        ok.publish(f"evil/{marker}\n2026-01-01 FORGED", b"x", qos=0)
        assert wait_until(lambda: log.read_text().count(marker) >= 3, 10), log.read_text()
        ok.close()
    lines = log.read_text().splitlines()
    assert not [line for line in lines if line.startswith("FORGED")], "a forged line"
    assert not [line for line in lines if "FORGED" in line and marker not in line]
    assert len([line for line in lines if "FORGED ERROR" in line]) == 1, "logged twice"
    assert max(len(line) for line in lines) < 2200


def test_deeply_nested_intent_is_rejected_without_traceback(hub: RunningHub) -> None:
    """An intent nested 20 000 levels deep gets a ``rejected`` result, not a traceback."""
    user = register(hub)
    dev, m = online_device(hub, user)
    it = integration_token(hub, user)
    integ = MqttClient(hub, it["name"], it["token"])
    try:
        assert integ.ok() and integ.subscribe(f"hexa/{m.uid}/result")
        with Captured("hexa", "") as logs:
            integ.publish(f"hexa/{m.uid}/relay/0/set", "[" * 20000 + "]" * 20000)
            found = integ.wait_for(lambda t, p, r: b'"rejected"' in p, 5)
        assert found, "no result for the nested intent"
        assert not [r for r in logs.records if r.exc_info], "a traceback was logged"
        assert command(hub, user, dev["id"]).status_code == 200
    finally:
        integ.close()
        m.close()


# --- delivery QoS ----------------------------------------------------------------------
def test_delivered_qos_is_the_lower_of_published_and_granted(hub: RunningHub, raws: Any) -> None:
    """A QoS 0 publish reaches a QoS 1 subscriber as QoS 0, a QoS 1 one as QoS 1
    (MQTT-3.8.4); the hub still ingests both."""
    user = register(hub)
    p, dev = claimed_device(hub, user)
    uid = p["device_uid"]
    it = integration_token(hub, user)
    watcher = raws(Raw(hub))
    assert watcher.connect(f"w-{uuid.uuid4().hex[:8]}", it["name"], it["token"]) == 0
    assert watcher.subscribe(f"hexa/{uid}/report", 1) == 1
    device = raws(Raw(hub))
    assert device.connect(f"dev-{uid}", uid, p["device_token"]) == 0
    seen: list[int] = []
    for qos in (0, 1):
        body = json.dumps({"relays": [bool(qos), False, False], "inputs": [False] * 3})
        device.publish(f"hexa/{uid}/report", body.encode(), qos=qos)
        while True:
            packet = watcher.read_packet(5)
            assert packet is not None, f"no delivery of the QoS {qos} report"
            if packet[0] >> 4 == 3:
                break
        delivered = (packet[0] >> 1) & 0x03
        seen.append(delivered)
        if delivered:  # acknowledge it, as a client must
            packet_id = packet[1][2 + struct.unpack("!H", packet[1][:2])[0] :][:2]
            watcher.sock.sendall(b"\x40\x02" + packet_id)
    assert seen == [0, 1]
    with hub.api(user.access_token) as c:
        relays = lambda: c.get(f"/devices/{dev['id']}/state").json()["relays"]  # noqa: E731
        assert wait_until(lambda: relays() == [True, False, False], 5), relays()
