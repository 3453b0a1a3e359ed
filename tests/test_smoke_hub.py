"""The shared hub fixture starts and answers: health, an MQTT device, a relay command."""

from __future__ import annotations

import httpx
from support.accounts import register
from support.devices import online_device
from support.hubs import RunningHub


def test_health_answers(hub: RunningHub) -> None:
    """/health answers 200 with the database reachable."""
    r = httpx.get(hub.base + "/health")
    assert r.status_code == 200 and r.json()["database"] is True


def test_rest_command_reaches_mqtt_device(hub: RunningHub) -> None:
    """A REST relay command is acked by a real paho device and returns the new state."""
    user = register(hub)
    dev, m = online_device(hub, user)
    with hub.api(user.access_token) as c:
        r = c.post(f"/devices/{dev['id']}/relays/1", json={"state": True})
    assert r.status_code == 200, r.text
    assert r.json()["relays"] == [False, True, False]
    m.close()
