"""What a caller may do takes effect at once, over real HTTP: the API keeps each user's
roles and each claimed device's organization in memory between requests (on SQLite), and
every change that moves access — a role changed, a member removed, an organization created,
joined or deleted, a user disabled, promoted or demoted, a device released, claimed again
or deleted — is seen by the very next request. Each test makes a request first, so that what
it changes was in memory, then checks the next one. Runs on both databases."""

from __future__ import annotations

import time
import uuid

import pytest
from support.accounts import User, add_member, admin_token, new_org, register
from support.checks import assert_error, ok
from support.devices import claim, claimed_device
from support.hubs import JWT_SECRET, RunningHub

from hexa.hub.security import issue_access_token


def command(hub: RunningHub, token: str, device_id: str, state: bool = True) -> int:
    """The status of a relay command: 503 device_offline means the caller passed every
    access check (the devices here are never connected)."""
    with hub.api(token) as c:
        r = c.post(f"/devices/{device_id}/relays/0", json={"state": state})
    if r.status_code == 503:
        assert_error(r, 503, "device_offline")
    return r.status_code


def org_status(hub: RunningHub, token: str, org_id: str) -> int:
    with hub.api(token) as c:
        return c.get(f"/orgs/{org_id}").status_code


def set_role(hub: RunningHub, by: User, who: User, role: str) -> None:
    with hub.api(by.access_token) as c:
        ok(c.post(f"/orgs/{by.org_id}/members", json={"user_id": who.id, "role": role}))


def test_role_lowered_and_raised_counts_at_once(hub: RunningHub) -> None:
    owner, member = register(hub), register(hub)
    _, device = claimed_device(hub, owner)
    add_member(hub, owner, member, "operator")
    assert command(hub, member.access_token, device["id"]) == 503
    set_role(hub, owner, member, "viewer")
    assert command(hub, member.access_token, device["id"]) == 403
    assert org_status(hub, member.access_token, owner.org_id) == 200  # still sees it
    set_role(hub, owner, member, "operator")
    assert command(hub, member.access_token, device["id"]) == 503


@pytest.mark.parametrize("form", ["path", "query"])
def test_removed_member_loses_the_organization_at_once(hub: RunningHub, form: str) -> None:
    owner, member = register(hub), register(hub)
    _, device = claimed_device(hub, owner)
    add_member(hub, owner, member, "operator")
    assert command(hub, member.access_token, device["id"]) == 503
    assert org_status(hub, member.access_token, owner.org_id) == 200
    with hub.api(owner.access_token) as c:
        if form == "path":
            r = c.delete(f"/orgs/{owner.org_id}/members/{member.id}")
        else:
            r = c.delete(f"/orgs/{owner.org_id}/members", params={"user_id": member.id})
    assert r.status_code == 204, r.text
    assert command(hub, member.access_token, device["id"]) == 404
    assert org_status(hub, member.access_token, owner.org_id) == 404


def test_member_who_leaves_loses_the_organization_at_once(hub: RunningHub) -> None:
    owner, member = register(hub), register(hub)
    add_member(hub, owner, member, "admin")
    assert org_status(hub, member.access_token, owner.org_id) == 200
    with hub.api(member.access_token) as c:
        assert c.delete(f"/orgs/{owner.org_id}/members/{member.id}").status_code == 204
    assert org_status(hub, member.access_token, owner.org_id) == 404


def test_accepted_invitation_counts_at_once(hub: RunningHub) -> None:
    owner, member = register(hub), register(hub)
    assert org_status(hub, member.access_token, owner.org_id) == 404
    with hub.api(owner.access_token) as c:
        invitation = ok(
            c.post(f"/orgs/{owner.org_id}/members", json={"email": member.email, "role": "viewer"}),
            201,
        )
    assert org_status(hub, member.access_token, owner.org_id) == 404  # invited, not a member
    with hub.api(member.access_token) as c:
        ok(c.post(f"/invitations/{invitation['id']}/accept"))
    assert org_status(hub, member.access_token, owner.org_id) == 200


def test_created_organization_is_usable_at_once(hub: RunningHub) -> None:
    user = register(hub)
    assert org_status(hub, user.access_token, user.org_id) == 200
    org = new_org(hub, user)
    with hub.api(user.access_token) as c:
        ok(c.post(f"/orgs/{org['id']}/sites", json={"name": "Home"}), 201)


def test_deleted_organization_is_gone_for_every_member_at_once(hub: RunningHub) -> None:
    owner, member = register(hub), register(hub)
    org = new_org(hub, owner)
    add_member(hub, owner, member, "viewer", org_id=org["id"])
    assert org_status(hub, member.access_token, org["id"]) == 200
    assert org_status(hub, owner.access_token, org["id"]) == 200
    with hub.api(owner.access_token) as c:
        assert c.delete(f"/orgs/{org['id']}").status_code == 204
    assert org_status(hub, member.access_token, org["id"]) == 404
    assert org_status(hub, owner.access_token, org["id"]) == 404
    with hub.api(member.access_token) as c:
        assert org["id"] not in {o["id"] for o in ok(c.get("/orgs"))["items"]}


def test_disabled_user_is_refused_at_once_and_enabled_again(hub: RunningHub) -> None:
    admin = admin_token(hub)
    user = register(hub)
    _, device = claimed_device(hub, user)
    assert command(hub, user.access_token, device["id"]) == 503
    with hub.api(admin) as c:
        ok(c.patch(f"/admin/users/{user.id}", json={"is_active": False}))
    assert_error(hub.api(user.access_token).get("/auth/me"), 401)
    assert command(hub, user.access_token, device["id"]) == 401
    with hub.api(admin) as c:
        ok(c.patch(f"/admin/users/{user.id}", json={"is_active": True}))
    assert command(hub, user.access_token, device["id"]) == 503


def test_platform_role_counts_at_once(hub: RunningHub) -> None:
    admin = admin_token(hub)
    user = register(hub)
    with hub.api(user.access_token) as c:
        assert c.get("/admin/users").status_code == 404
    with hub.api(admin) as c:
        ok(c.patch(f"/admin/users/{user.id}", json={"role": "admin"}))
    with hub.api(user.access_token) as c:
        assert c.get("/admin/users").status_code == 200
    with hub.api(admin) as c:
        ok(c.patch(f"/admin/users/{user.id}", json={"role": "user"}))
    with hub.api(user.access_token) as c:
        assert c.get("/admin/users").status_code == 404


def test_another_tenants_device_is_a_404(hub: RunningHub) -> None:
    owner, stranger = register(hub), register(hub)
    _, device = claimed_device(hub, owner)
    assert command(hub, owner.access_token, device["id"]) == 503
    assert command(hub, stranger.access_token, device["id"]) == 404
    assert command(hub, stranger.access_token, str(uuid.uuid4())) == 404
    with hub.api(owner.access_token) as c:
        r = c.post(f"/devices/{device['id']}/relays/7", json={"state": True})
    assert_error(r, 404)  # the switch has 3 relays


def test_released_and_reclaimed_device_follows_its_new_organization(hub: RunningHub) -> None:
    first, second = register(hub), register(hub)
    p, device = claimed_device(hub, first)
    assert command(hub, first.access_token, device["id"]) == 503
    assert command(hub, second.access_token, device["id"]) == 404
    with hub.api(first.access_token) as c:
        ok(c.post(f"/devices/{device['id']}/release"))
    assert command(hub, first.access_token, device["id"]) == 404
    assert command(hub, second.access_token, device["id"]) == 404
    # the claim code printed on the device stays valid: the next owner claims it
    assert claim(hub, second, p["claim_code"])["id"] == device["id"]
    assert command(hub, second.access_token, device["id"]) == 503
    assert command(hub, first.access_token, device["id"]) == 404


def test_deleted_device_is_gone_at_once(hub: RunningHub) -> None:
    owner = register(hub)
    _, device = claimed_device(hub, owner)
    for _ in range(2):
        assert command(hub, owner.access_token, device["id"]) == 503
    with hub.api(owner.access_token) as c:
        assert c.delete(f"/devices/{device['id']}").status_code == 204
    assert command(hub, owner.access_token, device["id"]) == 404


def test_expired_token_is_refused_after_being_accepted(hub: RunningHub) -> None:
    """The token's claims are kept between requests; its expiry is checked on each."""
    user = register(hub)
    token = issue_access_token(JWT_SECRET, uuid.UUID(user.id), 2)
    with hub.api(token) as c:
        ok(c.get("/orgs"))
        time.sleep(3.1)
        assert_error(c.get("/orgs"), 401)
