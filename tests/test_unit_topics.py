"""The topic contract: templates, filters, parsing and payload codecs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from hexa.hub import topics
from hexa.hub.mqtt import inbox
from hexa.hub.mqtt.busapi import Message, topic_matches


def test_format_filter_parse_round_trip() -> None:
    """A formatted topic parses back to its placeholders, and its filter matches it."""
    for t in topics.PER_DEVICE:
        params = {"uid": "hx-0a1b2c3d", "index": 2}
        concrete = t.format(**{k: v for k, v in params.items() if "{" + k + "}" in t.template})
        parsed = t.parse(concrete)
        assert parsed is not None and parsed["uid"] == "hx-0a1b2c3d"
        assert topic_matches(t.filter(), concrete)


@pytest.mark.parametrize("bad", ["a/b", "x+y", "#", ""])
def test_format_refuses_wildcards_and_separators(bad: str) -> None:
    """A placeholder value can never inject a level or a wildcard."""
    with pytest.raises(ValueError, match="bad topic segment"):
        topics.CMD.format(uid=bad)


@pytest.mark.parametrize(
    "topic",
    ["hexa/hx-1/relay/x/set", "hexa/hx-1/relay/01/set", "hexa/../relay/0/set", "hexa/hx-1/relay/0"],
)
def test_parse_rejects_malformed_topics(topic: str) -> None:
    """Non-numeric or zero-padded indexes and wrong shapes are not intents."""
    assert topics.RELAY_SET.parse(topic) is None


def test_device_of_finds_the_uid() -> None:
    """device_of names the device of any per-device topic, and nothing else."""
    assert topics.device_of("hexa/hx-1/relay/0/state") == "hx-1"
    assert topics.device_of("hexa/hub/status") is None
    assert topics.device_of("homeassistant/status") is None


@pytest.mark.parametrize(
    ("payload", "state"),
    [
        (b"ON", "ON"),
        (b"off", "OFF"),
        (b" toggle ", "TOGGLE"),
        (b'{"state":"on"}', "ON"),
        (b'{"state": true}', "ON"),
        (b'{"state": false, "source": "home_assistant"}', "OFF"),
    ],
)
def test_intent_payloads(payload: bytes, state: str) -> None:
    """Plain and JSON intents decode to the same state, with an intent id."""
    intent = topics.decode_intent(payload, all_relays=False)
    assert intent.state == state and intent.intent_id


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"maybe",
        b"\xff\xfe",
        b"[1,2]",
        b'{"state":"ON","evil":1}',
        b'{"state":3}',
        b'{"state":"ON","intent_id":""}',
        b"{not json",
    ],
)
def test_bad_intents_are_payload_errors(payload: bytes) -> None:
    """Anything else is a PayloadError, never an exception of another type."""
    with pytest.raises(topics.PayloadError):
        topics.decode_intent(payload, all_relays=False)


def test_toggle_is_refused_for_all_relays() -> None:
    """TOGGLE is not an all-relays intent."""
    with pytest.raises(topics.PayloadError, match="TOGGLE"):
        topics.decode_intent(b"TOGGLE", all_relays=True)


@pytest.mark.parametrize(
    ("decode", "payload"),
    [
        (topics.decode_ack, b'{"command_id": "", "ok": true}'),
        (topics.decode_ack, b'{"command_id": "c", "ok": "yes"}'),
        (topics.decode_report, b'{"relays": [1, 0]}'),
        (topics.decode_event, b'{"input_index": -1, "event": "press"}'),
        (topics.decode_event, b'{"input_index": 0, "event": "explode"}'),
        (topics.decode_ack, b"\x80\x81"),
    ],
)
def test_device_payload_validation(decode: object, payload: bytes) -> None:
    """Device payloads with wrong types, ranges or encodings are PayloadErrors."""
    with pytest.raises(topics.PayloadError):
        decode(payload)  # type: ignore[operator]


def test_firmware_may_add_fields() -> None:
    """Unknown fields in device payloads are ignored (forward compatibility)."""
    ack = topics.decode_ack(b'{"command_id": "c1", "ok": true, "relays": [true], "rssi": -40}')
    assert ack.command_id == "c1" and ack.relays == [True]


@pytest.mark.parametrize(
    ("flt", "topic", "expected"),
    [
        ("hexa/#", "hexa/a/b", True),
        ("hexa/+/state", "hexa/a/state", True),
        ("hexa/+/state", "hexa/a/b/state", False),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("hexa/#", "hexa", True),
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
    ],
)
def test_topic_matching(flt: str, topic: str, expected: bool) -> None:
    """MQTT filter matching, including $-topics (MQTT-4.7.2-1)."""
    assert topic_matches(flt, topic) is expected


def test_ha_object_id_round_trip() -> None:
    """The device uid is recoverable from a Home Assistant object id."""
    assert topics.uid_of_ha_object(topics.ha_object_id("hx-7f3a9c21", 2)) == "hx-7f3a9c21"
    assert topics.uid_of_ha_object("other_thing") is None


def test_protocol_doc_lists_every_topic() -> None:
    """docs/protocol.md documents every topic of the topic module."""
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "protocol.md").read_text()
    every = [
        *topics.PER_DEVICE,
        topics.HUB_STATUS,
        topics.HA_SWITCH_CONFIG,
        topics.HA_STATUS,
        topics.AUTOMATION_FIRED,
    ]
    for t in every:
        shown = (
            t.template.replace("{uid}", "<uid>")
            .replace("{index}", "<n>")
            .replace("{object_id}", "hexa_<uid>_<n>")
        )
        assert f"`{shown}`" in doc, f"{t.name} ({shown}) is not in docs/protocol.md"


# --- intent seals ---------------------------------------------------------------------
KEY = topics.seal_key("a-secret")
TOPIC = topics.RELAY_SET.format(uid="hx-00000001", index=0)


def _sealed(**fields: object) -> topics.Intent:
    intent = topics.Intent(state="ON", source="api", actor_type="user", actor_id="u1", **fields)
    return topics.seal_intent(intent, TOPIC, KEY)


def test_seal_verifies_on_its_topic_after_a_round_trip() -> None:
    """A sealed intent, encoded and decoded, verifies on its topic with the hub's key."""
    decoded = topics.decode_intent(topics.encode_intent(_sealed()), all_relays=False)
    assert topics.sealed_by(decoded, TOPIC, KEY)
    assert not topics.sealed_by(decoded, TOPIC, topics.seal_key("another-secret"))


def test_seal_does_not_travel_to_another_target_or_state() -> None:
    """A seal copied onto another device, relay or state, or over other attribution, fails."""
    intent = _sealed()
    assert not topics.sealed_by(intent, topics.RELAY_SET.format(uid="hx-00000002", index=0), KEY)
    assert not topics.sealed_by(intent, topics.RELAY_SET.format(uid="hx-00000001", index=1), KEY)
    assert not topics.sealed_by(intent.model_copy(update={"state": "OFF"}), TOPIC, KEY)
    assert not topics.sealed_by(intent.model_copy(update={"actor_id": "u2"}), TOPIC, KEY)


def test_old_or_missing_seals_are_not_trusted() -> None:
    """An unsealed intent, or one sealed longer ago than SEAL_MAX_AGE_S, is not the hub's."""
    assert not topics.sealed_by(topics.Intent(state="ON", source="api"), TOPIC, KEY)
    intent = _sealed()
    assert intent.sealed_at is not None
    old = intent.sealed_at - int(topics.SEAL_MAX_AGE_S * 1000) - 1
    stale = intent.model_copy(update={"sealed_at": old})
    assert not topics.sealed_by(stale, TOPIC, KEY)


def test_unattributed_keeps_the_command_and_drops_claims() -> None:
    """An untrusted intent keeps state and id; who and where are the publisher's."""
    intent = _sealed(schedule_id="s1", request_id="r1")
    plain = topics.unattributed(intent, actor_type="integration", actor_id="t1")
    assert (plain.state, plain.intent_id) == (intent.state, intent.intent_id)
    assert (plain.source, plain.actor_type, plain.actor_id) == ("mqtt", "integration", "t1")
    assert plain.schedule_id is None and plain.request_id is None and plain.seal is None


def test_parse_checks_every_literal_level_and_placeholder() -> None:
    """Parsing takes a topic of the template's shape only: each literal level equal, each
    placeholder valid; anything else (longer, shorter, another root) is no instance."""
    assert topics.RELAY_SET.parse("hexa/hx-1/relay/12/set") == {"uid": "hx-1", "index": "12"}
    for other in (
        "hexa/hx-1/relay/12/state",
        "hexa/hx-1/relays/12/set",
        "hexa/hx-1/relay/12/set/x",
        "hexa/hx-1/relay/12",
        "hexb/hx-1/relay/12/set",
        "hexa/hx 1/relay/12/set",
        "hexa/hx-1/relay/1000/set",
    ):
        assert topics.RELAY_SET.parse(other) is None, other
    assert topics.device_of("hexa/hx-1/relay/0/state") == "hx-1"
    assert topics.device_of("hexa/hx-1/unknown") is None
    assert topics.device_of("other/hx-1/cmd") is None
    assert topics.device_of("hexa/hub/status") is None


async def _delivered(handler_topic: topics.Topic[Any], msg: Message) -> list[Any]:
    got: list[Any] = []

    async def handle(params: dict[str, str], value: Any, m: Message) -> None:
        got.append((params, value))

    await inbox.on(handler_topic, handle)(msg)
    return got


def test_inbox_takes_the_hubs_own_message_as_built() -> None:
    """A message the hub published in process reaches a handler of the same topic as the
    value it was built from (not decoded again); a handler of another topic template, or
    a message without it, decodes the payload, and a bad payload is still refused."""
    result = topics.Result(intent_id="i1", ok=True, status="applied", relays=[True])
    topic = topics.RESULT.format(uid="hx-1")
    payload = topics.encode(result)
    decoded = topics.Decoded(topics.RESULT, {"uid": "hx-1"}, result)
    got = asyncio.run(_delivered(topics.RESULT, Message(topic, payload, decoded=decoded)))
    assert got == [({"uid": "hx-1"}, result)] and got[0][1] is result
    plain = asyncio.run(_delivered(topics.RESULT, Message(topic, payload)))
    assert plain == [({"uid": "hx-1"}, result)] and plain[0][1] is not result
    assert asyncio.run(_delivered(topics.RESULT, Message(topic, b"{"))) == []
    # the same message to a handler bound to another template: parsed and decoded as usual
    raw: topics.Topic[Any] = topics.Topic("raw", "hexa/{uid}/result", codec=topics.RESULT.codec)
    other = asyncio.run(_delivered(raw, Message(topic, payload, decoded=decoded)))
    assert other == [({"uid": "hx-1"}, result)] and other[0][1] is not result
