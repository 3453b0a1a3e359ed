"""The hub on an external Mosquitto: same bus, same relay service, reconnect with back-off."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.accounts import register
from support.checks import wait_until
from support.databases import migrated_database_url
from support.devices import claim, provision
from support.hubs import RunningHub, free_port, spawn_hub, stop_hub
from support.mqtt import MqttClient, MqttDevice

MOSQUITTO = shutil.which("mosquitto")
pytestmark = pytest.mark.skipif(
    MOSQUITTO is None or shutil.which("mosquitto_passwd") is None,
    reason="needs the mosquitto and mosquitto_passwd binaries",
)
HUB_USER, HUB_PASSWORD = "hexa-hub", "hub-password-for-tests"
#: reads everything under hexa/ (what an integrator on this broker would be allowed)
WATCHER_USER, WATCHER_PASSWORD = "watcher", "watcher-password-for-tests"


class Mosquitto:
    """A private Mosquitto with a password file and contract §3 device ACLs."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = free_port()
        self.passwd = work / "passwd"
        self.passwd.touch()
        self.passwd.chmod(0o600)
        self.add_user(HUB_USER, HUB_PASSWORD)
        self.add_user(WATCHER_USER, WATCHER_PASSWORD)
        (work / "acl").write_text(
            f"user {HUB_USER}\ntopic readwrite #\n\n"
            "pattern write hexa/%u/ack\npattern write hexa/%u/report\n"
            "pattern write hexa/%u/event\npattern write hexa/%u/availability\n"
            "pattern read hexa/%u/cmd\npattern read hexa/hub/status\n\n"
            f"user {WATCHER_USER}\ntopic read hexa/#\n"
        )
        self.conf = work / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous false\n"
            f"password_file {self.passwd}\nacl_file {work / 'acl'}\n"
            "persistence false\nset_tcp_nodelay true\nlog_type error\n"
            # started as root (CI), mosquitto would drop to its own user, who cannot read
            # our mode-0600 files; as anybody else this line is ignored
            f"user {os.environ.get('USER') or 'root'}\n"
        )

    def add_user(self, name: str, password: str) -> None:
        subprocess.run(
            ["mosquitto_passwd", "-b", str(self.passwd), name, password],
            check=True,
            capture_output=True,
        )
        if self.proc is not None:
            self.proc.send_signal(signal.SIGHUP)  # reload the password file

    def start(self) -> None:
        assert MOSQUITTO is not None
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        assert wait_until(lambda: _listening(self.port), 10), "mosquitto did not start"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def external(db_kind: str, tmp_path: Path) -> Iterator[tuple[Mosquitto, RunningHub]]:
    broker = Mosquitto(tmp_path)
    broker.start()
    url, drop = migrated_database_url(db_kind, tmp_path)
    hub = spawn_hub(
        url,
        tmp_path / "data",
        broker_url=f"mqtt://{HUB_USER}:{HUB_PASSWORD}@127.0.0.1:{broker.port}",
    )
    hub.mqtt_port = broker.port
    try:
        yield broker, hub
    finally:
        stop_hub(hub)
        broker.stop()
        drop()


def _device(broker: Mosquitto, hub: RunningHub, user: Any) -> tuple[dict[str, Any], MqttDevice]:
    """A claimed device whose credentials Mosquitto knows, connected over MQTT."""
    p = provision(hub)
    assert p["mqtt"] == {"host": "127.0.0.1", "port": broker.port, "tls_port": None}
    dev = claim(hub, user, p["claim_code"])
    broker.add_user(p["device_uid"], p["device_token"])
    m = wait_until(lambda: _connected(hub, p), 10)
    assert m, "device could not log in to mosquitto"
    dev["device_token"] = p["device_token"]
    return dev, m


def _connected(hub: RunningHub, p: dict[str, Any]) -> MqttDevice | None:
    m = MqttDevice(hub, p["device_uid"], p["device_token"])
    if m.ok(3):
        return m
    m.close()
    return None


def test_commands_through_mosquitto(external: tuple[Mosquitto, RunningHub]) -> None:
    """With HEXA_BROKER_URL the embedded broker is off and commands flow through Mosquitto."""
    broker, hub = external
    assert httpx.get(hub.base + "/readyz").status_code == 200
    user = register(hub)
    dev, m = _device(broker, hub, user)
    with hub.api(user.access_token) as c:
        assert wait_until(lambda: c.get(f"/devices/{dev['id']}").json()["online"], 5)
        r = c.post(f"/devices/{dev['id']}/relays/1", json={"state": True})
        assert r.status_code == 200, r.text
        assert r.json()["relays"] == [False, True, False]
        assert c.get(f"/devices/{dev['id']}/state").json()["relays"] == [False, True, False]
    m.close()


def test_bus_reconnects_after_broker_restart(external: tuple[Mosquitto, RunningHub]) -> None:
    """The hub's bus reconnects and resubscribes when the broker comes back; /readyz follows."""
    broker, hub = external
    user = register(hub)
    dev, m = _device(broker, hub, user)
    m.close()
    broker.stop()
    assert wait_until(lambda: httpx.get(hub.base + "/readyz").status_code == 503, 10)
    with hub.api(user.access_token) as c:
        r = c.post(f"/devices/{dev['id']}/relays/0", json={"state": True})
    assert r.status_code == 503, r.text
    assert r.json()["code"] in ("bus_unavailable", "device_offline"), r.text
    broker.start()
    ready = wait_until(lambda: httpx.get(hub.base + "/readyz").status_code == 200, 15)
    assert ready, httpx.get(hub.base + "/readyz").text
    m2 = wait_until(lambda: _connected(hub, dev), 10)
    assert m2, "the device could not log in to the restarted broker"
    with hub.api(user.access_token) as c:
        online = wait_until(lambda: c.get(f"/devices/{dev['id']}").json()["online"], 5)
        assert online, c.get(f"/devices/{dev['id']}").text
        r = c.post(f"/devices/{dev['id']}/relays/0", json={"state": True})
        assert r.status_code == 200, r.text
    m2.close()


def test_retained_state_is_republished_after_broker_restart(
    external: tuple[Mosquitto, RunningHub],
) -> None:
    """A broker that comes back without its retained messages gets the hub's states again."""
    broker, hub = external
    user = register(hub)
    dev, m = _device(broker, hub, user)
    with hub.api(user.access_token) as c:
        assert wait_until(lambda: c.get(f"/devices/{dev['id']}").json()["online"], 5)
        r = c.post(f"/devices/{dev['id']}/relays/0", json={"state": True})
        assert r.status_code == 200, r.text
    m.close()
    broker.stop()
    broker.start()  # no persistence: every retained message is gone
    assert wait_until(lambda: httpx.get(hub.base + "/readyz").status_code == 200, 15)
    uid = dev["device_uid"]
    first_look = MqttClient(hub, WATCHER_USER, WATCHER_PASSWORD)
    try:  # published while it watches, or replayed as retained: either way the hub sent it
        assert first_look.ok() and first_look.subscribe(f"hexa/{uid}/#")
        assert first_look.wait_for(lambda t, p, r: t == f"hexa/{uid}/state", 10)
    finally:
        first_look.close()
    watcher = MqttClient(hub, WATCHER_USER, WATCHER_PASSWORD)
    try:
        assert watcher.ok() and watcher.subscribe(f"hexa/{uid}/#")
        state = watcher.wait_for(lambda t, p, r: t == f"hexa/{uid}/state" and r, 5)
        assert state, watcher.messages()
        assert json.loads(state[1])["relays"] == [True, False, False]
        relay = watcher.wait_for(lambda t, p, r: t == f"hexa/{uid}/relay/0/state" and r, 5)
        assert relay and relay[1] == b"ON", watcher.messages()
    finally:
        watcher.close()
