"""The WebSocket gateways (contract.md §4): ``/ws/device`` bridged onto the device topics,
and ``/ws/client`` with live device state and relay commands, tenant-scoped."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlencode

from support.accounts import add_member, register
from support.checks import NEGATIVE_WAIT_S, wait_until
from support.devices import claimed_device, online_device
from support.hubs import RunningHub
from support.mqtt import integration_client
from support.ws import WsDevice, client_url, close_code_of, ws_client, ws_device


# --- /ws/device --------------------------------------------------------------------------
def test_device_bad_credentials_close_4401(hub: RunningHub) -> None:
    """/ws/device with a wrong token, an unknown uid or no credentials closes with 4401."""
    user = register(hub)
    p, dev = claimed_device(hub, user)
    base = f"{hub.ws_base}/ws/device"
    assert close_code_of(f"{base}?{urlencode({'uid': p['device_uid'], 'token': 'wrong'})}") == 4401
    assert (
        close_code_of(f"{base}?{urlencode({'uid': 'hx-nosuchdev', 'token': p['device_token']})}")
        == 4401
    )
    assert close_code_of(base) == 4401
    with hub.api(user.access_token) as c:
        assert c.get(f"/devices/{dev['id']}").json()["online"] is False


def test_ws_device_command_roundtrip(hub: RunningHub, track: Any) -> None:
    """A WS device receives set_relay from a REST command and its ack completes it (200)."""
    user = register(hub)
    dev, d = ws_device(hub, user, track)
    with hub.api(user.access_token) as c:
        r = c.post(f"/devices/{dev['id']}/relays/1", json={"state": True})
        assert r.status_code == 200, r.text
        assert r.json()["relays"] == [False, True, False]
        cmd = d.wait_for(lambda x: x.get("type") == "set_relay", 1)
        assert cmd is not None
        assert cmd["relay_index"] == 1 and cmd["state"] is True
        assert cmd["command_id"] == r.json()["command_id"]
        r = c.post(f"/devices/{dev['id']}/relays", json={"state": True})
        assert r.status_code == 200 and r.json()["relays"] == [True, True, True]
        assert d.messages(lambda x: x.get("type") == "set_all_relays")
        st = c.get(f"/devices/{dev['id']}/state").json()
        assert st["relays"] == [True, True, True] and st["online"] is True


def test_ws_device_timeout_without_ack(hub: RunningHub, track: Any) -> None:
    """A WS device that receives set_relay but never acks yields 504 device_timeout."""
    user = register(hub)
    dev, d = ws_device(hub, user, track, auto_ack=False)
    with hub.api(user.access_token) as c:
        r = c.post(f"/devices/{dev['id']}/relays/0", json={"state": True})
    assert r.status_code == 504 and r.json()["code"] == "device_timeout"
    assert d.messages(lambda x: x.get("type") == "set_relay")


def test_ws_device_online_while_connected(hub: RunningHub, track: Any) -> None:
    """A WS device is online while connected and offline after it closes."""
    user = register(hub)
    p, dev = claimed_device(hub, user)
    with hub.api(user.access_token) as c:
        assert c.get(f"/devices/{dev['id']}").json()["online"] is False
        d = track(WsDevice(hub, p["device_uid"], p["device_token"]))
        assert wait_until(lambda: c.get(f"/devices/{dev['id']}").json()["online"] is True, 5)
        assert c.get(f"/devices/{dev['id']}/state").json()["online"] is True
        d.close()
        assert wait_until(lambda: c.get(f"/devices/{dev['id']}").json()["online"] is False, 5)
        assert c.get(f"/devices/{dev['id']}/state").json()["online"] is False
        r = c.post(f"/devices/{dev['id']}/relays/0", json={"state": True})
        assert r.status_code == 503 and r.json()["code"] == "device_offline"


def test_ws_device_state_report_and_event(hub: RunningHub, track: Any) -> None:
    """A WS device's state_report updates relay state; its input_event is republished on the bus."""
    user = register(hub)
    dev, d = ws_device(hub, user, track)
    obs = integration_client(hub, user, track, f"hexa/{d.uid}/#")
    with hub.api(user.access_token) as c:
        d.send({"type": "state_report", "relays": [True, False, True], "inputs": [False] * 3})
        assert wait_until(
            lambda: c.get(f"/devices/{dev['id']}/state").json()["relays"] == [True, False, True], 5
        )
        assert [x["state"] for x in c.get(f"/devices/{dev['id']}").json()["relays"]] == [
            True,
            False,
            True,
        ]
    assert obs.wait_for(lambda t, p, r: t == f"hexa/{d.uid}/relay/2/state" and p == b"ON", 5)
    d.send({"type": "input_event", "input_index": 1, "event": "press"})
    msg = obs.wait_for(lambda t, p, r: t == f"hexa/{d.uid}/input/1/event", 5)
    assert msg and json.loads(msg[1]) == {"event": "press"}


def test_ws_device_bad_messages_get_error_and_socket_stays(hub: RunningHub, track: Any) -> None:
    """Malformed JSON, non-UTF-8 bytes, non-objects and unknown types each get an error; the
    socket stays usable for ping and commands."""
    user = register(hub)
    dev, d = ws_device(hub, user, track)
    bad: list[str | bytes] = [
        "{not json",
        b"\xff\xfe\x00\x81",
        "[1, 2]",
        '{"no": "type"}',
        '{"type": "launch_rockets"}',
        '{"type": 7}',
    ]
    for n, msg in enumerate(bad, start=1):
        d.send(msg)
        assert wait_until(lambda: d.count("error") >= n, 5), msg  # noqa: B023 - called at once
    assert all(
        isinstance(e.get("error"), str) and e["error"]
        for e in d.messages(lambda x: x.get("type") == "error")
    )
    assert not d.closed.is_set()
    d.send({"type": "ping"})
    assert d.wait_for(lambda x: x.get("type") == "pong", 5)
    with hub.api(user.access_token) as c:
        r = c.post(f"/devices/{dev['id']}/relays/2", json={"state": True})
        assert r.status_code == 200 and r.json()["relays"] == [False, False, True]
        assert c.get(f"/devices/{dev['id']}").json()["online"] is True


def test_ws_device_ping_pong(hub: RunningHub, track: Any) -> None:
    """A device's ping is answered with pong."""
    user = register(hub)
    _, d = ws_device(hub, user, track)
    for _ in range(3):
        d.send({"type": "ping"})
    assert wait_until(lambda: len(d.messages(lambda x: x.get("type") == "pong")) == 3, 5)


# --- /ws/client --------------------------------------------------------------------------
def test_client_bad_token_close_4401(hub: RunningHub) -> None:
    """/ws/client with a garbage, missing or refresh token closes with 4401."""
    user = register(hub)
    assert close_code_of(client_url(hub, "not-a-jwt")) == 4401
    assert close_code_of(f"{hub.ws_base}/ws/client") == 4401
    assert close_code_of(client_url(hub, user.refresh_token)) == 4401
    tampered = user.access_token[:-4] + (
        "AAAA" if not user.access_token.endswith("AAAA") else "BBBB"
    )
    assert close_code_of(client_url(hub, tampered)) == 4401


def test_client_receives_only_its_orgs_device_state(hub: RunningHub, track: Any) -> None:
    """A client gets device_state for its org's device when a relay changes, never another org's."""
    u1, u2 = register(hub), register(hub)
    d1, m1 = online_device(hub, u1, track)
    d2, m2 = online_device(hub, u2, track)
    c1 = ws_client(hub, u1, track)
    c2 = ws_client(hub, u2, track)
    with hub.api(u1.access_token) as a1, hub.api(u2.access_token) as a2:
        assert a2.post(f"/devices/{d2['id']}/relays/0", json={"state": True}).status_code == 200
        assert a1.post(f"/devices/{d1['id']}/relays/2", json={"state": True}).status_code == 200
    got = c1.wait_for(
        lambda x: (
            x.get("type") == "device_state"
            and x.get("device_id") == d1["id"]
            and x.get("relays") == [False, False, True]
        ),
        5,
    )
    assert got is not None, c1.messages()
    assert got["device_uid"] == m1.uid and got["online"] is True and len(got["inputs"]) == 3
    assert c2.wait_for(
        lambda x: (
            x.get("type") == "device_state"
            and x.get("device_id") == d2["id"]
            and x.get("relays") == [True, False, False]
        ),
        5,
    )
    time.sleep(NEGATIVE_WAIT_S)  # nothing is expected to arrive
    assert not c1.messages(
        lambda x: x.get("device_id") == d2["id"] or x.get("device_uid") == m2.uid
    )
    assert not c2.messages(
        lambda x: x.get("device_id") == d1["id"] or x.get("device_uid") == m1.uid
    )


def test_client_set_relay_command_result(hub: RunningHub, track: Any) -> None:
    """A client's set_relay gets command_result {request_id, ok: true, relays}; so does set_all."""
    user = register(hub)
    dev, m = online_device(hub, user, track)
    c = ws_client(hub, user, track)
    c.send(
        {
            "type": "set_relay",
            "request_id": "r-1",
            "device_id": dev["id"],
            "relay_index": 1,
            "state": True,
        }
    )
    res = c.wait_for(
        lambda x: x.get("type") == "command_result" and x.get("request_id") == "r-1", 10
    )
    assert res is not None, c.messages()
    assert res["ok"] is True and res["relays"] == [False, True, False]
    assert m.relays == [False, True, False]
    c.send(
        {
            "type": "set_relay",
            "request_id": "r-2",
            "device_id": dev["id"],
            "relay_index": 1,
            "state": "toggle",
        }
    )
    res = c.wait_for(
        lambda x: x.get("type") == "command_result" and x.get("request_id") == "r-2", 10
    )
    assert res is not None and res["ok"] is True and res["relays"] == [False, False, False]
    c.send({"type": "set_all_relays", "request_id": "r-3", "device_id": dev["id"], "state": True})
    res = c.wait_for(
        lambda x: x.get("type") == "command_result" and x.get("request_id") == "r-3", 10
    )
    assert res is not None and res["ok"] is True and res["relays"] == [True, True, True]
    with hub.api(user.access_token) as api:
        assert api.get(f"/devices/{dev['id']}/state").json()["relays"] == [True, True, True]


def test_client_bad_messages(hub: RunningHub, track: Any) -> None:
    """Malformed client messages get an error or a failed command_result; the socket stays up."""
    user = register(hub)
    dev, m = online_device(hub, user, track)
    c = ws_client(hub, user, track)
    c.send("{not json")
    c.send(b"\xff\xfe")
    c.send({"type": "nope", "request_id": "q-0"})
    c.send(
        {
            "type": "set_relay",
            "request_id": "q-1",
            "device_id": "not-a-uuid",
            "relay_index": 0,
            "state": True,
        }
    )
    c.send(
        {
            "type": "set_relay",
            "request_id": "q-2",
            "device_id": dev["id"],
            "relay_index": 9,
            "state": True,
        }
    )
    assert wait_until(lambda: len(c.messages(lambda x: x.get("type") == "error")) >= 3, 5), (
        c.messages()
    )
    for rid in ("q-1", "q-2"):
        res = c.result(rid, 5)
        assert res is not None and res["ok"] is False, rid
    assert m.commands == []
    c.send(
        {
            "type": "set_relay",
            "request_id": "q-3",
            "device_id": dev["id"],
            "relay_index": 0,
            "state": True,
        }
    )
    res = c.wait_for(
        lambda x: x.get("type") == "command_result" and x.get("request_id") == "q-3", 10
    )
    assert res is not None and res["ok"] is True


def test_viewer_set_relay_refused(hub: RunningHub, track: Any) -> None:
    """A viewer-role member sees the org's device, but its set_relay gets ok false."""
    owner, viewer = register(hub), register(hub)
    add_member(hub, owner, viewer, "viewer")
    dev, m = online_device(hub, owner, track)
    v = ws_client(hub, viewer, track)
    v.send(
        {
            "type": "set_relay",
            "request_id": "v-1",
            "device_id": dev["id"],
            "relay_index": 0,
            "state": True,
        }
    )
    res = v.wait_for(
        lambda x: x.get("type") == "command_result" and x.get("request_id") == "v-1", 10
    )
    assert res is not None and res["ok"] is False, v.messages()
    assert "relays" not in res or res.get("relays") is None
    v.send({"type": "set_all_relays", "request_id": "v-2", "device_id": dev["id"], "state": True})
    res = v.wait_for(
        lambda x: x.get("type") == "command_result" and x.get("request_id") == "v-2", 10
    )
    assert res is not None and res["ok"] is False
    assert m.commands == []
    # a viewer may read: it receives the device's state when the owner switches it
    with hub.api(owner.access_token) as c:
        assert c.post(f"/devices/{dev['id']}/relays/1", json={"state": True}).status_code == 200
    assert v.wait_for(
        lambda x: x.get("type") == "device_state" and x.get("device_id") == dev["id"], 5
    )
    with hub.api(viewer.access_token) as c:
        assert c.get(f"/devices/{dev['id']}/state").json()["relays"] == [False, True, False]


def test_client_command_to_other_tenant_refused(hub: RunningHub, track: Any) -> None:
    """A WS client's command to another tenant's device gets ok false; the device gets nothing."""
    owner, stranger = register(hub), register(hub)
    dev, m = online_device(hub, owner, track)
    s = ws_client(hub, stranger, track)
    s.send(
        {
            "type": "set_relay",
            "request_id": "x-1",
            "device_id": dev["id"],
            "relay_index": 0,
            "state": True,
        }
    )
    s.send({"type": "set_all_relays", "request_id": "x-2", "device_id": dev["id"], "state": True})
    for rid in ("x-1", "x-2"):
        res = s.result(rid)
        assert res is not None and res["ok"] is False, rid
        assert res.get("relays") is None
    assert m.commands == []
    with hub.api(owner.access_token) as c:
        assert c.get(f"/devices/{dev['id']}/state").json()["relays"] == [False, False, False]


def test_client_sees_device_online_offline(hub: RunningHub, track: Any) -> None:
    """A client is told device_offline / device_online when its org's device drops and returns."""
    user = register(hub)
    p, dev = claimed_device(hub, user)
    c = ws_client(hub, user, track)
    d = WsDevice(hub, p["device_uid"], p["device_token"])
    try:
        assert c.wait_for(lambda x: x.get("device_id") == dev["id"] and x.get("online") is True, 5)
    finally:
        d.close()
    assert c.wait_for(
        lambda x: x.get("type") == "device_offline" and x.get("device_id") == dev["id"], 5
    ), c.messages()
    d2 = track(WsDevice(hub, p["device_uid"], p["device_token"]))
    assert d2
    assert c.wait_for(
        lambda x: x.get("type") == "device_online" and x.get("device_id") == dev["id"], 5
    ), c.messages()


def test_ws_and_rest_concurrent_commands(hub: RunningHub, track: Any) -> None:
    """REST and WS-client commands to one WS device, issued together, all complete."""
    user = register(hub)
    dev, d = ws_device(hub, user, track)
    c = ws_client(hub, user, track)
    with ThreadPoolExecutor(1) as pool, hub.api(user.access_token) as api:
        fut = pool.submit(api.post, f"/devices/{dev['id']}/relays/0", json={"state": True})
        c.send(
            {
                "type": "set_relay",
                "request_id": "cc",
                "device_id": dev["id"],
                "relay_index": 2,
                "state": True,
            }
        )
        assert fut.result(15).status_code == 200
    res = c.wait_for(
        lambda x: x.get("type") == "command_result" and x.get("request_id") == "cc", 10
    )
    assert res is not None and res["ok"] is True
    with hub.api(user.access_token) as api:
        assert wait_until(
            lambda: api.get(f"/devices/{dev['id']}/state").json()["relays"] == [True, False, True],
            5,
        )
    assert len(d.messages(lambda x: x.get("type") == "set_relay")) == 2
