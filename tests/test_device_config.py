"""Device configuration (contract §5): the IO matrix and the power-restore mode over REST,
validated as a whole; versions bumped, audited, pushed to real MQTT (paho) and WebSocket
devices, re-sent on connect and on an older reported version; acks with the wrong version or
an unknown command refused; ``hexa sim`` devices applying the configuration and honouring the
power-restore mode across a restart of the simulator."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.accounts import User, add_member, audit, register
from support.checks import NEGATIVE_WAIT_S, assert_error, ok, wait_until
from support.devices import SimThread, claim, claimed_device, state_of
from support.hubs import PROVISION_KEY, RunningHub
from support.mqtt import MqttDevice, integration_client
from support.ws import WsDevice

from hexa.hub.device_config import legacy_mode, validate_io, validate_power_restore
from hexa.hub.errors import ValidationFailed
from hexa.hub.tools.sim_config import SimConfig, SimStore

DEFAULT_IO = [{"index": i, "type": "push", "link": "linked", "rocker_mode": None} for i in range(3)]


# --- the validator (pure) --------------------------------------------------------------
def _item(index: int = 0, type_: str = "push", link: str = "linked", **extra: Any) -> Any:
    return {"index": index, "type": type_, "link": link, **extra}


INVALID: list[tuple[str, Any, str]] = [
    ("empty list", [], "inputs"),
    ("not a list", {"index": 0}, "inputs"),
    ("index too high", [_item(3)], "inputs.0.index"),
    ("index negative", [_item(-1)], "inputs.0.index"),
    ("index not an integer", [_item("0")], "inputs.0.index"),  # type: ignore[arg-type]
    ("index a boolean", [_item(True)], "inputs.0.index"),
    ("index missing", [{"type": "push", "link": "linked"}], "inputs.0.index"),
    ("duplicate index", [_item(1), _item(1, link="detached")], "inputs.1.index"),
    ("unknown type", [_item(type_="toggle")], "inputs.0.type"),
    ("type missing", [{"index": 0, "link": "linked"}], "inputs.0.type"),
    ("unknown link", [_item(link="both")], "inputs.0.link"),
    ("link missing", [{"index": 0, "type": "push"}], "inputs.0.link"),
    ("rocker without mode", [_item(type_="rocker")], "inputs.0.rocker_mode"),
    ("rocker with null mode", [_item(type_="rocker", rocker_mode=None)], "inputs.0.rocker_mode"),
    (
        "detached rocker without mode",
        [_item(type_="rocker", link="detached")],
        "inputs.0.rocker_mode",
    ),
    ("push with follow", [_item(rocker_mode="follow")], "inputs.0.rocker_mode"),
    ("push with flip", [_item(link="detached", rocker_mode="flip")], "inputs.0.rocker_mode"),
    ("unknown rocker mode", [_item(type_="rocker", rocker_mode="toggle")], "inputs.0.rocker_mode"),
    ("unknown field", [_item(mode="momentary")], "inputs.0.mode"),
    ("item not an object", [0], "inputs.0"),
    ("good and bad", [_item(0), _item(2, type_="rocker")], "inputs.1.rocker_mode"),
]


@pytest.mark.parametrize(("items", "field"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_validator_refuses(items: Any, field: str) -> None:
    """Each invalid input list is refused, naming the offending field."""
    with pytest.raises(ValidationFailed) as caught:
        validate_io(items, 3)
    assert caught.value.details is not None
    fields = [e["field"] for e in caught.value.details["errors"]]
    assert field in fields, fields


def test_validator_lists_every_problem_and_accepts_the_matrix() -> None:
    """All problems are listed at once; every valid wiring and power-restore mode passes,
    and the derived input mode matches each wiring."""
    with pytest.raises(ValidationFailed) as caught:
        validate_io([_item(5, type_="x"), _item(0, type_="rocker", link="nowhere")], 3)
    assert caught.value.details is not None
    assert len(caught.value.details["errors"]) == 4  # index, type, link, rocker_mode
    matrix = [
        (t, link, m)
        for t, modes in (("push", [None]), ("rocker", ["follow", "flip"]))
        for link in ("linked", "detached")
        for m in modes
    ]
    for t, link, m in matrix:
        item = {"index": 2, "type": t, "link": link, **({"rocker_mode": m} if m else {})}
        [setting] = validate_io([item], 3)
        assert (setting.index, setting.type, setting.link, setting.rocker_mode) == (2, t, link, m)
    assert len(validate_io([_item(i) for i in range(3)], 3)) == 3
    for mode in ("off", "on", "restore"):
        assert validate_power_restore(mode) == mode
    for bad in ("OFF", "last", None, 1):
        with pytest.raises(ValidationFailed):
            validate_power_restore(bad)
    assert [legacy_mode(*m) for m in matrix] == [
        "momentary",
        "detached",
        "toggle",
        "edge",
        "detached",
        "detached",
    ]


# --- devices that speak the configuration protocol ------------------------------------
class ConfigMqttDevice(MqttDevice):
    """A paho device that acks ``config`` commands with their version (when ``config_ack``)
    and reports ``config_version``."""

    def __init__(self, *args: Any, config_ack: bool = True, **kwargs: Any) -> None:
        self.config_ack = config_ack
        self.config_version = 0
        super().__init__(*args, **kwargs)

    def configs(self) -> list[dict[str, Any]]:
        return [c for c in self.commands if c.get("type") == "config"]

    def report(self) -> None:
        doc = {"relays": self.relays, "inputs": [False] * 3, "config_version": self.config_version}
        self.c.publish(f"hexa/{self.uid}/report", json.dumps(doc), qos=1)

    def ack(self, command_id: str, version: int | None, ok_: bool = True) -> None:
        doc: dict[str, Any] = {"command_id": command_id, "ok": ok_}
        if version is not None:
            doc["config_version"] = version
        self.publish(f"hexa/{self.uid}/ack", json.dumps(doc))

    def _on_message(self, c: Any, userdata: Any, msg: Any) -> None:
        super()._on_message(c, userdata, msg)
        if msg.topic != f"hexa/{self.uid}/cmd" or not self.config_ack:
            return
        cmd = json.loads(msg.payload)
        if cmd.get("type") == "config":
            self.config_version = cmd["config_version"]
            doc = {
                "command_id": cmd["command_id"],
                "ok": True,
                "config_version": cmd["config_version"],
            }
            c.publish(f"hexa/{self.uid}/ack", json.dumps(doc), qos=1)


class ConfigWsDevice(WsDevice):
    def on_doc(self, doc: dict[str, Any]) -> None:
        super().on_doc(doc)
        if doc.get("type") == "config":
            self.send(
                {
                    "type": "ack",
                    "command_id": doc["command_id"],
                    "ok": True,
                    "config_version": doc["config_version"],
                }
            )


def device(hub: RunningHub, user: User, device_id: str) -> dict[str, Any]:
    with hub.api(user.access_token) as c:
        return dict(ok(c.get(f"/devices/{device_id}")))


def patch(
    hub: RunningHub, user: User, device_id: str, route: str, body: Any, **headers: str
) -> httpx.Response:
    with hub.api(user.access_token, **headers) as c:
        return c.patch(f"/devices/{device_id}/{route}", json=body)


def connect(hub: RunningHub, p: dict[str, Any], track: Callable[[Any], Any], **kw: Any) -> Any:
    d = track(ConfigMqttDevice(hub, p["device_uid"], p["device_token"], **kw))
    assert d.ok()
    return d


def config_acks(hub: RunningHub, result: str) -> float:
    text = httpx.get(hub.base + "/metrics", timeout=15).text
    m = re.search(rf'^hexa_device_config_acks_total{{result="{result}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


# --- REST ------------------------------------------------------------------------------
def test_defaults_and_invalid_patches_change_nothing(hub: RunningHub) -> None:
    """A new device shows the factory defaults; every invalid PATCH is a 400
    validation_error with details and leaves the configuration and its version alone."""
    user = register(hub)
    _, dev = claimed_device(hub, user)
    assert dev["io_config"] == DEFAULT_IO
    assert (dev["power_restore_mode"], dev["config_version"], dev["config_applied_version"]) == (
        "off",
        0,
        0,
    )
    assert [i["mode"] for i in dev["inputs"]] == ["momentary"] * 3
    bad = [
        {"inputs": []},
        {"inputs": [_item(3)]},
        {"inputs": [_item(1), _item(1)]},
        {"inputs": [_item(0, type_="rocker")]},
        {"inputs": [_item(0, rocker_mode="flip")]},
        {"inputs": [_item(0, type_="dimmer")]},
        {"inputs": [_item(0), _item(1, type_="rocker", rocker_mode="sideways")]},
        {"inputs": [_item(0, name="x")]},
        {"inputs": "all"},
        {},
    ]
    for body in bad:
        err = assert_error(patch(hub, user, dev["id"], "io-config", body), 400, "validation_error")
        assert err["details"]["errors"], err
    for body in ({"mode": "last"}, {"mode": None}, {}, {"mode": "on", "extra": 1}):
        assert_error(
            patch(hub, user, dev["id"], "power-restore-mode", body), 400, "validation_error"
        )
    after = device(hub, user, dev["id"])
    assert after["io_config"] == DEFAULT_IO and after["config_version"] == 0
    assert after["power_restore_mode"] == "off"


def test_other_tenants_device_is_404_and_roles_are_checked(hub: RunningHub) -> None:
    """Another tenant's (or an unknown) device is 404, an operator 403, a manager may."""
    owner, stranger, viewer, manager = (register(hub) for _ in range(4))
    _, dev = claimed_device(hub, owner)
    body = {"inputs": [_item(0, link="detached")]}
    for route, doc in (("io-config", body), ("power-restore-mode", {"mode": "on"})):
        assert_error(patch(hub, stranger, dev["id"], route, doc), 404, "not_found")
        assert_error(patch(hub, stranger, str(uuid.uuid4()), route, doc), 404, "not_found")
    add_member(hub, owner, viewer, "operator")
    assert_error(patch(hub, viewer, dev["id"], "io-config", body), 403, "forbidden")
    assert device(hub, owner, dev["id"])["config_version"] == 0
    add_member(hub, owner, manager, "manager")
    assert ok(patch(hub, manager, dev["id"], "io-config", body))["config_version"] == 1


def test_offline_patch_then_push_on_connect_audited(hub: RunningHub, track: Any) -> None:
    """A PATCH for an offline device answers 200; the device gets the whole configuration,
    at the last version, when it connects, and its ack is recorded; the changes are audited
    with the request id; an Idempotency-Key replay changes nothing."""
    user = register(hub)
    p, dev = claimed_device(hub, user)
    rid = f"cfg-{uuid.uuid4().hex[:8]}"
    body = {
        "inputs": [
            {"index": 2, "type": "rocker", "link": "linked", "rocker_mode": "flip"},
            {"index": 0, "type": "push", "link": "detached"},
        ]
    }
    key = {"Idempotency-Key": uuid.uuid4().hex}
    r = patch(hub, user, dev["id"], "io-config", body, **{"X-Request-ID": rid}, **key)
    first = ok(r)
    assert first["config_version"] == 1 and first["config_applied_version"] == 0
    assert first["io_config"] == [
        {"index": 0, "type": "push", "link": "detached", "rocker_mode": None},
        DEFAULT_IO[1],
        {"index": 2, "type": "rocker", "link": "linked", "rocker_mode": "flip"},
    ]
    assert [i["mode"] for i in first["inputs"]] == ["detached", "momentary", "edge"]
    replay = patch(hub, user, dev["id"], "io-config", body, **key)
    assert replay.headers.get("idempotency-replayed") == "true" and replay.json() == first
    second = ok(patch(hub, user, dev["id"], "power-restore-mode", {"mode": "restore"}))
    assert (second["config_version"], second["power_restore_mode"]) == (2, "restore")

    def entries() -> list[dict[str, Any]]:
        found = audit(hub, user, device_id=dev["id"], action="device_config_changed")["items"]
        return list(found)

    assert wait_until(lambda: len(entries()) == 2, 5), entries()
    time.sleep(NEGATIVE_WAIT_S)  # the replay wrote nothing
    assert len(entries()) == 2, entries()
    io_entry = next(e for e in entries() if e["request_id"] == rid)
    assert (io_entry["source"], io_entry["actor_type"], io_entry["actor_id"]) == (
        "api",
        "user",
        user.id,
    )
    assert io_entry["details"]["config_version"] == 1

    d = connect(hub, p, track)
    assert wait_until(lambda: d.configs(), 5), "no config pushed on connect"
    cmd = d.configs()[0]
    assert set(cmd) == {"type", "command_id", "config_version", "inputs", "power_restore_mode"}
    assert cmd["config_version"] == 2 and cmd["power_restore_mode"] == "restore"
    assert cmd["inputs"] == second["io_config"]
    assert wait_until(lambda: device(hub, user, dev["id"])["config_applied_version"] == 2, 5)
    time.sleep(NEGATIVE_WAIT_S)
    assert len(d.configs()) == 1, "the configuration was sent more than once"


def test_push_to_a_connected_ws_device(hub: RunningHub, track: Any) -> None:
    """A WebSocket device gets what changed while it was away when it connects, then every
    change at once; printed: PATCH → the document on the device's socket (the push
    latency), and PATCH → ack recorded."""
    user = register(hub)
    p, dev = claimed_device(hub, user)
    io = {"inputs": [{"index": 1, "type": "rocker", "link": "detached", "rocker_mode": "follow"}]}
    assert ok(patch(hub, user, dev["id"], "io-config", io))["config_version"] == 1
    ws = track(ConfigWsDevice(hub, p["device_uid"], p["device_token"]))
    first = ws.wait_for(lambda d: d.get("type") == "config")
    assert first is not None and first["config_version"] == 1, first
    inputs = [DEFAULT_IO[0], {**io["inputs"][0]}, DEFAULT_IO[2]]
    assert first["inputs"] == inputs and first["power_restore_mode"] == "off"
    assert wait_until(lambda: device(hub, user, dev["id"])["config_applied_version"] == 1, 5)
    times: list[tuple[float, float]] = []
    with hub.api(user.access_token) as c:  # one connection: the figure is the hub's
        for n, mode in enumerate(("on", "off", "restore", "on", "off"), 2):
            start = time.perf_counter()
            r = c.patch(f"/devices/{dev['id']}/power-restore-mode", json={"mode": mode})
            assert ok(r)["config_version"] == n
            doc = ws.wait_for(lambda d, n=n: d.get("type") == "config" and d["config_version"] == n)
            pushed = time.perf_counter() - start
            assert doc is not None and doc["power_restore_mode"] == mode
            assert doc["inputs"] == inputs
            assert wait_until(
                lambda n=n: ok(c.get(f"/devices/{dev['id']}"))["config_applied_version"] == n,
                5,
                step=0.002,
            )
            times.append((pushed, time.perf_counter() - start))
    best = min(times)
    print(
        f"\nconfig push over /ws/device: PATCH→document {best[0] * 1000:.1f} ms, "
        f"PATCH→applied (polled) {best[1] * 1000:.1f} ms (best of {len(times)})"
    )


def test_refused_acks_are_not_applied(hub: RunningHub, track: Any) -> None:
    """Acks with the wrong version, no version or an unknown or finished command id are
    counted and never raise config_applied_version; the right ack does."""
    user = register(hub)
    p, dev = claimed_device(hub, user)
    d = connect(hub, p, track, config_ack=False)
    assert wait_until(lambda: device(hub, user, dev["id"])["online"], 5)
    ok(patch(hub, user, dev["id"], "io-config", {"inputs": [_item(1, link="detached")]}))
    assert wait_until(lambda: d.configs(), 5)
    cmd = d.configs()[0]
    before = {r: config_acks(hub, r) for r in ("wrong_version", "unknown_command", "applied")}
    d.ack(cmd["command_id"], 7)  # a version the hub never sent
    d.ack(cmd["command_id"], None)  # no version at all
    d.ack(uuid.uuid4().hex, 1)  # a command the hub never sent
    assert wait_until(lambda: config_acks(hub, "wrong_version") >= before["wrong_version"] + 2, 5)
    assert wait_until(
        lambda: config_acks(hub, "unknown_command") >= before["unknown_command"] + 1, 5
    )
    assert device(hub, user, dev["id"])["config_applied_version"] == 0
    d.ack(cmd["command_id"], 1)
    assert wait_until(lambda: device(hub, user, dev["id"])["config_applied_version"] == 1, 5)
    assert config_acks(hub, "applied") >= before["applied"] + 1
    d.ack(cmd["command_id"], 1)  # once applied, the command is done: a replay is refused
    assert wait_until(
        lambda: config_acks(hub, "unknown_command") >= before["unknown_command"] + 2, 5
    )
    assert device(hub, user, dev["id"])["config_applied_version"] == 1


def test_report_with_an_older_version_gets_the_configuration_again(
    hub: RunningHub, track: Any
) -> None:
    """A report naming the current version brings nothing; one naming an older version
    (a factory reset) brings the whole configuration again."""
    user = register(hub)
    p, dev = claimed_device(hub, user)
    d = connect(hub, p, track)
    assert wait_until(lambda: device(hub, user, dev["id"])["online"], 5)
    ok(patch(hub, user, dev["id"], "power-restore-mode", {"mode": "on"}))
    assert wait_until(lambda: device(hub, user, dev["id"])["config_applied_version"] == 1, 5)
    d.report()  # reports the version it runs: nothing to send
    # and past the command timeout, within which the hub does not send a version twice
    time.sleep(max(NEGATIVE_WAIT_S, hub.settings.command_timeout_s))
    assert len(d.configs()) == 1
    d.config_version = 0  # as after a factory reset
    d.report()
    assert wait_until(lambda: len(d.configs()) == 2, 5), "no re-send after an older report"
    again = d.configs()[1]
    assert again["config_version"] == 1 and again["power_restore_mode"] == "on"
    assert wait_until(lambda: d.config_version == 1, 5)
    assert device(hub, user, dev["id"])["config_applied_version"] == 1


# --- hexa sim ---------------------------------------------------------------------------
def test_sim_applies_the_configuration(hub: RunningHub, track: Any) -> None:
    """Input 0 a detached push button, input 1 a linked rocker that the relay follows, input 2
    a linked rocker that flips its relay; then input 0 linked again."""
    user = register(hub)
    p, dev = claimed_device(hub, user)
    sim = track(SimThread(hub, p))
    obs = integration_client(hub, user, track, f"hexa/{p['device_uid']}/input/#")
    assert wait_until(lambda: device(hub, user, dev["id"])["online"], 5)

    def relays() -> list[bool]:
        return list(state_of(hub, user, dev["id"])["relays"])

    sim.call(sim.dev.press(1))  # factory defaults: a linked push button toggles its relay
    assert wait_until(lambda: relays() == [False, True, False], 5)
    body = {
        "inputs": [
            {"index": 0, "type": "push", "link": "detached"},
            {"index": 1, "type": "rocker", "link": "linked", "rocker_mode": "follow"},
            {"index": 2, "type": "rocker", "link": "linked", "rocker_mode": "flip"},
        ]
    }
    version = ok(patch(hub, user, dev["id"], "io-config", body))["config_version"]
    assert wait_until(lambda: device(hub, user, dev["id"])["config_applied_version"] == version, 5)
    assert sim.dev.config.version == version

    sim.call(sim.dev.press(0))  # detached: the event only
    assert obs.wait_for(lambda t, pl, r: t.endswith("/input/0/event") and b"press" in pl, 5)
    sim.call(sim.dev.rocker(1, False))  # follow: the relay takes the rocker's position
    assert wait_until(lambda: relays() == [False, False, False], 5)
    sim.call(sim.dev.rocker(1, True))
    assert wait_until(lambda: relays() == [False, True, False], 5)
    with hub.api(user.access_token) as c:  # relay 2 on, its rocker still off
        ok(c.post(f"/devices/{dev['id']}/relays/2", json={"state": True}))
    sim.call(sim.dev.rocker(2, True))  # flip: every change toggles (follow would keep it on)
    assert wait_until(lambda: relays() == [False, True, False], 5)
    sim.call(sim.dev.rocker(2, False))
    assert wait_until(lambda: relays() == [False, True, True], 5)
    assert state_of(hub, user, dev["id"])["inputs"] == [False, True, False]
    assert sim.dev.relays == [False, True, True]  # the press on detached input 0 did nothing

    ok(patch(hub, user, dev["id"], "io-config", {"inputs": [_item(0)]}))
    assert wait_until(lambda: sim.dev.config.inputs[0].link == "linked", 5)
    sim.call(sim.dev.press(0))
    assert wait_until(lambda: relays() == [True, True, True], 5)


def test_sim_config_units(tmp_path: Path) -> None:
    """The simulator's configuration and memory without a hub: bad documents are refused,
    and the state file keeps credentials and memory side by side."""
    config = SimConfig.factory(3)
    assert config.apply({"type": "config", "command_id": "c", "config_version": 1}) is not None
    partial = {
        "type": "config",
        "command_id": "c",
        "config_version": 1,
        "inputs": [DEFAULT_IO[0]],
        "power_restore_mode": "on",
    }
    assert config.apply(partial) == "expected inputs 0-2" and config.version == 0
    assert config.apply({**partial, "inputs": DEFAULT_IO}) is None and config.version == 1
    path = tmp_path / "sim.json"
    path.write_text(json.dumps({"url": "u", "devices": []}))
    SimStore(path).save("hx-1", config, [True, False, True])
    stored = json.loads(path.read_text())
    assert stored["devices"] == [] and stored["sims"]["hx-1"]["relays"] == [True, False, True]
    booted, relays = SimStore(path).boot("hx-1", 3, 3)
    assert booted.power_restore_mode == "on" and relays == [True] * 3
    assert SimStore(path).boot("hx-unknown", 3, 3)[1] == [False] * 3
    path.write_text("{not json")
    assert SimStore(path).boot("hx-1", 3, 3)[1] == [False] * 3


def _run_sim(hub: RunningHub, state: Path) -> subprocess.Popen[str]:
    argv = [
        sys.executable, "-m", "hexa.hub.cli", "sim", "--devices", "1", "--url", hub.base,
        "--provision-key", PROVISION_KEY, "--state-file", str(state), "--mqtt-host",
        "127.0.0.1", "--mqtt-port", str(hub.mqtt_port), "--report-every", "3600",
    ]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def test_sim_honours_power_restore_across_restarts(hub: RunningHub, tmp_path: Path) -> None:
    """``hexa sim --state-file`` restarted: ``restore`` brings back the relays it had, ``on``
    switches them all on, ``off`` all off. What the simulator runs with is read from the
    ack of a relay command right after it connects (an ack carries all its relays)."""
    user = register(hub)
    state = tmp_path / "sim-state.json"
    proc = _run_sim(hub, state)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        found = re.match(r"(\S+)\s+claim code (\S+)", line)
        assert found, line
        dev = claim(hub, user, found.group(2))
        assert wait_until(lambda: device(hub, user, dev["id"])["online"], 10)
        ok(patch(hub, user, dev["id"], "power-restore-mode", {"mode": "restore"}))
        with hub.api(user.access_token) as c:
            ok(c.post(f"/devices/{dev['id']}/relays/1", json={"state": True}))
        assert wait_until(lambda: device(hub, user, dev["id"])["config_applied_version"] == 1, 5)
    finally:
        _stop(proc)
    plan = [
        ("restore", [False, True, False], "on"),
        ("on", [True] * 3, "off"),
        ("off", [False] * 3, None),
    ]
    for mode, expected, following in plan:
        assert wait_until(lambda: not device(hub, user, dev["id"])["online"], 10)
        proc = _run_sim(hub, state)
        try:
            assert wait_until(lambda: device(hub, user, dev["id"])["online"], 15), mode
            with hub.api(user.access_token) as c:
                r = ok(c.post(f"/devices/{dev['id']}/relays/0", json={"state": expected[0]}))
            assert r["relays"] == expected, (mode, r)
            if following is not None:
                v = ok(patch(hub, user, dev["id"], "power-restore-mode", {"mode": following}))
                assert wait_until(
                    lambda v=v: (
                        device(hub, user, dev["id"])["config_applied_version"]
                        == v["config_version"]
                    ),
                    5,
                )
        finally:
            _stop(proc)
    stored = json.loads(state.read_text())["sims"][dev["device_uid"]]
    assert stored["config"]["power_restore_mode"] == "off" and stored["config"]["version"] == 3
