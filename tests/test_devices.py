"""Devices over REST (contract §2 Devices): provisioning, claiming, listing, configuration,
release, deletion, token rotation, state, and integration tokens — with real MQTT clients
checking that revoked credentials stop working and live sessions are closed."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from support.accounts import User, add_member, integration_token, register, unique_email
from support.checks import assert_error, wait_until
from support.devices import claim, claimed_device, online_device, provision
from support.hubs import PROVISION_KEY, RunningHub
from support.mqtt import MqttClient, MqttDevice

DEVICE_FIELDS = {
    "id",
    "device_uid",
    "model",
    "device_class",
    "name",
    "org_id",
    "site_id",
    "area_id",
    "relay_count",
    "input_count",
    "relays",
    "inputs",
    "online",
    "last_seen_at",
    "fw_version",
    "created_at",
}


def _no_secrets(resource: Any, *secrets: str) -> None:
    """No key naming a token or hash anywhere, and none of the given secret values."""

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                assert "token" not in k.lower() and "hash" not in k.lower(), k
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(resource)
    text = json.dumps(resource)
    for secret in secrets:
        assert secret not in text


def _site(hub: RunningHub, user: User, org_id: str | None = None) -> dict[str, Any]:
    with hub.api(user.access_token) as c:
        r = c.post(
            f"/orgs/{org_id or user.org_id}/sites", json={"name": f"site-{uuid.uuid4().hex[:6]}"}
        )
    assert r.status_code == 201, r.text
    return dict(r.json())


def _area(hub: RunningHub, user: User, site_id: str) -> dict[str, Any]:
    with hub.api(user.access_token) as c:
        r = c.post(f"/sites/{site_id}/areas", json={"name": f"area-{uuid.uuid4().hex[:6]}"})
    assert r.status_code == 201, r.text
    return dict(r.json())


def _add_member(hub: RunningHub, owner: User, member: User, role: str) -> None:
    add_member(hub, owner, member, role)


# --- provisioning ------------------------------------------------------------------------
def test_provision_answers_201_with_credentials_and_endpoints(hub: RunningHub) -> None:
    """Provisioning with the right key answers 201 with credentials, MQTT and WS endpoints."""
    with hub.api(**{"X-Provision-Key": PROVISION_KEY}) as c:
        r = c.post(
            "/provision/register",
            json={"model": "hexa-mini-switch-v1", "serial": "SN-1", "fw_version": "1.2.3"},
        )
    assert r.status_code == 201, r.text
    body = r.json()
    assert {"device_uid", "device_token", "claim_code", "mqtt", "ws_url"} <= set(body)
    assert isinstance(body["device_uid"], str) and body["device_uid"].startswith("hx-")
    assert isinstance(body["device_token"], str) and len(body["device_token"]) >= 16
    assert isinstance(body["claim_code"], str) and len(body["claim_code"]) >= 4
    assert {"host", "port", "tls_port"} <= set(body["mqtt"])
    assert body["mqtt"]["port"] == hub.mqtt_port
    assert isinstance(body["mqtt"]["host"], str) and body["mqtt"]["host"]
    assert body["ws_url"].startswith(("ws://", "wss://")) and body["ws_url"].endswith("/ws/device")


def test_provision_twice_gives_distinct_identities(hub: RunningHub) -> None:
    """Two provisionings give two different uids, tokens and claim codes."""
    a, b = provision(hub), provision(hub)
    assert a["device_uid"] != b["device_uid"]
    assert a["device_token"] != b["device_token"]
    assert a["claim_code"] != b["claim_code"]


@pytest.mark.parametrize("key", [None, "", "wrong-key", PROVISION_KEY + "x"])
def test_provision_wrong_or_missing_key_is_401(hub: RunningHub, key: str | None) -> None:
    """Provisioning without the right X-Provision-Key answers 401 unauthorized."""
    headers = {} if key is None else {"X-Provision-Key": key}
    with hub.api(**headers) as c:
        r = c.post("/provision/register", json={"model": "hexa-mini-switch-v1"})
    body = assert_error(r, 401, "unauthorized")
    assert "device_token" not in body


def test_provision_unknown_model_is_400(hub: RunningHub) -> None:
    """Provisioning an unknown model answers 400 validation_error."""
    with hub.api(**{"X-Provision-Key": PROVISION_KEY}) as c:
        r = c.post("/provision/register", json={"model": "hexa-toaster-v9"})
    assert_error(r, 400, "validation_error")


def test_mini_switch_has_three_relays_and_three_inputs(hub: RunningHub) -> None:
    """A claimed hexa-mini-switch-v1 has 3 relays (0..2, off) and 3 inputs (0..2)."""
    user = register(hub)
    _, dev = claimed_device(hub, user)
    assert dev["model"] == "hexa-mini-switch-v1"
    assert dev["relay_count"] == 3 and dev["input_count"] == 3
    assert [r["index"] for r in dev["relays"]] == [0, 1, 2]
    assert [r["state"] for r in dev["relays"]] == [False, False, False]
    assert [i["index"] for i in dev["inputs"]] == [0, 1, 2]


# --- claiming ----------------------------------------------------------------------------
def test_claim_returns_full_device_resource_without_secrets(hub: RunningHub) -> None:
    """Claiming answers 200 with every contract field of the device and no token or hash."""
    user = register(hub)
    p = provision(hub)
    with hub.api(user.access_token) as c:
        r = c.post("/devices/claim", json={"claim_code": p["claim_code"], "name": "Kitchen"})
    assert r.status_code == 200, r.text
    dev = r.json()
    assert set(dev) >= DEVICE_FIELDS, DEVICE_FIELDS - set(dev)
    uuid.UUID(dev["id"])
    assert dev["device_uid"] == p["device_uid"]
    assert dev["model"] == "hexa-mini-switch-v1"
    assert dev["device_class"] == "relay_controller"
    assert dev["name"] == "Kitchen"
    assert dev["org_id"] == user.org_id
    assert dev["site_id"] is None and dev["area_id"] is None
    assert dev["relay_count"] == 3 and dev["input_count"] == 3
    for relay in dev["relays"]:
        assert {"index", "name", "state"} <= set(relay)
    for inp in dev["inputs"]:
        assert {"index", "name", "mode"} <= set(inp)
    assert dev["online"] is False
    assert dev["last_seen_at"] is None or dev["last_seen_at"].endswith("Z")
    assert isinstance(dev["created_at"], str) and dev["created_at"].endswith("Z")
    _no_secrets(dev, p["device_token"], p["claim_code"])
    with hub.api(user.access_token) as c:
        got = c.get(f"/devices/{dev['id']}")
    assert got.status_code == 200
    _no_secrets(got.json(), p["device_token"], p["claim_code"])


def test_claim_code_reuse_is_409(hub: RunningHub) -> None:
    """A claimed device cannot be claimed again with its code, by anyone (409 conflict)."""
    owner, other = register(hub), register(hub)
    p, dev = claimed_device(hub, owner)
    for who in (owner, other):
        with hub.api(who.access_token) as c:
            r = c.post("/devices/claim", json={"claim_code": p["claim_code"]})
        assert_error(r, 409, "conflict")
    with hub.api(owner.access_token) as c:
        assert c.get(f"/devices/{dev['id']}").json()["org_id"] == owner.org_id


def test_unknown_claim_code_is_404(hub: RunningHub) -> None:
    """Claiming with a code no device has answers 404 not_found."""
    user = register(hub)
    with hub.api(user.access_token) as c:
        r = c.post("/devices/claim", json={"claim_code": "ZZZZ-ZZZZ-ZZZZ"})
    assert_error(r, 404, "not_found")


def test_claim_into_another_tenants_org_is_404(hub: RunningHub) -> None:
    """Claiming into another tenant's org answers 404 and leaves the device unclaimed."""
    me, stranger = register(hub), register(hub)
    p = provision(hub)
    with hub.api(me.access_token) as c:
        r = c.post(
            "/devices/claim", json={"claim_code": p["claim_code"], "org_id": stranger.org_id}
        )
    assert_error(r, 404, "not_found")
    dev = claim(hub, me, p["claim_code"])  # still claimable
    assert dev["org_id"] == me.org_id


def test_claim_with_own_site_and_area(hub: RunningHub) -> None:
    """Claiming with a site and area of the caller's org places the device there."""
    user = register(hub)
    site = _site(hub, user)
    area = _area(hub, user, site["id"])
    dev = claimed_device(hub, user)[1]
    assert dev["site_id"] is None
    p = provision(hub)
    dev = claim(hub, user, p["claim_code"], site_id=site["id"], area_id=area["id"])
    assert dev["org_id"] == user.org_id
    assert dev["site_id"] == site["id"] and dev["area_id"] == area["id"]


def test_claim_with_another_tenants_site_is_404(hub: RunningHub) -> None:
    """Claiming with a site of another tenant answers 404."""
    me, stranger = register(hub), register(hub)
    site = _site(hub, stranger)
    p = provision(hub)
    with hub.api(me.access_token) as c:
        r = c.post("/devices/claim", json={"claim_code": p["claim_code"], "site_id": site["id"]})
    assert_error(r, 404, "not_found")


# --- listing and reading -----------------------------------------------------------------
def test_list_devices_filters_by_org_site_and_online(hub: RunningHub) -> None:
    """GET /devices filters by org_id, site_id and online, and shows only the caller's devices."""
    user, stranger = register(hub), register(hub)
    site = _site(hub, user)
    claimed_device(hub, stranger)
    plain = claimed_device(hub, user)[1]
    p = provision(hub)
    placed = claim(hub, user, p["claim_code"], site_id=site["id"])
    live, m = online_device(hub, user)
    try:
        with hub.api(user.access_token) as c:
            r = c.get("/devices")
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["total"] == 3
            assert {d["id"] for d in body["items"]} == {plain["id"], placed["id"], live["id"]}
            assert all(d["org_id"] == user.org_id for d in body["items"])

            r = c.get("/devices", params={"org_id": user.org_id})
            assert r.status_code == 200 and r.json()["total"] == 3

            r = c.get("/devices", params={"site_id": site["id"]})
            assert r.status_code == 200
            assert [d["id"] for d in r.json()["items"]] == [placed["id"]]

            r = c.get("/devices", params={"online": "true"})
            assert r.status_code == 200
            assert [d["id"] for d in r.json()["items"]] == [live["id"]]
            assert r.json()["items"][0]["online"] is True

            r = c.get("/devices", params={"online": "false"})
            assert r.status_code == 200
            assert {d["id"] for d in r.json()["items"]} == {plain["id"], placed["id"]}

            r = c.get("/devices", params={"org_id": stranger.org_id})
            assert r.status_code == 200 and r.json()["total"] == 0 and r.json()["items"] == []
    finally:
        m.close()


def test_list_devices_pagination(hub: RunningHub) -> None:
    """GET /devices pages with limit/offset and reports total, has_next and has_prev."""
    user = register(hub)
    ids = [claimed_device(hub, user)[1]["id"] for _ in range(3)]
    with hub.api(user.access_token) as c:
        first = c.get("/devices", params={"limit": 2}).json()
        second = c.get("/devices", params={"limit": 2, "offset": 2}).json()
    assert first["total"] == 3 and first["limit"] == 2 and first["offset"] == 0
    assert len(first["items"]) == 2 and first["has_next"] is True and first["has_prev"] is False
    assert second["total"] == 3 and second["offset"] == 2
    assert len(second["items"]) == 1 and second["has_next"] is False and second["has_prev"] is True
    seen = [d["id"] for d in first["items"] + second["items"]]
    assert sorted(seen) == sorted(ids)


def test_get_other_tenants_device_is_404(hub: RunningHub) -> None:
    """Reading, patching, deleting or commanding another tenant's device answers 404, not 403."""
    owner, stranger = register(hub), register(hub)
    dev = claimed_device(hub, owner)[1]
    with hub.api(stranger.access_token) as c:
        assert_error(c.get(f"/devices/{dev['id']}"), 404, "not_found")
        assert_error(c.get(f"/devices/{dev['id']}/state"), 404, "not_found")
        assert_error(c.patch(f"/devices/{dev['id']}", json={"name": "mine"}), 404, "not_found")
        assert_error(c.delete(f"/devices/{dev['id']}"), 404, "not_found")
        assert_error(c.post(f"/devices/{dev['id']}/release"), 404, "not_found")
        assert_error(c.post(f"/devices/{dev['id']}/token/rotate"), 404, "not_found")
    with hub.api(owner.access_token) as c:
        assert c.get(f"/devices/{dev['id']}").json()["name"] == dev["name"]


def test_unknown_device_id_is_404(hub: RunningHub) -> None:
    """A well-formed but unknown device id answers 404 not_found."""
    user = register(hub)
    with hub.api(user.access_token) as c:
        assert_error(c.get(f"/devices/{uuid.uuid4()}"), 404, "not_found")


def test_device_state_shape(hub: RunningHub) -> None:
    """GET /devices/{id}/state answers {relays, inputs, online, last_seen_at} of the device."""
    user = register(hub)
    dev = claimed_device(hub, user)[1]
    with hub.api(user.access_token) as c:
        r = c.get(f"/devices/{dev['id']}/state")
    assert r.status_code == 200, r.text
    st = r.json()
    assert {"relays", "inputs", "online", "last_seen_at"} <= set(st)
    assert st["relays"] == [False, False, False]
    assert len(st["inputs"]) == 3
    assert st["online"] is False

    live, m = online_device(hub, user)
    try:
        with hub.api(user.access_token) as c:
            st = c.get(f"/devices/{live['id']}/state").json()
        assert st["online"] is True
        assert isinstance(st["last_seen_at"], str) and st["last_seen_at"].endswith("Z")
        assert st["relays"] == [False, False, False]
    finally:
        m.close()


# --- configuration -----------------------------------------------------------------------
def test_patch_name_site_area_and_relay_names(hub: RunningHub) -> None:
    """PATCH changes name, site, area and relay names; relay names appear in relays[].name."""
    user = register(hub)
    site = _site(hub, user)
    area = _area(hub, user, site["id"])
    dev = claimed_device(hub, user)[1]
    with hub.api(user.access_token) as c:
        r = c.patch(f"/devices/{dev['id']}", json={"name": "Hall switch"})
        assert r.status_code == 200, r.text
        assert r.json()["name"] == "Hall switch"

        r = c.patch(f"/devices/{dev['id']}", json={"site_id": site["id"], "area_id": area["id"]})
        assert r.status_code == 200, r.text
        assert r.json()["site_id"] == site["id"] and r.json()["area_id"] == area["id"]

        r = c.patch(f"/devices/{dev['id']}", json={"relay_names": ["Lamp", "Fan", "Heater"]})
        assert r.status_code == 200, r.text
        assert [x["name"] for x in r.json()["relays"]] == ["Lamp", "Fan", "Heater"]
        assert [x["index"] for x in r.json()["relays"]] == [0, 1, 2]

        got = c.get(f"/devices/{dev['id']}").json()
    assert got["name"] == "Hall switch"
    assert got["site_id"] == site["id"] and got["area_id"] == area["id"]
    assert [x["name"] for x in got["relays"]] == ["Lamp", "Fan", "Heater"]


def test_patch_too_many_relay_names_is_400_and_changes_nothing(hub: RunningHub) -> None:
    """PATCH with more relay names than relays answers 400 and applies none of the request."""
    user = register(hub)
    dev = claimed_device(hub, user)[1]
    with hub.api(user.access_token) as c:
        r = c.patch(
            f"/devices/{dev['id']}", json={"name": "changed", "relay_names": ["a", "b", "c", "d"]}
        )
        assert_error(r, 400, "validation_error")
        got = c.get(f"/devices/{dev['id']}").json()
    assert got["name"] == dev["name"]
    assert [x["name"] for x in got["relays"]] == [x["name"] for x in dev["relays"]]


def test_patch_with_other_tenants_site_is_404(hub: RunningHub) -> None:
    """PATCH moving a device to another tenant's site answers 404 and leaves it in place."""
    user, stranger = register(hub), register(hub)
    foreign = _site(hub, stranger)
    dev = claimed_device(hub, user)[1]
    with hub.api(user.access_token) as c:
        assert_error(
            c.patch(f"/devices/{dev['id']}", json={"site_id": foreign["id"]}), 404, "not_found"
        )
        assert c.get(f"/devices/{dev['id']}").json()["site_id"] is None


# --- deletion ----------------------------------------------------------------------------
def test_delete_device_then_404_and_mqtt_credentials_dead(hub: RunningHub) -> None:
    """DELETE answers 204, then 404; its MQTT session is closed and its credentials refused."""
    user = register(hub)
    dev, m = online_device(hub, user)
    uid, token = dev["device_uid"], dev["device_token"]
    try:
        with hub.api(user.access_token) as c:
            r = c.delete(f"/devices/{dev['id']}")
            assert r.status_code == 204, r.text
            assert r.content == b""
            assert_error(c.get(f"/devices/{dev['id']}"), 404, "not_found")
            assert_error(c.delete(f"/devices/{dev['id']}"), 404, "not_found")
            assert dev["id"] not in {d["id"] for d in c.get("/devices").json()["items"]}
        assert m.disconnected.wait(5), "the deleted device's MQTT session stayed open"
    finally:
        m.close()
    again = MqttClient(hub, uid, token)
    try:
        assert again.refused(), "a deleted device's credentials were accepted"
    finally:
        again.close()


# --- release -----------------------------------------------------------------------------
def test_release_then_claim_by_another_user(hub: RunningHub) -> None:
    """Release removes the device from the org (old owner: 404); another user claims it again."""
    owner, newcomer = register(hub), register(hub)
    p, dev = claimed_device(hub, owner)
    with hub.api(owner.access_token) as c:
        r = c.post(f"/devices/{dev['id']}/release")
        assert r.status_code == 200, r.text
        assert r.json()["id"] == dev["id"] and r.json()["org_id"] is None
        _no_secrets(r.json(), p["device_token"])
        assert_error(c.get(f"/devices/{dev['id']}"), 404, "not_found")
        assert dev["id"] not in {d["id"] for d in c.get("/devices").json()["items"]}
    again = claim(hub, newcomer, p["claim_code"])
    assert again["id"] == dev["id"] and again["device_uid"] == p["device_uid"]
    assert again["org_id"] == newcomer.org_id
    with hub.api(owner.access_token) as c:
        assert_error(c.get(f"/devices/{dev['id']}"), 404, "not_found")
    with hub.api(newcomer.access_token) as c:
        assert c.get(f"/devices/{dev['id']}").json()["org_id"] == newcomer.org_id


def test_release_kills_the_token_and_the_next_owner_gets_a_new_one(hub: RunningHub) -> None:
    """Whoever knew a device's token while it was one org's cannot use it after a release:
    the organization that claims it next is given a fresh token, shown once."""
    owner, newcomer = register(hub), register(hub)
    prov, dev = claimed_device(hub, owner)
    m = MqttDevice(hub, prov["device_uid"], prov["device_token"])
    assert m.ok(), m.rc
    with hub.api(owner.access_token) as c:
        known = c.post(f"/devices/{dev['id']}/token/rotate").json()["device_token"]
    assert wait_until(lambda: m.disconnected.is_set(), 5)
    m.close()
    with hub.api(owner.access_token) as c:
        assert c.post(f"/devices/{dev['id']}/release").status_code == 200
    stale = MqttClient(hub, m.uid, known)
    assert stale.refused(), "the old owner's token still works after the release"
    stale.close()
    p = provision(hub)  # a device never released keeps its provisioned token on claim
    first = claim(hub, newcomer, p["claim_code"])
    assert "device_token" not in first
    with hub.api(newcomer.access_token) as c:
        r = c.post("/devices/claim", json={"claim_code": prov["claim_code"]})
    assert r.status_code == 200, r.text
    fresh = r.json()["device_token"]
    assert fresh != known
    again = MqttDevice(hub, m.uid, fresh)
    try:
        assert again.ok(), again.rc
    finally:
        again.close()
    stale = MqttClient(hub, m.uid, known)
    assert stale.refused()
    stale.close()
    with hub.api(newcomer.access_token) as c:
        body = c.get(f"/devices/{dev['id']}").json()
    assert "device_token" not in body


def test_release_needs_admin_role(hub: RunningHub) -> None:
    """A viewer member cannot release the org's device (403) and it stays claimed."""
    owner, viewer = register(hub), register(hub)
    _add_member(hub, owner, viewer, "viewer")
    dev = claimed_device(hub, owner)[1]
    with hub.api(viewer.access_token) as c:
        assert c.get(f"/devices/{dev['id']}").status_code == 200
        assert_error(c.post(f"/devices/{dev['id']}/release"), 403, "forbidden")
        assert_error(c.delete(f"/devices/{dev['id']}"), 403, "forbidden")
        assert_error(c.patch(f"/devices/{dev['id']}", json={"name": "x"}), 403, "forbidden")
    with hub.api(owner.access_token) as c:
        assert c.get(f"/devices/{dev['id']}").json()["org_id"] == owner.org_id


# --- token rotation ----------------------------------------------------------------------
def test_token_rotate_new_works_old_refused_and_session_closed(hub: RunningHub) -> None:
    """Rotating closes the live session; the new token connects, the old one is refused."""
    user = register(hub)
    dev, m = online_device(hub, user)
    uid, old = dev["device_uid"], dev["device_token"]
    try:
        with hub.api(user.access_token) as c:
            r = c.post(f"/devices/{dev['id']}/token/rotate")
        assert r.status_code == 200, r.text
        new = r.json()["device_token"]
        assert isinstance(new, str) and new and new != old
        assert m.disconnected.wait(5), "the session with the old token stayed open"
    finally:
        m.close()
    stale = MqttClient(hub, uid, old, client_id=f"old-{uid}")
    try:
        assert stale.refused(), "the old token was accepted after rotation"
    finally:
        stale.close()
    fresh = MqttDevice(hub, uid, new, client_id=f"new-{uid}")
    try:
        assert fresh.ok(), "the new token was refused"
        with hub.api(user.access_token) as c:
            assert wait_until(lambda: c.get(f"/devices/{dev['id']}").json().get("online"), 5)
    finally:
        fresh.close()


# --- integration tokens ------------------------------------------------------------------
def test_integration_token_created_once_listed_without_token(hub: RunningHub) -> None:
    """POST /integrations/tokens answers 201 with the token once; GET lists it without the token."""
    user = register(hub)
    name = f"ha-{uuid.uuid4().hex[:10]}"
    with hub.api(user.access_token) as c:
        r = c.post("/integrations/tokens", json={"name": name, "org_id": user.org_id})
        assert r.status_code == 201, r.text
        tok = r.json()
        assert {"id", "name", "token", "org_id"} <= set(tok)
        assert tok["name"] == name and tok["org_id"] == user.org_id
        assert isinstance(tok["token"], str) and len(tok["token"]) >= 16
        uuid.UUID(tok["id"])
        listed = c.get("/integrations/tokens")
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert {"items", "total", "limit", "offset", "has_next", "has_prev"} <= set(body)
    mine = [t for t in body["items"] if t["id"] == tok["id"]]
    assert len(mine) == 1 and mine[0]["name"] == name and mine[0]["org_id"] == user.org_id
    _no_secrets(body, tok["token"])


def test_integration_token_duplicate_name_is_409(hub: RunningHub) -> None:
    """Creating a second integration token with the same name answers 409 conflict."""
    user = register(hub)
    tok = integration_token(hub, user)
    with hub.api(user.access_token) as c:
        r = c.post("/integrations/tokens", json={"name": tok["name"], "org_id": user.org_id})
        assert_error(r, 409, "conflict")
        assert (
            sum(t["name"] == tok["name"] for t in c.get("/integrations/tokens").json()["items"])
            == 1
        )


def test_integration_token_for_another_org_is_404(hub: RunningHub) -> None:
    """Creating a token in, or deleting a token of, another tenant's org answers 404."""
    me, stranger = register(hub), register(hub)
    with hub.api(me.access_token) as c:
        r = c.post(
            "/integrations/tokens",
            json={"name": f"ha-{uuid.uuid4().hex[:10]}", "org_id": stranger.org_id},
        )
        assert_error(r, 404, "not_found")
    theirs = integration_token(hub, stranger)
    with hub.api(me.access_token) as c:
        assert_error(c.delete(f"/integrations/tokens/{theirs['id']}"), 404, "not_found")
        assert theirs["id"] not in {t["id"] for t in c.get("/integrations/tokens").json()["items"]}


def test_integration_token_needs_admin_role(hub: RunningHub) -> None:
    """A viewer member of the org cannot create (403) or delete (403) its integration tokens."""
    owner, viewer = register(hub), register(hub)
    _add_member(hub, owner, viewer, "viewer")
    tok = integration_token(hub, owner)
    with hub.api(viewer.access_token) as c:
        r = c.post(
            "/integrations/tokens",
            json={"name": f"ha-{uuid.uuid4().hex[:10]}", "org_id": owner.org_id},
        )
        assert_error(r, 403, "forbidden")
        assert_error(c.delete(f"/integrations/tokens/{tok['id']}"), 403, "forbidden")
        listed = c.get("/integrations/tokens")
        assert listed.status_code == 200
        _no_secrets(listed.json(), tok["token"])
    with hub.api(owner.access_token) as c:
        assert tok["id"] in {t["id"] for t in c.get("/integrations/tokens").json()["items"]}


def test_integration_token_delete_revokes_mqtt_login(hub: RunningHub) -> None:
    """An integration token logs in over MQTT; DELETE (204) closes its session and refuses it."""
    user = register(hub)
    tok = integration_token(hub, user)
    live = MqttClient(hub, tok["name"], tok["token"])
    try:
        assert live.ok(), "a fresh integration token was refused"
        with hub.api(user.access_token) as c:
            r = c.delete(f"/integrations/tokens/{tok['id']}")
            assert r.status_code == 204, r.text
            assert r.content == b""
            assert tok["id"] not in {t["id"] for t in c.get("/integrations/tokens").json()["items"]}
            assert_error(c.delete(f"/integrations/tokens/{tok['id']}"), 404, "not_found")
        assert live.disconnected.wait(5), "the deleted integration's MQTT session stayed open"
    finally:
        live.close()
    again = MqttClient(hub, tok["name"], tok["token"])
    try:
        assert again.refused(), "a deleted integration token was accepted"
    finally:
        again.close()


def test_integration_wrong_password_refused(hub: RunningHub) -> None:
    """An integration name with a wrong token is refused by the broker."""
    user = register(hub)
    tok = integration_token(hub, user)
    bad = MqttClient(hub, tok["name"], tok["token"] + "x")
    try:
        assert bad.refused()
    finally:
        bad.close()


def test_new_user_sees_no_devices(hub: RunningHub) -> None:
    """A newly registered user sees no devices at all."""
    user = register(hub, unique_email())
    with hub.api(user.access_token) as c:
        r = c.get("/devices")
    assert r.status_code == 200
    assert r.json()["items"] == [] and r.json()["total"] == 0
