"""Devices as the hub's users get them: provisioned at the factory, claimed into an
organization, connected over MQTT; and their state as the API reports it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from hexa.hub.tools.sim import Credentials, SimDevice
from support.accounts import User
from support.checks import wait_until
from support.hubs import PROVISION_KEY, RunningHub
from support.mqtt import MqttDevice


def provision(hub: RunningHub, model: str = "hexa-mini-switch-v1") -> dict[str, Any]:
    """A provisioned device: its uid, MQTT token and claim code."""
    with hub.api(**{"X-Provision-Key": PROVISION_KEY}) as c:
        r = c.post("/provision/register", json={"model": model, "serial": uuid.uuid4().hex[:8]})
    assert r.status_code == 201, r.text
    return dict(r.json())


def claim(hub: RunningHub, user: User, claim_code: str, **extra: Any) -> dict[str, Any]:
    with hub.api(user.access_token) as c:
        r = c.post("/devices/claim", json={"claim_code": claim_code, **extra})
    assert r.status_code == 200, r.text
    return dict(r.json())


def claimed_device(hub: RunningHub, user: User) -> tuple[dict[str, Any], dict[str, Any]]:
    """(provisioning answer, device resource) for a new device claimed by ``user``."""
    p = provision(hub)
    return p, claim(hub, user, p["claim_code"])


def online_device(
    hub: RunningHub,
    user: User,
    track: Callable[[MqttDevice], MqttDevice] | None = None,
    **kwargs: Any,
) -> tuple[dict[str, Any], MqttDevice]:
    """A claimed device connected over MQTT and seen online by the hub; closed after the
    test when ``track`` is given. ``kwargs`` go to ``MqttDevice``."""
    p, dev = claimed_device(hub, user)
    m = MqttDevice(hub, p["device_uid"], p["device_token"], **kwargs)
    if track is not None:
        track(m)
    assert m.ok()
    with hub.api(user.access_token) as c:
        assert wait_until(lambda: c.get(f"/devices/{dev['id']}").json().get("online"), 5)
    dev["device_token"] = p["device_token"]
    return dev, m


def state_of(hub: RunningHub, user: User, device_id: str) -> dict[str, Any]:
    """``GET /devices/{id}/state``."""
    with hub.api(user.access_token) as c:
        r = c.get(f"/devices/{device_id}/state")
    assert r.status_code == 200, r.text
    return dict(r.json())


def resource_relays(hub: RunningHub, user: User, device_id: str) -> list[bool]:
    """Relay states of the device resource (``GET /devices/{id}``), in index order."""
    with hub.api(user.access_token) as c:
        r = c.get(f"/devices/{device_id}")
    assert r.status_code == 200, r.text
    return [x["state"] for x in sorted(r.json()["relays"], key=lambda x: x["index"])]


class SimThread:
    """A ``hexa sim`` device (SimDevice) run on an event loop of its own thread, over MQTT or,
    with ``transport="ws"``, the hub's device WebSocket."""

    def __init__(self, hub: RunningHub, p: dict[str, Any], **kwargs: Any) -> None:
        creds = Credentials(
            p["device_uid"],
            p["device_token"],
            p["claim_code"],
            "127.0.0.1",
            hub.mqtt_port,
            hub.ws_base + "/ws/device",
        )
        self.dev = SimDevice(creds, report_every=3600, **kwargs)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.task = asyncio.run_coroutine_threadsafe(self.dev.run(), self.loop)
        assert self.call(asyncio.wait_for(self.dev.connected.wait(), 10)) is True

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.task.cancel()
        concurrent.futures.wait([self.task], 5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
