"""Tenancy over real HTTP (contract §2 "Tenancy"): organizations, members and roles, sites,
areas, soft deletion, tenant isolation (404, never 403) and platform admins."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from support.accounts import User, add_member, admin_token, new_org, register
from support.checks import assert_error, ok, wait_until
from support.devices import claim, online_device, provision
from support.hubs import RunningHub
from support.mqtt import MqttClient, MqttDevice

ROLES = ["viewer", "operator", "manager", "admin", "owner"]
RANK = {r: i for i, r in enumerate(ROLES)}
PAGE_KEYS = {"items", "total", "limit", "offset", "has_next", "has_prev"}


def new_site(hub: RunningHub, user: User, org_id: str, **body: Any) -> dict[str, Any]:
    with hub.api(user.access_token) as c:
        return dict(ok(c.post(f"/orgs/{org_id}/sites", json={"name": "Home", **body}), 201))


def new_area(hub: RunningHub, user: User, site_id: str, **body: Any) -> dict[str, Any]:
    with hub.api(user.access_token) as c:
        return dict(ok(c.post(f"/sites/{site_id}/areas", json={"name": "Kitchen", **body}), 201))


def me(hub: RunningHub, user: User) -> dict[str, Any]:
    with hub.api(user.access_token) as c:
        return dict(ok(c.get("/auth/me")))


def all_ids(c: httpx.Client, path: str) -> set[str]:
    """Every id of a paged list, walking all pages."""
    ids: set[str] = set()
    offset = 0
    while True:
        page = ok(c.get(path, params={"limit": 100, "offset": offset}))
        ids |= {item["id"] for item in page["items"]}
        if not page["has_next"]:
            return ids
        offset += 100


# --- organizations -----------------------------------------------------------------------
def test_registration_creates_personal_org_owned_by_user(hub: RunningHub) -> None:
    """Every new user gets exactly one personal organization in which they are owner."""
    user = register(hub)
    memberships = me(hub, user)["memberships"]
    assert len(memberships) == 1 and memberships[0]["role"] == "owner"
    with hub.api(user.access_token) as c:
        page = ok(c.get("/orgs"))
        assert page["total"] == 1 and [o["id"] for o in page["items"]] == [user.org_id]
        org = ok(c.get(f"/orgs/{user.org_id}"))
        members = ok(c.get(f"/orgs/{user.org_id}/members"))
    assert set(org) >= {"id", "name", "created_at"} and org["created_at"].endswith("Z")
    assert org["name"] == memberships[0]["org_name"]
    assert members["total"] == 1
    assert members["items"][0]["role"] == "owner"
    assert members["items"][0]["email"] == user.email


def test_create_org_makes_caller_owner(hub: RunningHub) -> None:
    """POST /orgs answers 201 with {id, name, created_at}; the caller is its owner."""
    user = register(hub)
    with hub.api(user.access_token) as c:
        r = c.post("/orgs", json={"name": "Acme Facilities"})
        org = ok(r, 201)
        assert set(org) >= {"id", "name", "created_at"}
        uuid.UUID(org["id"])
        assert org["name"] == "Acme Facilities" and org["created_at"].endswith("Z")
        assert ok(c.get(f"/orgs/{org['id']}")) == org
    roles = {m["org_id"]: m["role"] for m in me(hub, user)["memberships"]}
    assert roles == {user.org_id: "owner", org["id"]: "owner"}
    assert {m["org_name"] for m in me(hub, user)["memberships"]} >= {"Acme Facilities"}


@pytest.mark.parametrize(
    "body",
    [{}, {"name": ""}, {"name": "x" * 201}, {"name": 42}, {"name": "ok", "owner": "me"}],
    ids=["missing", "empty", "too-long", "int", "unknown-field"],
)
def test_create_org_validation(hub: RunningHub, body: dict[str, Any]) -> None:
    """Invalid organization bodies answer 400 validation_error and create nothing."""
    user = register(hub)
    with hub.api(user.access_token) as c:
        assert_error(c.post("/orgs", json=body), 400, "validation_error")
        assert ok(c.get("/orgs"))["total"] == 1


def test_org_requires_authentication(hub: RunningHub) -> None:
    """Tenancy routes without a token answer 401 unauthorized."""
    user = register(hub)
    with hub.api() as c:
        assert_error(c.get("/orgs"), 401, "unauthorized")
        assert_error(c.post("/orgs", json={"name": "x"}), 401, "unauthorized")
        assert_error(c.get(f"/orgs/{user.org_id}"), 401, "unauthorized")
        assert_error(c.get(f"/orgs/{user.org_id}/sites"), 401, "unauthorized")


def test_list_orgs_shows_only_own_with_pagination(hub: RunningHub) -> None:
    """GET /orgs lists only the caller's organizations, with the paged list shape."""
    user, other = register(hub), register(hub)
    mine = [user.org_id] + [new_org(hub, user, f"Org {i}")["id"] for i in range(2)]
    theirs = new_org(hub, other, "Not yours")["id"]
    with hub.api(user.access_token) as c:
        p1 = ok(c.get("/orgs", params={"limit": 2}))
        p2 = ok(c.get("/orgs", params={"limit": 2, "offset": 2}))
        full = ok(c.get("/orgs"))
    assert set(p1) >= PAGE_KEYS
    assert (p1["total"], p1["limit"], p1["offset"], p1["has_next"], p1["has_prev"]) == (
        3,
        2,
        0,
        True,
        False,
    )
    assert (p2["total"], p2["limit"], p2["offset"], p2["has_next"], p2["has_prev"]) == (
        3,
        2,
        2,
        False,
        True,
    )
    assert len(p1["items"]) == 2 and len(p2["items"]) == 1
    paged = [o["id"] for o in p1["items"] + p2["items"]]
    assert sorted(paged) == sorted(mine) and len(set(paged)) == 3
    assert full["limit"] == 20 and full["offset"] == 0 and full["total"] == 3
    assert theirs not in {o["id"] for o in full["items"]}
    assert other.org_id not in {o["id"] for o in full["items"]}


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"limit": 0}, 400),
        ({"limit": 101}, 400),
        ({"limit": -1}, 400),
        ({"limit": "ten"}, 400),
        ({"offset": -1}, 400),
        ({"limit": 1}, 200),
        ({"limit": 100}, 200),
    ],
    ids=["limit-0", "limit-101", "limit-neg", "limit-str", "offset-neg", "limit-1", "limit-100"],
)
def test_list_limit_bounds(hub: RunningHub, params: dict[str, Any], status: int) -> None:
    """?limit= accepts 1-100 only (400 validation_error outside); offset must be >= 0."""
    user = register(hub)
    site = new_site(hub, user, user.org_id)
    new_area(hub, user, site["id"])
    with hub.api(user.access_token) as c:
        for path in (
            "/orgs",
            f"/orgs/{user.org_id}/sites",
            f"/orgs/{user.org_id}/members",
            f"/sites/{site['id']}/areas",
        ):
            r = c.get(path, params=params)
            if status == 400:
                assert_error(r, 400, "validation_error")
            else:
                page = ok(r)
                assert page["limit"] == params["limit"] and len(page["items"]) == 1


def test_get_patch_delete_org(hub: RunningHub) -> None:
    """An owner reads, renames (PATCH) and deletes (204) an organization; then it is 404."""
    user = register(hub)
    org = new_org(hub, user, "Before")
    with hub.api(user.access_token) as c:
        renamed = ok(c.patch(f"/orgs/{org['id']}", json={"name": "After"}))
        assert renamed["id"] == org["id"] and renamed["name"] == "After"
        assert ok(c.get(f"/orgs/{org['id']}"))["name"] == "After"
        assert_error(c.patch(f"/orgs/{org['id']}", json={"name": ""}), 400, "validation_error")
        assert_error(c.patch(f"/orgs/{org['id']}", json={"bogus": 1}), 400, "validation_error")
        r = c.delete(f"/orgs/{org['id']}")
        assert r.status_code == 204, r.text
        assert r.content == b""
        assert_error(c.get(f"/orgs/{org['id']}"), 404, "not_found")
        assert_error(c.patch(f"/orgs/{org['id']}", json={"name": "Zombie"}), 404, "not_found")
        assert_error(c.delete(f"/orgs/{org['id']}"), 404, "not_found")
        assert org["id"] not in {o["id"] for o in ok(c.get("/orgs"))["items"]}
        assert ok(c.get("/orgs"))["total"] == 1
    assert org["id"] not in {m["org_id"] for m in me(hub, user)["memberships"]}


def test_unknown_and_malformed_ids_are_404_and_400(hub: RunningHub) -> None:
    """A random UUID is 404 not_found; a malformed id in the path is 400 validation_error."""
    user = register(hub)
    with hub.api(user.access_token) as c:
        for path in (f"/orgs/{uuid.uuid4()}", f"/sites/{uuid.uuid4()}", f"/areas/{uuid.uuid4()}"):
            assert_error(c.get(path), 404, "not_found")
        for path in ("/orgs/nope", "/sites/123", "/areas/x-y"):
            assert_error(c.get(path), 400, "validation_error")


# --- tenant isolation --------------------------------------------------------------------
def test_other_tenants_objects_are_404_not_403(hub: RunningHub) -> None:
    """Another tenant's org, site and area answer 404 (like unknown ids) for every verb."""
    alice, mallory = register(hub), register(hub)
    org = new_org(hub, alice, "Alice Co")
    site = new_site(hub, alice, org["id"], name="HQ")
    area = new_area(hub, alice, site["id"], name="Lab")
    with hub.api(mallory.access_token) as c:
        calls = [
            ("GET", f"/orgs/{org['id']}", None, "organization not found"),
            ("PATCH", f"/orgs/{org['id']}", {"name": "pwned"}, "organization not found"),
            ("DELETE", f"/orgs/{org['id']}", None, "organization not found"),
            ("DELETE", f"/orgs/{alice.org_id}", None, "organization not found"),
            ("GET", f"/orgs/{org['id']}/sites", None, "organization not found"),
            ("POST", f"/orgs/{org['id']}/sites", {"name": "evil"}, "organization not found"),
            ("GET", f"/orgs/{org['id']}/members", None, "organization not found"),
            (
                "POST",
                f"/orgs/{org['id']}/members",
                {"email": mallory.email, "role": "owner"},
                "organization not found",
            ),
            ("DELETE", f"/orgs/{org['id']}/members/{alice.id}", None, "organization not found"),
            ("GET", f"/sites/{site['id']}", None, "site not found"),
            ("PATCH", f"/sites/{site['id']}", {"name": "pwned"}, "site not found"),
            ("DELETE", f"/sites/{site['id']}", None, "site not found"),
            ("GET", f"/sites/{site['id']}/areas", None, "site not found"),
            ("POST", f"/sites/{site['id']}/areas", {"name": "evil"}, "site not found"),
            ("GET", f"/areas/{area['id']}", None, "area not found"),
            ("PATCH", f"/areas/{area['id']}", {"name": "pwned"}, "area not found"),
            ("DELETE", f"/areas/{area['id']}", None, "area not found"),
        ]
        for method, path, body, _msg in calls:
            r = c.request(method, path, json=body)
            assert r.status_code == 404, (method, path, r.status_code, r.text)
            err = assert_error(r, 404, "not_found")
            # indistinguishable from an object that does not exist at all
            unknown = path.replace(path.split("/")[2], str(uuid.uuid4()))
            ghost = c.request(method, unknown, json=body)
            assert_error(ghost, 404, "not_found")
            assert ghost.json()["message"] == err["message"], (path, err, ghost.json())
        assert org["id"] not in {o["id"] for o in ok(c.get("/orgs"))["items"]}
    # nothing was changed or deleted by those attempts
    with hub.api(alice.access_token) as c:
        assert ok(c.get(f"/orgs/{org['id']}"))["name"] == "Alice Co"
        assert ok(c.get(f"/sites/{site['id']}"))["name"] == "HQ"
        assert ok(c.get(f"/areas/{area['id']}"))["name"] == "Lab"
        assert ok(c.get(f"/orgs/{org['id']}/sites"))["total"] == 1
        assert ok(c.get(f"/sites/{site['id']}/areas"))["total"] == 1
        assert ok(c.get(f"/orgs/{org['id']}/members"))["total"] == 1
    assert {m["org_id"] for m in me(hub, mallory)["memberships"]} == {mallory.org_id}


def test_platform_admin_sees_every_org(hub: RunningHub) -> None:
    """A platform admin lists and reads every organization, site and area."""
    a, b = register(hub), register(hub)
    org_b = new_org(hub, b, "B Corp")
    site = new_site(hub, b, org_b["id"])
    area = new_area(hub, b, site["id"])
    admin = admin_token(hub)
    with hub.api(admin) as c:
        ids = all_ids(c, "/orgs")
        assert {a.org_id, b.org_id, org_b["id"]} <= ids
        assert ok(c.get("/orgs", params={"limit": 1}))["total"] >= 3
        assert ok(c.get(f"/orgs/{org_b['id']}"))["name"] == "B Corp"
        assert ok(c.get(f"/orgs/{a.org_id}"))["id"] == a.org_id
        assert ok(c.get(f"/orgs/{org_b['id']}/sites"))["items"][0]["id"] == site["id"]
        assert ok(c.get(f"/sites/{site['id']}/areas"))["items"][0]["id"] == area["id"]
        assert ok(c.get(f"/areas/{area['id']}"))["id"] == area["id"]
        members = ok(c.get(f"/orgs/{org_b['id']}/members"))
        assert [m["email"] for m in members["items"]] == [b.email]


# --- members and roles -------------------------------------------------------------------
def test_add_member_by_email_and_list(hub: RunningHub) -> None:
    """An owner invites a user by email with a role; once they accept, the member sees the
    org with that role."""
    owner, member = register(hub), register(hub)
    org = new_org(hub, owner)
    m = add_member(hub, owner, member, "operator", org["id"])
    assert m["role"] == "operator" and m["email"] == member.email and m["user_id"] == member.id
    with hub.api(owner.access_token) as c:
        page = ok(c.get(f"/orgs/{org['id']}/members"))
    assert set(page) >= PAGE_KEYS and page["total"] == 2
    roles = {i["email"]: i["role"] for i in page["items"]}
    assert roles == {owner.email: "owner", member.email: "operator"}
    for item in page["items"]:
        assert "password" not in repr(item) and "hash" not in repr(item)
    mine = {x["org_id"]: x["role"] for x in me(hub, member)["memberships"]}
    assert mine == {member.org_id: "owner", org["id"]: "operator"}
    with hub.api(member.access_token) as c:
        assert org["id"] in {o["id"] for o in ok(c.get("/orgs"))["items"]}
        assert ok(c.get(f"/orgs/{org['id']}"))["id"] == org["id"]


def test_add_member_validation(hub: RunningHub) -> None:
    """Adding a member: malformed email, bad role, unknown fields, both or neither of email
    and user_id answer 400 validation_error, and nothing is created."""
    owner, member = register(hub), register(hub)
    org = new_org(hub, owner)
    with hub.api(owner.access_token) as c:
        path = f"/orgs/{org['id']}/members"
        for body in (
            {"email": "not-an-address", "role": "viewer"},
            {"email": member.email, "role": "god"},
            {"email": member.email, "role": "viewer", "x": 1},
            {"email": member.email, "user_id": member.id, "role": "viewer"},
            {"role": "viewer"},
        ):
            assert_error(c.post(path, json=body), 400, "validation_error")
        # a user id names an existing member only: invitations go to an email address
        assert_error(c.post(path, json={"user_id": member.id, "role": "viewer"}), 404, "not_found")
        assert ok(c.get(path))["total"] == 1
        assert ok(c.get(f"/orgs/{org['id']}/invitations"))["total"] == 0


def _role_client_setup(hub: RunningHub, role: str) -> dict[str, Any]:
    owner, member, third = register(hub), register(hub), register(hub)
    org = new_org(hub, owner, f"Matrix {role}")
    site = new_site(hub, owner, org["id"])
    p = provision(hub)
    dev = claim(hub, owner, p["claim_code"], org_id=org["id"])
    assert dev["org_id"] == org["id"]
    device = MqttDevice(hub, p["device_uid"], p["device_token"])
    assert device.ok()
    with hub.api(owner.access_token) as c:
        assert wait_until(lambda: c.get(f"/devices/{dev['id']}").json().get("online"), 5)
    if role != "owner":
        add_member(hub, owner, member, role, org["id"])
    else:
        add_member(hub, owner, member, "owner", org["id"])
    return {
        "owner": owner,
        "member": member,
        "third": third,
        "org": org,
        "site": site,
        "dev": dev,
        "device": device,
    }


@pytest.mark.parametrize("role", ROLES)
def test_role_matrix(hub: RunningHub, role: str) -> None:
    """Each role may do exactly what contract §2 grants it; below that the answer is 403."""
    s = _role_client_setup(hub, role)
    org_id, dev_id, site_id = s["org"]["id"], s["dev"]["id"], s["site"]["id"]
    rank = RANK[role]
    device: MqttDevice = s["device"]

    def expect(r: httpx.Response, needed: str, ok_status: int) -> None:
        if rank >= RANK[needed]:
            assert r.status_code == ok_status, (role, needed, r.request.url, r.text)
        else:
            body = assert_error(r, 403, "forbidden")
            assert body["details"]["required_role"] == needed, body

    try:
        with hub.api(s["member"].access_token) as c:
            # viewer: read everything in the org
            assert ok(c.get(f"/orgs/{org_id}"))["id"] == org_id
            assert ok(c.get(f"/orgs/{org_id}/sites"))["total"] == 1
            assert ok(c.get(f"/orgs/{org_id}/members"))["total"] == 2
            assert ok(c.get(f"/devices/{dev_id}"))["id"] == dev_id
            assert ok(c.get(f"/devices/{dev_id}/state"))["online"] is True
            assert dev_id in {
                d["id"] for d in ok(c.get("/devices", params={"org_id": org_id}))["items"]
            }
            # operator: + command relays
            r = c.post(f"/devices/{dev_id}/relays/0", json={"state": True})
            expect(r, "operator", 200)
            if rank >= RANK["operator"]:
                assert r.json()["relays"][0] is True
                r = c.post(f"/devices/{dev_id}/relays", json={"state": False})
                assert r.status_code == 200 and r.json()["relays"] == [False, False, False]
            else:
                assert device.commands == []
                expect(c.post(f"/devices/{dev_id}/relays", json={"state": False}), "operator", 200)
            # manager: + device config, sites and areas
            expect(c.patch(f"/devices/{dev_id}", json={"name": f"by {role}"}), "manager", 200)
            expect(
                c.post(f"/orgs/{org_id}/sites", json={"name": f"site by {role}"}), "manager", 201
            )
            expect(c.patch(f"/sites/{site_id}", json={"location": "here"}), "manager", 200)
            expect(c.post(f"/sites/{site_id}/areas", json={"name": "a"}), "manager", 201)
            # admin: + members, integrations, devices
            r = c.post(
                f"/orgs/{org_id}/members", json={"email": s["third"].email, "role": "viewer"}
            )
            expect(r, "admin", 201)
            r = c.post(
                "/integrations/tokens",
                json={"name": f"int-{uuid.uuid4().hex[:8]}", "org_id": org_id},
            )
            expect(r, "admin", 201)
            if rank >= RANK["admin"]:
                assert r.json()["token"] and r.json()["org_id"] == org_id
            expect(c.post(f"/devices/{dev_id}/release"), "admin", 200)
            # owner: + delete the organization (its device was released above)
            expect(c.delete(f"/orgs/{org_id}"), "owner", 204)
    finally:
        device.close()

    # what the owner sees afterwards matches what was allowed
    with hub.api(s["owner"].access_token) as c:
        if role == "owner":
            assert_error(c.get(f"/orgs/{org_id}"), 404, "not_found")
            return
        assert ok(c.get(f"/orgs/{org_id}"))["id"] == org_id
        sites = ok(c.get(f"/orgs/{org_id}/sites"))["total"]
        assert sites == (2 if rank >= RANK["manager"] else 1)
        # an admin's POST /members invited the third user; they are not a member before accepting
        assert ok(c.get(f"/orgs/{org_id}/members"))["total"] == 2
        pending = ok(c.get(f"/orgs/{org_id}/invitations", params={"status": "pending"}))["items"]
        assert [(i["email"], i["status"]) for i in pending] == (
            [(s["third"].email, "pending")] if rank >= RANK["admin"] else []
        )
        d = c.get(f"/devices/{dev_id}")
        if rank >= RANK["admin"]:
            assert_error(d, 404, "not_found")  # released: it left the org
        else:
            assert d.status_code == 200
            assert d.json()["name"] == (
                f"by {role}" if rank >= RANK["manager"] else s["dev"]["name"]
            )


def test_member_cannot_grant_role_above_own(hub: RunningHub) -> None:
    """An admin may grant up to admin but not owner, nor demote or remove an owner."""
    owner, adm, newbie, other = register(hub), register(hub), register(hub), register(hub)
    org = new_org(hub, owner)
    add_member(hub, owner, adm, "admin", org["id"])
    with hub.api(adm.access_token) as c:
        path = f"/orgs/{org['id']}/members"
        body = assert_error(
            c.post(path, json={"email": newbie.email, "role": "owner"}), 403, "forbidden"
        )
        assert "owner" in body["message"]
        invited = ok(c.post(path, json={"email": newbie.email, "role": "admin"}), 201)
        assert (invited["role"], invited["status"]) == ("admin", "pending")
        # changing an existing owner's role or removing them is also above an admin
        assert_error(c.post(path, json={"email": owner.email, "role": "viewer"}), 403, "forbidden")
        assert_error(c.delete(f"{path}/{owner.id}"), 403, "forbidden")
        # self-promotion is refused too
        assert_error(c.post(path, json={"email": adm.email, "role": "owner"}), 403, "forbidden")
        invited_too = ok(c.post(path, json={"email": other.email, "role": "operator"}), 201)
    for user, invitation in ((newbie, invited), (other, invited_too)):
        with hub.api(user.access_token) as c:
            ok(c.post(f"/invitations/{invitation['id']}/accept"))
    with hub.api(owner.access_token) as c:
        roles = {m["email"]: m["role"] for m in ok(c.get(f"/orgs/{org['id']}/members"))["items"]}
    assert roles == {
        owner.email: "owner",
        adm.email: "admin",
        newbie.email: "admin",
        other.email: "operator",
    }


def test_manager_cannot_add_members(hub: RunningHub) -> None:
    """A manager cannot add members at all (members need admin): 403 and nothing changes."""
    owner, mgr, newbie = register(hub), register(hub), register(hub)
    org = new_org(hub, owner)
    add_member(hub, owner, mgr, "manager", org["id"])
    with hub.api(mgr.access_token) as c:
        r = c.post(f"/orgs/{org['id']}/members", json={"email": newbie.email, "role": "viewer"})
        assert_error(r, 403, "forbidden")
        assert ok(c.get(f"/orgs/{org['id']}/members"))["total"] == 2


def test_owner_changes_and_removes_members(hub: RunningHub) -> None:
    """An owner changes a member's role and removes them; the removed user loses access (404)."""
    owner, member = register(hub), register(hub)
    org = new_org(hub, owner)
    site = new_site(hub, owner, org["id"])
    add_member(hub, owner, member, "viewer", org["id"])
    assert add_member(hub, owner, member, "manager", org["id"])["role"] == "manager"
    with hub.api(owner.access_token) as c:
        page = ok(c.get(f"/orgs/{org['id']}/members"))
        assert page["total"] == 2
        r = c.delete(f"/orgs/{org['id']}/members/{member.id}")
        assert r.status_code == 204, r.text
        assert ok(c.get(f"/orgs/{org['id']}/members"))["total"] == 1
    with hub.api(member.access_token) as c:
        assert_error(c.get(f"/orgs/{org['id']}"), 404, "not_found")
        assert_error(c.get(f"/sites/{site['id']}"), 404, "not_found")
    assert org["id"] not in {m["org_id"] for m in me(hub, member)["memberships"]}


def test_member_can_leave_org(hub: RunningHub) -> None:
    """Any member (even a viewer) may remove themselves from an organization."""
    owner, viewer = register(hub), register(hub)
    org = new_org(hub, owner)
    add_member(hub, owner, viewer, "viewer", org["id"])
    with hub.api(viewer.access_token) as c:
        assert_error(c.delete(f"/orgs/{org['id']}/members/{owner.id}"), 403, "forbidden")
        r = c.delete(f"/orgs/{org['id']}/members/{viewer.id}")
        assert r.status_code == 204, r.text
        assert_error(c.get(f"/orgs/{org['id']}"), 404, "not_found")


def test_last_owner_cannot_be_removed(hub: RunningHub) -> None:
    """Removing an organization's last owner answers 409; with a second owner it works."""
    first, second = register(hub), register(hub)
    org = new_org(hub, first)
    path = f"/orgs/{org['id']}/members"
    with hub.api(first.access_token) as c:
        assert_error(c.delete(f"{path}/{first.id}"), 409, "conflict")
        assert_error(c.delete(path, params={"user_id": first.id}), 409, "conflict")
    with hub.api(admin_token(hub)) as c:  # not even a platform admin may orphan it
        assert_error(c.delete(f"{path}/{first.id}"), 409, "conflict")
    add_member(hub, first, second, "owner", org["id"])
    with hub.api(first.access_token) as c:
        r = c.delete(f"{path}/{first.id}")
        assert r.status_code == 204, r.text
    with hub.api(second.access_token) as c:
        page = ok(c.get(path))
        assert [(m["email"], m["role"]) for m in page["items"]] == [(second.email, "owner")]
        assert_error(c.delete(f"{path}/{second.id}"), 409, "conflict")
    # the personal org keeps its owner too
    with hub.api(first.access_token) as c:
        assert_error(c.delete(f"/orgs/{first.org_id}/members/{first.id}"), 409, "conflict")


def test_last_owner_cannot_be_demoted(hub: RunningHub) -> None:
    """The last owner cannot demote themselves to a lower role (the org would have no owner)."""
    owner = register(hub)
    org = new_org(hub, owner)
    with hub.api(owner.access_token) as c:
        r = c.post(f"/orgs/{org['id']}/members", json={"email": owner.email, "role": "viewer"})
        assert_error(r, 409, "conflict")
        roles = [m["role"] for m in ok(c.get(f"/orgs/{org['id']}/members"))["items"]]
    assert roles == ["owner"]


def _race(calls: list[tuple[str, str, str, dict[str, Any] | None]], hub: RunningHub) -> list[int]:
    """Send (token, method, path, body) requests all at once, one thread each; the statuses."""
    gate = threading.Barrier(len(calls))

    def send(token: str, method: str, path: str, body: dict[str, Any] | None) -> int:
        with hub.api(token) as c:
            gate.wait(30)
            return c.request(method, path, json=body).status_code

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: send(*call), calls))


@pytest.mark.parametrize("how", ["leave", "demote_each_other", "demote_self"])
def test_concurrent_owner_changes_keep_an_owner(hub: RunningHub, how: str) -> None:
    """Two owners leaving or demoting at the same moment, in many organizations at once and
    for several rounds: every organization keeps exactly one owner; the refused request
    gets 409 (or 403 when its sender had already been demoted)."""
    first, second = register(hub), register(hub)
    orgs = 8
    for _ in range(3):
        ids = [new_org(hub, first, f"Race {i}")["id"] for i in range(orgs)]
        for org_id in ids:
            add_member(hub, first, second, "owner", org_id)
        calls: list[tuple[str, str, str, dict[str, Any] | None]] = []
        for org_id in ids:
            path = f"/orgs/{org_id}/members"
            for me_, them in ((first, second), (second, first)):
                if how == "leave":
                    calls.append((me_.access_token, "DELETE", f"{path}/{me_.id}", None))
                else:
                    target = them if how == "demote_each_other" else me_
                    body = {"email": target.email, "role": "viewer"}
                    calls.append((me_.access_token, "POST", path, body))
        statuses = _race(calls, hub)
        with hub.api(admin_token(hub)) as c:
            for n, org_id in enumerate(ids):
                members = ok(c.get(f"/orgs/{org_id}/members"))["items"]
                owners = [m["email"] for m in members if m["role"] == "owner"]
                assert len(owners) == 1, (how, org_id, members)
                done, refused = sorted(statuses[2 * n : 2 * n + 2])
                assert done == (204 if how == "leave" else 200), (how, statuses)
                # 409: refused under the organization's lock. When demoting each other, a
                # request that began after the other demotion landed is refused earlier,
                # with 403: its sender is no owner (nor admin) any more.
                assert refused == 409 or (how == "demote_each_other" and refused == 403), (
                    how,
                    statuses,
                )


# --- integration token names ---------------------------------------------------------------
def test_integration_token_names_are_per_organization(hub: RunningHub) -> None:
    """Two tenants may both name a token "home-assistant" (201 each, distinct tokens); the
    same name twice in one organization is 409, and neither tenant sees the other's."""
    alice, bob = register(hub), register(hub)
    name = f"ha-{uuid.uuid4().hex[:8]}"
    created = {}
    for user in (alice, bob):
        with hub.api(user.access_token) as c:
            body = {"name": name, "org_id": user.org_id}
            created[user.id] = ok(c.post("/integrations/tokens", json=body), 201)
            assert_error(c.post("/integrations/tokens", json=body), 409, "conflict")
    assert created[alice.id]["token"] != created[bob.id]["token"]
    assert created[alice.id]["id"] != created[bob.id]["id"]
    for user, other in ((alice, bob), (bob, alice)):
        with hub.api(user.access_token) as c:
            ids = {t["id"] for t in ok(c.get("/integrations/tokens"))["items"]}
        assert created[user.id]["id"] in ids and created[other.id]["id"] not in ids


def test_integration_token_kinds(hub: RunningHub) -> None:
    """A token's kind defaults to generic, takes home_assistant or alexa, is listed with the
    token, and anything else is a 400 validation_error."""
    user = register(hub)
    with hub.api(user.access_token) as c:
        tag = uuid.uuid4().hex[:8]
        plain = ok(
            c.post("/integrations/tokens", json={"name": f"p-{tag}", "org_id": user.org_id}), 201
        )
        assert plain["kind"] == "generic"
        for kind in ("home_assistant", "alexa", "generic"):
            body = {"name": f"{kind}-{tag}", "org_id": user.org_id, "kind": kind}
            assert ok(c.post("/integrations/tokens", json=body), 201)["kind"] == kind
        bad = {"name": f"x-{tag}", "org_id": user.org_id, "kind": "homekit"}
        assert_error(c.post("/integrations/tokens", json=bad), 400, "validation_error")
        listed = {t["name"]: t["kind"] for t in ok(c.get("/integrations/tokens"))["items"]}
    assert listed == {
        f"p-{tag}": "generic",
        f"home_assistant-{tag}": "home_assistant",
        f"alexa-{tag}": "alexa",
        f"generic-{tag}": "generic",
    }


def test_same_named_integration_tokens_stay_in_their_organizations(
    hub: RunningHub, track: Any
) -> None:
    """Two tenants' integrations with the same MQTT username both log in, each seeing only
    its own organization's devices: the broker tells them apart by the token."""
    name = f"ha-{uuid.uuid4().hex[:8]}"
    tenants = []
    for _ in range(2):
        user = register(hub)
        dev, _device = online_device(hub, user, track)
        with hub.api(user.access_token) as c:
            body = {"name": name, "org_id": user.org_id}
            token = ok(c.post("/integrations/tokens", json=body), 201)["token"]
        tenants.append((dev["device_uid"], token))
    assert track(MqttClient(hub, name, "hxi_not-a-token")).refused()
    for n, (uid, token) in enumerate(tenants):
        other_uid = tenants[1 - n][0]
        client = track(MqttClient(hub, name, token))
        assert client.ok(), client.rc
        assert client.subscribe("hexa/+/availability")
        assert client.wait_for(lambda t, p, r, uid=uid: t == f"hexa/{uid}/availability", 5)
        assert not client.messages(lambda t, p, r, o=other_uid: t.startswith(f"hexa/{o}/"))


# --- sites -------------------------------------------------------------------------------
def test_site_defaults_and_fields(hub: RunningHub) -> None:
    """A site defaults to timezone UTC and empty metadata; given fields round-trip."""
    user = register(hub)
    plain = new_site(hub, user, user.org_id)
    assert set(plain) >= {"id", "org_id", "name", "location", "timezone", "metadata"}
    assert plain["org_id"] == user.org_id and plain["name"] == "Home"
    assert plain["timezone"] == "UTC" and plain["metadata"] == {}
    assert plain["location"] is None
    meta = {"floor": 2, "tags": ["a", "b"], "nested": {"k": True}}
    full = new_site(
        hub,
        user,
        user.org_id,
        name="Office",
        location="Berlin, Alexanderplatz 1",
        timezone="Europe/Berlin",
        metadata=meta,
    )
    assert (full["name"], full["location"], full["timezone"], full["metadata"]) == (
        "Office",
        "Berlin, Alexanderplatz 1",
        "Europe/Berlin",
        meta,
    )
    with hub.api(user.access_token) as c:
        assert ok(c.get(f"/sites/{full['id']}")) == full
        page = ok(c.get(f"/orgs/{user.org_id}/sites"))
    assert set(page) >= PAGE_KEYS and page["total"] == 2
    assert [s["id"] for s in page["items"]] == [plain["id"], full["id"]]


@pytest.mark.parametrize(
    "tz",
    ["Mars/Olympus_Mons", "Europe/Berlinn", "", "UTC+25", "../../etc/passwd", "/etc/localtime"],
)
def test_site_invalid_timezone_is_400(hub: RunningHub, tz: str) -> None:
    """A timezone that is not an IANA name answers 400 validation_error on create and patch."""
    user = register(hub)
    site = new_site(hub, user, user.org_id)
    with hub.api(user.access_token) as c:
        r = c.post(f"/orgs/{user.org_id}/sites", json={"name": "x", "timezone": tz})
        body = assert_error(r, 400, "validation_error")
        assert "timezone" in repr(body["details"]) or "timezone" in body["message"]
        assert_error(
            c.patch(f"/sites/{site['id']}", json={"timezone": tz}), 400, "validation_error"
        )
        assert ok(c.get(f"/sites/{site['id']}"))["timezone"] == "UTC"
        assert ok(c.get(f"/orgs/{user.org_id}/sites"))["total"] == 1


def test_site_patch(hub: RunningHub) -> None:
    """PATCH /sites/{id} changes only the given fields; null for required ones is 400."""
    user = register(hub)
    site = new_site(hub, user, user.org_id, location="old", metadata={"a": 1})
    with hub.api(user.access_token) as c:
        r = ok(c.patch(f"/sites/{site['id']}", json={"timezone": "America/New_York"}))
        assert r["timezone"] == "America/New_York"
        assert (r["name"], r["location"], r["metadata"]) == ("Home", "old", {"a": 1})
        r = ok(c.patch(f"/sites/{site['id']}", json={"name": "Cabin", "metadata": {"b": [1]}}))
        assert (r["name"], r["metadata"], r["timezone"]) == (
            "Cabin",
            {"b": [1]},
            "America/New_York",
        )
        for field in ("name", "timezone", "metadata"):
            assert_error(
                c.patch(f"/sites/{site['id']}", json={field: None}), 400, "validation_error"
            )
        assert_error(
            c.patch(f"/sites/{site['id']}", json={"org_id": str(uuid.uuid4())}),
            400,
            "validation_error",
        )
        assert_error(
            c.patch(f"/sites/{site['id']}", json={"metadata": [1, 2]}), 400, "validation_error"
        )
        assert ok(c.get(f"/sites/{site['id']}")) == r


def test_site_create_validation(hub: RunningHub) -> None:
    """Site bodies: missing name, unknown fields, non-object metadata answer 400."""
    user = register(hub)
    with hub.api(user.access_token) as c:
        path = f"/orgs/{user.org_id}/sites"
        for body in (
            {},
            {"name": ""},
            {"name": "x", "extra": 1},
            {"name": "x", "metadata": "m"},
            {"name": "x", "timezone": 5},
        ):
            assert_error(c.post(path, json=body), 400, "validation_error")
        assert ok(c.get(path))["total"] == 0


# --- areas -------------------------------------------------------------------------------
def test_areas_create_list_get_patch(hub: RunningHub) -> None:
    """Areas are created in a site with metadata, listed, read and patched."""
    user = register(hub)
    site = new_site(hub, user, user.org_id)
    a1 = new_area(hub, user, site["id"])
    a2 = new_area(hub, user, site["id"], name="Garage", metadata={"door": "north"})
    assert set(a1) >= {"id", "site_id", "name", "metadata"}
    assert (a1["site_id"], a1["name"], a1["metadata"]) == (site["id"], "Kitchen", {})
    assert a2["metadata"] == {"door": "north"}
    with hub.api(user.access_token) as c:
        page = ok(c.get(f"/sites/{site['id']}/areas"))
        assert set(page) >= PAGE_KEYS and page["total"] == 2
        assert [a["id"] for a in page["items"]] == [a1["id"], a2["id"]]
        assert ok(c.get(f"/areas/{a2['id']}")) == a2
        p = ok(c.patch(f"/areas/{a1['id']}", json={"name": "Pantry", "metadata": {"x": 1}}))
        assert (p["id"], p["name"], p["metadata"], p["site_id"]) == (
            a1["id"],
            "Pantry",
            {"x": 1},
            site["id"],
        )
        assert ok(c.get(f"/areas/{a1['id']}")) == p
        assert_error(c.patch(f"/areas/{a1['id']}", json={"name": None}), 400, "validation_error")
        assert_error(
            c.patch(f"/areas/{a1['id']}", json={"site_id": site["id"]}), 400, "validation_error"
        )
        assert_error(c.post(f"/sites/{site['id']}/areas", json={}), 400, "validation_error")
        p2 = ok(c.get(f"/sites/{site['id']}/areas", params={"limit": 1, "offset": 1}))
        assert (p2["total"], p2["has_next"], p2["has_prev"]) == (2, False, True)
        assert [a["id"] for a in p2["items"]] == [a2["id"]]


# --- soft delete -------------------------------------------------------------------------
def test_delete_area_is_soft_and_final(hub: RunningHub) -> None:
    """A deleted area answers 404 afterwards and is gone from its site's list."""
    user = register(hub)
    site = new_site(hub, user, user.org_id)
    keep, gone = new_area(hub, user, site["id"], name="Keep"), new_area(hub, user, site["id"])
    with hub.api(user.access_token) as c:
        r = c.delete(f"/areas/{gone['id']}")
        assert r.status_code == 204, r.text
        assert_error(c.get(f"/areas/{gone['id']}"), 404, "not_found")
        assert_error(c.patch(f"/areas/{gone['id']}", json={"name": "back"}), 404, "not_found")
        assert_error(c.delete(f"/areas/{gone['id']}"), 404, "not_found")
        page = ok(c.get(f"/sites/{site['id']}/areas"))
        assert [a["id"] for a in page["items"]] == [keep["id"]] and page["total"] == 1


def test_delete_site_removes_it_and_its_areas(hub: RunningHub) -> None:
    """A deleted site answers 404, leaves its org's list, and its areas are 404 too."""
    user = register(hub)
    keep = new_site(hub, user, user.org_id, name="Keep")
    site = new_site(hub, user, user.org_id)
    area = new_area(hub, user, site["id"])
    with hub.api(user.access_token) as c:
        r = c.delete(f"/sites/{site['id']}")
        assert r.status_code == 204, r.text
        assert_error(c.get(f"/sites/{site['id']}"), 404, "not_found")
        assert_error(c.patch(f"/sites/{site['id']}", json={"name": "x"}), 404, "not_found")
        assert_error(c.get(f"/sites/{site['id']}/areas"), 404, "not_found")
        assert_error(c.post(f"/sites/{site['id']}/areas", json={"name": "x"}), 404, "not_found")
        assert_error(c.get(f"/areas/{area['id']}"), 404, "not_found")
        assert_error(c.delete(f"/areas/{area['id']}"), 404, "not_found")
        page = ok(c.get(f"/orgs/{user.org_id}/sites"))
        assert [s["id"] for s in page["items"]] == [keep["id"]] and page["total"] == 1


def test_delete_org_removes_its_sites_and_areas(hub: RunningHub) -> None:
    """A deleted org answers 404 with all its sites and areas, for members and admins alike."""
    owner, member = register(hub), register(hub)
    org = new_org(hub, owner)
    site = new_site(hub, owner, org["id"])
    area = new_area(hub, owner, site["id"])
    add_member(hub, owner, member, "admin", org["id"])
    with hub.api(owner.access_token) as c:
        r = c.delete(f"/orgs/{org['id']}")
        assert r.status_code == 204, r.text
    for token in (owner.access_token, member.access_token, admin_token(hub)):
        with hub.api(token) as c:
            assert_error(c.get(f"/orgs/{org['id']}"), 404, "not_found")
            assert_error(c.get(f"/orgs/{org['id']}/sites"), 404, "not_found")
            assert_error(c.get(f"/orgs/{org['id']}/members"), 404, "not_found")
            assert_error(c.post(f"/orgs/{org['id']}/sites", json={"name": "x"}), 404, "not_found")
            assert_error(c.get(f"/sites/{site['id']}"), 404, "not_found")
            assert_error(c.get(f"/areas/{area['id']}"), 404, "not_found")
    with hub.api(admin_token(hub)) as c:
        assert org["id"] not in all_ids(c, "/orgs")
    with hub.api(member.access_token) as c:
        assert ok(c.get("/orgs"))["total"] == 1
    assert org["id"] not in {m["org_id"] for m in me(hub, member)["memberships"]}


def test_non_owner_cannot_delete_org_but_owner_can(hub: RunningHub) -> None:
    """Deleting an organization needs owner: an admin member gets 403, the org survives."""
    owner, adm = register(hub), register(hub)
    org = new_org(hub, owner)
    add_member(hub, owner, adm, "admin", org["id"])
    with hub.api(adm.access_token) as c:
        body = assert_error(c.delete(f"/orgs/{org['id']}"), 403, "forbidden")
        assert body["details"]["required_role"] == "owner"
        assert ok(c.get(f"/orgs/{org['id']}"))["id"] == org["id"]
    with hub.api(owner.access_token) as c:
        assert c.delete(f"/orgs/{org['id']}").status_code == 204
