"""The HomeKit bridge (contract §6) driven by aiohomekit, a real HomeKit controller, against
a real hub: pairing by address with the setup code, the accessories a controller sees,
switching relays of a simulated paho device, events, restarts, forgotten pairings, stable
AIDs, the 149-device limit, and the answers to bad input. On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import re
import socket
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohomekit.characteristic_cache import CharacteristicCacheMemory
from aiohomekit.controller.ip.controller import IpController
from aiohomekit.controller.ip.pairing import IpPairing
from aiohomekit.crypto.srp import SrpClient
from aiohomekit.exceptions import AccessoryDisconnectedError, AuthenticationError
from aiohomekit.model import Categories
from aiohomekit.model.status_flags import StatusFlags
from aiohomekit.uuid import normalize_uuid
from pyhap.params import get_srp_context
from pyhap.util import long_to_bytes
from support.accounts import User, add_member, audit, register
from support.checks import assert_error, ok, wait_until
from support.databases import migrated_database_url
from support.devices import claimed_device, online_device, resource_relays
from support.homekit import controller, pair, pair_through
from support.hubs import COMMAND_TIMEOUT_MS, JWT_SECRET, RunningHub, spawn_hub, stop_hub
from support.mqtt import MqttDevice
from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

from hexa.bridges.homekit_hap import PairSetupSrp
from hexa.bridges.homekit_org import MAX_PENDING_WRITES
from hexa.hub.homekit import MAX_DEVICES, open_state, setup_uri

pytestmark = pytest.mark.anyio

SWITCH = normalize_uuid("49")
INFORMATION = normalize_uuid("3E")
ON = normalize_uuid("25")
NAME = normalize_uuid("23")
INFO = {
    "name": normalize_uuid("23"),
    "manufacturer": normalize_uuid("20"),
    "model": normalize_uuid("21"),
    "serial": normalize_uuid("30"),
    "firmware": normalize_uuid("52"),
}
COMMUNICATION_FAILURE = -70402
RESOURCE_BUSY = -70403
TIMED_OUT = -70408
NO_SUCH_RESOURCE = -70409
INVALID_VALUE = -70410


# --- helpers -------------------------------------------------------------------------------
def enable(hub: RunningHub, user: User, org_id: str | None = None, **body: Any) -> dict[str, Any]:
    """``PUT /orgs/{id}/homekit {"enabled": true, …}``; the answer."""
    with hub.api(user.access_token) as c:
        return dict(
            ok(c.put(f"/orgs/{org_id or user.org_id}/homekit", json={"enabled": True, **body}))
        )


def homekit_of(hub: RunningHub, user: User) -> dict[str, Any]:
    with hub.api(user.access_token) as c:
        return dict(ok(c.get(f"/orgs/{user.org_id}/homekit")))


def reconnect(pairing: IpPairing) -> IpPairing:
    """The same pairing (keys and address) in a new controller, as after its restart."""
    return IpPairing(controller(), dict(pairing.pairing_data))


@contextlib.asynccontextmanager
async def paired(bridge: dict[str, Any]) -> AsyncIterator[IpPairing]:
    pairing = await pair(bridge)
    try:
        yield pairing
    finally:
        await pairing.close()


def info_of(accessory: dict[str, Any]) -> dict[str, Any]:
    """The accessory's information service: name, manufacturer, model, serial, firmware."""
    values = {}
    for service in accessory["services"]:
        if normalize_uuid(service["type"]) != INFORMATION:
            continue
        for char in service["characteristics"]:
            for key, kind in INFO.items():
                if normalize_uuid(char["type"]) == kind:
                    values[key] = char.get("value")
    return values


def switches(accessory: dict[str, Any]) -> list[dict[str, Any]]:
    """Each Switch service as {"name", "on", "iid"} (the iid of its On)."""
    found = []
    for service in accessory["services"]:
        if normalize_uuid(service["type"]) != SWITCH:
            continue
        chars = {normalize_uuid(c["type"]): c for c in service["characteristics"]}
        found.append(
            {"name": chars[NAME]["value"], "on": chars[ON]["value"], "iid": chars[ON]["iid"]}
        )
    return found


def by_serial(accessories: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {info_of(a).get("serial"): a for a in accessories if a["aid"] != 1}


async def accessories_of(pairing: IpPairing) -> dict[str, dict[str, Any]]:
    return by_serial(await pairing.list_accessories_and_characteristics())


def events_of(pairing: IpPairing) -> asyncio.Queue[dict[Any, Any]]:
    queue: asyncio.Queue[dict[Any, Any]] = asyncio.Queue()
    pairing.dispatcher_connect(queue.put_nowait)
    return queue


async def value_event(
    queue: asyncio.Queue[dict[Any, Any]], key: tuple[int, int], value: Any, timeout: float = 5
) -> bool:
    """Whether an event brings ``value`` for ``key`` before the deadline (the others are
    skipped: aiohomekit also reports the controller's own writes)."""

    async def find() -> bool:
        while True:
            event = await queue.get()
            if event.get(key, {}).get("value") == value:
                return True

    try:
        return await asyncio.wait_for(find(), timeout)
    except TimeoutError:
        return False


async def until(predicate: Callable[[], Any], timeout: float = 15) -> bool:
    """Whether ``predicate`` holds before the deadline (checked every 50 ms)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def switch_rest(hub: RunningHub, user: User, device_id: str, index: int, state: bool) -> None:
    with hub.api(user.access_token) as c:
        ok(c.post(f"/devices/{device_id}/relays/{index}", json={"state": state}))


def release(hub: RunningHub, user: User, device_id: str) -> None:
    with hub.api(user.access_token) as c:
        ok(c.post(f"/devices/{device_id}/release"))


# --- pair-setup ----------------------------------------------------------------------------
def test_pair_setup_exchange_agrees_with_controllers() -> None:
    """The bridge's SRP exchange agrees with a controller's (aiohomekit's, padded as iOS
    pads) every time, also when S, K or B starts with a zero byte: HAP-python's own
    refuses the right setup code about once in 85 exchanges."""
    context = get_srp_context(3072, hashlib.sha512, 16)
    for _ in range(200):
        server = PairSetupSrp(context, b"Pair-Setup", b"123-45-679")
        salt, public = server.get_challenge()
        client = SrpClient("Pair-Setup", "123-45-679")
        client.set_salt(bytearray(salt))
        client.set_server_public_key(long_to_bytes(public))  # as the bridge sends it
        server.set_A(client.get_public_key_bytes())
        proof = server.verify(client.get_proof_bytes())
        assert proof is not None and client.verify_servers_proof_bytes(proof)
        assert long_to_bytes(server.get_session_key()) == client.get_session_key_bytes()


# --- settings ----------------------------------------------------------------------------
def test_settings_and_setup_payload(hub: RunningHub) -> None:
    """GET answers a disabled bridge before it was enabled; PUT enables it on a free port
    with a HAP setup code and an X-HM:// URI that encodes it; the identity stays when the
    bridge is disabled and enabled again."""
    user = register(hub)
    assert homekit_of(hub, user) == {
        "enabled": False,
        "port": None,
        "hap_id": None,
        "setup_code": None,
        "setup_uri": None,
        "paired": False,
        "accessories": 0,
    }
    first = enable(hub, user, port=0)
    assert first["enabled"] is True and first["paired"] is False and first["accessories"] == 0
    assert isinstance(first["port"], int) and first["port"] > 0
    assert re.fullmatch(r"\d{3}-\d{2}-\d{3}", first["setup_code"])
    assert re.fullmatch(r"([0-9A-F]{2}:){5}[0-9A-F]{2}", first["hap_id"])
    uri = first["setup_uri"]
    assert re.fullmatch(r"X-HM://[0-9A-Z]{13}", uri)
    payload = int(uri[7:16], 36)
    assert payload & 0x7FFFFFF == int(first["setup_code"].replace("-", ""))
    assert (payload >> 31) & 0xFF == 2  # category: bridge
    assert uri == setup_uri(first["setup_code"], uri[-4:])
    with hub.api(user.access_token) as c:
        off = ok(c.put(f"/orgs/{user.org_id}/homekit", json={"enabled": False}))
    assert off["enabled"] is False and off["setup_code"] == first["setup_code"]
    with pytest.raises(ConnectionRefusedError):  # nothing serves the port now
        socket.create_connection(("127.0.0.1", first["port"]), timeout=2).close()
    again = enable(hub, user)
    assert {k: again[k] for k in ("hap_id", "setup_code", "setup_uri", "port")} == {
        k: first[k] for k in ("hap_id", "setup_code", "setup_uri", "port")
    }


def test_settings_need_admin_of_the_org(hub: RunningHub) -> None:
    """Only admins and owners of the organization see or change its bridge: a viewer or
    operator gets 403, another tenant 404; bad bodies are 400 and a taken port 409."""
    owner, operator, stranger = register(hub), register(hub), register(hub)
    add_member(hub, owner, operator, "operator")
    with hub.api(operator.access_token) as c:
        assert_error(c.get(f"/orgs/{owner.org_id}/homekit"), 403, "forbidden")
        assert_error(c.put(f"/orgs/{owner.org_id}/homekit", json={"enabled": True}), 403)
        assert_error(c.delete(f"/orgs/{owner.org_id}/homekit/pairings"), 403)
    with hub.api(stranger.access_token) as c:
        assert_error(c.get(f"/orgs/{owner.org_id}/homekit"), 404, "not_found")
        assert_error(c.put(f"/orgs/{owner.org_id}/homekit", json={"enabled": True}), 404)
    with hub.api(owner.access_token) as c:
        for body in ({"enabled": True, "port": 70000}, {"enabled": "maybe"}, {"port": 0}):
            assert_error(c.put(f"/orgs/{owner.org_id}/homekit", json=body), 400)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            r = c.put(f"/orgs/{owner.org_id}/homekit", json={"enabled": True, "port": port})
            assert_error(r, 409, "conflict")
            assert str(port) in r.json()["message"]
    assert homekit_of(hub, owner)["enabled"] is False  # refused: nothing changed
    running = enable(hub, owner)
    with hub.api(owner.access_token) as c, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        r = c.put(
            f"/orgs/{owner.org_id}/homekit", json={"enabled": True, "port": taken.getsockname()[1]}
        )
        assert_error(r, 409, "conflict")
    assert homekit_of(hub, owner) == running  # still where it was, still serving
    socket.create_connection(("127.0.0.1", running["port"]), timeout=2).close()


def test_moving_to_another_port(hub: RunningHub) -> None:
    """PUT with another port moves the running bridge there; the old port is closed."""
    user = register(hub)
    first = enable(hub, user)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        wanted = probe.getsockname()[1]
    moved = enable(hub, user, port=wanted)
    assert moved["port"] == wanted and moved["hap_id"] == first["hap_id"]
    socket.create_connection(("127.0.0.1", wanted), timeout=2).close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", first["port"]), timeout=2).close()


async def test_found_through_mdns(hub: RunningHub, track: Any) -> None:
    """Controllers find the bridge through mDNS (_hap._tcp) with its id, port and the
    bridge category, pair with what they found, and see it advertised as paired and its
    configuration number rise when a device is claimed."""
    user = register(hub)
    bridge = enable(hub, user)
    ident = bridge["hap_id"].lower()
    zeroconf = AsyncZeroconf()
    # aiohomekit listens to a browser its host application runs (as Home Assistant does)
    browser = AsyncServiceBrowser(
        zeroconf.zeroconf, ["_hap._tcp.local."], handlers=[lambda **_: None]
    )
    finder = IpController(char_cache=CharacteristicCacheMemory(), zeroconf_instance=zeroconf)
    await finder.async_start()
    try:
        found = await finder.async_find(ident, timeout=15)
        assert found.description.port == bridge["port"]
        assert found.description.category == Categories.BRIDGE
        assert found.description.status_flags & StatusFlags.UNPAIRED
        config = found.description.config_num
        pairing = await pair_through(lambda: found, bridge["setup_code"], close=False)
        try:
            assert await until(lambda: not finder.discoveries[ident].description.status_flags)
            await asyncio.to_thread(claimed_device, hub, user)
            assert await until(lambda: finder.discoveries[ident].description.config_num > config)
        finally:
            await pairing.close()
    finally:
        await finder.async_stop()
        await browser.async_cancel()
        await zeroconf.async_close()


# --- a controller's view and writes -------------------------------------------------------
async def test_pair_list_switch_and_events(hub: RunningHub, track: Any) -> None:
    """A controller pairs by address with the setup code and sees one accessory per device
    (Hexa, model, uid, firmware) with a named Switch per relay; its write switches the
    relay through the relay service (the device acks) and is audited as homekit; a change
    made through REST reaches it as an event."""
    user = register(hub)
    dev, device = online_device(hub, user, track)
    with hub.api(user.access_token) as c:
        ok(c.patch(f"/devices/{dev['id']}", json={"name": "Kitchen"}))
    bridge = enable(hub, user)
    assert bridge["accessories"] == 1
    async with paired(bridge) as pairing:
        assert (await asyncio.to_thread(homekit_of, hub, user))["paired"] is True
        accessory = (await accessories_of(pairing))[device.uid]
        assert info_of(accessory) == {
            "name": "Kitchen",
            "manufacturer": "Hexa",
            "model": "hexa-mini-switch-v1",
            "serial": device.uid,
            "firmware": "1.0.0",
        }
        relays = switches(accessory)
        assert [r["on"] for r in relays] == [False, False, False]
        assert len({r["name"] for r in relays}) == 3
        aid = accessory["aid"]
        answer = await pairing.put_characteristics([(aid, relays[1]["iid"], True)])
        assert answer == {}  # 204: applied
        assert device.commands[-1]["relay_index"] == 1 and device.commands[-1]["state"] is True
        assert await asyncio.to_thread(resource_relays, hub, user, dev["id"]) == [
            False,
            True,
            False,
        ]

        def audited() -> bool:
            entries = audit(hub, user, action="relay_command", device_id=dev["id"])["items"]
            return any(e["source"] == "homekit" for e in entries)

        assert await asyncio.to_thread(wait_until, audited)  # the audit log is written in batches
        read = await pairing.get_characteristics([(aid, relays[1]["iid"])])
        assert read[(aid, relays[1]["iid"])]["value"] is True

        events = events_of(pairing)
        key = (aid, relays[2]["iid"])
        await pairing.subscribe([key])
        await asyncio.to_thread(switch_rest, hub, user, dev["id"], 2, True)
        assert await value_event(events, key, True)
        await asyncio.to_thread(switch_rest, hub, user, dev["id"], 2, False)
        assert await value_event(events, key, False)


async def test_each_organization_sees_only_its_devices(hub: RunningHub, track: Any) -> None:
    """Two organizations' bridges: each controller sees and switches only its own
    organization's device (the AIDs of both start at 2), and a state change of the other
    organization's device never reaches it."""
    alice, bob = register(hub), register(hub)
    dev_a, a = online_device(hub, alice, track)
    dev_b, b = online_device(hub, bob, track)
    bridge_a, bridge_b = enable(hub, alice), enable(hub, bob)
    assert bridge_a["port"] != bridge_b["port"] and bridge_a["hap_id"] != bridge_b["hap_id"]
    async with paired(bridge_a) as home_a, paired(bridge_b) as home_b:
        seen_a, seen_b = await accessories_of(home_a), await accessories_of(home_b)
        assert set(seen_a) == {a.uid} and set(seen_b) == {b.uid}
        key_a = (seen_a[a.uid]["aid"], switches(seen_a[a.uid])[0]["iid"])
        key_b = (seen_b[b.uid]["aid"], switches(seen_b[b.uid])[0]["iid"])
        assert key_a == key_b  # the same ids, in two bridges
        events_b = events_of(home_b)
        await home_b.subscribe([key_b])
        await asyncio.to_thread(switch_rest, hub, bob, dev_b["id"], 0, True)
        assert await value_event(events_b, key_b, True)
        assert (await home_a.get_characteristics([key_a]))[key_a]["value"] is False
        assert await home_a.put_characteristics([(*key_a, True)]) == {}
        assert [(c["relay_index"], c["state"]) for c in a.commands] == [(0, True)]
        assert [(c["relay_index"], c["state"]) for c in b.commands] == [(0, True)]  # REST's
    assert resource_relays(hub, alice, dev_a["id"])[0] is True


async def test_offline_device_answers_communication_failure(hub: RunningHub, track: Any) -> None:
    """A write to a device that is not connected answers -70402 and sends nothing; a read
    of it answers -70402 too (Home shows "No Response")."""
    user = register(hub)
    _, dev = claimed_device(hub, user)
    bridge = enable(hub, user)
    async with paired(bridge) as pairing:
        accessory = next(iter((await accessories_of(pairing)).values()))
        key = (accessory["aid"], switches(accessory)[0]["iid"])
        answer = await pairing.put_characteristics([(*key, True)])
        assert answer[key]["status"] == COMMUNICATION_FAILURE
        read = await pairing.get_characteristics([key])
        assert read[key]["status"] == COMMUNICATION_FAILURE
    assert resource_relays(hub, user, dev["id"]) == [False, False, False]


async def test_released_device_and_stable_aids(hub: RunningHub, track: Any) -> None:
    """Releasing a device removes its accessory (configuration number bumped) and a write
    to it answers -70409 without a command; the other device keeps its AID, and a newly
    claimed one gets an AID never used before."""
    user = register(hub)
    dev_a, a = online_device(hub, user, track)
    _, b = online_device(hub, user, track)
    bridge = enable(hub, user)
    async with paired(bridge) as pairing:
        before = await accessories_of(pairing)
        aid_a, aid_b = before[a.uid]["aid"], before[b.uid]["aid"]
        key = (aid_a, switches(before[a.uid])[0]["iid"])
        await asyncio.to_thread(release, hub, user, dev_a["id"])
        sent = len(a.commands)
        answer = await pairing.put_characteristics([(*key, True)])
        assert answer[key]["status"] == NO_SUCH_RESOURCE
        assert len(a.commands) == sent
        _, c = online_device(hub, user, track)
        after = await accessories_of(pairing)
        assert set(after) == {b.uid, c.uid}
        assert after[b.uid]["aid"] == aid_b
        assert after[c.uid]["aid"] not in (aid_a, aid_b)
    assert homekit_of(hub, user)["accessories"] == 2


async def test_renamed_relay_reaches_controllers(hub: RunningHub, track: Any) -> None:
    """Renaming a device or its relays renames the accessory and its Switches for
    controllers; odd names (quotes, emoji, control characters, 200 characters) arrive
    printable and cut to HomeKit's 64 characters, and an unnamed relay is named after its
    device."""
    user = register(hub)
    dev, device = online_device(hub, user, track)
    bridge = enable(hub, user)
    odd = '"Küche" 🏠 \t' + "x" * 180
    async with paired(bridge) as pairing:
        with hub.api(user.access_token) as c:
            body = {"name": "Hall", "relay_names": ["Lamp", None, odd]}
            ok(c.patch(f"/devices/{dev['id']}", json=body))
        accessory = (await accessories_of(pairing))[device.uid]
        names = [r["name"] for r in switches(accessory)]
        assert names[:2] == ["Lamp", "Hall relay 2"]
        assert names[2].startswith('"Küche" 🏠 xxx') and len(names[2]) == 64
        with hub.api(user.access_token) as c:
            ok(c.patch(f"/devices/{dev['id']}", json={"name": odd}))
        renamed = (await accessories_of(pairing))[device.uid]
        assert renamed["aid"] == accessory["aid"]
        assert info_of(renamed)["name"] == names[2]
        unnamed = switches(renamed)[1]["name"]
        assert len(unnamed) == 64 and unnamed.endswith("x relay 2")


# --- bad input ---------------------------------------------------------------------------
async def test_unpaired_controller_gets_nothing(hub: RunningHub, track: Any) -> None:
    """A controller with a wrong setup code does not pair; one with keys the bridge never
    paired cannot open a session; an unencrypted write is refused; nothing switches."""
    user = register(hub)
    dev, device = online_device(hub, user, track)
    bridge = enable(hub, user)
    code = bridge["setup_code"]
    wrong = f"{(int(code[0]) + 1) % 10}{code[1:]}"
    with pytest.raises(AuthenticationError):
        await pair(bridge, wrong)
    async with paired(bridge) as genuine:
        accessory = (await accessories_of(genuine))[device.uid]
        data = dict(genuine.pairing_data)
    stranger = dict(data)
    stranger["iOSDeviceLTSK"] = "11" * 32
    stranger["iOSDeviceLTPK"] = "22" * 32
    stranger["iOSPairingId"] = str(uuid.uuid4())
    forged = IpPairing(controller(), stranger)
    with pytest.raises((AuthenticationError, AccessoryDisconnectedError)):
        await forged.put_characteristics([(accessory["aid"], switches(accessory)[0]["iid"], True)])
    with contextlib.suppress(AuthenticationError, AccessoryDisconnectedError):
        await forged.close()  # re-raises what its connection met
    body = json.dumps({"characteristics": [{"aid": accessory["aid"], "iid": 9, "value": True}]})
    r = httpx.put(
        f"http://127.0.0.1:{bridge['port']}/characteristics",
        content=body,
        headers={"Content-Type": "application/hap+json"},
        timeout=5,
    )
    assert r.status_code in (401, 470)
    assert device.commands == []
    assert resource_relays(hub, user, dev["id"]) == [False, False, False]


async def test_timed_writes(hub: RunningHub, track: Any) -> None:
    """A timed write (HAP's ``/prepare``, then the write with its ``pid``) switches the
    relay; one whose ``pid`` was never prepared answers -70410 and switches nothing."""
    user = register(hub)
    _, device = online_device(hub, user, track)
    bridge = enable(hub, user)
    async with paired(bridge) as pairing:
        accessory = (await accessories_of(pairing))[device.uid]
        write = {"aid": accessory["aid"], "iid": switches(accessory)[0]["iid"], "value": True}
        connection = pairing.connection
        stale = await connection.put_json(
            "/characteristics", {"characteristics": [write], "pid": 7}
        )
        assert [c["status"] for c in stale["characteristics"]] == [INVALID_VALUE]
        assert device.commands == []
        prepared = await connection.put_json("/prepare", {"ttl": 5000, "pid": 8})
        assert prepared == {"status": 0}
        done = await connection.put_json("/characteristics", {"characteristics": [write], "pid": 8})
        assert done == {}
        assert [(c["relay_index"], c["state"]) for c in device.commands] == [(0, True)]


async def test_malformed_writes(hub: RunningHub, track: Any) -> None:
    """A paired controller's malformed writes (not JSON, not an object, wrong types, a
    subscription without its ids) get HAP error answers; nothing switches and the same
    session goes on working."""
    user = register(hub)
    _, device = online_device(hub, user, track)
    bridge = enable(hub, user)
    async with paired(bridge) as pairing:
        accessory = (await accessories_of(pairing))[device.uid]
        aid, iid = accessory["aid"], switches(accessory)[0]["iid"]
        connection = pairing.connection
        for body in (b"{not json", b"[1, 2]", b'{"characteristics": [{"ev": true}]}'):
            answer = await connection.put("/characteristics", body)
            assert answer.code == 500 and json.loads(answer.body) == {"status": -70402}
        for write in (
            {"aid": str(aid), "iid": iid, "value": True},
            {"aid": aid, "iid": iid, "value": "on"},
            {"aid": aid, "iid": iid, "value": 2},
        ):
            answer = await connection.put_json("/characteristics", {"characteristics": [write]})
            assert [c["status"] for c in answer["characteristics"]] == [INVALID_VALUE], write
        assert device.commands == []
        assert await pairing.put_characteristics([(aid, iid, True)]) == {}
        assert [(c["relay_index"], c["state"]) for c in device.commands] == [(0, True)]


async def test_controller_vanishing_mid_write(hub: RunningHub, track: Any) -> None:
    """A controller that drops its connection while its write waits for a slow device
    leaves the bridge serving: the intent completes, and controllers go on working."""
    user = register(hub)
    dev, device = online_device(hub, user, track, auto_ack=False)
    bridge = enable(hub, user)
    pairing = await pair(bridge)
    accessory = (await accessories_of(pairing))[device.uid]
    key = (accessory["aid"], switches(accessory)[0]["iid"])
    write = asyncio.ensure_future(pairing.put_characteristics([(*key, True)]))
    assert await until(lambda: device.commands), "the write never reached the device"
    transport = pairing.connection.transport
    assert transport is not None
    transport.abort()  # gone without a word
    with contextlib.suppress(Exception):
        await asyncio.wait_for(write, COMMAND_TIMEOUT_MS / 1000 + 5)
    await pairing.close()
    device.auto_ack = True
    again = reconnect(pairing)
    try:
        answer = await again.put_characteristics([(*key, True)])
        assert answer == {}
        read = await again.get_characteristics([key])
        assert read[key]["value"] is True
    finally:
        await again.close()
    assert resource_relays(hub, user, dev["id"])[0] is True


async def test_too_many_unanswered_writes(hub: RunningHub, track: Any) -> None:
    """With 64 writes waiting for devices that do not answer, the 65th answers -70403
    (busy) at once; the others answer -70408 (timed out) after the command timeout."""
    user = register(hub)
    silent = [online_device(hub, user, track, auto_ack=False)[1] for _ in range(3)]
    bridge = enable(hub, user)
    first = await pair(bridge)
    listed = await accessories_of(first)
    keys = [(listed[d.uid]["aid"], switches(listed[d.uid])[0]["iid"]) for d in silent]
    sessions = [first] + [reconnect(first) for _ in range(MAX_PENDING_WRITES)]
    try:
        for session in sessions[1:]:  # each its own HAP session (connection)
            await session.get_characteristics([keys[0]])
        answers = await asyncio.gather(
            *(s.put_characteristics([(*keys[i % 3], True)]) for i, s in enumerate(sessions))
        )
    finally:
        for session in sessions:
            await session.close()
    statuses = sorted(answer[key]["status"] for answer in answers for key in answer)
    assert statuses.count(RESOURCE_BUSY) >= 1, statuses
    assert set(statuses) == {RESOURCE_BUSY, TIMED_OUT}, statuses


async def test_forgetting_pairings(hub: RunningHub, track: Any) -> None:
    """DELETE /orgs/{id}/homekit/pairings ends every controller's access at once (the ones
    a home shared the bridge with too); the setup code pairs a new one; a home that removes
    the bridge leaves it unpaired. The audit log has the settings changes by their user
    and each pairing by its controller's id."""
    user = register(hub)
    online_device(hub, user, track)
    bridge = enable(hub, user)
    old = await pair(bridge)
    await old.list_accessories_and_characteristics()
    shared = str(uuid.uuid4()).upper()  # the home shared with another person
    assert await old.add_pairing(shared, "ab" * 32, "User")
    with hub.api(user.access_token, **{"X-Request-ID": "forget-pairings-1"}) as c:
        forgotten = ok(c.delete(f"/orgs/{user.org_id}/homekit/pairings"))
    assert forgotten["paired"] is False
    await old.close()
    with pytest.raises((AuthenticationError, AccessoryDisconnectedError)):
        await reconnect(old).list_accessories_and_characteristics()
    async with paired(bridge) as fresh:
        assert len(await fresh.list_accessories_and_characteristics()) == 2
        assert (await asyncio.to_thread(homekit_of, hub, user))["paired"] is True
        fresh_id = fresh.pairing_data["iOSPairingId"].lower()
        await fresh.remove_pairing(fresh_id)  # the home removes the bridge
    assert homekit_of(hub, user)["paired"] is False

    def entries(action: str) -> list[dict[str, Any]]:
        return list(audit(hub, user, action=action)["items"])

    by_user = {"actor_type": "user", "actor_id": user.id, "source": "api"}
    for action in ("homekit_enabled", "homekit_pairings_reset"):
        found = await asyncio.to_thread(wait_until, lambda a=action: entries(a))
        assert [{k: e[k] for k in by_user} for e in found] == [by_user], action
    assert entries("homekit_pairings_reset")[0]["request_id"] == "forget-pairings-1"
    assert await asyncio.to_thread(wait_until, lambda: entries("homekit_controller_unpaired"))
    found = entries("homekit_controller_paired") + entries("homekit_controller_unpaired")
    assert len(found) == 4  # the old controller, the one it shared with and the fresh one
    assert {(e["action"], e["actor_id"]) for e in found} >= {
        ("homekit_controller_paired", shared.lower()),
        ("homekit_controller_paired", fresh_id),
        ("homekit_controller_unpaired", fresh_id),
    }
    assert {(e["source"], e["actor_type"]) for e in found} == {("homekit", "homekit_controller")}


def test_at_most_149_devices(hub: RunningHub) -> None:
    """The 150th device of an organization is not bridged: the bridge keeps 149 and the
    audit log says why; releasing one device makes room for it."""
    user = register(hub)
    bridge = enable(hub, user)
    devices = [claimed_device(hub, user)[1] for _ in range(MAX_DEVICES + 1)]
    assert homekit_of(hub, user)["accessories"] == MAX_DEVICES
    entries = wait_until(lambda: audit(hub, user, action="homekit_not_bridged")["items"])
    assert [e["device_id"] for e in entries] == [devices[-1]["id"]]
    assert str(MAX_DEVICES) in entries[0]["details"]["reason"]

    async def count() -> int:
        async with paired(bridge) as pairing:
            return len(await pairing.list_accessories_and_characteristics())

    assert asyncio.run(count()) == MAX_DEVICES + 1  # the bridge itself, and 149
    release(hub, user, devices[0]["id"])
    assert homekit_of(hub, user)["accessories"] == MAX_DEVICES


# --- restarts ----------------------------------------------------------------------------
def stored_state(url: str, org_id: str) -> str:
    """The organization's ``homekit_bridges.hap_state`` as the database holds it."""
    return _sql(
        url,
        "SELECT hap_state FROM homekit_bridges WHERE org_id = ?",
        "SELECT hap_state::text FROM homekit_bridges WHERE org_id = $1::uuid",
        org_id,
    )


def store_state(url: str, org_id: str, text: str) -> None:
    """Write ``hap_state`` as an older hub would have."""
    _sql(
        url,
        "UPDATE homekit_bridges SET hap_state = ? WHERE org_id = ? RETURNING id",
        "UPDATE homekit_bridges SET hap_state = $2::jsonb WHERE org_id = $1::uuid RETURNING id",
        org_id,
        text,
        sqlite_args=(text, org_id),
    )


def _sql(
    url: str, sqlite: str, postgres: str, *args: str, sqlite_args: tuple[str, ...] = ()
) -> str:
    """The first column of the one row ``sqlite`` or ``postgres`` (by ``url``) answers."""
    if url.startswith("sqlite://"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite://"))) as conn, conn:
            row = conn.execute(sqlite, sqlite_args or args).fetchone()
        return str(row[0])
    import asyncpg

    async def run() -> str:
        conn = await asyncpg.connect(url.replace("postgres://", "postgresql://", 1))
        try:
            return str(await conn.fetchval(postgres, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


def threads_of(hub: RunningHub) -> list[str]:
    """The names of the threads of a spawned hub's process (Linux)."""
    tasks = Path(f"/proc/{hub.proc.pid}/task")
    return sorted((task / "comm").read_text().strip() for task in tasks.iterdir())


def test_pairing_survives_restart(db_kind: str, tmp_path: Path, track: Callable[..., Any]) -> None:
    """After `hexa serve` restarts, the bridge is back on the same port with the same
    identity and accessory ids, and the controller paired before goes on without pairing
    again: it reads, switches and gets events. The bridge adds no thread to the process."""
    url, drop = migrated_database_url(db_kind, tmp_path)
    data = tmp_path / "data"
    try:
        first = spawn_hub(url, data)
        try:
            user = register(first)
            dev, device = online_device(first, user, track)
            threads = threads_of(first)
            bridge = enable(first, user)

            async def before() -> tuple[dict[str, Any], dict[str, Any]]:
                async with paired(bridge) as pairing:
                    accessory = (await accessories_of(pairing))[device.uid]
                    return dict(pairing.pairing_data), accessory

            pairing_data, accessory = asyncio.run(before())
            # HAP-python and zeroconf run on the hub's event loop: no thread of their own
            assert threads_of(first) == threads
            device.close()
        finally:
            stop_hub(first)
        assert first.proc.returncode == 0  # SIGTERM with a bridge running: a clean exit
        # the HAP keys are stored sealed; a state an older hub stored in clear still opens
        sealed = stored_state(url, user.org_id)
        assert set(json.loads(sealed)) == {"sealed"} and "private_key" not in sealed
        clear = open_state(JWT_SECRET, uuid.UUID(user.org_id), json.loads(sealed))
        assert clear is not None and clear["private_key"] and clear["paired_clients"]
        store_state(url, user.org_id, json.dumps(clear))
        second = spawn_hub(url, data)
        try:
            again = homekit_of(second, user)
            assert again["paired"] is True
            assert set(json.loads(stored_state(url, user.org_id))) == {"sealed"}  # at start
            assert {k: again[k] for k in ("port", "hap_id", "setup_code")} == {
                k: bridge[k] for k in ("port", "hap_id", "setup_code")
            }
            device = track(MqttDevice(second, device.uid, dev["device_token"]))
            assert device.ok()

            async def after() -> None:
                pairing = IpPairing(controller(), pairing_data)
                try:
                    listed = await accessories_of(pairing)
                    assert listed[device.uid]["aid"] == accessory["aid"]
                    key = (accessory["aid"], switches(accessory)[0]["iid"])
                    events = events_of(pairing)
                    await pairing.subscribe([key])
                    for _ in range(100):
                        read = await pairing.get_characteristics([key])
                        if read[key].get("status") is None:
                            break
                        await asyncio.sleep(0.05)  # until the hub has seen the device online
                    assert await pairing.put_characteristics([(*key, True)]) == {}
                    await asyncio.to_thread(switch_rest, second, user, dev["id"], 0, False)
                    assert await value_event(events, key, False)
                finally:
                    await pairing.close()

            asyncio.run(after())
        finally:
            stop_hub(second)
    finally:
        drop()


def test_taken_port_at_start_and_bridges_off(db_kind: str, tmp_path: Path) -> None:
    """A bridge whose port (picked by the hub) is taken when the hub starts moves to a
    free one; with HEXA_HOMEKIT_BIND=off a hub runs no bridge and still stores settings."""
    url, drop = migrated_database_url(db_kind, tmp_path)
    data = tmp_path / "data"
    try:
        first = spawn_hub(url, data)
        try:
            user = register(first)
            before = enable(first, user)
        finally:
            stop_hub(first)
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", before["port"]))
            squatter.listen(1)
            second = spawn_hub(url, data)
            try:
                moved = homekit_of(second, user)
                assert moved["enabled"] is True and moved["port"] != before["port"]
                assert moved["hap_id"] == before["hap_id"]
                socket.create_connection(("127.0.0.1", moved["port"]), timeout=2).close()
            finally:
                stop_hub(second)
        third = spawn_hub(url, data, homekit_bind="off")
        try:
            with third.api(user.access_token) as c:
                off = ok(c.put(f"/orgs/{user.org_id}/homekit", json={"enabled": False}))
                assert off["enabled"] is False
                on = ok(c.put(f"/orgs/{user.org_id}/homekit", json={"enabled": True}))
            assert on["enabled"] is True and on["port"] == moved["port"]
            with pytest.raises(ConnectionRefusedError):  # stored, not served here
                socket.create_connection(("127.0.0.1", moved["port"]), timeout=2).close()
        finally:
            stop_hub(third)
    finally:
        drop()


def test_keys_sealed_with_another_secret(db_kind: str, tmp_path: Path) -> None:
    """A hub whose secret is not the one the bridge's keys were sealed with does not start
    that bridge with new keys (its controllers would be cut off without a word): it says
    why in its log, answers the bridge as unpaired, and forgetting the pairings starts the
    bridge again with new keys that pair with the setup code."""
    url, drop = migrated_database_url(db_kind, tmp_path)
    try:
        first = spawn_hub(url, tmp_path / "first")
        try:
            user = register(first)
            claimed_device(first, user)
            bridge = enable(first, user)

            async def pair_once() -> None:
                async with paired(bridge) as pairing:
                    assert len(await pairing.list_accessories_and_characteristics()) == 2

            asyncio.run(pair_once())
        finally:
            stop_hub(first)
        log = tmp_path / "other.log"
        other = spawn_hub(url, tmp_path / "other", log=log, jwt_secret="another-" + "s" * 40)
        try:
            assert wait_until(lambda: "stored with another hub secret" in log.read_text())
            with other.api() as c:
                login = {"email": user.email, "password": user.password}
                token = ok(c.post("/auth/login", json=login))["access_token"]
            with other.api(token) as c:
                seen = ok(c.get(f"/orgs/{user.org_id}/homekit"))
                assert seen["enabled"] is True and seen["paired"] is False
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection(("127.0.0.1", bridge["port"]), timeout=2).close()
                fresh = ok(c.delete(f"/orgs/{user.org_id}/homekit/pairings"))
            assert {k: fresh[k] for k in ("port", "hap_id", "setup_code")} == {
                k: bridge[k] for k in ("port", "hap_id", "setup_code")
            }

            async def pair_again() -> None:
                async with paired(fresh) as pairing:
                    assert len(await pairing.list_accessories_and_characteristics()) == 2

            asyncio.run(pair_again())
            assert homekit_of(other, dataclasses.replace(user, access_token=token))["paired"]
        finally:
            stop_hub(other)
    finally:
        drop()
