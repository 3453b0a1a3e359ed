"""The embedded broker's authentication and topic ACL (contract.md §3), tried with real
paho clients: every rule gets a test that tries to break it, verified by a hub-side
observer (an integration subscribed to ``hexa/#``) and by the hub's own state."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from support.accounts import integration_token, register
from support.checks import NEGATIVE_WAIT_S, wait_until
from support.devices import claimed_device, online_device, state_of
from support.hubs import RunningHub
from support.mqtt import MqttClient, MqttDevice, integration_client, mentions, sync_on

C = TypeVar("C", bound=MqttClient)


def on_topic(topic: str) -> Callable[[str, bytes, bool], bool]:
    return lambda t, p, r: t == topic


# --- authentication ----------------------------------------------------------------------
def test_anonymous_refused(hub: RunningHub, track: Callable[[MqttClient], MqttClient]) -> None:
    """A client without credentials is refused at CONNECT."""
    anon = track(MqttClient(hub, None, None))
    assert anon.refused()


def test_wrong_device_token_refused(
    hub: RunningHub, track: Callable[[MqttClient], MqttClient]
) -> None:
    """A device uid with a wrong token (or a token of another device) is refused."""
    user = register(hub)
    p1, _ = claimed_device(hub, user)
    p2, _ = claimed_device(hub, user)
    bad = track(MqttClient(hub, p1["device_uid"], "not-the-token"))
    assert bad.refused()
    swapped = track(MqttClient(hub, p1["device_uid"], p2["device_token"]))
    assert swapped.refused()
    unknown = track(MqttClient(hub, "hx-doesnotexist", p1["device_token"]))
    assert unknown.refused()


def test_device_with_its_token_connects(
    hub: RunningHub, track: Callable[[MqttClient], MqttClient]
) -> None:
    """A device with its own uid and token connects and may subscribe to its own cmd."""
    user = register(hub)
    p, _ = claimed_device(hub, user)
    dev = track(MqttClient(hub, p["device_uid"], p["device_token"]))
    assert dev.ok()
    assert dev.subscribe(f"hexa/{p['device_uid']}/cmd")


def test_wrong_integration_token_refused(
    hub: RunningHub, track: Callable[[MqttClient], MqttClient]
) -> None:
    """An integration name with a wrong token is refused."""
    user = register(hub)
    name = integration_token(hub, user)["name"]
    bad = track(MqttClient(hub, name, "hxi_wrong"))
    assert bad.refused()


# --- device publish ACL ------------------------------------------------------------------
def test_device_cannot_publish_other_devices_report(hub: RunningHub, track: Any) -> None:
    """Device A's report on B's topic is not delivered and does not change B's state."""
    user = register(hub)
    _, a = online_device(hub, user, track)
    b_dev, b = online_device(hub, user, track)
    obs = integration_client(hub, user, track, "hexa/#")
    forged = json.dumps(
        {"relays": [True, True, True], "inputs": [True, True, True], "fw_version": "forged"}
    )
    a.publish(f"hexa/{b.uid}/report", forged)
    sync_on(a, obs)
    assert not obs.messages(lambda t, p, r: b"forged" in p)
    st = state_of(hub, user, b_dev["id"])
    assert st["relays"] == [False, False, False] and st["inputs"] == [False, False, False]
    with hub.api(user.access_token) as c:
        assert c.get(f"/devices/{b_dev['id']}").json()["fw_version"] != "forged"


def test_device_cannot_ack_other_devices_command(hub: RunningHub, track: Any) -> None:
    """Device A cannot complete B's pending command by acking on B's ack topic (→ 504)."""
    user = register(hub)
    _, a = online_device(hub, user, track)
    b_dev, b = online_device(hub, user, track, auto_ack=False)
    obs = integration_client(hub, user, track, "hexa/#")
    with ThreadPoolExecutor(1) as pool, hub.api(user.access_token) as c:
        fut = pool.submit(c.post, f"/devices/{b_dev['id']}/relays/0", json={"state": True})
        assert wait_until(lambda: b.commands, 5), "B never got its command"
        cid = b.commands[0]["command_id"]
        a.publish(
            f"hexa/{b.uid}/ack",
            json.dumps({"command_id": cid, "ok": True, "relays": [True, False, False]}),
        )
        r = fut.result(15)
    assert r.status_code == 504, r.text
    assert r.json()["code"] == "device_timeout"
    assert not obs.messages(lambda t, p, r: t == f"hexa/{b.uid}/ack")
    assert state_of(hub, user, b_dev["id"])["relays"] == [False, False, False]


def test_device_cannot_publish_other_devices_availability(hub: RunningHub, track: Any) -> None:
    """Device A's 'offline' on B's availability topic is not delivered and B stays online."""
    user = register(hub)
    _, a = online_device(hub, user, track)
    b_dev, b = online_device(hub, user, track)
    obs = integration_client(hub, user, track, "hexa/#")
    a.publish(f"hexa/{b.uid}/availability", "offline", retain=True)
    sync_on(a, obs)
    assert not obs.messages(lambda t, p, r: t == f"hexa/{b.uid}/availability" and p == b"offline")
    assert state_of(hub, user, b_dev["id"])["online"] is True
    # and nothing was retained for a later subscriber either
    late = integration_client(hub, user, track, f"hexa/{b.uid}/availability")
    assert late.wait_for(lambda t, p, r: r and p == b"online", 5), (
        "B's own retained 'online' missing"
    )
    assert not late.messages(lambda t, p, r: p == b"offline")


def test_device_cannot_publish_intents(hub: RunningHub, track: Any) -> None:
    """A device's intents (for another device or itself) are refused: no cmd, no state change."""
    user = register(hub)
    a_dev, a = online_device(hub, user, track)
    b_dev, b = online_device(hub, user, track)
    obs = integration_client(hub, user, track, "hexa/#")
    a.publish(f"hexa/{b.uid}/relay/0/set", "ON")
    a.publish(f"hexa/{b.uid}/relays/set", json.dumps({"state": "ON", "intent_id": "forged-all"}))
    a.publish(f"hexa/{a.uid}/relay/1/set", "ON")
    sync_on(a, obs)
    assert not obs.messages(lambda t, p, r: t.endswith("/set"))
    assert not obs.messages(lambda t, p, r: t.endswith("/cmd") or t.endswith("/result"))
    assert b.commands == [] and a.commands == []
    assert state_of(hub, user, b_dev["id"])["relays"] == [False, False, False]
    assert state_of(hub, user, a_dev["id"])["relays"] == [False, False, False]


def test_device_cannot_publish_hub_topics(hub: RunningHub, track: Any) -> None:
    """A device cannot forge its own retained state, a result, or the hub's status."""
    user = register(hub)
    _, a = online_device(hub, user, track)
    obs = integration_client(hub, user, track, "hexa/#")
    a.publish(f"hexa/{a.uid}/relay/0/state", "ON", retain=True)
    a.publish(
        f"hexa/{a.uid}/state",
        json.dumps(
            {"relays": [True] * 3, "inputs": [False] * 3, "online": True, "updated_at": "forged"}
        ),
        retain=True,
    )
    a.publish(
        f"hexa/{a.uid}/result", json.dumps({"intent_id": "forged", "ok": True, "status": "applied"})
    )
    a.publish("hexa/hub/status", "offline", retain=True)
    sync_on(a, obs)
    assert not obs.messages(
        lambda t, p, r: b"forged" in p or (t.endswith("/relay/0/state") and p == b"ON")
    )
    assert not obs.messages(lambda t, p, r: t == "hexa/hub/status" and p == b"offline")
    late = integration_client(hub, user, track, f"hexa/{a.uid}/relay/0/state", "hexa/hub/status")
    assert late.wait_for(lambda t, p, r: t == "hexa/hub/status" and p == b"online", 5)
    assert not late.messages(lambda t, p, r: t.endswith("/relay/0/state") and p == b"ON")


# --- device subscribe ACL ----------------------------------------------------------------
def test_device_subscribes_only_to_its_own_cmd(hub: RunningHub, track: Any) -> None:
    """SUBACK refuses a device hexa/#, #, another device's cmd and its own state; grants its cmd."""
    user = register(hub)
    pa, _ = claimed_device(hub, user)
    pb, _ = claimed_device(hub, user)
    a = track(MqttClient(hub, pa["device_uid"], pa["device_token"]))
    assert a.ok()
    assert not a.subscribe("hexa/#")
    assert not a.subscribe("#")
    assert not a.subscribe(f"hexa/{pb['device_uid']}/cmd")
    assert not a.subscribe("hexa/+/cmd")
    assert not a.subscribe(f"hexa/{pa['device_uid']}/state")
    assert not a.subscribe(f"hexa/{pa['device_uid']}/#")
    assert not a.subscribe("homeassistant/#")
    assert a.subscribe(f"hexa/{pa['device_uid']}/cmd")


def test_device_does_not_receive_other_devices_commands(hub: RunningHub, track: Any) -> None:
    """Commands to device B never reach device A, even after A tried to subscribe to them."""
    user = register(hub)
    _, a = online_device(hub, user, track)
    b_dev, _ = online_device(hub, user, track)
    a.subscribe(f"hexa/{b_dev['device_uid']}/cmd")
    a.subscribe("hexa/#")
    with hub.api(user.access_token) as c:
        assert c.post(f"/devices/{b_dev['id']}/relays/0", json={"state": True}).status_code == 200
    time.sleep(NEGATIVE_WAIT_S)  # nothing is expected to arrive
    assert not a.messages(lambda t, p, r: t != f"hexa/{a.uid}/cmd" and t != "hexa/hub/status")


# --- integrations ------------------------------------------------------------------------
def test_integration_sees_only_its_orgs_devices(hub: RunningHub, track: Any) -> None:
    """An integration on hexa/# and homeassistant/# gets its org's devices (live and retained)
    and hexa/hub/status, never another org's device."""
    u1, u2 = register(hub), register(hub)
    d1, m1 = online_device(hub, u1, track)
    d2, m2 = online_device(hub, u2, track)
    with hub.api(u1.access_token) as c1, hub.api(u2.access_token) as c2:
        assert c1.post(f"/devices/{d1['id']}/relays/0", json={"state": True}).status_code == 200
        assert c2.post(f"/devices/{d2['id']}/relays/0", json={"state": True}).status_code == 200
        i1 = integration_client(hub, u1, track, "hexa/#", "homeassistant/#")
        i2 = integration_client(hub, u2, track, "hexa/#", "homeassistant/#")
        # retained: own device's state and the hub status arrive on subscribe
        assert i1.wait_for(
            lambda t, p, r: t == f"hexa/{m1.uid}/relay/0/state" and p == b"ON" and r, 5
        )
        assert i1.wait_for(lambda t, p, r: t == f"hexa/{m1.uid}/state" and r, 5)
        assert i1.wait_for(lambda t, p, r: t == "hexa/hub/status" and p == b"online", 5)
        assert i2.wait_for(
            lambda t, p, r: t == f"hexa/{m2.uid}/relay/0/state" and p == b"ON" and r, 5
        )
        # live: both devices change; each integration sees only its own
        assert c2.post(f"/devices/{d2['id']}/relays/1", json={"state": True}).status_code == 200
        assert c1.post(f"/devices/{d1['id']}/relays/1", json={"state": True}).status_code == 200
    m2.event(0, "press")
    m1.event(0, "press")
    assert i1.wait_for(lambda t, p, r: t == f"hexa/{m1.uid}/input/0/event", 5)
    assert i2.wait_for(lambda t, p, r: t == f"hexa/{m2.uid}/input/0/event", 5)
    for kind in ("cmd", "ack", "result", "relay/1/state"):
        assert i1.messages(on_topic(f"hexa/{m1.uid}/{kind}")), kind
        assert i2.messages(on_topic(f"hexa/{m2.uid}/{kind}")), kind
    time.sleep(NEGATIVE_WAIT_S)  # nothing is expected to arrive
    assert not i1.messages(mentions(m2.uid))
    assert not i2.messages(mentions(m1.uid))


def test_integration_cannot_subscribe_to_everything(hub: RunningHub, track: Any) -> None:
    """An integration's SUBACK fails for '#' and other roots; hexa/#, homeassistant/# granted."""
    user = register(hub)
    i = integration_client(hub, user, track)
    assert not i.subscribe("#")
    assert not i.subscribe("+/#")
    assert not i.subscribe("other/#")
    assert i.subscribe("hexa/#")
    assert i.subscribe("homeassistant/#")
    assert i.subscribe("hexa/hub/status")


def test_integration_other_orgs_device_filter_gets_nothing(hub: RunningHub, track: Any) -> None:
    """A filter naming another org's device delivers nothing, retained messages included."""
    u1, u2 = register(hub), register(hub)
    d2, m2 = online_device(hub, u2, track)
    with hub.api(u2.access_token) as c2:
        assert c2.post(f"/devices/{d2['id']}/relays/2", json={"state": True}).status_code == 200
    i1 = integration_client(hub, u1, track)
    i1.subscribe(f"hexa/{m2.uid}/#")
    i1.subscribe(f"hexa/{m2.uid}/relay/+/state")
    with hub.api(u2.access_token) as c2:
        assert c2.post(f"/devices/{d2['id']}/relays/2", json={"state": False}).status_code == 200
    time.sleep(NEGATIVE_WAIT_S)  # nothing is expected to arrive
    assert not i1.messages(mentions(m2.uid))


def test_integration_intent_for_other_org_has_no_effect(hub: RunningHub, track: Any) -> None:
    """An integration's intents for another org's device are refused: no cmd, no state change."""
    u1, u2 = register(hub), register(hub)
    d1, m1 = online_device(hub, u1, track)
    d2, m2 = online_device(hub, u2, track)
    i1 = integration_client(hub, u1, track)
    i2 = integration_client(hub, u2, track, "hexa/#")
    i1.publish(f"hexa/{m2.uid}/relay/2/set", "ON")
    i1.publish(f"hexa/{m2.uid}/relay/1/set", json.dumps({"state": "ON", "intent_id": "xtenant"}))
    i1.publish(f"hexa/{m2.uid}/relays/set", "ON")
    i1.publish(f"hexa/{m1.uid}/relay/2/set", "ON")  # allowed: own org (also a barrier)
    assert wait_until(lambda: any(c.get("relay_index") == 2 for c in m1.commands), 5)
    with hub.api(u1.access_token) as c1:
        assert wait_until(lambda: c1.get(f"/devices/{d1['id']}/state").json()["relays"][2], 5)
    time.sleep(NEGATIVE_WAIT_S)  # nothing is expected to arrive
    assert m2.commands == []
    assert not i2.messages(
        lambda t, p, r: t.endswith("/set") or t.endswith("/cmd") or t.endswith("/result")
    )
    assert state_of(hub, u2, d2["id"])["relays"] == [False, False, False]


def test_a_device_moved_to_another_org_leaves_the_old_orgs_integrations(
    hub: RunningHub, track: Any
) -> None:
    """The broker knows a device's organization from its claim: once the device is
    released and claimed by another organization, the old one's integration can neither
    command it nor see it, and the new one's can, at once (not after a cache expiry)."""
    first, second = register(hub), register(hub)
    prov, dev = claimed_device(hub, first)
    m = track(MqttDevice(hub, prov["device_uid"], prov["device_token"]))
    assert m.ok(), m.rc
    old = integration_client(hub, first, track, "hexa/#")
    old.publish(f"hexa/{m.uid}/relay/0/set", "ON")  # the broker now knows the device's org
    assert wait_until(lambda: any(c.get("relay_index") == 0 for c in m.commands), 5)
    with hub.api(first.access_token) as c:
        assert c.post(f"/devices/{dev['id']}/release").status_code == 200
    with hub.api(second.access_token) as c:
        r = c.post("/devices/claim", json={"claim_code": prov["claim_code"]})
    assert r.status_code == 200, r.text
    moved = track(MqttDevice(hub, m.uid, r.json()["device_token"]))
    assert moved.ok(), moved.rc
    new = integration_client(hub, second, track, "hexa/#")
    seen = len(old.messages())
    old.publish(f"hexa/{m.uid}/relay/1/set", "ON")
    new.publish(f"hexa/{m.uid}/relay/2/set", "ON")  # allowed (also a barrier)
    assert wait_until(lambda: any(c.get("relay_index") == 2 for c in moved.commands), 5)
    assert new.wait_for(lambda t, p, r: t == f"hexa/{m.uid}/relay/2/state" and p == b"ON", 5)
    time.sleep(NEGATIVE_WAIT_S)  # nothing is expected to arrive
    assert [c for c in moved.commands if c.get("relay_index") == 1] == []
    assert not [msg for msg in old.messages()[seen:] if mentions(m.uid)(*msg)]


def test_integration_cannot_forge_device_topics(hub: RunningHub, track: Any) -> None:
    """An integration may not publish its own org device's report, ack, availability or state."""
    user = register(hub)
    d, m = online_device(hub, user, track)
    i = integration_client(hub, user, track)
    obs = integration_client(hub, user, track, "hexa/#")
    i.publish(f"hexa/{m.uid}/report", json.dumps({"relays": [True] * 3, "fw_version": "forged"}))
    i.publish(f"hexa/{m.uid}/availability", "offline", retain=True)
    i.publish(f"hexa/{m.uid}/ack", json.dumps({"command_id": "forged", "ok": True}))
    i.publish(
        f"hexa/{m.uid}/cmd",
        json.dumps({"type": "set_relay", "command_id": "forged", "relay_index": 0, "state": True}),
    )
    i.publish(f"hexa/{m.uid}/relay/0/state", "ON", retain=True)
    sync_on(m, obs)
    assert not obs.messages(lambda t, p, r: b"forged" in p or p == b"offline")
    assert not obs.messages(lambda t, p, r: t.endswith("/relay/0/state") and p == b"ON")
    assert m.commands == []
    st = state_of(hub, user, d["id"])
    assert st["relays"] == [False, False, False] and st["online"] is True


# --- hygiene -----------------------------------------------------------------------------
def test_retained_intent_is_refused(hub: RunningHub, track: Any) -> None:
    """A retained ON intent is not executed and not replayed to a later subscriber."""
    user = register(hub)
    d, m = online_device(hub, user, track)
    i = integration_client(hub, user, track)
    i.publish(f"hexa/{m.uid}/relay/0/set", "ON", retain=True)
    i.publish(f"hexa/{m.uid}/relays/set", "ON", retain=True)
    i.publish(f"hexa/{m.uid}/relay/1/set", "ON")  # not retained: executed (barrier)
    assert wait_until(lambda: any(c.get("relay_index") == 1 for c in m.commands), 5)
    with hub.api(user.access_token) as c:
        assert wait_until(
            lambda: c.get(f"/devices/{d['id']}/state").json()["relays"] == [False, True, False], 5
        )
    assert all(c.get("relay_index") == 1 for c in m.commands), m.commands
    late = integration_client(
        hub,
        user,
        track,
        f"hexa/{m.uid}/relay/+/set",
        f"hexa/{m.uid}/relays/set",
        f"hexa/{m.uid}/state",
    )
    # the retained state arrives after any retained message of the earlier subscriptions
    assert late.wait_for(lambda t, p, r: t == f"hexa/{m.uid}/state" and r, 5)
    time.sleep(NEGATIVE_WAIT_S)  # nothing is expected to arrive
    assert not late.messages(lambda t, p, r: t.endswith("/set"))
    assert all(c.get("relay_index") == 1 for c in m.commands), m.commands
    assert state_of(hub, user, d["id"])["relays"] == [False, True, False]


def test_oversized_payloads_dropped(hub: RunningHub, track: Any) -> None:
    """Payloads above the broker's limit (64 KiB) are dropped: no intent, no report applied."""
    user = register(hub)
    d, m = online_device(hub, user, track)
    i = integration_client(hub, user, track)
    obs = integration_client(hub, user, track, "hexa/#")
    pad = "x" * (70 * 1024)
    i.publish(
        f"hexa/{m.uid}/relay/0/set", json.dumps({"state": "ON", "intent_id": "big", "pad": pad})
    )
    m.publish(
        f"hexa/{m.uid}/report",
        json.dumps({"relays": [True] * 3, "inputs": [False] * 3, "pad": pad}),
    )
    sync_on(m, obs)
    time.sleep(NEGATIVE_WAIT_S)  # the intent (other connection) is not expected to arrive
    assert m.commands == []
    assert not obs.messages(lambda t, p, r: len(p) > 64 * 1024)
    assert state_of(hub, user, d["id"])["relays"] == [False, False, False]


def test_client_id_takeover_refused(hub: RunningHub, track: Any) -> None:
    """A device connecting with another device's live client id is refused; the victim works on."""
    user = register(hub)
    a_dev, a = online_device(hub, user, track)
    pb, _ = claimed_device(hub, user)
    thief = track(MqttClient(hub, pb["device_uid"], pb["device_token"], client_id=f"dev-{a.uid}"))
    assert thief.refused()
    assert not a.disconnected.is_set()
    with hub.api(user.access_token) as c:
        r = c.post(f"/devices/{a_dev['id']}/relays/0", json={"state": True})
    assert r.status_code == 200, r.text
    assert r.json()["relays"] == [True, False, False]


def test_refused_login_does_not_disturb_live_client_id(hub: RunningHub, track: Any) -> None:
    """A bad-credential CONNECT under a live device's client id leaves that session working."""
    user = register(hub)
    a_dev, a = online_device(hub, user, track)
    intruder = track(MqttClient(hub, a.uid, "wrong-token", client_id=f"dev-{a.uid}"))
    assert intruder.refused()
    with hub.api(user.access_token) as c:
        r = c.post(f"/devices/{a_dev['id']}/relays/2", json={"state": True})
        assert r.status_code == 200, r.text
        assert c.get(f"/devices/{a_dev['id']}").json()["online"] is True


def test_hub_status_online_retained(hub: RunningHub, track: Any) -> None:
    """hexa/hub/status is 'online' and retained, readable by integrations and devices."""
    user = register(hub)
    i = integration_client(hub, user, track, "hexa/hub/status")
    assert i.wait_for(lambda t, p, r: t == "hexa/hub/status" and p == b"online" and r, 5)
    p, _ = claimed_device(hub, user)
    d = track(MqttClient(hub, p["device_uid"], p["device_token"]))
    assert d.ok()
    assert d.subscribe("hexa/hub/status")
    assert d.wait_for(lambda t, pl, r: t == "hexa/hub/status" and pl == b"online" and r, 5)
