"""Interoperability with aiomqtt (contract.md §3): a third-party asyncio MQTT client, used
the way a Home Assistant integration uses it, against the hub's embedded broker, with a
real paho device answering commands. Intents (JSON and plain), results, retained state,
the REST view of the same state, and tenancy between two organizations' integrations."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiomqtt
import pytest
from support.accounts import User, integration_token, register
from support.checks import NEGATIVE_WAIT_S
from support.devices import online_device, resource_relays
from support.hubs import RunningHub
from support.mqtt import MqttDevice, mentions

WAIT_S = 10.0  # generous safety net for anything expected to arrive; never a speed bound
Received = tuple[str, bytes, bool]  # topic, payload, retain flag


# --- helpers -----------------------------------------------------------------------------
def commands(m: MqttDevice) -> list[tuple[Any, Any, Any]]:
    """What the device was told to do: (type, relay_index, state) per command."""
    return [(c.get("type"), c.get("relay_index"), c.get("state")) for c in list(m.commands)]


class Inbox:
    """An aiomqtt client and everything it receives, collected by a background task."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.msgs: list[Received] = []
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        async for msg in self.client.messages:
            assert isinstance(msg.payload, (bytes, bytearray)), msg.payload
            self.msgs.append((str(msg.topic), bytes(msg.payload), bool(msg.retain)))

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def messages(self, pred: Callable[[str, bytes, bool], bool] | None = None) -> list[Received]:
        return [m for m in self.msgs if pred is None or pred(*m)]

    async def wait_for(
        self, pred: Callable[[str, bytes, bool], bool], timeout: float = WAIT_S
    ) -> Received | None:
        """The first message matching ``pred``, waiting up to ``timeout`` for it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            found = next(iter(self.messages(pred)), None)
            if found is not None or loop.time() >= deadline:
                return found
            if self._task.done():  # the connection broke: say why instead of timing out
                self._task.result()
                return None
            await asyncio.sleep(0.02)

    def results(self, uid: str) -> list[dict[str, Any]]:
        return [
            json.loads(p) for _, p, _ in self.messages(lambda t, p, r: t == f"hexa/{uid}/result")
        ]

    async def publish(self, topic: str, payload: str) -> None:
        await self.client.publish(topic, payload, qos=1)

    async def json_intent(self, uid: str, relay: int, state: str) -> dict[str, Any]:
        """Publish a JSON intent with a fresh intent_id; its result (asserted to arrive)."""
        iid = str(uuid.uuid4())
        await self.publish(
            f"hexa/{uid}/relay/{relay}/set", json.dumps({"state": state, "intent_id": iid})
        )
        got = await self.wait_for(
            lambda t, p, r: t == f"hexa/{uid}/result" and json.loads(p).get("intent_id") == iid
        )
        assert got is not None, f"no result for intent {iid}: {self.results(uid)}"
        return dict(json.loads(got[1]))


@contextlib.asynccontextmanager
async def integration(hub: RunningHub, it: dict[str, Any], *filters: str) -> AsyncIterator[Inbox]:
    """An aiomqtt client logged in with an integration token, subscribed to ``filters``
    (each SUBACK asserted granted); disconnected when the block ends, whatever happens."""
    async with aiomqtt.Client(
        "127.0.0.1",
        hub.mqtt_port,
        username=it["name"],
        password=it["token"],
        identifier=f"aio-{uuid.uuid4().hex[:10]}",
        timeout=WAIT_S,
    ) as client:
        inbox = Inbox(client)
        try:
            for flt in filters:
                codes = await client.subscribe(flt, qos=1)
                refused = [c for c in codes if (c >= 0x80 if isinstance(c, int) else c.is_failure)]
                assert codes and not refused, (flt, codes)
            yield inbox
        finally:
            await inbox.stop()


# --- the steps of an integration's session, each with its own checks ---------------------
async def switch_on_with_json_intent(i: Inbox, m: MqttDevice) -> None:
    """Step 1: a JSON intent for relay 1 is applied, answered on result with its intent_id,
    and the new state is published on hexa/<uid>/relay/1/state (``i`` is on hexa/#)."""
    res = await i.json_intent(m.uid, 1, "ON")
    assert res["ok"] is True and res["status"] == "applied", res
    assert res["relays"] == [False, True, False], res
    assert m.commands and res["command_id"] == m.commands[-1]["command_id"], (res, m.commands)
    assert commands(m)[-1] == ("set_relay", 1, True)
    state = await i.wait_for(lambda t, p, r: t == f"hexa/{m.uid}/relay/1/state" and p == b"ON")
    assert state is not None, i.messages(lambda t, p, r: t.startswith(f"hexa/{m.uid}/"))


async def late_subscriber_sees_relay_1_on(
    hub: RunningHub, it: dict[str, Any], m: MqttDevice
) -> None:
    """Step 2: a client connecting afterwards gets relay 1's retained ON on subscribe."""
    topic = f"hexa/{m.uid}/relay/1/state"
    async with integration(hub, it, f"hexa/{m.uid}/relay/+/state") as late:
        got = await late.wait_for(lambda t, p, r: t == topic)
        assert got == (topic, b"ON", True), late.messages()


async def toggle_off_and_check_rest(
    hub: RunningHub, owner: User, dev: dict[str, Any], i: Inbox, m: MqttDevice
) -> None:
    """Step 3: a plain TOGGLE intent switches relay 1 (ON) off; the result, the state topic,
    the device and the REST device resource agree."""
    uid = m.uid
    before = len(i.results(uid))

    def offs() -> list[Received]:
        return i.messages(lambda t, p, r: t == f"hexa/{uid}/relay/1/state" and p == b"OFF")

    seen_off = len(offs())  # the device's report on connect may have published one already
    await i.publish(f"hexa/{uid}/relay/1/set", "TOGGLE")
    got = await i.wait_for(lambda t, p, r: len(i.results(uid)) > before)
    assert got is not None, f"no result for TOGGLE: {i.results(uid)}"
    res = i.results(uid)[before]
    assert res["ok"] is True and res["status"] == "applied", res
    assert res["relays"] == [False, False, False], res
    assert res["intent_id"] and res["command_id"] == m.commands[-1]["command_id"], res
    assert commands(m)[-1] == ("set_relay", 1, False)
    assert m.relays == [False, False, False]
    assert await i.wait_for(lambda t, p, r: len(offs()) > seen_off), i.messages(
        lambda t, p, r: t == f"hexa/{uid}/relay/1/state"
    )
    relays = await asyncio.to_thread(resource_relays, hub, owner, dev["id"])
    assert relays == [False, False, False]


# --- tests -------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_aiomqtt_json_intent_result_and_state(hub: RunningHub, track: Any) -> None:
    """An aiomqtt integration on hexa/# sends {"state":"ON","intent_id":…} to relay 1: the
    device is commanded, the result carries the intent_id, ok and "applied", and
    hexa/<uid>/relay/1/state goes ON."""
    owner = register(hub)
    _, m = online_device(hub, owner, track)
    it = integration_token(hub, owner)
    async with integration(hub, it, "hexa/#") as i:
        await switch_on_with_json_intent(i, m)
    assert commands(m) == [("set_relay", 1, True)]
    assert m.relays == [False, True, False]


@pytest.mark.anyio
async def test_aiomqtt_late_subscriber_gets_retained_state(hub: RunningHub, track: Any) -> None:
    """A second aiomqtt client connecting after the command gets relay 1's ON, retained."""
    owner = register(hub)
    _, m = online_device(hub, owner, track)
    it = integration_token(hub, owner)
    async with integration(hub, it, "hexa/#") as i:
        await switch_on_with_json_intent(i, m)
    await late_subscriber_sees_relay_1_on(hub, it, m)


@pytest.mark.anyio
async def test_aiomqtt_plain_toggle_agrees_with_rest(hub: RunningHub, track: Any) -> None:
    """A plain-text TOGGLE from aiomqtt switches relay 1 off, and GET /devices/{id} agrees."""
    owner = register(hub)
    dev, m = online_device(hub, owner, track)
    it = integration_token(hub, owner)
    async with integration(hub, it, "hexa/#") as i:
        await switch_on_with_json_intent(i, m)
        await toggle_off_and_check_rest(hub, owner, dev, i, m)
    assert commands(m) == [("set_relay", 1, True), ("set_relay", 1, False)]


@pytest.mark.anyio
async def test_aiomqtt_other_org_sees_nothing_and_commands_nothing(
    hub: RunningHub, track: Any
) -> None:
    """An aiomqtt integration of another org, on hexa/# all along, receives none of the first
    org's device traffic while that org's integration runs its commands, and its intents
    for the first org's device are not executed; it still gets its own org's device."""
    owner, other = register(hub), register(hub)
    dev, m = online_device(hub, owner, track)
    _, theirs = online_device(hub, other, track)
    it = integration_token(hub, owner)
    foreign_it = integration_token(hub, other)
    async with integration(hub, foreign_it, "hexa/#") as foreign:
        # intents for the first org's device, then one for its own device on the same
        # connection: once that one is applied, the broker has handled the earlier ones
        foreign_iid = str(uuid.uuid4())
        await foreign.publish(
            f"hexa/{m.uid}/relay/2/set", json.dumps({"state": "ON", "intent_id": foreign_iid})
        )
        await foreign.publish(f"hexa/{m.uid}/relay/0/set", "TOGGLE")
        await foreign.publish(f"hexa/{m.uid}/relays/set", "ON")
        own = await foreign.json_intent(theirs.uid, 0, "ON")
        assert own["ok"] is True and own["status"] == "applied", own

        async with integration(hub, it, "hexa/#") as i:
            await switch_on_with_json_intent(i, m)  # would show relays 0/2 on if executed
        await late_subscriber_sees_relay_1_on(hub, it, m)
        async with integration(hub, it, "hexa/#") as i:
            await toggle_off_and_check_rest(hub, owner, dev, i, m)
            assert not [r for r in i.results(m.uid) if r.get("intent_id") == foreign_iid]

        # the commands are complete; a last own-org intent flushes the foreign inbox
        own = await foreign.json_intent(theirs.uid, 0, "OFF")
        assert own["ok"] is True and own["status"] == "applied", own
        await asyncio.sleep(NEGATIVE_WAIT_S)  # nothing is expected to arrive
        assert foreign.messages(lambda t, p, r: t == f"hexa/{theirs.uid}/relay/0/state")
        assert foreign.messages(mentions(m.uid)) == []
    assert commands(m) == [("set_relay", 1, True), ("set_relay", 1, False)]
    assert m.relays == [False, False, False]
    assert await asyncio.to_thread(resource_relays, hub, owner, dev["id"]) == [False] * 3
