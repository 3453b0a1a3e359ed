"""Relay commands end to end (contract.md §2 relay commands, §3 intents/results/state):
REST and MQTT intents, a real paho device, retained state topics, the database-backed
resources, timeouts, offline devices, hostile device payloads, ordering and fairness."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
from support.accounts import register
from support.checks import error_shape_ok, wait_until
from support.devices import online_device, resource_relays, state_of
from support.hubs import COMMAND_TIMEOUT_MS, RunningHub
from support.mqtt import MqttClient, integration_client, sync_on

C = TypeVar("C", bound=MqttClient)
TIMEOUT_S = COMMAND_TIMEOUT_MS / 1000


def results(client: MqttClient, uid: str) -> list[dict[str, Any]]:
    return [json.loads(p) for t, p, _ in client.messages(lambda t, p, r: t == f"hexa/{uid}/result")]


def result_for(
    client: MqttClient, uid: str, intent_id: str, timeout: float = 5
) -> dict[str, Any] | None:
    def find() -> dict[str, Any] | None:
        for res in results(client, uid):
            if res.get("intent_id") == intent_id:
                return res
        return None

    found: dict[str, Any] | None = wait_until(find, timeout)
    return found


def audit_entries(hub: RunningHub, device_id: str, action: str) -> list[dict[str, Any]]:
    """Audit rows of one device and action, read straight from the hub's database
    (the contract's GET /audit is not served yet)."""
    url = hub.settings.resolved_database_url
    query = "SELECT source, actor_type, details FROM audit_log WHERE {} AND action = {}"
    if url.startswith("sqlite"):
        con = sqlite3.connect(url.split("://", 1)[1], timeout=10)
        try:
            rows = con.execute(query.format("device_id = ?", "?"), (device_id, action)).fetchall()
        finally:
            con.close()
    else:
        import asyncpg

        async def fetch() -> list[Any]:
            conn = await asyncpg.connect(url, timeout=5)
            try:
                return list(
                    await conn.fetch(query.format("device_id::text = $1", "$2"), device_id, action)
                )
            finally:
                await conn.close()

        rows = [tuple(r) for r in asyncio.run(fetch())]
    out = []
    for source, actor_type, details in rows:
        out.append(
            {
                "source": source,
                "actor_type": actor_type,
                "details": json.loads(details) if isinstance(details, str) else details,
            }
        )
    return out


# --- REST --------------------------------------------------------------------------------
def test_rest_command_applied_and_state_everywhere(hub: RunningHub, track: Any) -> None:
    """A REST relay command returns 200 {device_id, relays, latency_ms, command_id} and the new
    state shows on retained MQTT topics, GET /state and the device resource."""
    user = register(hub)
    dev, m = online_device(hub, user, track)
    with hub.api(user.access_token) as c:
        r = c.post(f"/devices/{dev['id']}/relays/1", json={"state": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"device_id", "relays", "latency_ms", "command_id"}
    assert body["device_id"] == dev["id"]
    assert body["relays"] == [False, True, False]
    assert isinstance(body["latency_ms"], (int, float)) and body["latency_ms"] >= 0
    cmd = m.commands[-1]
    assert cmd == {
        "type": "set_relay",
        "command_id": body["command_id"],
        "relay_index": 1,
        "state": True,
    }
    late = integration_client(
        hub, user, track, f"hexa/{m.uid}/relay/+/state", f"hexa/{m.uid}/state"
    )
    assert late.wait_for(lambda t, p, r: t == f"hexa/{m.uid}/relay/1/state" and p == b"ON" and r, 5)
    state_msg = late.wait_for(lambda t, p, r: t == f"hexa/{m.uid}/state" and r, 5)
    assert state_msg
    doc = json.loads(state_msg[1])
    assert doc["relays"] == [False, True, False] and doc["online"] is True
    assert len(doc["inputs"]) == 3 and doc["updated_at"].endswith("Z")
    st = state_of(hub, user, dev["id"])
    assert st["relays"] == [False, True, False] and st["online"] is True and st["last_seen_at"]
    assert resource_relays(hub, user, dev["id"]) == [False, True, False]
    with hub.api(user.access_token) as c:
        r = c.post(f"/devices/{dev['id']}/relays/1", json={"state": False})
    assert r.status_code == 200 and r.json()["relays"] == [False, False, False]
    assert late.wait_for(lambda t, p, r: t == f"hexa/{m.uid}/relay/1/state" and p == b"OFF", 5)
    assert resource_relays(hub, user, dev["id"]) == [False, False, False]


def test_rest_all_relays(hub: RunningHub, track: Any) -> None:
    """POST /devices/{id}/relays switches every relay with one set_all_relays command."""
    user = register(hub)
    dev, m = online_device(hub, user, track)
    with hub.api(user.access_token) as c:
        r = c.post(f"/devices/{dev['id']}/relays", json={"state": True})
        assert r.status_code == 200, r.text
        assert r.json()["relays"] == [True, True, True]
        assert m.commands[-1]["type"] == "set_all_relays" and m.commands[-1]["state"] is True
        assert m.commands[-1]["command_id"] == r.json()["command_id"]
        assert state_of(hub, user, dev["id"])["relays"] == [True, True, True]
        r = c.post(f"/devices/{dev['id']}/relays", json={"state": False})
        assert r.status_code == 200 and r.json()["relays"] == [False, False, False]
        assert resource_relays(hub, user, dev["id"]) == [False, False, False]
        assert c.post(f"/devices/{dev['id']}/relays", json={"state": "toggle"}).status_code == 400


def test_rest_toggle(hub: RunningHub, track: Any) -> None:
    """{"state": "toggle"} flips one relay from its current state, twice back to off."""
    user = register(hub)
    dev, m = online_device(hub, user, track)
    with hub.api(user.access_token) as c:
        r = c.post(f"/devices/{dev['id']}/relays/2", json={"state": "toggle"})
        assert r.status_code == 200, r.text
        assert r.json()["relays"] == [False, False, True]
        assert m.commands[-1]["state"] is True
        r = c.post(f"/devices/{dev['id']}/relays/2", json={"state": "toggle"})
        assert r.status_code == 200 and r.json()["relays"] == [False, False, False]
        assert m.commands[-1]["state"] is False


def test_device_timeout_then_late_ack_recorded(hub: RunningHub, track: Any) -> None:
    """A device that never acks gives 504 device_timeout after about the command timeout;
    its late ack is still recorded as the new state."""
    user = register(hub)
    dev, m = online_device(hub, user, track, auto_ack=False)
    with hub.api(user.access_token) as c:
        start = time.monotonic()
        r = c.post(f"/devices/{dev['id']}/relays/0", json={"state": True})
        elapsed = time.monotonic() - start
    assert r.status_code == 504, r.text
    body = r.json()
    assert error_shape_ok(body) and body["code"] == "device_timeout"
    assert TIMEOUT_S * 0.9 <= elapsed < TIMEOUT_S + 2.5, elapsed
    assert len(m.commands) == 1
    cid = m.commands[0]["command_id"]
    assert state_of(hub, user, dev["id"])["relays"] == [False, False, False]
    m.publish(
        f"hexa/{m.uid}/ack",
        json.dumps({"command_id": cid, "ok": True, "relays": [True, False, False]}),
    )
    assert wait_until(lambda: state_of(hub, user, dev["id"])["relays"] == [True, False, False], 5)
    assert resource_relays(hub, user, dev["id"]) == [True, False, False]


def test_offline_device_503_without_command(hub: RunningHub, track: Any) -> None:
    """After a device dropped (LWT offline), a command answers 503 device_offline at once and
    no command is published."""
    user = register(hub)
    dev, m = online_device(hub, user, track)
    obs = integration_client(hub, user, track, f"hexa/{m.uid}/#")
    m.drop()
    assert obs.wait_for(lambda t, p, r: t == f"hexa/{m.uid}/availability" and p == b"offline", 10)
    with hub.api(user.access_token) as c:
        assert wait_until(lambda: c.get(f"/devices/{dev['id']}").json()["online"] is False, 5)
        start = time.monotonic()
        r = c.post(f"/devices/{dev['id']}/relays/0", json={"state": True})
        elapsed = time.monotonic() - start
        assert r.status_code == 503, r.text
        assert error_shape_ok(r.json()) and r.json()["code"] == "device_offline"
        assert elapsed < TIMEOUT_S, elapsed  # answered without waiting for a device
        r = c.post(f"/devices/{dev['id']}/relays", json={"state": True})
        assert r.status_code == 503 and r.json()["code"] == "device_offline"
    assert obs.wait_for(
        lambda t, p, r: t == f"hexa/{m.uid}/result" and json.loads(p)["status"] == "offline", 5
    )
    assert not obs.messages(lambda t, p, r: t == f"hexa/{m.uid}/cmd")
    assert state_of(hub, user, dev["id"])["relays"] == [False, False, False]


def test_relay_index_out_of_range(hub: RunningHub, track: Any) -> None:
    """Relay indexes beyond the device (or invalid) answer 404/400, never 500, and send nothing."""
    user = register(hub)
    dev, m = online_device(hub, user, track)
    obs = integration_client(hub, user, track, f"hexa/{m.uid}/result")
    with hub.api(user.access_token) as c:
        for idx in ("3", "63", "64", "1000", "-1", "abc"):
            r = c.post(f"/devices/{dev['id']}/relays/{idx}", json={"state": True})
            assert r.status_code in (400, 404), (idx, r.status_code, r.text)
            assert error_shape_ok(r.json())
        r = c.post(f"/devices/{dev['id']}/relays/0", json={"state": "maybe"})
        assert r.status_code == 400, r.text
    # the same over MQTT: rejected result, no command
    obs.publish(f"hexa/{m.uid}/relay/7/set", json.dumps({"state": "ON", "intent_id": "oob"}))
    res = result_for(obs, m.uid, "oob")
    assert res is not None and res["ok"] is False and res["status"] == "rejected"
    assert m.commands == []
    with hub.api(user.access_token) as c:
        r = c.post(f"/devices/{dev['id']}/relays/0", json={"state": True})
    assert r.status_code == 200 and r.json()["relays"] == [True, False, False]


# --- MQTT intents ------------------------------------------------------------------------
def test_mqtt_plain_intents(hub: RunningHub, track: Any) -> None:
    """Plain ON / OFF / TOGGLE intents from an integration are executed and answered on result."""
    user = register(hub)
    dev, m = online_device(hub, user, track)
    i = integration_client(hub, user, track, f"hexa/{m.uid}/result", f"hexa/{m.uid}/relay/+/state")
    steps = [
        ("0", "ON", [True, False, False]),
        ("0", "TOGGLE", [False, False, False]),
        ("2", "TOGGLE", [False, False, True]),
        ("1", "on", [False, True, True]),
        ("2", "OFF", [False, True, False]),
    ]
    for n, (index, payload, expected) in enumerate(steps, start=1):
        i.publish(f"hexa/{m.uid}/relay/{index}/set", payload)
        got = wait_until(lambda: results(i, m.uid)[n - 1 :], 5)  # noqa: B023 - called at once
        assert got, payload
        res = got[0]
        assert res["ok"] is True and res["status"] == "applied", res
        assert res["relays"] == expected and res["intent_id"] and res["command_id"]
    assert m.relays == [False, True, False]
    assert state_of(hub, user, dev["id"])["relays"] == [False, True, False]
    assert resource_relays(hub, user, dev["id"]) == [False, True, False]
    assert i.wait_for(lambda t, p, r: t == f"hexa/{m.uid}/relay/2/state" and p == b"OFF", 5)
    assert i.wait_for(lambda t, p, r: t == f"hexa/{m.uid}/relay/1/state" and p == b"ON", 5)


def test_mqtt_json_intent_result_carries_intent_id(hub: RunningHub, track: Any) -> None:
    """A JSON intent {"state":"ON","intent_id":…} is applied; its result carries the intent_id."""
    user = register(hub)
    dev, m = online_device(hub, user, track)
    i = integration_client(hub, user, track, f"hexa/{m.uid}/result")
    iid = f"x-{uuid.uuid4().hex[:8]}"
    i.publish(f"hexa/{m.uid}/relay/1/set", json.dumps({"state": "ON", "intent_id": iid}))
    res = result_for(i, m.uid, iid)
    assert res is not None, results(i, m.uid)
    assert res["ok"] is True and res["status"] == "applied"
    assert res["relays"] == [False, True, False]
    assert res["command_id"] == m.commands[-1]["command_id"]
    assert isinstance(res["latency_ms"], (int, float))
    # all-relays intent, JSON and plain
    iid2 = f"x-{uuid.uuid4().hex[:8]}"
    i.publish(f"hexa/{m.uid}/relays/set", json.dumps({"state": "ON", "intent_id": iid2}))
    res = result_for(i, m.uid, iid2)
    assert res is not None and res["status"] == "applied" and res["relays"] == [True, True, True]
    assert m.commands[-1]["type"] == "set_all_relays"
    # TOGGLE is not allowed for all relays: rejected, no command
    sent = len(m.commands)
    iid3 = f"x-{uuid.uuid4().hex[:8]}"
    i.publish(f"hexa/{m.uid}/relays/set", json.dumps({"state": "TOGGLE", "intent_id": iid3}))
    assert wait_until(lambda: any(r["status"] == "rejected" for r in results(i, m.uid)), 5)
    assert len(m.commands) == sent
    assert state_of(hub, user, dev["id"])["relays"] == [True, True, True]


def test_commands_to_one_device_applied_in_order(hub: RunningHub, track: Any) -> None:
    """Intents fired quickly at one relay are applied in order; the final state is the last."""
    user = register(hub)
    dev, m = online_device(hub, user, track)
    i = integration_client(hub, user, track, f"hexa/{m.uid}/result")
    for payload in ("ON", "OFF", "TOGGLE", "TOGGLE", "ON"):
        i.c.publish(f"hexa/{m.uid}/relay/0/set", payload, qos=1)
    last = f"last-{uuid.uuid4().hex[:8]}"
    i.publish(f"hexa/{m.uid}/relay/0/set", json.dumps({"state": "OFF", "intent_id": last}))
    res = result_for(i, m.uid, last, 10)
    assert res is not None and res["status"] == "applied", results(i, m.uid)
    assert [c["state"] for c in m.commands] == [True, False, True, False, True, False]
    assert all(r["status"] == "applied" for r in results(i, m.uid))
    assert res["relays"] == [False, False, False]
    assert state_of(hub, user, dev["id"])["relays"] == [False, False, False]


def test_flood_on_one_device_does_not_starve_another(hub: RunningHub, track: Any) -> None:
    """A flood of intents to one device does not keep another device's REST command from working."""
    user = register(hub)
    _, a = online_device(hub, user, track)
    b_dev, _ = online_device(hub, user, track)
    i = integration_client(hub, user, track, f"hexa/{a.uid}/result")
    n = 80
    for k in range(n):
        i.c.publish(
            f"hexa/{a.uid}/relay/{k % 3}/set",
            json.dumps({"state": "TOGGLE", "intent_id": f"flood-{k}"}),
            qos=1,
        )
    with hub.api(user.access_token) as c:
        r = c.post(f"/devices/{b_dev['id']}/relays/0", json={"state": True})
    assert r.status_code == 200, r.text
    assert r.json()["relays"] == [True, False, False]
    # every flooded intent is answered (applied, or rejected when the device's queue is full)
    assert wait_until(lambda: len({x["intent_id"] for x in results(i, a.uid)}) >= n, 30)
    assert {x["status"] for x in results(i, a.uid)} <= {"applied", "rejected"}


def db_relays(hub: RunningHub, device_id: str) -> list[bool]:
    """A device's relay states as the hub's database holds them (not the hub's cache)."""
    url = hub.settings.resolved_database_url
    query = 'SELECT state FROM relay_states WHERE {} ORDER BY "index"'
    if url.startswith("sqlite"):
        con = sqlite3.connect(url.split("://", 1)[1], timeout=10)
        try:
            rows = con.execute(query.format("device_id = ?"), (device_id,)).fetchall()
        finally:
            con.close()
    else:
        import asyncpg

        async def fetch() -> list[Any]:
            conn = await asyncpg.connect(url, timeout=5)
            try:
                return list(await conn.fetch(query.format("device_id::text = $1"), device_id))
            finally:
                await conn.close()

        rows = [tuple(r) for r in asyncio.run(fetch())]
    return [bool(state) for (state,) in rows]


def test_burst_of_intents_reaches_database_audit_retained_state_and_observers(
    hub: RunningHub, track: Any
) -> None:
    """Intents to several devices at once (MQTT, then the hub's own from REST): each is
    answered once its device acked, the database already holds the state a result reports
    when the result is out, every one is audited, the retained state is the last, and an
    integration subscribed to hexa/# sees every intent and every result."""
    user = register(hub)
    devices = [online_device(hub, user, track) for _ in range(3)]
    obs = integration_client(hub, user, track, "hexa/#")
    sender = integration_client(hub, user, track)
    n = 10  # relay k % 3 toggled: relay 0 four times, relays 1 and 2 three times
    for _, m in devices:
        for k in range(n):
            sender.c.publish(
                f"hexa/{m.uid}/relay/{k % 3}/set",
                json.dumps({"state": "TOGGLE", "intent_id": f"burst-{m.uid}-{k}"}),
                qos=1,
            )
    for dev, m in devices:
        last = result_for(obs, m.uid, f"burst-{m.uid}-{n - 1}", 15)
        assert last is not None and last["status"] == "applied", results(obs, m.uid)
        assert last["relays"] == [False, True, True]
        assert db_relays(hub, dev["id"]) == [False, True, True]  # written before the result
    with hub.api(user.access_token) as c:
        for dev, _ in devices:  # the hub's own intents: to its relay service in process
            r = c.post(f"/devices/{dev['id']}/relays/0", json={"state": True})
            assert r.status_code == 200, r.text
            assert r.json()["relays"] == [True, True, True]
            assert db_relays(hub, dev["id"]) == [True, True, True]
    for dev, m in devices:
        answered = results(obs, m.uid)
        assert len(answered) == n + 1 and all(x["status"] == "applied" for x in answered)
        ids = {x["intent_id"] for x in answered}
        assert {f"burst-{m.uid}-{k}" for k in range(n)} < ids
        prefix = f"hexa/{m.uid}/relay/"
        intents = [
            json.loads(p)
            for t, p, _ in obs.messages()
            if t.startswith(prefix) and t.endswith("/set")
        ]
        assert {i["intent_id"] for i in intents} == ids  # the REST one too, as published
        assert [c["command_id"] for c in m.commands] == [x["command_id"] for x in answered]

        def all_audited(device_id: str = dev["id"]) -> list[dict[str, Any]] | None:
            rows = audit_entries(hub, device_id, "relay_command")
            return rows if len(rows) == n + 1 else None

        audited = wait_until(all_audited, 5)
        assert audited, audit_entries(hub, dev["id"], "relay_command")
        assert {a["details"]["intent_id"] for a in audited} == ids
        assert {a["details"]["status"] for a in audited} == {"applied"}
        assert {a["source"] for a in audited} == {"mqtt", "api"}
        late = integration_client(
            hub, user, track, f"hexa/{m.uid}/relay/+/state", f"hexa/{m.uid}/state"
        )
        wanted = {f"{prefix}{index}/state" for index in range(3)}
        state_topic = f"hexa/{m.uid}/state"
        assert wait_until(
            lambda late=late, wanted=wanted, state_topic=state_topic: (
                {t for t, _, r in late.messages() if r} >= wanted | {state_topic}
            ),
            5,
        ), late.messages()
        kept = {t: p for t, p, r in late.messages() if r}
        assert all(kept[t] == b"ON" for t in wanted), kept
        assert json.loads(kept[state_topic])["relays"] == [True, True, True]


# --- device-initiated traffic ------------------------------------------------------------
def test_state_report_updates_state_with_audit(hub: RunningHub, track: Any) -> None:
    """A state report with changed relays (local switch) updates state and topics, audited."""
    user = register(hub)
    dev, m = online_device(hub, user, track)
    obs = integration_client(hub, user, track, f"hexa/{m.uid}/#")
    m.relays = [True, False, True]
    m.report()
    assert wait_until(lambda: state_of(hub, user, dev["id"])["relays"] == [True, False, True], 5)
    assert resource_relays(hub, user, dev["id"]) == [True, False, True]
    assert obs.wait_for(lambda t, p, r: t == f"hexa/{m.uid}/relay/0/state" and p == b"ON", 5)
    assert obs.wait_for(lambda t, p, r: t == f"hexa/{m.uid}/relay/2/state" and p == b"ON", 5)
    assert obs.wait_for(
        lambda t, p, r: (
            t == f"hexa/{m.uid}/state" and json.loads(p)["relays"] == [True, False, True]
        ),
        5,
    )
    entries = wait_until(lambda: audit_entries(hub, dev["id"], "state_report"), 5)
    assert entries, "no audit entry for the device-initiated change"
    assert entries[0]["source"] == "device"
    assert entries[0]["details"]["before"] == [False, False, False]
    assert entries[0]["details"]["relays"] == [True, False, True]
    # a REST toggle afterwards starts from the reported state
    with hub.api(user.access_token) as c:
        r = c.post(f"/devices/{dev['id']}/relays/0", json={"state": "toggle"})
    assert r.status_code == 200 and r.json()["relays"] == [False, False, True]


def test_report_records_fw_version(hub: RunningHub, track: Any) -> None:
    """A state report's fw_version shows on the device resource, also when none was known."""
    user = register(hub)
    # provisioned without fw_version; reports "1.0.0" on connect
    dev, m = online_device(hub, user, track)
    with hub.api(user.access_token) as c:
        assert wait_until(
            lambda: c.get(f"/devices/{dev['id']}").json()["fw_version"] == "1.0.0", 5
        ), c.get(f"/devices/{dev['id']}").json()["fw_version"]
        m.c.publish(
            f"hexa/{m.uid}/report", json.dumps({"relays": m.relays, "fw_version": "1.1.0"}), qos=1
        )
        assert wait_until(lambda: c.get(f"/devices/{dev['id']}").json()["fw_version"] == "1.1.0", 5)


def test_input_events_republished(hub: RunningHub, track: Any) -> None:
    """Input events from a device are republished on hexa/<uid>/input/<n>/event."""
    user = register(hub)
    _, m = online_device(hub, user, track)
    obs = integration_client(hub, user, track, f"hexa/{m.uid}/input/+/event")
    m.event(1, "hold", duration_ms=10500)
    msg = obs.wait_for(lambda t, p, r: t == f"hexa/{m.uid}/input/1/event", 5)
    assert msg and json.loads(msg[1]) == {"event": "hold", "duration_ms": 10500}
    m.event(0, "double_press")
    msg = obs.wait_for(lambda t, p, r: t == f"hexa/{m.uid}/input/0/event", 5)
    assert msg and json.loads(msg[1]) == {"event": "double_press"}


@pytest.mark.parametrize("kind", ["ack", "report", "event"])
def test_malformed_device_payloads_do_not_break_hub(hub: RunningHub, track: Any, kind: str) -> None:
    """Malformed, non-UTF-8 or ill-typed JSON on a device topic is dropped; commands still work."""
    user = register(hub)
    dev, m = online_device(hub, user, track)
    obs = integration_client(hub, user, track, f"hexa/{m.uid}/input/#")
    junk = [
        b"{not json",
        b"\xff\xfe\x00\x81",
        b"",
        b"[]",
        b"null",
        b"42",
        b'"text"',
        b'{"command_id": 5, "ok": "yes"}',
        b'{"command_id": "", "ok": true}',
        b'{"relays": "on"}',
        b'{"relays": [1, 0, 1]}',
        b'{"relays": [true]}',
        b'{"uptime_s": -1}',
        b'{"input_index": 99, "event": "press"}',
        b'{"input_index": -1, "event": "press"}',
        b'{"input_index": 0, "event": "boom"}',
        b'{"input_index": "0", "event": "press", "duration_ms": -5}',
        b"\xc3\x28" * 100,
    ]
    for payload in junk:
        m.publish(f"hexa/{m.uid}/{kind}", payload)
    sync_on(m, obs)
    assert state_of(hub, user, dev["id"])["relays"] == [False, False, False]
    assert not obs.messages(lambda t, p, r: t != f"hexa/{m.uid}/input/2/event")
    with hub.api(user.access_token) as c:
        r = c.post(f"/devices/{dev['id']}/relays/2", json={"state": True})
        assert r.status_code == 200, r.text
        assert r.json()["relays"] == [False, False, True]
        assert c.get(f"/devices/{dev['id']}").json()["online"] is True


def test_ack_with_unknown_command_id_ignored(hub: RunningHub, track: Any) -> None:
    """An ack naming a command the hub never sent changes nothing."""
    user = register(hub)
    dev, m = online_device(hub, user, track)
    obs = integration_client(hub, user, track, f"hexa/{m.uid}/#")
    m.publish(
        f"hexa/{m.uid}/ack",
        json.dumps({"command_id": uuid.uuid4().hex, "ok": True, "relays": [True, True, True]}),
    )
    sync_on(m, obs)
    assert state_of(hub, user, dev["id"])["relays"] == [False, False, False]
    assert not obs.messages(lambda t, p, r: t.endswith("/state") and b"ON" in p)
    assert not obs.messages(lambda t, p, r: t == f"hexa/{m.uid}/result")


def test_ack_from_wrong_device_ignored(hub: RunningHub, track: Any) -> None:
    """Device B acking device A's command on its own ack topic does not complete it (→ 504),
    not even as a late ack, and changes neither device's state."""
    user = register(hub)
    a_dev, a = online_device(hub, user, track, auto_ack=False)
    b_dev, b = online_device(hub, user, track)
    obs = integration_client(hub, user, track, f"hexa/{b.uid}/input/#")
    ack = {"ok": True, "relays": [True, True, True]}
    with ThreadPoolExecutor(1) as pool, hub.api(user.access_token) as c:
        fut = pool.submit(c.post, f"/devices/{a_dev['id']}/relays/0", json={"state": True})
        assert wait_until(lambda: a.commands, 5), "A never got its command"
        cid = a.commands[0]["command_id"]
        b.publish(f"hexa/{b.uid}/ack", json.dumps({"command_id": cid, **ack}))
        r = fut.result(15)
    assert r.status_code == 504, r.text
    assert r.json()["code"] == "device_timeout"
    b.publish(f"hexa/{b.uid}/ack", json.dumps({"command_id": cid, **ack}))  # after the timeout
    sync_on(b, obs)
    assert state_of(hub, user, a_dev["id"])["relays"] == [False, False, False]
    assert state_of(hub, user, b_dev["id"])["relays"] == [False, False, False]


def test_last_seen_advances_with_reports_and_is_written_in_batches(
    hub: RunningHub, track: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device that keeps talking (reports without changes) has its last_seen_at moved
    forward: written later and for many devices at once, not on every message."""
    from hexa.hub import state

    monkeypatch.setattr(state, "LAST_SEEN_EVERY_S", 0.0)
    monkeypatch.setattr(state, "SEEN_FLUSH_S", 0.05)
    user = register(hub)
    devices = [online_device(hub, user, track) for _ in range(3)]
    first = {dev["id"]: state_of(hub, user, dev["id"])["last_seen_at"] for dev, _ in devices}
    assert all(first.values())
    time.sleep(0.01)
    for _, m in devices:
        m.report()

    def advanced() -> bool:
        return all(
            state_of(hub, user, dev["id"])["last_seen_at"] > first[dev["id"]] for dev, _ in devices
        )

    assert wait_until(advanced, 5), "last_seen_at did not move after reports"


def test_report_flood_does_not_starve_others_and_ends_on_the_last_report(
    hub: RunningHub, track: Any
) -> None:
    """A device flooding state reports fills only its own queue: another device's REST
    command still works, and the hub ends with the flooding device's last report."""
    user = register(hub)
    a_dev, a = online_device(hub, user, track)
    b_dev, _ = online_device(hub, user, track)
    n = 3000
    for k in range(n):
        relays = [bool(k & 1), bool(k & 2), bool(k & 4)]
        a.c.publish(
            f"hexa/{a.uid}/report",
            json.dumps({"relays": relays, "inputs": [False] * 3}),
            qos=0,
        )
    last = [bool((n - 1) & 1), bool((n - 1) & 2), bool((n - 1) & 4)]
    with hub.api(user.access_token) as c:
        r = c.post(f"/devices/{b_dev['id']}/relays/0", json={"state": True})
    assert r.status_code == 200, r.text
    assert r.json()["relays"] == [True, False, False]
    assert wait_until(lambda: state_of(hub, user, a_dev["id"])["relays"] == last, 30), (
        f"the hub did not end on the last report {last}: {state_of(hub, user, a_dev['id'])}"
    )
