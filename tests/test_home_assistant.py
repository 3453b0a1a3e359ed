"""Home Assistant discovery on the hub's own broker (contract §6): a Home Assistant
integration (paho, with a token of kind ``home_assistant``) finds every relay and input
of its organization's devices, follows claims, renames, releases and deletes, gets
everything again after its birth, and never sees or switches another organization's."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from support.accounts import User, audit, register
from support.checks import NEGATIVE_WAIT_S, wait_until
from support.devices import claim, claimed_device, online_device, provision, resource_relays
from support.hubs import RunningHub
from support.mqtt import MqttClient

from hexa.bridges.home_assistant_config import TRIGGER_TYPES
from hexa.hub import __version__

EVENTS = tuple(TRIGGER_TYPES)  # press, hold, double_press
#: how long a birth may take to be answered (BIRTH_DELAY_S + BIRTH_JITTER_S, and margin)
BIRTH_ANSWER_S = 6.0


def ha_token(hub: RunningHub, user: User) -> dict[str, Any]:
    """A new integration token of kind home_assistant for ``user``'s organization."""
    name = f"ha-{uuid.uuid4().hex[:8]}"
    with hub.api(user.access_token) as c:
        r = c.post(
            "/integrations/tokens",
            json={"name": name, "org_id": user.org_id, "kind": "home_assistant"},
        )
    assert r.status_code == 201, r.text
    assert r.json()["kind"] == "home_assistant"
    return dict(r.json())


def home_assistant(
    hub: RunningHub,
    user: User,
    track: Callable[[MqttClient], MqttClient],
    token: dict[str, Any] | None = None,
) -> MqttClient:
    """Home Assistant as it connects: its token, subscribed to its discovery prefix and to
    the hub's topics."""
    token = token or ha_token(hub, user)
    client = track(MqttClient(hub, token["name"], token["token"]))
    assert client.ok(), client.rc
    assert client.subscribe("homeassistant/#")
    assert client.subscribe("hexa/#")
    return client


def switch_topic(uid: str, n: int) -> str:
    return f"homeassistant/switch/hexa_{uid}_{n}/config"


def trigger_topic(uid: str, n: int, event: str) -> str:
    return f"homeassistant/device_automation/hexa_{uid}_input{n}_{event}/config"


def all_topics(uid: str) -> list[str]:
    return [switch_topic(uid, n) for n in range(3)] + [
        trigger_topic(uid, n, e) for n in range(3) for e in EVENTS
    ]


def configs_of(ha: MqttClient, topic: str) -> list[bytes]:
    """Every payload ``ha`` received on ``topic``, in order."""
    return [p for t, p, _ in ha.messages(lambda t, p, r: t == topic)]


def latest(ha: MqttClient, topic: str, timeout: float = 5.0) -> Any:
    """The newest config ``ha`` holds for ``topic`` once it has one (None: removed)."""
    assert ha.wait_for(lambda t, p, r: t == topic, timeout), f"nothing on {topic}"
    payload = configs_of(ha, topic)[-1]
    return json.loads(payload) if payload else None


def barrier(ha: MqttClient, hub: RunningHub, user: User) -> str:
    """Claim a fresh device and wait until ``ha`` has its last config: every discovery
    publish the hub made before it has been delivered. Returns the new device's uid."""
    p = provision(hub)
    claim(hub, user, p["claim_code"])
    uid = str(p["device_uid"])
    assert ha.wait_for(lambda t, p_, r: t == trigger_topic(uid, 2, "double_press"), 5)
    return uid


def switch_config(uid: str, n: int, device_name: str, sw_version: str | None = None) -> Any:
    """The discovery config of relay ``n`` of a hexa-mini-switch-v1 named ``device_name``
    (``sw_version``: the firmware it reported, if any), as the hub publishes it."""
    device: dict[str, Any] = {
        "identifiers": [f"hexa_{uid}"],
        "name": device_name,
        "manufacturer": "Hexa",
        "model": "hexa-mini-switch-v1",
    }
    if sw_version is not None:
        device["sw_version"] = sw_version
    return {
        "name": f"Relay {n + 1}",
        "unique_id": f"hexa_{uid}_{n}",
        "command_topic": f"hexa/{uid}/relay/{n}/set",
        "state_topic": f"hexa/{uid}/relay/{n}/state",
        "payload_on": "ON",
        "payload_off": "OFF",
        "availability": [{"topic": f"hexa/{uid}/availability"}, {"topic": "hexa/hub/status"}],
        "availability_mode": "all",
        "qos": 1,
        "retain": False,
        "device": device,
        "origin": {"name": "Hexa Hub", "sw_version": __version__},
    }


def test_claimed_switch_is_discovered_as_three_switches_and_nine_triggers(
    hub: RunningHub, track: Callable[[Any], Any]
) -> None:
    """A claimed hexa-mini-switch-v1 appears as a switch per relay and a device trigger per
    input event, exactly the payloads of contract §6, and the switch's command topic
    switches the relay."""
    user = register(hub)
    ha = home_assistant(hub, user, track)
    dev, device = online_device(hub, user, track)
    uid = dev["device_uid"]
    for n in range(3):
        # claimed before it ever connected, then republished with the version it reports
        assert wait_until(
            lambda n=n: latest(ha, switch_topic(uid, n))["device"].get("sw_version") == "1.0.0", 5
        )
        config = latest(ha, switch_topic(uid, n))
        assert config == switch_config(uid, n, dev["name"], sw_version="1.0.0")
    kinds = {"press": "button_short_press", "hold": "button_long_press"}
    kinds["double_press"] = "button_double_press"
    for n in range(3):
        for event in EVENTS:
            assert latest(ha, trigger_topic(uid, n, event)) == {
                "automation_type": "trigger",
                "topic": f"hexa/{uid}/input/{n}/event",
                "type": kinds[event],
                "subtype": f"button_{n + 1}",
                "value_template": "{{ value_json.event }}",
                "payload": event,
                "device": {"identifiers": [f"hexa_{uid}"]},
            }
    # what Home Assistant does with them: switch relay 1 and see its state and the trigger
    ha.publish(f"hexa/{uid}/relay/1/set", "ON")
    assert ha.wait_for(lambda t, p, r: t == f"hexa/{uid}/relay/1/state" and p == b"ON", 5)
    assert resource_relays(hub, user, dev["id"]) == [False, True, False]
    device.event(0, "hold", duration_ms=1200)
    held = ha.wait_for(lambda t, p, r: t == f"hexa/{uid}/input/0/event", 5)
    assert held and json.loads(held[1])["event"] == "hold"


def test_intents_from_home_assistant_are_audited_as_home_assistant(
    hub: RunningHub, track: Callable[[Any], Any]
) -> None:
    """An intent from a home_assistant token is audited with source home_assistant; one
    from a generic token of the same organization stays mqtt."""
    user = register(hub)
    ha = home_assistant(hub, user, track)
    dev, _ = online_device(hub, user, track)
    uid = dev["device_uid"]
    ha.publish(f"hexa/{uid}/relay/0/set", "ON")
    assert ha.wait_for(lambda t, p, r: t == f"hexa/{uid}/relay/0/state" and p == b"ON", 5)
    with hub.api(user.access_token) as c:
        r = c.post("/integrations/tokens", json={"name": "plain", "org_id": user.org_id})
    generic = track(MqttClient(hub, "plain", r.json()["token"]))
    assert generic.ok()
    generic.publish(f"hexa/{uid}/relay/0/set", "OFF")
    assert ha.wait_for(lambda t, p, r: t == f"hexa/{uid}/relay/0/state" and p == b"OFF", 5)

    def entries() -> list[dict[str, Any]]:
        page = audit(hub, user, device_id=dev["id"], action="relay_command")
        return list(page["items"])

    assert wait_until(lambda: len(entries()) == 2, 5), entries()
    by_state = {e["details"]["requested"]: e for e in entries()}
    assert by_state["ON"]["source"] == "home_assistant"
    assert by_state["ON"]["actor_type"] == "integration"
    assert by_state["OFF"]["source"] == "mqtt"


@pytest.mark.parametrize(
    "name",
    [
        'Kitchen "main" \\ light',
        "Salon 💡🔥 ünïcödé",
        "x" * 200,
        "{{ value_json.event }} </script>",
    ],
)
def test_odd_names_make_valid_configs(
    hub: RunningHub, track: Callable[[Any], Any], name: str
) -> None:
    """Quotes, backslashes, emoji, template syntax and 200 characters, in the device's and
    a relay's name, give valid JSON configs carrying the names unchanged."""
    user = register(hub)
    ha = home_assistant(hub, user, track)
    p = provision(hub)
    dev = claim(hub, user, p["claim_code"], name=name)
    uid = dev["device_uid"]
    assert latest(ha, switch_topic(uid, 0))["device"]["name"] == name
    with hub.api(user.access_token) as c:
        r = c.patch(f"/devices/{dev['id']}", json={"relay_names": [name, None, "B"]})
    assert r.status_code == 200, r.text
    assert wait_until(lambda: latest(ha, switch_topic(uid, 0))["name"] == name, 5)
    config = latest(ha, switch_topic(uid, 0))
    assert config["device"]["name"] == name and config["unique_id"] == f"hexa_{uid}_0"
    assert wait_until(lambda: latest(ha, switch_topic(uid, 2))["name"] == "B", 5)


def test_rename_and_relay_rename_republish(hub: RunningHub, track: Callable[[Any], Any]) -> None:
    """Renaming the device or a relay republishes the configs with the new names (the
    unique ids stay, so Home Assistant updates the same entities)."""
    user = register(hub)
    ha = home_assistant(hub, user, track)
    _, dev = claimed_device(hub, user)
    uid = dev["device_uid"]
    assert latest(ha, switch_topic(uid, 2))
    with hub.api(user.access_token) as c:
        assert c.patch(f"/devices/{dev['id']}", json={"name": "Hall"}).status_code == 200
    assert wait_until(lambda: latest(ha, switch_topic(uid, 2))["device"]["name"] == "Hall", 5)
    with hub.api(user.access_token) as c:
        r = c.patch(f"/devices/{dev['id']}", json={"relay_names": [None, "Ceiling"]})
    assert r.status_code == 200, r.text
    assert wait_until(lambda: latest(ha, switch_topic(uid, 1))["name"] == "Ceiling", 5)
    config = latest(ha, switch_topic(uid, 1))
    assert config["unique_id"] == f"hexa_{uid}_1" and config["device"]["name"] == "Hall"


@pytest.mark.parametrize("how", ["release", "delete"])
def test_release_and_delete_remove_every_config(
    hub: RunningHub, track: Callable[[Any], Any], how: str
) -> None:
    """Releasing or deleting a device sends Home Assistant an empty retained config on
    each of its twelve topics (the entities go), and a later subscriber finds none."""
    user = register(hub)
    token = ha_token(hub, user)
    ha = home_assistant(hub, user, track, token)
    _, dev = claimed_device(hub, user)
    uid = dev["device_uid"]
    for topic in all_topics(uid):
        assert latest(ha, topic) is not None
    with hub.api(user.access_token) as c:
        r = c.post(f"/devices/{dev['id']}/release") if how == "release" else None
        r = r or c.delete(f"/devices/{dev['id']}")
    assert r.status_code in (200, 204), r.text
    for topic in all_topics(uid):
        assert wait_until(lambda t=topic: configs_of(ha, t)[-1] == b"", 5), topic
    late = home_assistant(hub, user, track, token)
    barrier(late, hub, user)
    assert not late.messages(lambda t, p, r: uid in t and t.startswith("homeassistant/"))


def test_birth_flood_is_answered_by_one_republish_with_states(
    hub: RunningHub, track: Callable[[Any], Any]
) -> None:
    """Thirty births in a burst make the hub republish every config and the current
    states once, a moment later."""
    user = register(hub)
    ha = home_assistant(hub, user, track)
    dev, _ = online_device(hub, user, track)
    uid = dev["device_uid"]
    topic = switch_topic(uid, 0)
    assert latest(ha, topic)
    before = len(configs_of(ha, topic))
    states_before = len(ha.messages(lambda t, p, r: t == f"hexa/{uid}/relay/0/state"))
    availability = ha.messages(lambda t, p, r: t == f"hexa/{uid}/availability")
    assert availability and availability[-1][1] == b"online"
    for _ in range(30):
        ha.publish("homeassistant/status", "online")
    assert wait_until(lambda: len(configs_of(ha, topic)) > before, BIRTH_ANSWER_S)
    assert ha.wait_for(
        lambda t, p, r: t == f"hexa/{uid}/relay/0/state",
        timeout=5,
    )
    assert wait_until(
        lambda: len(ha.messages(lambda t, p, r: t == f"hexa/{uid}/relay/0/state")) > states_before,
        5,
    )
    # the whole burst is answered by that one republish: nothing else follows it
    wait_until(lambda: len(configs_of(ha, topic)) > before + 1, BIRTH_ANSWER_S / 2)
    assert len(configs_of(ha, topic)) == before + 1
    # the device's availability stays the device's own: the republish adds none
    assert ha.messages(lambda t, p, r: t == f"hexa/{uid}/availability") == availability


def test_a_birth_leaves_availability_to_the_devices(
    hub: RunningHub, track: Callable[[Any], Any]
) -> None:
    """The republish after a birth never speaks for a device's availability: a claimed
    device that never connected gets no retained ``offline`` from the hub (which could
    overwrite the ``online`` of a device connecting at that moment), and a connected one
    keeps its own retained ``online``."""
    user = register(hub)
    ha = home_assistant(hub, user, track)
    _, quiet = claimed_device(hub, user)
    connected, _ = online_device(hub, user, track)
    uids = (quiet["device_uid"], connected["device_uid"])
    for uid in uids:
        assert latest(ha, switch_topic(uid, 0))

    def states(uid: str) -> int:
        return len(ha.messages(lambda t, p, r: t == f"hexa/{uid}/relay/2/state"))

    before = {uid: states(uid) for uid in uids}
    ha.publish("homeassistant/status", "online")
    for uid in uids:  # the republish reached each device's last relay state
        assert wait_until(lambda uid=uid: states(uid) > before[uid], BIRTH_ANSWER_S)
    barrier(ha, hub, user)
    assert not ha.messages(lambda t, p, r: t == f"hexa/{quiet['device_uid']}/availability")
    late = home_assistant(hub, user, track)
    online = f"hexa/{connected['device_uid']}/availability"
    found = late.wait_for(lambda t, p, r: t == online and r, 5)
    assert found and found[1] == b"online"
    barrier(late, hub, user)
    assert not late.messages(lambda t, p, r: t == f"hexa/{quiet['device_uid']}/availability")


def test_retained_birth_is_answered(hub: RunningHub, track: Callable[[Any], Any]) -> None:
    """A birth published retained (as some setups do) is answered like a plain one."""
    user = register(hub)
    ha = home_assistant(hub, user, track)
    _, dev = claimed_device(hub, user)
    topic = switch_topic(dev["device_uid"], 1)
    assert latest(ha, topic)
    before = len(configs_of(ha, topic))
    ha.publish("homeassistant/status", "online", retain=True)
    try:
        assert wait_until(lambda: len(configs_of(ha, topic)) > before, BIRTH_ANSWER_S)
    finally:
        ha.publish("homeassistant/status", "", retain=True)  # clear it for the other tests


def test_status_messages_other_than_a_birth_bring_no_republish(
    hub: RunningHub, track: Callable[[Any], Any]
) -> None:
    """Home Assistant's ``offline`` will, garbage, bytes that are not UTF-8 and an empty
    message on its status topic are ignored; the next birth is still answered."""
    user = register(hub)
    ha = home_assistant(hub, user, track)
    _, dev = claimed_device(hub, user)
    topic = switch_topic(dev["device_uid"], 0)
    assert latest(ha, topic)
    before = len(configs_of(ha, topic))
    for payload in (b"offline", b"\xff\xfe" * 40, b"online, please", b""):
        ha.publish("homeassistant/status", payload)
    wait_until(lambda: len(configs_of(ha, topic)) > before, BIRTH_ANSWER_S)
    assert len(configs_of(ha, topic)) == before
    ha.publish("homeassistant/status", "online")
    assert wait_until(lambda: len(configs_of(ha, topic)) > before, BIRTH_ANSWER_S)


def test_device_deleted_while_home_assistant_is_offline(
    hub: RunningHub, track: Callable[[Any], Any]
) -> None:
    """A device deleted while Home Assistant is away is not among the configs it finds
    when it comes back, nor in the republish that answers its birth."""
    user = register(hub)
    token = ha_token(hub, user)
    ha = home_assistant(hub, user, track, token)
    _, dev = claimed_device(hub, user)
    _, kept = claimed_device(hub, user)
    uid = dev["device_uid"]
    assert latest(ha, switch_topic(uid, 0)) and latest(ha, switch_topic(kept["device_uid"], 0))
    ha.close()
    with hub.api(user.access_token) as c:
        assert c.delete(f"/devices/{dev['id']}").status_code == 204
    back = home_assistant(hub, user, track, token)
    assert latest(back, switch_topic(kept["device_uid"], 0))  # its retained configs
    back.publish("homeassistant/status", "online")
    before = len(configs_of(back, switch_topic(kept["device_uid"], 0)))
    assert wait_until(
        lambda: len(configs_of(back, switch_topic(kept["device_uid"], 0))) > before,
        BIRTH_ANSWER_S,
    )
    assert not back.messages(lambda t, p, r: uid in t)


def test_other_organizations_never_see_or_switch_the_devices(
    hub: RunningHub, track: Callable[[Any], Any]
) -> None:
    """Home Assistant of another organization receives none of a device's switch or
    trigger configs (retained, live, or after its birth), and its intents for the device
    are refused: no command reaches the device, nothing changes."""
    owner, stranger = register(hub), register(hub)
    theirs = home_assistant(hub, stranger, track)
    mine = home_assistant(hub, owner, track)
    dev, device = online_device(hub, owner, track)
    uid = dev["device_uid"]
    assert latest(mine, trigger_topic(uid, 2, "hold"))
    theirs.publish("homeassistant/status", "online")
    late = home_assistant(hub, stranger, track)
    theirs.publish(f"hexa/{uid}/relay/0/set", "ON")
    theirs.publish(f"hexa/{uid}/relays/set", "ON")
    barrier(theirs, hub, stranger)
    barrier(late, hub, stranger)
    before = len(configs_of(mine, switch_topic(uid, 0)))
    wait_until(lambda: len(configs_of(mine, switch_topic(uid, 0))) > before, BIRTH_ANSWER_S)
    for client in (theirs, late):
        assert not client.messages(lambda t, p, r: uid in t or uid.encode() in p)
    wait_until(lambda: device.commands, NEGATIVE_WAIT_S)
    assert device.commands == []
    assert resource_relays(hub, owner, dev["id"]) == [False, False, False]


def test_a_birth_does_not_bring_back_a_released_device(
    hub: RunningHub, track: Callable[[Any], Any]
) -> None:
    """Births racing a release: once the release returns, the device's configs end
    removed, whatever republish ran meanwhile."""
    user = register(hub)
    ha = home_assistant(hub, user, track)
    devices = [claimed_device(hub, user)[1] for _ in range(3)]
    witness = switch_topic(claimed_device(hub, user)[1]["device_uid"], 0)  # stays claimed
    for d in devices:
        assert latest(ha, trigger_topic(d["device_uid"], 2, "double_press"))
    assert latest(ha, witness)
    with hub.api(user.access_token) as c:
        for d in devices:
            ha.publish("homeassistant/status", "online")
            assert c.post(f"/devices/{d['id']}/release").status_code == 200
    before = len(configs_of(ha, witness))
    ha.publish("homeassistant/status", "online")
    # a republish ran after every release
    assert wait_until(lambda: len(configs_of(ha, witness)) > before, BIRTH_ANSWER_S)
    barrier(ha, hub, user)
    for d in devices:
        for topic in all_topics(d["device_uid"]):
            assert configs_of(ha, topic)[-1] == b"", topic


def test_generic_integration_of_the_org_also_gets_configs(
    hub: RunningHub, track: Callable[[Any], Any]
) -> None:
    """Discovery is for any integration of the organization (a generic token too), both
    the switch and the device trigger configs, retained for a late subscriber."""
    user = register(hub)
    _, dev = claimed_device(hub, user)
    uid = dev["device_uid"]
    with hub.api(user.access_token) as c:
        r = c.post("/integrations/tokens", json={"name": "any", "org_id": user.org_id})
    client = track(MqttClient(hub, "any", r.json()["token"]))
    assert client.ok() and client.subscribe("homeassistant/#")
    for topic in (switch_topic(uid, 0), trigger_topic(uid, 1, "press")):
        found = client.wait_for(lambda t, p, r, topic=topic: t == topic and r, 5)
        assert found and json.loads(found[1])


# --- a real Home Assistant -----------------------------------------------------------------
def _real_home_assistant() -> Any:
    """The harness class of a real Home Assistant Core, from the folder that
    HEXA_TEST_HA_HARNESS names (its ``ha_harness.py``; the Home Assistant venv as that
    harness finds it, e.g. through HA_REAL_VENV)."""
    import os
    import sys

    folder = os.environ.get("HEXA_TEST_HA_HARNESS")
    if not folder:
        pytest.skip("set HEXA_TEST_HA_HARNESS to a real Home Assistant harness folder")
    sys.path.insert(0, folder)
    try:
        from ha_harness import RealHomeAssistant  # type: ignore[import-not-found]
    finally:
        sys.path.remove(folder)
    return RealHomeAssistant()


def test_real_home_assistant_shows_and_switches_the_relays(
    hub: RunningHub, track: Callable[[Any], Any]
) -> None:
    """With a hub and one simulated hexa-mini-switch-v1, an unmodified Home Assistant Core
    shows three switches and the nine input triggers without any YAML, switches the
    relays, runs an automation on an input trigger, follows a relay rename, and drops the
    device when it is released."""
    ha = _real_home_assistant()
    user = register(hub)
    token = ha_token(hub, user)
    dev, device = online_device(hub, user, track)
    uid = dev["device_uid"]
    ha.start("127.0.0.1", hub.mqtt_port, token["name"], token["token"], client_id="ha-real")
    try:
        with ha.dump_on_failure():
            entities = [ha.wait_for_unique_id(f"hexa_{uid}_{n}", timeout=30) for n in range(3)]
            assert all(e.startswith("switch.") for e in entities), entities
            for entity in entities:
                ha.wait_for_state(entity, "off", timeout=20)  # available: device and hub online
            registered = ha.device_by_identifier(f"hexa_{uid}")
            assert registered is not None
            assert (registered["manufacturer"], registered["model"]) == (
                "Hexa",
                "hexa-mini-switch-v1",
            )
            ha.wait_for(  # reported by the device after its claim
                lambda: (ha.device_by_identifier(f"hexa_{uid}") or {}).get("sw_version") == "1.0.0",
                timeout=15,
                what="the firmware version",
            )

            def mqtt_triggers() -> list[dict[str, Any]]:
                listed = ha.device_triggers(registered["id"])
                return [t for t in listed if t["domain"] == "mqtt"]

            found = ha.wait_for(
                lambda: t if len(t := mqtt_triggers()) >= 9 else None,
                timeout=20,
                what="nine device triggers",
            )
            pairs = {(t["type"], t["subtype"]) for t in found}
            assert pairs == {
                (kind, f"button_{n + 1}")
                for n in range(3)
                for kind in ("button_short_press", "button_long_press", "button_double_press")
            }
            # Home Assistant switches relay 1: the device gets the command, HA the state
            ha.call_service("switch", "turn_on", {"entity_id": entities[1]})
            ha.wait_for_state(entities[1], "on", timeout=10)
            assert device.relays == [False, True, False]
            # an automation on input 1's press switches relay 3
            press = next(
                {k: v for k, v in t.items() if k != "metadata"}
                for t in found
                if (t["type"], t["subtype"]) == ("button_short_press", "button_1")
            )
            ha.add_automation(
                {
                    "id": "hexa_press",
                    "alias": "press turns relay 3 on",
                    "triggers": [press],
                    "actions": [{"action": "switch.turn_on", "target": {"entity_id": entities[2]}}],
                }
            )
            for _ in range(10):  # HA subscribes to the event topic a moment after loading
                device.event(0, "press")
                if wait_until(lambda: device.relays[2], 1.5):
                    break
            assert device.relays == [False, True, True]
            ha.wait_for_state(entities[2], "on", timeout=10)
            with hub.api(user.access_token) as c:
                r = c.patch(f"/devices/{dev['id']}", json={"relay_names": ["Ceiling"]})
            assert r.status_code == 200, r.text
            ha.wait_for(
                lambda: (
                    (ha.state(entities[0]) or {})
                    .get("attributes", {})
                    .get("friendly_name", "")
                    .endswith("Ceiling")
                ),
                timeout=15,
                what="the renamed relay",
            )
            with hub.api(user.access_token) as c:
                assert c.post(f"/devices/{dev['id']}/release").status_code == 200
            for entity in entities:
                ha.wait_for_gone(entity, timeout=20)
            ha.wait_for(
                lambda: ha.device_by_identifier(f"hexa_{uid}") is None,
                timeout=20,
                what="the released device gone",
            )
    finally:
        ha.stop()


# --- another discovery prefix --------------------------------------------------------------
def test_topics_under_another_discovery_prefix() -> None:
    """A configured prefix replaces only the first level; config topics map to their
    device under any prefix, and other topics do not."""
    from hexa.broker.acl import topic_device
    from hexa.hub import topics

    assert topics.ha_topic("homeassistant/status", "ha") == "ha/status"
    assert topics.ha_topic("homeassistant/switch/+/config", "homeassistant") == (
        "homeassistant/switch/+/config"
    )
    assert topics.ha_topic("hexa/hub/status", "ha") == "hexa/hub/status"
    assert topic_device("ha/switch/hexa_hx-1_input0_2/config") == "hx-1_input0"
    assert topic_device("ha/device_automation/hexa_hx-1_input0_hold/config") == "hx-1"
    assert topic_device("ha/device_automation/hexa_x_input0_double_press/config") == "x"
    assert topic_device("hexa/switch/hexa_hx-1_0/config") is None
    assert topic_device("ha/light/hexa_hx-1_0/config") is None
    assert topic_device("ha/switch/other_0/config") is None


def test_another_discovery_prefix_end_to_end(db_kind: str, tmp_path: Any) -> None:
    """With HEXA_HA_DISCOVERY_PREFIX, configs go under that prefix (switches and
    triggers, to the device's organization only) and a birth on <prefix>/status is
    answered."""
    from support.hubs import spawned_hub

    with spawned_hub(db_kind, tmp_path, ha_discovery_prefix="ha-test") as other_hub:
        user, stranger = register(other_hub), register(other_hub)
        token = ha_token(other_hub, user)
        ha = MqttClient(other_hub, token["name"], token["token"])
        theirs_token = ha_token(other_hub, stranger)
        theirs = MqttClient(other_hub, theirs_token["name"], theirs_token["token"])
        try:
            assert ha.ok() and ha.subscribe("ha-test/#")
            assert theirs.ok() and theirs.subscribe("ha-test/#")
            _, dev = claimed_device(other_hub, user)
            uid = dev["device_uid"]
            switch = f"ha-test/switch/hexa_{uid}_1/config"
            assert ha.wait_for(lambda t, p, r: t == switch, 5)
            trig = f"ha-test/device_automation/hexa_{uid}_input2_hold/config"
            assert ha.wait_for(lambda t, p, r: t == trig, 5)
            count = len(configs_of(ha, switch))
            ha.publish("ha-test/status", "online")
            assert wait_until(lambda: len(configs_of(ha, switch)) > count, BIRTH_ANSWER_S)
            assert not ha.messages(lambda t, p, r: t.startswith("homeassistant/"))
            assert not theirs.messages(lambda t, p, r: uid in t)
        finally:
            ha.close()
            theirs.close()


def test_a_republish_of_many_devices_sends_each_config_and_state_once(
    hub: RunningHub, track: Callable[[Any], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A birth republishes many devices, read a batch at a time (batches made small here
    so that the devices span several, with a partial last one): every device's twelve
    configs exactly once, byte for byte what its claim and renames published (contract §6
    payloads, with its own names), and its relay and aggregate states once."""
    from hexa.bridges import home_assistant_config

    monkeypatch.setattr(home_assistant_config, "LOAD_BATCH", 4)  # the hub runs in process
    user = register(hub)
    ha = home_assistant(hub, user, track)
    devices: list[dict[str, Any]] = []
    for i in range(15):
        p = provision(hub)
        name = f'Hall "{i}" ✓' if i % 3 == 0 else None
        devices.append(claim(hub, user, p["claim_code"], **({"name": name} if name else {})))
    with hub.api(user.access_token) as c:
        for dev in devices[::4]:
            r = c.patch(f"/devices/{dev['id']}", json={"relay_names": [None, f"L{dev['id'][:4]}"]})
            assert r.status_code == 200, r.text
    barrier(ha, hub, user)
    uids = [dev["device_uid"] for dev in devices]
    renamed = {dev["device_uid"] for dev in devices[::4]}
    for dev in devices:
        uid = dev["device_uid"]
        assert wait_until(
            lambda uid=uid: (
                uid not in renamed or latest(ha, switch_topic(uid, 1))["name"] != "Relay 2"
            ),
            5,
        )
        assert latest(ha, switch_topic(uid, 0)) == switch_config(uid, 0, dev["name"])
        relay_2 = f"L{dev['id'][:4]}" if uid in renamed else "Relay 2"
        assert latest(ha, switch_topic(uid, 1))["name"] == relay_2
    published = {t: configs_of(ha, t) for uid in uids for t in all_topics(uid)}
    relay_states = {f"hexa/{uid}/relay/{n}/state" for uid in uids for n in range(3)}
    aggregates = {f"hexa/{uid}/state" for uid in uids}

    def count(topics: set[str]) -> dict[str, int]:
        got = dict.fromkeys(topics, 0)
        for t, _, _ in ha.messages(lambda t, p, r: t in topics):
            got[t] += 1
        return got

    states_before = count(relay_states | aggregates)
    ha.publish("homeassistant/status", "online")
    for topic, before in published.items():
        n = len(before)
        assert wait_until(lambda t=topic, n=n: len(configs_of(ha, t)) > n, BIRTH_ANSWER_S)
    for topic, n in states_before.items():  # states follow each batch's configs
        assert wait_until(lambda t=topic, n=n: count({t})[t] > n, 5), topic
    barrier(ha, hub, user)  # a claim after the republish: nothing more of it comes
    for topic, before in published.items():
        assert configs_of(ha, topic) == [*before, before[-1]], topic  # once, the same bytes
    states_after = count(relay_states | aggregates)
    assert all(states_after[t] == states_before[t] + 1 for t in states_after), states_after
    for topic in relay_states:
        assert ha.messages(lambda t, p, r, topic=topic: t == topic)[-1][1] == b"OFF"
