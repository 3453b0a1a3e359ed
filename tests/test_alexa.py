"""Alexa Smart Home directives (contract §6): ``POST /api/v1/alexa/smart-home`` on a real
hub, with real accounts and a simulated switch over MQTT.

Every answer is checked field by field for what Amazon's message schema requires (the
checks below run everywhere, CI included). When ``HEXA_ALEXA_SCHEMA`` names a copy of
Amazon's published schema (``alexa_smart_home_message_schema.json`` from the public
repository alexa-samples/alexa-smarthome, folder ``validation_schemas/``), every answer is
validated against it as well; that copy is not part of this repository.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from support.accounts import User, add_member, admin_token, audit, register
from support.checks import NEGATIVE_WAIT_S, wait_until
from support.devices import claimed_device, online_device, resource_relays
from support.hubs import JWT_SECRET, RunningHub, free_port
from support.mqtt import MqttDevice

SCHEMA_ENV = "HEXA_ALEXA_SCHEMA"
MESSAGE_ID = re.compile(r"^[a-zA-Z0-9\-]{1,127}$")
TIME_OF_SAMPLE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,3})?Z$")
ENDPOINT_ID = re.compile(r"^[a-zA-Z0-9_\-=#;:?@&]{1,256}$")
INTERFACES = ["Alexa", "Alexa.PowerController", "Alexa.EndpointHealth"]


# --- Amazon's schema, when a copy is named ------------------------------------------------
def _amazon_validator() -> Any:
    path = os.environ.get(SCHEMA_ENV)
    if not path:
        return None
    import jsonschema

    schema = json.loads(Path(path).read_text())
    return jsonschema.Draft4Validator(schema)


AMAZON = _amazon_validator()
#: every answer the hub gave during this module, for the schema test at its end
ANSWERS: list[dict[str, Any]] = []


# --- directives as Alexa sends them -------------------------------------------------------
def scope(token: str) -> dict[str, str]:
    return {"type": "BearerToken", "token": token}


def directive(
    namespace: str,
    name: str,
    *,
    token: str | None = None,
    endpoint_id: str | None = None,
    payload: dict[str, Any] | None = None,
    correlation: str | None = None,
) -> dict[str, Any]:
    """A v3 directive: the token goes where Alexa puts it for this directive (payload
    scope for discovery, grantee for AcceptGrant, endpoint scope otherwise)."""
    header = {
        "namespace": namespace,
        "name": name,
        "payloadVersion": "3",
        "messageId": str(uuid.uuid4()),
    }
    if correlation is not None:
        header["correlationToken"] = correlation
    body: dict[str, Any] = {"header": header, "payload": dict(payload or {})}
    if namespace == "Alexa.Discovery" and token is not None:
        body["payload"]["scope"] = scope(token)
    elif namespace == "Alexa.Authorization" and token is not None:
        body["payload"].setdefault("grant", {"type": "OAuth2.AuthorizationCode", "code": "c0de"})
        body["payload"]["grantee"] = scope(token)
    if endpoint_id is not None:
        body["endpoint"] = {"endpointId": endpoint_id, "cookie": {}}
        if token is not None:
            body["endpoint"]["scope"] = scope(token)
    return {"directive": body}


def post(hub: RunningHub, body: bytes | dict[str, Any]) -> dict[str, Any]:
    """Send one directive; the answer is always HTTP 200 with a JSON event."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(
        f"{hub.api_base}/alexa/smart-home",
        content=content,
        headers={"Content-Type": "application/json"},
        timeout=15,
    )
    assert r.status_code == 200, r.text
    return seen(dict(r.json()))


def seen(answer: dict[str, Any]) -> dict[str, Any]:
    """Keep an answer for the schema test; with Amazon's schema at hand, validate it at
    once, so that a failure names the test that got it."""
    ANSWERS.append(answer)
    if AMAZON is not None:
        problems = [e.message for e in AMAZON.iter_errors(answer)]
        assert not problems, f"not valid by Amazon's schema: {problems[:3]}\n{answer}"
    return answer


def discover(hub: RunningHub, token: str) -> dict[str, Any]:
    return post(hub, directive("Alexa.Discovery", "Discover", token=token))


def power(
    hub: RunningHub, token: str, endpoint_id: str, on: bool = True, correlation: str = "c-1"
) -> dict[str, Any]:
    name = "TurnOn" if on else "TurnOff"
    return post(
        hub,
        directive(
            "Alexa.PowerController",
            name,
            token=token,
            endpoint_id=endpoint_id,
            correlation=correlation,
        ),
    )


def report_state(hub: RunningHub, token: str, endpoint_id: str) -> dict[str, Any]:
    return post(
        hub,
        directive("Alexa", "ReportState", token=token, endpoint_id=endpoint_id, correlation="rs"),
    )


def eid(uid: str, index: int) -> str:
    return f"hexa_{uid}_{index}"


# --- what Amazon's schema requires of each answer -----------------------------------------
def check_header(answer: dict[str, Any], namespace: str, name: str) -> dict[str, Any]:
    """The event's header, checked: namespace, name, payloadVersion "3", a fresh
    messageId (a UUID, within the schema's alphabet), no field the schema does not know."""
    assert set(answer) <= {"event", "context"}, answer
    event = answer["event"]
    assert set(event) <= {"header", "endpoint", "payload"}, event
    assert isinstance(event["payload"], dict)
    header = event["header"]
    assert header["namespace"] == namespace and header["name"] == name, answer
    assert header["payloadVersion"] == "3"
    assert MESSAGE_ID.match(header["messageId"]) and uuid.UUID(header["messageId"])
    assert set(header) <= {"namespace", "name", "payloadVersion", "messageId", "correlationToken"}
    if "correlationToken" in header:
        assert isinstance(header["correlationToken"], str) and header["correlationToken"]
    if "endpoint" in event:
        assert ENDPOINT_ID.match(event["endpoint"]["endpointId"])
    return dict(header)


def check_error(
    answer: dict[str, Any], type_: str, namespace: str = "Alexa", correlation: str | None = None
) -> None:
    """An ErrorResponse of ``type_``: type and message only, and no context."""
    header = check_header(answer, namespace, "ErrorResponse")
    assert "context" not in answer
    payload = answer["event"]["payload"]
    assert set(payload) == {"type", "message"}, payload
    assert payload["type"] == type_, payload
    assert isinstance(payload["message"], str) and payload["message"]
    assert header.get("correlationToken") == correlation


def check_sample(prop: dict[str, Any]) -> None:
    """A state property's time: ISO-8601 UTC with at most milliseconds and a Z."""
    assert set(prop) == {"namespace", "name", "value", "timeOfSample", "uncertaintyInMilliseconds"}
    assert TIME_OF_SAMPLE.match(prop["timeOfSample"]), prop
    datetime.fromisoformat(prop["timeOfSample"].replace("Z", "+00:00"))
    assert isinstance(prop["uncertaintyInMilliseconds"], int)
    assert prop["uncertaintyInMilliseconds"] >= 0


def state_of(answer: dict[str, Any]) -> tuple[str, str]:
    """(powerState, connectivity) of a Response or StateReport, each property checked."""
    props = answer["context"]["properties"]
    assert set(answer["context"]) == {"properties"}
    for prop in props:
        check_sample(prop)
    by_name = {(p["namespace"], p["name"]): p["value"] for p in props}
    assert set(by_name) == {
        ("Alexa.PowerController", "powerState"),
        ("Alexa.EndpointHealth", "connectivity"),
    }
    return by_name["Alexa.PowerController", "powerState"], by_name[
        "Alexa.EndpointHealth", "connectivity"
    ]["value"]


# --- fixtures ------------------------------------------------------------------------------
@pytest.fixture
def owner(hub: RunningHub) -> User:
    return register(hub)


@pytest.fixture
def switch(
    hub: RunningHub, owner: User, track: Callable[[MqttDevice], MqttDevice]
) -> Iterator[tuple[dict[str, Any], MqttDevice]]:
    """An online hexa-mini-switch-v1 of ``owner``'s organization."""
    yield online_device(hub, owner, track)


def alexa_token(hub: RunningHub, user: User, kind: str = "alexa") -> str:
    with hub.api(user.access_token) as c:
        r = c.post(
            "/integrations/tokens",
            json={"name": f"alexa-{uuid.uuid4().hex[:8]}", "org_id": user.org_id, "kind": kind},
        )
    assert r.status_code == 201, r.text
    assert r.json()["kind"] == kind
    return str(r.json()["token"])


def commands_seen(dev: MqttDevice) -> int:
    return len(dev.commands)


# --- discovery -----------------------------------------------------------------------------
def test_discovery_lists_one_switch_per_relay_of_the_accounts_devices(
    hub: RunningHub, owner: User
) -> None:
    """Discover.Response: endpoint hexa_<uid>_<n> per relay, SWITCH, the three interfaces
    with powerState and connectivity retrievable and proactively reported; relay names
    become friendly names; another organization's device is not listed."""
    _, dev = claimed_device(hub, owner)
    with hub.api(owner.access_token) as c:
        patched = c.patch(
            f"/devices/{dev['id']}",
            json={"name": "Hall", "relay_names": ['Ceiling "big" 💡', None, "x" * 200]},
        )
        assert patched.status_code == 200, patched.text
    stranger = register(hub)
    _, foreign = claimed_device(hub, stranger)

    answer = discover(hub, owner.access_token)
    check_header(answer, "Alexa.Discovery", "Discover.Response")
    assert "endpoint" not in answer["event"] and "context" not in answer
    endpoints = answer["event"]["payload"]["endpoints"]
    uid = dev["device_uid"]
    assert [e["endpointId"] for e in endpoints] == [eid(uid, i) for i in range(3)]
    names = [e["friendlyName"] for e in endpoints]
    assert names[0] == 'Ceiling "big" 💡'
    assert names[1] == "Hall relay 2"
    assert len(names[2]) == 128 and names[2].startswith("xxx")
    for e in endpoints:
        assert e["displayCategories"] == ["SWITCH"]
        assert e["manufacturerName"] == "Hexa"
        assert 1 <= len(e["description"]) <= 128
        assert e["additionalAttributes"]["serialNumber"] == uid
        caps = {c["interface"]: c for c in e["capabilities"]}
        assert list(caps) == INTERFACES
        for c in e["capabilities"]:
            assert c["type"] == "AlexaInterface" and c["version"] == "3"
        for interface, prop in (
            ("Alexa.PowerController", "powerState"),
            ("Alexa.EndpointHealth", "connectivity"),
        ):
            assert caps[interface]["properties"] == {
                "supported": [{"name": prop}],
                "proactivelyReported": True,
                "retrievable": True,
            }
    assert not any(foreign["device_uid"] in e["endpointId"] for e in endpoints)
    mine = discover(hub, stranger.access_token)["event"]["payload"]["endpoints"]
    assert [e["endpointId"] for e in mine] == [eid(foreign["device_uid"], i) for i in range(3)]


def test_discovery_without_devices_is_an_empty_list(hub: RunningHub, owner: User) -> None:
    """An account whose organizations have no devices discovers an empty endpoint list."""
    answer = discover(hub, owner.access_token)
    check_header(answer, "Alexa.Discovery", "Discover.Response")
    assert answer["event"]["payload"] == {"endpoints": []}


# --- power and state -----------------------------------------------------------------------
def test_turn_on_switches_the_relay_and_answers_after_the_ack(
    hub: RunningHub, owner: User, switch: tuple[dict[str, Any], MqttDevice]
) -> None:
    """TurnOn/TurnOff: the device gets the command, the answer carries the state it
    acknowledged, the correlation token and the endpoint; REST sees the same state."""
    dev, m = switch
    endpoint = eid(dev["device_uid"], 1)
    answer = power(hub, owner.access_token, endpoint, on=True, correlation="tok-on")
    header = check_header(answer, "Alexa", "Response")
    assert header["correlationToken"] == "tok-on"
    assert answer["event"]["endpoint"] == {"endpointId": endpoint}
    assert answer["event"]["payload"] == {}
    assert state_of(answer) == ("ON", "OK")
    assert m.relays == [False, True, False]  # acknowledged before the answer came
    assert m.commands[-1]["relay_index"] == 1 and m.commands[-1]["state"] is True
    assert resource_relays(hub, owner, dev["id"]) == [False, True, False]

    answer = power(hub, owner.access_token, endpoint, on=False, correlation="tok-off")
    assert check_header(answer, "Alexa", "Response")["correlationToken"] == "tok-off"
    assert state_of(answer) == ("OFF", "OK")
    assert m.relays == [False, False, False]


def test_report_state_gives_the_relays_state_and_connectivity(
    hub: RunningHub, owner: User, switch: tuple[dict[str, Any], MqttDevice]
) -> None:
    """ReportState: a StateReport for the endpoint with its relay's state and OK
    connectivity, the correlation token echoed."""
    dev, _ = switch
    assert state_of(power(hub, owner.access_token, eid(dev["device_uid"], 2)))[0] == "ON"
    answer = report_state(hub, owner.access_token, eid(dev["device_uid"], 2))
    header = check_header(answer, "Alexa", "StateReport")
    assert header["correlationToken"] == "rs"
    assert answer["event"]["payload"] == {}
    assert answer["event"]["endpoint"] == {"endpointId": eid(dev["device_uid"], 2)}
    assert state_of(answer) == ("ON", "OK")
    assert state_of(report_state(hub, owner.access_token, eid(dev["device_uid"], 0))) == (
        "OFF",
        "OK",
    )


def test_audit_records_alexa_commands_with_the_account(
    hub: RunningHub, owner: User, switch: tuple[dict[str, Any], MqttDevice]
) -> None:
    """A switch through Alexa is audited with source alexa and the linked user."""
    dev, _ = switch
    assert state_of(power(hub, owner.access_token, eid(dev["device_uid"], 0)))[0] == "ON"
    entries = wait_until(lambda: audit(hub, owner, source="alexa", device_id=dev["id"])["items"])
    assert len(entries) == 1, entries
    entry = entries[0]
    assert entry["action"] == "relay_command"
    assert entry["actor_type"] == "user" and entry["actor_id"] == owner.id
    assert entry["details"]["status"] == "applied" and entry["details"]["relay_index"] == 0
    assert entry["request_id"]  # the HTTP request that carried the directive


def test_an_alexa_integration_token_reaches_its_organization(
    hub: RunningHub, owner: User, switch: tuple[dict[str, Any], MqttDevice]
) -> None:
    """An integration token of kind alexa discovers and switches its organization's
    devices (audited as the integration); a generic integration token is refused."""
    dev, m = switch
    token = alexa_token(hub, owner)
    endpoints = discover(hub, token)["event"]["payload"]["endpoints"]
    assert [e["endpointId"] for e in endpoints] == [eid(dev["device_uid"], i) for i in range(3)]
    assert state_of(power(hub, token, eid(dev["device_uid"], 2))) == ("ON", "OK")
    assert m.relays[2] is True
    entries = wait_until(lambda: audit(hub, owner, source="alexa", device_id=dev["id"])["items"])
    assert entries and entries[0]["actor_type"] == "integration"

    generic = alexa_token(hub, owner, kind="generic")
    check_error(discover(hub, generic), "INVALID_AUTHORIZATION_CREDENTIAL")
    before = commands_seen(m)
    check_error(
        power(hub, generic, eid(dev["device_uid"], 0), correlation="g"),
        "INVALID_AUTHORIZATION_CREDENTIAL",
        correlation="g",
    )
    assert not wait_until(lambda: commands_seen(m) > before, NEGATIVE_WAIT_S)


# --- unreachable devices --------------------------------------------------------------------
def test_an_offline_device_is_unreachable(hub: RunningHub, owner: User) -> None:
    """TurnOn for a device that is not connected: ENDPOINT_UNREACHABLE. ReportState still
    answers a StateReport, with connectivity UNREACHABLE (Alexa.EndpointHealth)."""
    _, dev = claimed_device(hub, owner)
    endpoint = eid(dev["device_uid"], 0)
    answer = power(hub, owner.access_token, endpoint, correlation="off-1")
    check_error(answer, "ENDPOINT_UNREACHABLE", correlation="off-1")
    assert answer["event"]["endpoint"] == {"endpointId": endpoint}
    assert state_of(report_state(hub, owner.access_token, endpoint)) == ("OFF", "UNREACHABLE")
    assert resource_relays(hub, owner, dev["id"]) == [False, False, False]


def test_a_device_that_never_acknowledges_is_unreachable(
    hub: RunningHub, owner: User, track: Callable[[MqttDevice], MqttDevice]
) -> None:
    """A device that gets the command but never acknowledges it: ENDPOINT_UNREACHABLE
    once the command timeout is over, the relays unchanged, audited as a timeout."""
    dev, m = online_device(hub, owner, track, auto_ack=False)
    answer = power(hub, owner.access_token, eid(dev["device_uid"], 0), correlation="slow")
    check_error(answer, "ENDPOINT_UNREACHABLE", correlation="slow")
    assert m.commands and m.commands[-1]["relay_index"] == 0  # it was asked, never answered
    assert resource_relays(hub, owner, dev["id"]) == [False, False, False]
    entries = wait_until(lambda: audit(hub, owner, source="alexa", device_id=dev["id"])["items"])
    assert entries and entries[0]["details"]["status"] == "timeout"


# --- refusals -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"",
        b"[1, 2]",
        b'{"directive": "x"}',
        b'{"directive": {"payload": {}}}',
        b'{"directive": {"header": {"namespace": "Alexa", "name": "ReportState"}, "payload": {}}}',
        b'{"directive": {"header": {"namespace": "Alexa", "name": "ReportState",'
        b' "payloadVersion": "2", "messageId": "m"}, "payload": {}}}',
        b'{"directive": {"header": {"namespace": "Alexa", "name": "ReportState",'
        b' "payloadVersion": "3", "messageId": "m"}, "payload": []}}',
        b"[" * 5000 + b"]" * 5000,
    ],
    ids=[
        "not-json",
        "empty",
        "array",
        "directive-not-object",
        "no-header",
        "no-message-id",
        "payload-version-2",
        "payload-not-object",
        "deeply-nested",
    ],
)
def test_malformed_directives_are_invalid(hub: RunningHub, body: bytes) -> None:
    """A body that is not a v3 directive is INVALID_DIRECTIVE with HTTP 200, never a 4xx
    or 5xx (Alexa would read either as the skill being down)."""
    check_error(post(hub, body), "INVALID_DIRECTIVE")


def test_unknown_directives_are_invalid_and_echo_the_correlation_token(
    hub: RunningHub, owner: User, switch: tuple[dict[str, Any], MqttDevice]
) -> None:
    """Directives of interfaces the hub does not offer, and a control directive without
    an endpoint id, are INVALID_DIRECTIVE with the correlation token; nothing switches."""
    dev, m = switch
    before = commands_seen(m)
    endpoint = eid(dev["device_uid"], 0)
    for namespace, name in (
        ("Alexa.BrightnessController", "SetBrightness"),
        ("Alexa.PowerController", "Toggle"),
        ("Alexa.Discovery", "Discover.Response"),
    ):
        answer = post(
            hub,
            directive(
                namespace,
                name,
                token=owner.access_token,
                endpoint_id=endpoint,
                correlation="ct",
            ),
        )
        check_error(answer, "INVALID_DIRECTIVE", correlation="ct")
        assert answer["event"]["endpoint"] == {"endpointId": endpoint}
    # a directive without the endpoint it needs (its scope alone)
    nameless = directive("Alexa", "ReportState", correlation="ct")
    nameless["directive"]["endpoint"] = {"scope": scope(owner.access_token)}
    check_error(post(hub, nameless), "INVALID_DIRECTIVE", correlation="ct")
    assert not wait_until(lambda: commands_seen(m) > before, NEGATIVE_WAIT_S)


def test_unknown_and_foreign_endpoints_do_not_exist(
    hub: RunningHub, owner: User, switch: tuple[dict[str, Any], MqttDevice], track: Any
) -> None:
    """An endpoint that is no relay of the account's devices is NO_SUCH_ENDPOINT: made-up
    ids, a relay past the device's count, and another organization's device (which gets
    no command)."""
    dev, _ = switch
    stranger = register(hub)
    foreign, fm = online_device(hub, stranger, track)
    for endpoint in (
        eid("nosuchdevice", 0),
        eid(dev["device_uid"], 3),
        eid(dev["device_uid"], 99999),
        "light-1",
        "hexa_",
        eid(foreign["device_uid"], 0),
    ):
        answer = power(hub, owner.access_token, endpoint, correlation="x")
        check_error(answer, "NO_SUCH_ENDPOINT", correlation="x")
        check_error(
            report_state(hub, owner.access_token, endpoint), "NO_SUCH_ENDPOINT", "Alexa", "rs"
        )
    assert not wait_until(lambda: fm.commands, NEGATIVE_WAIT_S)
    assert resource_relays(hub, stranger, foreign["id"]) == [False, False, False]


def test_released_and_deleted_devices_and_deleted_tokens(
    hub: RunningHub, owner: User, track: Callable[[MqttDevice], MqttDevice]
) -> None:
    """A released device and a deleted one leave discovery and answer NO_SUCH_ENDPOINT
    (their devices get no command); a deleted alexa integration token is
    INVALID_AUTHORIZATION_CREDENTIAL from then on."""
    released, rm = online_device(hub, owner, track)
    deleted, dm = online_device(hub, owner, track)
    token = alexa_token(hub, owner)
    listed = discover(hub, token)["event"]["payload"]["endpoints"]
    assert {eid(released["device_uid"], 0), eid(deleted["device_uid"], 0)} <= {
        e["endpointId"] for e in listed
    }
    with hub.api(owner.access_token) as c:
        assert c.post(f"/devices/{released['id']}/release").status_code == 200
        assert c.delete(f"/devices/{deleted['id']}").status_code == 204
    assert discover(hub, token)["event"]["payload"]["endpoints"] == []
    for dev in (released, deleted):
        endpoint = eid(dev["device_uid"], 0)
        check_error(
            power(hub, token, endpoint, correlation="gone"), "NO_SUCH_ENDPOINT", "Alexa", "gone"
        )
        check_error(report_state(hub, token, endpoint), "NO_SUCH_ENDPOINT", "Alexa", "rs")
    assert not wait_until(lambda: rm.commands or dm.commands, NEGATIVE_WAIT_S)

    with hub.api(owner.access_token) as c:
        tokens = c.get("/integrations/tokens").json()["items"]
        (mine,) = [t for t in tokens if t["kind"] == "alexa"]
        assert c.delete(f"/integrations/tokens/{mine['id']}").status_code == 204
    check_error(discover(hub, token), "INVALID_AUTHORIZATION_CREDENTIAL")


def _access_token(user_id: str, *, secret: str = JWT_SECRET, age: timedelta, **claims: str) -> str:
    """An access token as the hub issues them, issued ``age`` ago with a 15-minute life
    (``claims`` replace the hub's, e.g. another audience)."""
    issued = datetime.now(UTC) - age
    standard = {
        "sub": user_id,
        "iat": int(issued.timestamp()),
        "exp": int((issued + timedelta(minutes=15)).timestamp()),
        "aud": "hexa-api",
        "typ": "access",
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode({**standard, **claims}, secret, algorithm="HS256")


def test_expired_and_forged_tokens(
    hub: RunningHub, owner: User, switch: tuple[dict[str, Any], MqttDevice]
) -> None:
    """An expired access token of this hub: EXPIRED_AUTHORIZATION_CREDENTIAL (Alexa then
    refreshes it). A token signed with another key, an expired token of ours that is no
    access token (another audience or type), an unknown opaque token, a missing token and
    a refresh token: INVALID_AUTHORIZATION_CREDENTIAL. No answer repeats the token, and
    nothing is switched."""
    dev, m = switch
    endpoint = eid(dev["device_uid"], 0)
    before = commands_seen(m)
    expired = _access_token(owner.id, age=timedelta(hours=1))
    check_error(discover(hub, expired), "EXPIRED_AUTHORIZATION_CREDENTIAL")
    check_error(
        power(hub, expired, endpoint, correlation="e"),
        "EXPIRED_AUTHORIZATION_CREDENTIAL",
        correlation="e",
    )
    fresh_but_forged = _access_token(owner.id, secret="another-secret-" * 4, age=timedelta())
    expired_and_forged = _access_token(owner.id, secret="another-secret-" * 4, age=timedelta(1))
    expired_elsewhere = _access_token(owner.id, age=timedelta(hours=1), aud="another-api")
    expired_refresh = _access_token(owner.id, age=timedelta(hours=1), typ="refresh")
    for token in (
        fresh_but_forged,
        expired_and_forged,
        expired_elsewhere,
        expired_refresh,
        "hxi_" + uuid.uuid4().hex,
        owner.refresh_token,
        owner.access_token + "x",
        _access_token(str(uuid.uuid4()), age=timedelta()),  # nobody's
    ):
        refused = discover(hub, token)
        check_error(refused, "INVALID_AUTHORIZATION_CREDENTIAL")
        refused_power = power(hub, token, endpoint, correlation="f")
        check_error(refused_power, "INVALID_AUTHORIZATION_CREDENTIAL", correlation="f")
        assert token not in json.dumps(refused) + json.dumps(refused_power)
    no_scope = directive("Alexa.PowerController", "TurnOn", endpoint_id=endpoint)
    check_error(post(hub, no_scope), "INVALID_AUTHORIZATION_CREDENTIAL")
    assert not wait_until(lambda: commands_seen(m) > before, NEGATIVE_WAIT_S)
    assert m.relays == [False, False, False]


def test_a_viewer_discovers_and_reads_but_may_not_switch(
    hub: RunningHub, owner: User, switch: tuple[dict[str, Any], MqttDevice]
) -> None:
    """A viewer's TurnOn is INSUFFICIENT_PERMISSIONS (the endpoint exists for them, their
    role is too low): the device gets no command; an operator may switch."""
    dev, m = switch
    viewer, operator = register(hub), register(hub)
    add_member(hub, owner, viewer, "viewer")
    add_member(hub, owner, operator, "operator")
    endpoint = eid(dev["device_uid"], 1)
    listed = discover(hub, viewer.access_token)["event"]["payload"]["endpoints"]
    assert endpoint in [e["endpointId"] for e in listed]
    assert state_of(report_state(hub, viewer.access_token, endpoint)) == ("OFF", "OK")
    before = commands_seen(m)
    answer = power(hub, viewer.access_token, endpoint, correlation="v")
    check_error(answer, "INSUFFICIENT_PERMISSIONS", correlation="v")
    assert not wait_until(lambda: commands_seen(m) > before, NEGATIVE_WAIT_S)
    assert audit(hub, owner, source="alexa", device_id=dev["id"])["total"] == 0
    assert state_of(power(hub, operator.access_token, endpoint)) == ("ON", "OK")
    assert m.relays[1] is True


def test_platform_admins_reach_their_memberships_only_and_disabled_users_nothing(
    hub: RunningHub, owner: User, switch: tuple[dict[str, Any], MqttDevice]
) -> None:
    """A platform admin who is no member of the owner's organization neither discovers
    nor switches its device (NO_SUCH_ENDPOINT); a user disabled by the platform admin is
    INVALID_AUTHORIZATION_CREDENTIAL with a token issued before. No command is sent."""
    dev, m = switch
    endpoint = eid(dev["device_uid"], 0)
    admin = admin_token(hub)
    listed = discover(hub, admin)["event"]["payload"]["endpoints"]
    assert endpoint not in [e["endpointId"] for e in listed]
    check_error(power(hub, admin, endpoint, correlation="a"), "NO_SUCH_ENDPOINT", "Alexa", "a")

    operator = register(hub)
    add_member(hub, owner, operator, "operator")
    assert endpoint in [
        e["endpointId"]
        for e in discover(hub, operator.access_token)["event"]["payload"]["endpoints"]
    ]
    with hub.api(admin) as c:
        r = c.patch(f"/admin/users/{operator.id}", json={"is_active": False})
        assert r.status_code == 200, r.text
    check_error(discover(hub, operator.access_token), "INVALID_AUTHORIZATION_CREDENTIAL")
    check_error(
        power(hub, operator.access_token, endpoint, correlation="d"),
        "INVALID_AUTHORIZATION_CREDENTIAL",
        correlation="d",
    )
    assert not wait_until(lambda: m.commands, NEGATIVE_WAIT_S)
    assert m.relays == [False, False, False]


# --- account linking -------------------------------------------------------------------------
def test_accept_grant(hub: RunningHub, owner: User) -> None:
    """AcceptGrant with a valid grantee token: AcceptGrant.Response with an empty payload;
    a bad token or no grant code: Alexa.Authorization ErrorResponse ACCEPT_GRANT_FAILED."""
    answer = post(hub, directive("Alexa.Authorization", "AcceptGrant", token=owner.access_token))
    check_header(answer, "Alexa.Authorization", "AcceptGrant.Response")
    assert answer["event"]["payload"] == {} and "context" not in answer
    assert "endpoint" not in answer["event"]

    forged = post(hub, directive("Alexa.Authorization", "AcceptGrant", token="hxi_nope"))
    check_error(forged, "ACCEPT_GRANT_FAILED", namespace="Alexa.Authorization")
    no_code = directive(
        "Alexa.Authorization",
        "AcceptGrant",
        token=owner.access_token,
        payload={"grant": {"type": "OAuth2.AuthorizationCode"}},
    )
    check_error(post(hub, no_code), "ACCEPT_GRANT_FAILED", namespace="Alexa.Authorization")


# --- the Lambda function of docs/alexa.md ----------------------------------------------------
DOCS = Path(__file__).resolve().parents[1] / "docs" / "alexa.md"


def documented_lambda(monkeypatch: pytest.MonkeyPatch, **env: str) -> Any:
    """The Lambda function of docs/alexa.md, loaded with ``env`` as its environment."""
    source = re.search(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    assert source is not None, "docs/alexa.md has no Python example"
    monkeypatch.delenv("HEXA_TOKEN", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    namespace: dict[str, Any] = {"__name__": "alexa_lambda"}
    exec(compile(source.group(1), str(DOCS), "exec"), namespace)  # noqa: S102 - our own docs
    return namespace["lambda_handler"]


def test_the_documented_lambda_forwards_directives(
    hub: RunningHub,
    owner: User,
    switch: tuple[dict[str, Any], MqttDevice],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The docs' Lambda passes a directive to the hub and the hub's answer back; with
    HEXA_TOKEN it puts that integration token in place of the token account linking
    gave Alexa; a hub that does not answer becomes BRIDGE_UNREACHABLE."""
    dev, m = switch
    endpoint = eid(dev["device_uid"], 0)
    handler = documented_lambda(monkeypatch, HEXA_HUB_URL=hub.base + "/")
    answer = seen(handler(directive("Alexa.Discovery", "Discover", token=owner.access_token), None))
    check_header(answer, "Alexa.Discovery", "Discover.Response")
    assert len(answer["event"]["payload"]["endpoints"]) == 3

    amazons_token = "Atza|" + uuid.uuid4().hex  # what Login with Amazon linking gives Alexa
    handler = documented_lambda(
        monkeypatch, HEXA_HUB_URL=hub.base, HEXA_TOKEN=alexa_token(hub, owner)
    )
    turn_on = directive(
        "Alexa.PowerController",
        "TurnOn",
        token=amazons_token,
        endpoint_id=endpoint,
        correlation="l",
    )
    answer = seen(handler(turn_on, None))
    assert check_header(answer, "Alexa", "Response")["correlationToken"] == "l"
    assert state_of(answer) == ("ON", "OK") and m.relays[0] is True
    grant = seen(
        handler(directive("Alexa.Authorization", "AcceptGrant", token=amazons_token), None)
    )
    check_header(grant, "Alexa.Authorization", "AcceptGrant.Response")

    closed = f"http://127.0.0.1:{free_port()}"
    handler = documented_lambda(monkeypatch, HEXA_HUB_URL=closed)
    answer = seen(handler(turn_on, None))
    check_error(answer, "BRIDGE_UNREACHABLE", correlation="l")
    assert answer["event"]["endpoint"] == {"endpointId": endpoint}


def test_the_route_is_in_the_api_document(hub: RunningHub) -> None:
    """/openapi.json documents the route with the directive as its request body."""
    doc = httpx.get(f"{hub.base}/openapi.json", timeout=15).json()
    operation = doc["paths"]["/api/v1/alexa/smart-home"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["directive"]
    assert "200" in operation["responses"]


# --- Amazon's schema ---------------------------------------------------------------------------
def test_every_answer_validates_against_amazons_schema(hub: RunningHub) -> None:
    """Every answer of this module (each response kind and each error) against Amazon's
    published Alexa Smart Home message schema, named by HEXA_ALEXA_SCHEMA."""
    if AMAZON is None:
        pytest.skip(
            f"{SCHEMA_ENV} is not set: point it at alexa_smart_home_message_schema.json from "
            "github.com/alexa-samples/alexa-smarthome (validation_schemas/) to run this check"
        )
    answers = [a for a in ANSWERS if a]
    kinds = {(a["event"]["header"]["namespace"], a["event"]["header"]["name"]) for a in answers}
    errors = {a["event"]["payload"].get("type") for a in answers if "ErrorResponse" in str(a)}
    expected_kinds = {
        ("Alexa.Discovery", "Discover.Response"),
        ("Alexa", "Response"),
        ("Alexa", "StateReport"),
        ("Alexa", "ErrorResponse"),
        ("Alexa.Authorization", "AcceptGrant.Response"),
        ("Alexa.Authorization", "ErrorResponse"),
    }
    if not expected_kinds <= kinds:
        pytest.skip("run the whole module: the answers of the other tests are validated here")
    assert {
        "ENDPOINT_UNREACHABLE",
        "NO_SUCH_ENDPOINT",
        "INVALID_AUTHORIZATION_CREDENTIAL",
        "EXPIRED_AUTHORIZATION_CREDENTIAL",
        "INVALID_DIRECTIVE",
        "INSUFFICIENT_PERMISSIONS",
        "ACCEPT_GRANT_FAILED",
    } <= errors
    invalid = []
    for answer in answers:
        problems = [e.message for e in AMAZON.iter_errors(answer)]
        if problems:
            invalid.append(f"{json.dumps(answer)[:400]}: {problems[:3]}")
    assert not invalid, "\n".join(invalid)
    # the validator is not a rubber stamp: a timeOfSample with an offset is refused
    broken = json.loads(json.dumps(next(a for a in answers if "context" in a)))
    broken["context"]["properties"][0]["timeOfSample"] = "2026-01-01T00:00:00+00:00"
    assert not AMAZON.is_valid(broken)
