"""Retained truth at start: the embedded broker forgets retained messages when the hub
stops, and the restarted hub publishes every device's state again from the database."""

from __future__ import annotations

import json
from pathlib import Path

from support.accounts import integration_token, register
from support.checks import wait_until
from support.databases import migrated_database_url
from support.devices import claimed_device
from support.hubs import spawn_hub, stop_hub
from support.mqtt import MqttClient, MqttDevice


def test_restarted_hub_republishes_retained_state(tmp_path: Path, db_kind: str) -> None:
    """After a restart, a subscriber gets each device's per-relay and aggregate state,
    retained, with no device connected."""
    url, drop = migrated_database_url(db_kind, tmp_path)
    first = spawn_hub(url, tmp_path / "data")
    try:
        user = register(first)
        p, dev = claimed_device(first, user)
        m = MqttDevice(first, p["device_uid"], p["device_token"])
        assert m.ok(), m.rc
        with first.api(user.access_token) as c:
            assert wait_until(lambda: c.get(f"/devices/{dev['id']}").json()["online"], 5)
            r = c.post(f"/devices/{dev['id']}/relays/2", json={"state": True})
            assert r.status_code == 200, r.text
        token = integration_token(first, user, "watcher")
        m.close()
    finally:
        stop_hub(first)
    second = spawn_hub(url, tmp_path / "data")
    uid = p["device_uid"]
    watchers: list[MqttClient] = []
    try:
        first_look = MqttClient(second, token["name"], token["token"])
        watchers.append(first_look)
        assert first_look.ok() and first_look.subscribe(f"hexa/{uid}/#")
        # published while it watches, or replayed to it as retained: either way the hub sent it
        assert first_look.wait_for(lambda t, pl, r: t == f"hexa/{uid}/state", 10)
        late = MqttClient(second, token["name"], token["token"])
        watchers.append(late)
        assert late.ok() and late.subscribe(f"hexa/{uid}/#")
        state = late.wait_for(lambda t, pl, r: t == f"hexa/{uid}/state" and r, 5)
        assert state, late.messages()
        body = json.loads(state[1])
        assert body["relays"] == [False, False, True] and body["online"] is False, body
        relay = late.wait_for(lambda t, pl, r: t == f"hexa/{uid}/relay/2/state" and r, 5)
        assert relay and relay[1] == b"ON", late.messages()
    finally:
        for w in watchers:
            w.close()
        stop_hub(second)
        drop()
