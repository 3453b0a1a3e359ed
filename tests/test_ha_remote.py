"""The outbound Home Assistant bridge (contract §6): a hub publishing one organization's
discovery, states and availability to a separate broker — a private Mosquitto started
here, plain and with TLS (a private CA and client certificates made here) — taking intents
from it, keeping its own will there, and reconnecting when that broker comes back."""

from __future__ import annotations

import datetime as dt
import getpass
import ipaddress
import json
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from support.accounts import User, audit, register
from support.checks import NEGATIVE_WAIT_S, wait_until
from support.databases import migrated_database_url
from support.devices import claimed_device, provision, resource_relays
from support.hubs import RunningHub, free_port, spawn_hub, stop_hub
from support.mqtt import MqttDevice

from hexa.hub.config import SettingError, load_settings

pytestmark = pytest.mark.skipif(shutil.which("mosquitto") is None, reason="needs mosquitto")

EVENTS = ("press", "hold", "double_press")
#: what the hub logs each time it waits before connecting to Home Assistant's broker again
RECONNECTING = "reconnecting to the Home Assistant broker"


# --- a private Mosquitto ------------------------------------------------------------------
@dataclass
class Pki:
    """A private CA, a server certificate for 127.0.0.1/localhost and a client one."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return key


def _cert(
    path: Path,
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    hosts: bool = False,
) -> x509.Name:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, signer = issuer if issuer is not None else (subject, key)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    path.write_bytes(builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return subject


def make_pki(folder: Path, label: str = "Hexa test CA") -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = _key(folder / "ca.key")
    ca_name = _cert(folder / "ca.pem", label, ca_key, None, ca=True)
    server_key = _key(folder / "server.key")
    _cert(folder / "server.pem", "localhost", server_key, (ca_name, ca_key), hosts=True)
    client_key = _key(folder / "client.key")
    _cert(folder / "client.pem", "hexa-hub", client_key, (ca_name, ca_key))
    return Pki(
        folder / "ca.pem",
        folder / "server.pem",
        folder / "server.key",
        folder / "client.pem",
        folder / "client.key",
    )


class Mosquitto:
    """A private Mosquitto: a plain listener (Home Assistant's side in these tests) and,
    with ``pki``, a TLS listener that requires a client certificate (the hub's side); with
    ``users`` (name → password), only those may connect."""

    def __init__(
        self, folder: Path, pki: Pki | None = None, users: dict[str, str] | None = None
    ) -> None:
        self.folder = folder
        self.pki = pki
        self.users = users or {}
        self.port = free_port()
        self.tls_port = free_port() if pki is not None else None
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> Mosquitto:
        lines = [
            "per_listener_settings false",
            f"allow_anonymous {'false' if self.users else 'true'}",
            "persistence false",
            # started as root, Mosquitto would become "mosquitto" and not read the files here
            f"user {getpass.getuser()}",
            f"listener {self.port} 127.0.0.1",
        ]
        if self.pki is not None:
            lines += [
                f"listener {self.tls_port} 127.0.0.1",
                f"cafile {self.pki.ca}",
                f"certfile {self.pki.server_cert}",
                f"keyfile {self.pki.server_key}",
                "require_certificate true",
            ]
        if self.users:
            passwd = self.folder / "passwd"
            passwd.write_text("")
            for name, password in self.users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(passwd), name, password], check=True)
            lines.append(f"password_file {passwd}")
        conf = self.folder / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        log = (self.folder / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=log, stderr=log)
        ports = [p for p in (self.port, self.tls_port) if p is not None]
        assert wait_until(lambda: all(_listening(p) for p in ports), 10), "mosquitto down"
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def url(self) -> str:
        if self.tls_port is not None:
            return f"mqtts://127.0.0.1:{self.tls_port}"
        return f"mqtt://127.0.0.1:{self.port}"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Watcher:
    """Home Assistant's view of its broker: a paho client recording what it receives."""

    def __init__(self, broker: Mosquitto, *filters: str) -> None:
        self.msgs: list[tuple[str, bytes, bool]] = []
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"ha-{uuid.uuid4().hex[:8]}"
        )
        self.c.on_message = lambda c, u, m: self.msgs.append((m.topic, m.payload, bool(m.retain)))
        for name, password in broker.users.items():  # the first user, if any
            self.c.username_pw_set(name, password)
            break
        self.c.connect("127.0.0.1", broker.port)
        self.c.loop_start()
        for flt in filters or ("homeassistant/#", "hexa/#"):
            self.c.subscribe(flt, qos=1)

    def publish(self, topic: str, payload: str, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def last(self, topic: str) -> bytes | None:
        found = [p for t, p, _ in list(self.msgs) if t == topic]
        return found[-1] if found else None

    def has(self, topic: str, pred: Callable[[bytes], bool] = bool, timeout: float = 10) -> bool:
        return bool(wait_until(lambda: (p := self.last(topic)) is not None and pred(p), timeout))

    def count(self, topic: str) -> int:
        return sum(1 for t, _, _ in list(self.msgs) if t == topic)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def switch(uid: str, n: int) -> str:
    return f"homeassistant/switch/hexa_{uid}_{n}/config"


def trigger(uid: str, n: int, event: str) -> str:
    return f"homeassistant/device_automation/hexa_{uid}_input{n}_{event}/config"


# --- an organization and its devices, set up on a hub without the bridge -------------------
@dataclass
class Home:
    db_url: str
    data: Path
    user: User
    #: provisioning answers of two claimed devices of the organization
    devices: list[dict[str, Any]]
    #: a claimed device of another organization
    stranger: dict[str, Any]


@pytest.fixture(scope="module")
def home(db_kind: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Home]:
    tmp = tmp_path_factory.mktemp(f"ha-remote-{db_kind}")
    url, drop = migrated_database_url(db_kind, tmp)
    first = spawn_hub(url, tmp / "data")
    try:
        user = register(first)
        devices = []
        for name in ("Hall", 'Porch "east" 🌙'):
            p = provision(first)
            with first.api(user.access_token) as c:
                r = c.post("/devices/claim", json={"claim_code": p["claim_code"], "name": name})
            assert r.status_code == 200, r.text
            devices.append({**p, "id": r.json()["id"]})
        other = register(first)
        p, dev = claimed_device(first, other)
        stranger = {**p, "id": dev["id"]}
    finally:
        stop_hub(first)
    yield Home(url, tmp / "data", user, devices, stranger)
    drop()


def bridged_hub(home: Home, broker: Mosquitto, **settings: str) -> RunningHub:
    """``hexa serve`` on the home's database with the bridge to ``broker``."""
    pki = broker.pki
    options = {
        "ha_broker_url": broker.url(),
        "ha_org_id": home.user.org_id,
        **(
            {
                "ha_ca_file": str(pki.ca),
                "ha_cert_file": str(pki.client_cert),
                "ha_key_file": str(pki.client_key),
            }
            if pki is not None
            else {}
        ),
        **settings,
    }
    return spawn_hub(home.db_url, home.data, log_level="INFO", **options)


def login(hub: RunningHub, user: User) -> User:
    """``user`` with a fresh access token from this hub process."""
    with hub.api() as c:
        r = c.post("/auth/login", json={"email": user.email, "password": user.password})
    assert r.status_code == 200, r.text
    user.access_token = r.json()["access_token"]
    return user


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path / "mosquitto").start()
    yield b
    b.stop()


# --- the tests -----------------------------------------------------------------------------
def test_discovery_state_availability_and_will_on_the_remote_broker(
    home: Home, broker: Mosquitto
) -> None:
    """Home Assistant's broker gets the organization's configs, states and availability,
    retained, and the hub's online status; never another organization's device; the
    hub's will marks it offline when the hub dies, and a clean stop says so too."""
    hub = bridged_hub(home, broker)
    try:
        ha = Watcher(broker)
        for dev in home.devices:
            uid = dev["device_uid"]
            for n in range(3):
                assert ha.has(switch(uid, n)), ha.msgs[-5:]
                config = json.loads(ha.last(switch(uid, n)) or b"")
                assert config["command_topic"] == f"hexa/{uid}/relay/{n}/set"
                assert config["availability"][1] == {"topic": "hexa/hub/status"}
                assert ha.has(f"hexa/{uid}/relay/{n}/state", lambda p: p == b"OFF")
                for event in EVENTS:
                    assert ha.has(trigger(uid, n, event))
            assert ha.has(f"hexa/{uid}/availability", lambda p: p == b"offline")
            assert json.loads(ha.last(f"hexa/{uid}/state") or b"")["relays"] == [False] * 3
        assert (
            json.loads(ha.last(switch(home.devices[1]["device_uid"], 0)) or b"")["device"]["name"]
            == 'Porch "east" 🌙'
        )
        assert ha.has("hexa/hub/status", lambda p: p == b"online")
        # a late subscriber finds all of it retained
        late = Watcher(broker)
        uid = home.devices[0]["device_uid"]
        assert late.has(trigger(uid, 2, "double_press"))
        assert all(r for t, _, r in list(late.msgs) if t.startswith("homeassistant/"))
        assert not [t for t, _, _ in list(ha.msgs) if home.stranger["device_uid"] in t]
        late.close()
        assert hub.proc is not None
        hub.proc.send_signal(signal.SIGKILL)
        hub.proc.wait(10)
        assert ha.has("hexa/hub/status", lambda p: p == b"offline", 60)  # its will
        ha.close()
    finally:
        stop_hub(hub)
    hub = bridged_hub(home, broker)
    watcher = Watcher(broker, "hexa/hub/status")
    try:
        assert watcher.has("hexa/hub/status", lambda p: p == b"online")
    finally:
        stop_hub(hub)
    assert watcher.has("hexa/hub/status", lambda p: p == b"offline")
    watcher.close()


def test_intents_from_home_assistant_are_forwarded_for_its_organization_only(
    home: Home, broker: Mosquitto
) -> None:
    """ON published on Home Assistant's broker switches the organization's relay (audited
    as home_assistant) and the new state comes back there; intents for another
    organization's device, a stale retained one and a malformed one change nothing."""
    ha = Watcher(broker)
    uid = home.devices[0]["device_uid"]
    # a stale retained command, waiting on the broker from before the hub connected: a
    # live one cannot be told apart (MQTT-3.3.1-9), a replayed one is refused
    ha.publish(f"hexa/{uid}/relay/2/set", "ON", retain=True)
    hub = bridged_hub(home, broker)
    devices: list[MqttDevice] = []
    try:
        user = login(hub, home.user)
        mine = MqttDevice(hub, home.devices[0]["device_uid"], home.devices[0]["device_token"])
        theirs = MqttDevice(hub, home.stranger["device_uid"], home.stranger["device_token"])
        devices += [mine, theirs]
        assert mine.ok() and theirs.ok()
        assert ha.has(f"hexa/{uid}/availability", lambda p: p == b"online")
        # the version the device reports on connecting shows in its configs
        assert ha.has(
            switch(uid, 0), lambda p: json.loads(p)["device"].get("sw_version") == "1.0.0"
        )
        # a birth's republish mirrors the availability the device published
        availability = f"hexa/{uid}/availability"
        before = ha.count(availability)
        ha.publish("homeassistant/status", "online")
        assert wait_until(lambda: ha.count(availability) > before, 10)
        assert ha.last(availability) == b"online"
        ha.publish(f"hexa/{theirs.uid}/relay/0/set", "ON")
        ha.publish(f"hexa/{theirs.uid}/relays/set", "ON")
        ha.publish(f"hexa/{uid}/relay/1/set", "SIDEWAYS")
        ha.publish(f"hexa/{uid}/relay/0/set", "ON")
        assert ha.has(f"hexa/{uid}/relay/0/state", lambda p: p == b"ON")
        assert resource_relays(hub, user, home.devices[0]["id"]) == [True, False, False]
        assert [c["relay_index"] for c in mine.commands] == [0]
        wait_until(lambda: theirs.commands, NEGATIVE_WAIT_S)
        assert theirs.commands == []
        entries = audit(hub, user, device_id=home.devices[0]["id"], action="relay_command")
        assert [e["source"] for e in entries["items"]][:1] == ["home_assistant"]
        mine.event(1, "double_press")
        assert ha.has(
            f"hexa/{uid}/input/1/event", lambda p: json.loads(p)["event"] == "double_press"
        )
        ha.publish(f"hexa/{uid}/relay/0/set", "OFF")
        assert ha.has(f"hexa/{uid}/relay/0/state", lambda p: p == b"OFF")
    finally:
        ha.publish(f"hexa/{uid}/relay/2/set", "", retain=True)
        ha.close()
        for d in devices:
            d.close()
        stop_hub(hub)


def test_another_organizations_devices_never_reach_the_remote_broker(
    home: Home, broker: Mosquitto
) -> None:
    """Claims, renames, releases and deletes in another organization send nothing to Home
    Assistant's broker, not even an empty config that would name the device's uid."""
    hub = bridged_hub(home, broker)
    ha = Watcher(broker)
    try:
        user = login(hub, home.user)
        other = register(hub)
        p, dev = claimed_device(hub, other)
        _, gone = claimed_device(hub, other)
        with hub.api(other.access_token) as c:
            assert c.patch(f"/devices/{dev['id']}", json={"name": "Shed"}).status_code == 200
            assert c.post(f"/devices/{dev['id']}/release").status_code == 200
            assert c.delete(f"/devices/{gone['id']}").status_code == 204
        # then a change of the organization's own device, which the bridge sends after them
        mine = home.devices[0]
        with hub.api(user.access_token) as c:
            r = c.patch(f"/devices/{mine['id']}", json={"name": "Hall 2"})
        assert r.status_code == 200, r.text
        assert ha.has(switch(mine["device_uid"], 2), lambda p: b'"Hall 2"' in p)
        for uid in (p["device_uid"], gone["device_uid"]):
            assert not [t for t, _, _ in list(ha.msgs) if uid in t], uid
    finally:
        with hub.api(login(hub, home.user).access_token) as c:
            c.patch(f"/devices/{home.devices[0]['id']}", json={"name": "Hall"})
        ha.close()
        stop_hub(hub)


def test_a_broker_with_passwords_takes_the_hub_with_either_spelling(
    home: Home, tmp_path: Path
) -> None:
    """A broker that refuses anonymous clients takes the hub with HEXA_HA_USERNAME and
    HEXA_HA_PASSWORD, or with the user and password in HEXA_HA_BROKER_URL (as
    HEXA_BROKER_URL takes them); the hub's log never shows the password."""
    password = "s3cret/pw"
    broker = Mosquitto(tmp_path / "auth", users={"hexa": password}).start()
    spellings = [
        {"ha_username": "hexa", "ha_password": password},
        {"ha_broker_url": f"mqtt://hexa:s3cret%2Fpw@127.0.0.1:{broker.port}"},
    ]
    try:
        for spelling in spellings:
            ha = Watcher(broker, "hexa/hub/status")
            hub = bridged_hub(home, broker, **spelling)
            try:
                assert ha.has("hexa/hub/status", lambda p: p == b"online", 20), spelling
            finally:
                stop_hub(hub)
                ha.close()
            log = (home.data / "hub.log").read_text()
            assert "connected to the Home Assistant broker" in log
            assert password not in log and "s3cret" not in log
    finally:
        broker.stop()


def test_birth_republishes_and_the_bridge_reconnects_to_a_restarted_broker(
    home: Home, broker: Mosquitto
) -> None:
    """Home Assistant's birth on its broker brings a republish (one for a burst); when
    that broker restarts empty, the hub reconnects by itself and publishes everything
    again."""
    hub = bridged_hub(home, broker)
    try:
        ha = Watcher(broker)
        topic = switch(home.devices[0]["device_uid"], 1)
        assert ha.has(topic)
        before = ha.count(topic)
        for _ in range(20):
            ha.publish("homeassistant/status", "online")
        assert wait_until(lambda: ha.count(topic) > before, 10)
        wait_until(lambda: ha.count(topic) > before + 1, 3)
        assert ha.count(topic) == before + 1
        ha.close()
        log = home.data / "hub.log"
        retries = log.read_text().count(RECONNECTING)
        broker.stop()
        # the bridge notices, and backs off, while the broker is away
        assert wait_until(lambda: log.read_text().count(RECONNECTING) > retries, 10)
        broker.start()
        again = Watcher(broker)
        assert again.has(topic, timeout=30), again.msgs[-3:]
        assert again.has("hexa/hub/status", lambda p: p == b"online")
        again.close()
    finally:
        stop_hub(hub)


def test_device_removed_while_the_bridge_was_away_is_cleared_on_connect(
    home: Home, broker: Mosquitto, tmp_path: Path
) -> None:
    """A device deleted while the hub was not connected to Home Assistant's broker keeps
    no retained config there: the bridge clears it when it connects."""
    hub = bridged_hub(home, broker)
    p = provision(hub)
    user = login(hub, home.user)
    with hub.api(user.access_token) as c:
        dev = c.post("/devices/claim", json={"claim_code": p["claim_code"]}).json()
    uid = dev["device_uid"]
    ha = Watcher(broker)
    try:
        assert ha.has(trigger(uid, 1, "hold")) and ha.has(switch(uid, 2))
    finally:
        stop_hub(hub)
    plain = spawn_hub(home.db_url, home.data)  # no bridge: Home Assistant's broker is unaware
    try:
        with plain.api(login(plain, home.user).access_token) as c:
            assert c.delete(f"/devices/{dev['id']}").status_code == 204
    finally:
        stop_hub(plain)
    assert ha.last(switch(uid, 2))  # still there
    hub = bridged_hub(home, broker)
    try:
        every = [switch(uid, n) for n in range(3)]
        every += [trigger(uid, n, e) for n in range(3) for e in EVENTS]
        for topic in every:
            assert ha.has(topic, lambda p: p == b"", 15), topic
        # and its states, availability last
        assert ha.has(f"hexa/{uid}/availability", lambda p: p == b"", 15)
        late = Watcher(broker)
        assert late.has(switch(home.devices[0]["device_uid"], 0))
        assert not [t for t, _, r in list(late.msgs) if uid in t and r]
        late.close()
    finally:
        ha.close()
        stop_hub(hub)


def test_tls_with_private_ca_and_client_certificate(home: Home, tmp_path: Path) -> None:
    """Over TLS the bridge verifies the broker against the private CA and presents its
    client certificate; a broker whose certificate another CA signed is refused (nothing
    is published to it) unless HEXA_HA_TLS_INSECURE is set."""
    pki = make_pki(tmp_path / "pki")
    broker = Mosquitto(tmp_path / "tls", pki).start()
    stranger_ca = make_pki(tmp_path / "other", "Someone else's CA").ca
    try:
        hub = bridged_hub(home, broker)
        try:
            ha = Watcher(broker)
            assert ha.has(switch(home.devices[0]["device_uid"], 0))
            ha.close()
        finally:
            stop_hub(hub)
        clean = Mosquitto(tmp_path / "tls2", pki).start()
        try:
            hub = bridged_hub(home, clean, ha_ca_file=str(stranger_ca))
            try:
                log = Path(home.data / "hub.log")
                assert wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in log.read_text(), 15)
                ha = Watcher(clean)
                wait_until(lambda: ha.msgs, NEGATIVE_WAIT_S)
                assert ha.msgs == []
                ha.close()
            finally:
                stop_hub(hub)
            hub = bridged_hub(home, clean, ha_ca_file="", ha_tls_insecure="true")
            try:
                ha = Watcher(clean)
                assert ha.has(switch(home.devices[0]["device_uid"], 0), timeout=15)
                ha.close()
            finally:
                stop_hub(hub)
        finally:
            clean.stop()
    finally:
        broker.stop()


def test_another_discovery_prefix_on_the_remote_broker(home: Home, broker: Mosquitto) -> None:
    """With HEXA_HA_DISCOVERY_PREFIX the configs go under that prefix there, and a birth
    on <prefix>/status is answered."""
    hub = bridged_hub(home, broker, ha_discovery_prefix="ha-test")
    try:
        ha = Watcher(broker, "ha-test/#", "homeassistant/#")
        uid = home.devices[0]["device_uid"]
        topic = f"ha-test/switch/hexa_{uid}_0/config"
        assert ha.has(topic)
        assert ha.has(f"ha-test/device_automation/hexa_{uid}_input0_press/config")
        before = ha.count(topic)
        ha.publish("ha-test/status", "online")
        assert wait_until(lambda: ha.count(topic) > before, 10)
        assert not [t for t, _, _ in list(ha.msgs) if t.startswith("homeassistant/")]
        ha.close()
    finally:
        stop_hub(hub)


def test_discovery_on_an_external_broker_the_hub_uses(
    db_kind: str, broker: Mosquitto, tmp_path: Path
) -> None:
    """A hub whose own bus is an external broker (HEXA_BROKER_URL) keeps the discovery
    configs there too: published on claim, republished after a birth and after the broker
    restarted empty (the hub reconnects), removed on release."""
    url, drop = migrated_database_url(db_kind, tmp_path)
    hub = spawn_hub(url, tmp_path / "data", broker_url=f"mqtt://127.0.0.1:{broker.port}")
    try:
        user = register(hub)
        ha = Watcher(broker)
        _, dev = claimed_device(hub, user)
        uid = dev["device_uid"]
        topic = switch(uid, 2)
        assert ha.has(topic) and ha.has(trigger(uid, 0, "double_press"))
        before = ha.count(topic)
        ha.publish("homeassistant/status", "online")
        assert wait_until(lambda: ha.count(topic) > before, 10)
        ha.close()
        broker.stop()  # its retained messages go with it (no persistence)
        broker.start()
        ha = Watcher(broker)
        assert ha.has(topic, timeout=30) and ha.has(trigger(uid, 0, "hold"))
        with hub.api(user.access_token) as c:
            assert c.post(f"/devices/{dev['id']}/release").status_code == 200
        assert ha.has(topic, lambda p: p == b"") and ha.has(
            trigger(uid, 0, "hold"), lambda p: p == b""
        )
        ha.close()
    finally:
        stop_hub(hub)
        drop()


# --- settings ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"HEXA_HA_BROKER_URL": "mqtt://127.0.0.1:1883", "HEXA_HA_ORG_ID": ""}, "HEXA_HA_ORG_ID"),
        ({"HEXA_HA_BROKER_URL": "http://ha:1883"}, "HEXA_HA_BROKER_URL"),
        ({"HEXA_HA_ORG_ID": "not-a-uuid"}, "HEXA_HA_ORG_ID"),
        ({"HEXA_HA_CA_FILE": "/nonexistent/ca.pem"}, "HEXA_HA_CA_FILE"),
        ({"HEXA_HA_CA_FILE": "{garbage}"}, "HEXA_HA_CA_FILE"),
        ({"HEXA_HA_CERT_FILE": "{cert}"}, "HEXA_HA_KEY_FILE"),
        ({"HEXA_HA_CERT_FILE": "{cert}", "HEXA_HA_KEY_FILE": "{garbage}"}, "HEXA_HA_CERT_FILE"),
        ({"HEXA_HA_CA_FILE": "{ca}", "HEXA_HA_BROKER_URL": "mqtt://h:1"}, "mqtts://"),
        ({"HEXA_HA_TLS_INSECURE": "maybe"}, "HEXA_HA_TLS_INSECURE"),
        ({"HEXA_HA_DISCOVERY_PREFIX": "home/assistant"}, "HEXA_HA_DISCOVERY_PREFIX"),
        ({"HEXA_HA_DISCOVERY_PREFIX": "hexa"}, "HEXA_HA_DISCOVERY_PREFIX"),
    ],
)
def test_bad_ha_settings_name_themselves(tmp_path: Path, env: dict[str, str], needle: str) -> None:
    """Each bad HEXA_HA_* setting is refused with an error naming the setting."""
    pki = make_pki(tmp_path / "pki")
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    paths = {"{garbage}": tmp_path / "garbage.pem", "{cert}": pki.client_cert, "{ca}": pki.ca}
    base = {
        "HEXA_DATA_DIR": str(tmp_path / "data"),
        "HEXA_HA_BROKER_URL": "mqtts://127.0.0.1:8883",
        "HEXA_HA_ORG_ID": str(uuid.uuid4()),
    }
    resolved = {k: str(paths.get(v, v)) for k, v in env.items()}
    with pytest.raises(SettingError) as err:
        load_settings(environ={**base, **resolved}, with_secrets=False)
    assert needle in str(err.value)


def test_a_bad_ha_setting_stops_start_up_with_one_line(tmp_path: Path) -> None:
    """`hexa serve` with HEXA_HA_BROKER_URL but no HEXA_HA_ORG_ID exits non-zero at once,
    saying so in one line."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HEXA_DATA_DIR": str(tmp_path / "data"),
        "HEXA_HA_BROKER_URL": "mqtt://127.0.0.1:1883",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "hexa.hub.cli", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "HEXA_HA_ORG_ID" in lines[0], proc.stderr
