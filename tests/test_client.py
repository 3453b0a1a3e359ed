"""hexa.client, the integrators' client, against a real hub (embedded broker, real
database) with a simulated paho device: typed states, availability, input events and
results; intents answered applied or timed out; refused credentials; tenancy; malformed
payloads skipped; a lost connection. Its payload decoding and topics are also checked on
their own, against the hub's topic contract."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from support.accounts import User, integration_token, register
from support.devices import online_device
from support.hubs import RunningHub, free_port, spawned_hub
from support.mqtt import MqttDevice
from support.tls import self_signed

from hexa.client import (
    AuthenticationError,
    Availability,
    ConnectError,
    ConnectionLost,
    DeviceState,
    HexaClient,
    HubStatus,
    InputEvent,
    Message,
    PayloadError,
    RelayResult,
    RelayState,
    ResultTimeout,
    codec,
    decode,
)
from hexa.hub import topics

WAIT_S = 10.0  # generous safety net for anything expected to arrive; never a speed bound


class Inbox:
    """Everything a connected client's ``messages()`` yields, collected by a task."""

    def __init__(self, client: HexaClient) -> None:
        self.client = client
        self.received: list[Message] = []
        self.task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        async for message in self.client.messages():
            self.received.append(message)

    async def wait_for(self, pred: Callable[[Message], bool]) -> Message:
        """The first message matching ``pred`` (asserted to arrive within WAIT_S)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while True:
            found = next((m for m in self.received if pred(m)), None)
            if found is not None:
                return found
            if self.task.done():  # the iterator ended: say why instead of timing out
                self.task.result()
                raise AssertionError(f"messages() ended; got {self.received}")
            assert loop.time() < deadline, f"not received; got {self.received}"
            await asyncio.sleep(0.02)

    def about(self, uid: str) -> list[Message]:
        return [m for m in self.received if getattr(m, "uid", None) == uid]

    async def stop(self) -> None:
        """Stop collecting; a ConnectionLost that already ended it is the test's to check."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionLost):
            await self.task


@contextlib.asynccontextmanager
async def connected(hub: RunningHub, it: dict[str, Any]) -> AsyncIterator[tuple[HexaClient, Inbox]]:
    """A client logged in with integration token ``it`` and the inbox of its messages."""
    async with HexaClient(
        "127.0.0.1", hub.mqtt_port, token_name=it["name"], token=it["token"]
    ) as client:
        inbox = Inbox(client)
        try:
            yield client, inbox
        finally:
            await inbox.stop()


def device_with_token(
    hub: RunningHub, track: Any, **kwargs: Any
) -> tuple[User, dict[str, Any], MqttDevice, dict[str, Any]]:
    """A new user with an online simulated switch and an integration token of their org."""
    owner = register(hub)
    dev, m = online_device(hub, owner, track, **kwargs)
    return owner, dev, m, integration_token(hub, owner)


# --- against the hub ---------------------------------------------------------------------
@pytest.mark.anyio
async def test_client_gets_typed_retained_state_and_switches_a_relay(
    hub: RunningHub, track: Any
) -> None:
    """On connect the client yields the hub's status and the device's retained state,
    relay states and availability as typed messages; set_relay returns the applied result
    for its own intent, and the new state follows."""
    _, _, m, it = device_with_token(hub, track)
    async with connected(hub, it) as (client, inbox):
        assert await inbox.wait_for(lambda x: x == HubStatus(online=True, retained=True))
        state = await inbox.wait_for(lambda x: isinstance(x, DeviceState) and x.uid == m.uid)
        assert isinstance(state, DeviceState) and state.retained
        assert state.relays == (False, False, False) and state.online is True
        assert state.updated_at.utcoffset() == timedelta(0)  # aware, in UTC
        for index in range(3):
            assert await inbox.wait_for(lambda x, i=index: x == RelayState(m.uid, i, False, True))
        assert await inbox.wait_for(lambda x: x == Availability(m.uid, True, retained=True))

        result = await client.set_relay(m.uid, 1, True)
        assert isinstance(result, RelayResult)
        assert (result.uid, result.ok, result.status) == (m.uid, True, "applied")
        assert result.relays == (False, True, False)
        assert result.command_id == m.commands[-1]["command_id"]
        assert result.latency_ms is not None and result.latency_ms >= 0
        assert await inbox.wait_for(lambda x: x == result)  # also in the stream
        assert await inbox.wait_for(lambda x: x == RelayState(m.uid, 1, True, retained=False))
        live = await inbox.wait_for(
            lambda x: isinstance(x, DeviceState) and x.uid == m.uid and not x.retained
        )
        assert isinstance(live, DeviceState) and live.relays == (False, True, False)
    assert m.relays == [False, True, False]
    assert [(c["type"], c["relay_index"], c["state"]) for c in m.commands] == [
        ("set_relay", 1, True)
    ]


@pytest.mark.anyio
async def test_all_relays_toggle_and_bad_arguments(hub: RunningHub, track: Any) -> None:
    """set_all_relays sends one set_all_relays command; "toggle" flips one relay; a uid or
    index that cannot be in a topic is refused before anything is published."""
    _, _, m, it = device_with_token(hub, track)
    async with connected(hub, it) as (client, _):
        on = await client.set_all_relays(m.uid, True)
        assert (on.status, on.relays) == ("applied", (True, True, True))
        flipped = await client.set_relay(m.uid, 0, "toggle")
        assert (flipped.status, flipped.relays) == ("applied", (False, True, True))
        for uid, index in (("hexa/#", 0), ("+", 0), (m.uid, -1), (m.uid, 1000), (m.uid, True)):
            with pytest.raises(ValueError):
                await client.set_relay(uid, index, True)
        with pytest.raises(ValueError):
            await client.set_relay(m.uid, 0, "on")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await client.set_all_relays(m.uid, "toggle")  # type: ignore[arg-type]
    assert [(c["type"], c.get("relay_index"), c["state"]) for c in m.commands] == [
        ("set_all_relays", None, True),
        ("set_relay", 0, False),
    ]


@pytest.mark.anyio
async def test_input_events_and_going_offline(hub: RunningHub, track: Any) -> None:
    """A device's input events arrive as InputEvent (with the hold duration), and its
    dropped connection as Availability offline."""
    _, _, m, it = device_with_token(hub, track)
    async with connected(hub, it) as (_, inbox):
        await inbox.wait_for(lambda x: x == Availability(m.uid, True, retained=True))
        await asyncio.to_thread(m.event, 0, "press")
        await asyncio.to_thread(m.event, 2, "hold", 10500)
        assert await inbox.wait_for(lambda x: x == InputEvent(m.uid, 0, "press", None))
        assert await inbox.wait_for(lambda x: x == InputEvent(m.uid, 2, "hold", 10500))
        m.drop()
        assert await inbox.wait_for(lambda x: x == Availability(m.uid, False, retained=False))


@pytest.mark.anyio
async def test_device_that_never_acks_gets_the_hubs_timeout_result(
    hub: RunningHub, track: Any
) -> None:
    """An intent for a device that does not ack returns the hub's `timeout` result (not
    an exception): ok False, the command id, the relays as they were."""
    _, _, m, it = device_with_token(hub, track, auto_ack=False)
    async with connected(hub, it) as (client, _):
        result = await client.set_relay(m.uid, 2, True)
    assert (result.ok, result.status) == (False, "timeout")
    assert result.relays == (False, False, False)
    assert m.commands and result.command_id == m.commands[-1]["command_id"]


@pytest.mark.anyio
async def test_refused_credentials_and_unreachable_hub(hub: RunningHub, track: Any) -> None:
    """A wrong token or an unknown token name raises AuthenticationError (a ConnectError
    naming the token); a device's credentials pass CONNECT but not the subscriptions; a
    port nobody listens on raises ConnectError."""
    _, dev, m, it = device_with_token(hub, track)
    for name, token in ((it["name"], "not-the-token"), (f"nobody-{uuid.uuid4().hex[:6]}", "x")):
        with pytest.raises(AuthenticationError) as refused:
            async with HexaClient("127.0.0.1", hub.mqtt_port, token_name=name, token=token):
                raise AssertionError("connected with a wrong token")
        assert refused.value.code in (4, 5) and name in str(refused.value)
        assert isinstance(refused.value, ConnectError)

    device = HexaClient("127.0.0.1", hub.mqtt_port, token_name=m.uid, token=dev["device_token"])
    with pytest.raises(ConnectError, match="integration token") as not_integration:
        async with device:
            raise AssertionError("a device subscribed to every device's topics")
    assert not isinstance(not_integration.value, AuthenticationError)

    with pytest.raises(ConnectError) as unreachable:
        async with HexaClient("127.0.0.1", free_port(), token_name="a", token="b"):
            raise AssertionError("connected to a closed port")
    assert not isinstance(unreachable.value, AuthenticationError)


@pytest.mark.anyio
async def test_another_orgs_device_is_invisible_and_cannot_be_switched(
    hub: RunningHub, track: Any
) -> None:
    """A client of another organization sees its own device but nothing of the first
    org's device, even while that one switches; its intent for that device is dropped by
    the broker, so set_relay raises ResultTimeout and the device is never commanded."""
    _, _, theirs, their_it = device_with_token(hub, track)
    _, _, mine, it = device_with_token(hub, track)
    async with connected(hub, it) as (client, inbox), connected(hub, their_it) as (_, witness):
        await inbox.wait_for(lambda x: isinstance(x, DeviceState) and x.uid == mine.uid)
        await witness.wait_for(lambda x: x == Availability(theirs.uid, True, retained=True))
        with pytest.raises(ResultTimeout) as unanswered:
            await client.set_relay(theirs.uid, 0, True, within=1.0)
        assert unanswered.value.uid == theirs.uid and unanswered.value.intent_id
        await asyncio.to_thread(theirs.event, 1, "press")
        await asyncio.to_thread(theirs.drop)
        # Once their own organization's client has the event and the offline availability,
        # the broker has routed both to every subscriber; the result of a round trip on our
        # connection then comes after anything routed to us before it, in order.
        await witness.wait_for(lambda x: x == InputEvent(theirs.uid, 1, "press"))
        await witness.wait_for(lambda x: x == Availability(theirs.uid, False))
        own = await client.set_relay(mine.uid, 0, True)
        assert own.status == "applied"
        await inbox.wait_for(lambda x: x == own)
        assert inbox.about(theirs.uid) == []
        assert inbox.about(mine.uid)
    assert theirs.commands == []


@pytest.mark.anyio
async def test_a_failing_reader_ends_the_session_instead_of_hanging(
    hub: RunningHub, track: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Should reading fail for an unforeseen reason (here decoding raises a bug of its own),
    the client logs it and ends the session: messages() and set_relay raise
    ConnectionLost naming the cause, rather than waiting forever on a dead reader."""
    _, _, m, it = device_with_token(hub, track)

    def broken(topic: str, payload: bytes, retain: bool = False) -> Message | None:
        raise RuntimeError("decoder bug")

    monkeypatch.setattr(codec, "decode", broken)
    with caplog.at_level(logging.ERROR, logger="hexa.client"):
        async with connected(hub, it) as (client, inbox):
            done, _ = await asyncio.wait([inbox.task], timeout=WAIT_S)
            assert done, "messages() went on waiting after the reader failed"
            lost = inbox.task.exception()
            assert isinstance(lost, ConnectionLost) and "decoder bug" in str(lost)
            with pytest.raises(ConnectionLost):
                await client.set_relay(m.uid, 0, True)
    assert any("stopped reading" in r.getMessage() for r in caplog.records), caplog.records
    assert m.commands == []


@pytest.mark.anyio
async def test_malformed_payload_is_logged_and_skipped(
    hub: RunningHub, track: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A device publishing garbage as its availability: the client logs one warning naming
    the topic and why, yields nothing for it, and goes on with the next message."""
    _, _, m, it = device_with_token(hub, track)
    topic = f"hexa/{m.uid}/availability"
    with caplog.at_level(logging.WARNING, logger="hexa.client"):
        async with connected(hub, it) as (_, inbox):
            await inbox.wait_for(lambda x: x == Availability(m.uid, True, retained=True))
            await asyncio.to_thread(m.publish, topic, b"banana\x00")
            await asyncio.to_thread(m.publish, topic, b"online")
            assert await inbox.wait_for(lambda x: x == Availability(m.uid, True, retained=False))
            assert not inbox.task.done()
            assert [x for x in inbox.about(m.uid) if isinstance(x, Availability)] == [
                Availability(m.uid, True, retained=True),
                Availability(m.uid, True, retained=False),
            ]
    warnings = [r.getMessage() for r in caplog.records if r.name == "hexa.client"]
    assert len(warnings) == 1, warnings
    assert topic in warnings[0] and "expected online or offline" in warnings[0]
    assert "banana" in warnings[0]


@pytest.mark.anyio
async def test_unread_messages_beyond_queue_size_drop_the_oldest(
    hub: RunningHub, track: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """With nobody iterating, a client keeps only its newest queue_size messages and says
    once that it dropped some; set_relay still gets its result."""
    _, _, m, it = device_with_token(hub, track)
    with caplog.at_level(logging.WARNING, logger="hexa.client"):
        async with HexaClient(
            "127.0.0.1", hub.mqtt_port, token_name=it["name"], token=it["token"], queue_size=2
        ) as client:
            # the retained replay (hub status, state, 3 relay states, availability) comes
            # first; the hub publishes the relay state, the state, then the result
            result = await client.set_relay(m.uid, 1, True)
            assert result.status == "applied"
            kept = []
            async for message in client.messages():
                kept.append(message)
                if len(kept) == 2:
                    break
    state, last = kept
    assert isinstance(state, DeviceState) and not state.retained
    assert state.relays == (False, True, False)
    assert last == result
    dropped = [r.getMessage() for r in caplog.records if r.name == "hexa.client"]
    assert len(dropped) == 1 and "dropped the oldest" in dropped[0] and "1 so far" in dropped[0], (
        dropped
    )


@pytest.mark.anyio
async def test_deleted_token_ends_the_session_with_connection_lost(
    hub: RunningHub, track: Any
) -> None:
    """Deleting the integration token closes the client's connection: messages() raises
    ConnectionLost, so do intents; entering the client again is refused."""
    owner, _, m, it = device_with_token(hub, track)
    client = HexaClient("127.0.0.1", hub.mqtt_port, token_name=it["name"], token=it["token"])
    async with client:
        inbox = Inbox(client)
        await inbox.wait_for(lambda x: isinstance(x, DeviceState) and x.uid == m.uid)

        def delete_token() -> None:
            with hub.api(owner.access_token) as c:
                r = c.delete(f"/integrations/tokens/{it['id']}")
            assert r.status_code == 204, r.text

        await asyncio.to_thread(delete_token)
        done, _ = await asyncio.wait([inbox.task], timeout=WAIT_S)
        assert done, "messages() did not end when the connection was closed"
        assert isinstance(inbox.task.exception(), ConnectionLost)
        with pytest.raises(ConnectionLost) as first:
            await client.set_relay(m.uid, 0, True)
        with pytest.raises(ConnectionLost) as second:
            await client.set_relay(m.uid, 1, True)
        assert str(first.value) == str(second.value) == str(inbox.task.exception())
        assert first.value is not second.value  # each raise its own traceback
    with pytest.raises(AuthenticationError):
        async with client:
            raise AssertionError("a deleted token connected")
    assert m.commands == []


@pytest.mark.anyio
async def test_taken_over_session_is_lost_and_the_client_reconnects(
    hub: RunningHub, track: Any
) -> None:
    """A second connection with the same client id takes the session over: the first
    client's messages() raises ConnectionLost; entered again, the same client gets the
    retained state anew and switches relays."""
    _, _, m, it = device_with_token(hub, track)
    identifier = f"kitchen-{uuid.uuid4().hex[:8]}"

    def client() -> HexaClient:
        return HexaClient(
            "127.0.0.1",
            hub.mqtt_port,
            token_name=it["name"],
            token=it["token"],
            identifier=identifier,
        )

    first = client()
    async with first:
        inbox = Inbox(first)
        await inbox.wait_for(lambda x: isinstance(x, DeviceState) and x.uid == m.uid)
        async with client():
            done, _ = await asyncio.wait([inbox.task], timeout=WAIT_S)
            assert done, "the first connection was not closed by the takeover"
            assert isinstance(inbox.task.exception(), ConnectionLost)
    async with first:
        again = Inbox(first)
        state = await again.wait_for(lambda x: isinstance(x, DeviceState) and x.uid == m.uid)
        assert isinstance(state, DeviceState) and state.retained
        assert (await first.set_relay(m.uid, 2, True)).relays == (False, False, True)
        await again.stop()


def test_tls_verified_against_a_private_ca(db_kind: str, tmp_path: Path, track: Any) -> None:
    """Over the hub's MQTT/TLS listener the client connects with an SSLContext trusting
    the hub's CA and switches a relay; verified against the system's CAs instead
    (tls=True) the certificate is refused with a ConnectError."""
    cert, key = self_signed(tmp_path)
    tls_port = free_port()
    options = {"mqtt_tls_cert": str(cert), "mqtt_tls_key": str(key), "mqtt_tls_port": str(tls_port)}
    with spawned_hub(db_kind, tmp_path, **options) as tls_hub:
        owner = register(tls_hub)
        _, m = online_device(tls_hub, owner, track)
        it = integration_token(tls_hub, owner)

        async def check() -> None:
            context = ssl.create_default_context(cafile=str(cert))
            async with HexaClient(
                "127.0.0.1", tls_port, tls=context, token_name=it["name"], token=it["token"]
            ) as client:
                assert client.port == tls_port
                inbox = Inbox(client)
                assert await inbox.wait_for(lambda x: x == HubStatus(online=True, retained=True))
                result = await client.set_relay(m.uid, 0, True)
                assert (result.status, result.relays) == ("applied", (True, False, False))
                await inbox.stop()
            with pytest.raises(ConnectError, match="certificate") as unverified:
                async with HexaClient(
                    "127.0.0.1", tls_port, tls=True, token_name=it["name"], token=it["token"]
                ):
                    raise AssertionError("a certificate no system CA signed was accepted")
            assert not isinstance(unverified.value, AuthenticationError)

        asyncio.run(check())
        m.close()


# --- decoding and topics, without a hub --------------------------------------------------
STAMP = "2026-11-22T10:00:00.000Z"


def test_decode_reads_every_topic_the_client_subscribes_to() -> None:
    """Each hub → everyone topic decodes to its message; unknown fields are ignored, an
    empty payload (a cleared retained topic) and a foreign topic give None."""
    state = json.dumps(
        {"relays": [True, False], "inputs": [False], "online": True, "updated_at": STAMP, "x": 1}
    ).encode()
    assert decode("hexa/hx-1/state", state, True) == DeviceState(
        "hx-1", (True, False), (False,), True, datetime(2026, 11, 22, 10, tzinfo=UTC), True
    )
    assert decode("hexa/hx-1/relay/2/state", b"ON") == RelayState("hx-1", 2, True)
    assert decode("hexa/hx-1/availability", b"offline", True) == Availability("hx-1", False, True)
    assert decode("hexa/hub/status", b"online") == HubStatus(True)
    assert decode("hexa/hx-1/input/0/event", b'{"event": "double_press"}') == InputEvent(
        "hx-1", 0, "double_press"
    )
    result = b'{"intent_id": "i1", "ok": false, "status": "rejected", "error": "busy"}'
    assert decode("hexa/hx-1/result", result) == RelayResult(
        "hx-1", "i1", False, "rejected", error="busy"
    )
    assert decode("hexa/hx-1/state", b"") is None
    assert decode("hexa/hx-1/relay/1/set", b"ON") is None
    assert decode("homeassistant/status", b"online") is None


@pytest.mark.parametrize(
    ("topic", "payload", "why"),
    [
        ("hexa/hx-1/state", b"{not json", "not UTF-8 JSON"),
        ("hexa/hx-1/state", b"\xff\xfe", "not UTF-8 JSON"),
        ("hexa/hx-1/state", b"[1, 2]", "expected a JSON object"),
        ("hexa/hx-1/state", b"[" * 100_000, "nested too deeply"),
        (
            "hexa/hx-1/state",
            b'{"relays": [1, 0], "inputs": [], "online": true, "updated_at": "2026-01-01T00:00Z"}',
            "relays: expected a list of true/false",
        ),
        ("hexa/hx-1/state", b'{"relays": [], "inputs": [], "online": true}', "updated_at: missing"),
        (
            "hexa/hx-1/state",
            b'{"relays": [], "inputs": [], "online": true, "updated_at": "yesterday"}',
            "updated_at: expected an ISO-8601 time",
        ),
        ("hexa/hx-1/relay/0/state", b"MAYBE", "expected ON or OFF"),
        ("hexa/hub/status", b"up", "expected online or offline"),
        ("hexa/hx-1/input/1/event", b'{"event": "tap"}', "event: expected one of"),
        ("hexa/hx-1/input/1/event", b'{"event": "hold", "duration_ms": -1}', "duration_ms"),
        ("hexa/hx-1/input/1/event", b'{"event": "hold", "duration_ms": NaN}', "not UTF-8 JSON"),
        ("hexa/hx-1/result", b'{"intent_id": "i", "ok": true, "status": "done"}', "status"),
        ("hexa/hx-1/result", b'{"intent_id": "i", "ok": 1, "status": "applied"}', "ok: expected"),
        ("hexa/hx-1/result", b'{"ok": true, "status": "applied"}', "intent_id: missing"),
        (
            "hexa/hx-1/result",
            b'{"intent_id": "i", "ok": true, "status": "applied", "latency_ms": "fast"}',
            "latency_ms",
        ),
        (
            "hexa/hx-1/result",
            b'{"intent_id": "i", "ok": true, "status": "applied", "latency_ms": 1e999}',
            "latency_ms: expected a non-negative number",
        ),
        (
            "hexa/hx-1/result",
            b'{"intent_id": "i", "ok": true, "status": "applied", "latency_ms": 1'
            + b"0" * 400
            + b"}",
            "latency_ms: expected a non-negative number",
        ),
    ],
)
def test_decode_rejects_malformed_payloads(topic: str, payload: bytes, why: str) -> None:
    """A payload without its topic's shape raises PayloadError naming the topic and why."""
    with pytest.raises(PayloadError) as bad:
        decode(topic, payload)
    assert bad.value.topic == topic and why in str(bad.value) and topic in str(bad.value)
    assert isinstance(bad.value, ValueError)


def test_client_topics_are_the_hubs() -> None:
    """The client's copy of the topic contract agrees with the hub's (hexa.hub.topics)."""
    pairs = [
        (codec.STATE, topics.STATE),
        (codec.RELAY_STATE, topics.RELAY_STATE),
        (codec.AVAILABILITY, topics.AVAILABILITY),
        (codec.INPUT_EVENT, topics.INPUT_EVENT),
        (codec.RESULT, topics.RESULT),
        (codec.HUB_STATUS, topics.HUB_STATUS),
        (codec.RELAY_SET, topics.RELAY_SET),
        (codec.RELAYS_SET, topics.RELAYS_SET),
    ]
    for ours, hubs in pairs:
        assert ours == hubs.template
        assert codec.topic_filter(ours) == hubs.filter()
    samples = ["hexa/hx-1/relay/7/state", "hexa/a_b-c/input/12/event", "hexa/x/relay/01/state"]
    samples += ["hexa/-x/state", "hexa/hub/status", "hexa/hx-1/input/1000/event", "hexa/+/result"]
    for ours, hubs in pairs:
        for topic in samples:
            assert codec.match(ours, topic) == hubs.parse(topic), (ours, topic)
    assert codec.intent_topic("hx-1", 2) == topics.RELAY_SET.format(uid="hx-1", index=2)
    assert codec.intent_topic("hx-1", None) == topics.RELAYS_SET.format(uid="hx-1")
    intent = topics.RELAY_SET.decode(codec.encode_intent("TOGGLE", "abc"))
    assert (intent.state, intent.intent_id) == ("TOGGLE", "abc")
