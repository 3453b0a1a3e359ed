"""The audit log covers every change, not only devices: organizations, members, sites and
areas, schedules and automations, integration tokens, sign-in and users. Each entry names
its actor, source and request id; an organization's entries are read by its admins only,
entries of no organization by platform admins only; no entry carries a secret, and a
refused change leaves none."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
from support.accounts import User, admin_token, audit, new_org, register
from support.checks import assert_error, ok
from support.devices import claimed_device
from support.hubs import ADMIN_PASSWORD, RunningHub


def rid() -> str:
    return f"audit-{uuid.uuid4().hex[:12]}"


def api(hub: RunningHub, user: User, request_id: str) -> httpx.Client:
    return hub.api(user.access_token, **{"X-Request-ID": request_id})


def admin_audit(hub: RunningHub, **params: Any) -> list[dict[str, Any]]:
    with hub.api(admin_token(hub)) as c:
        return list(ok(c.get("/admin/audit", params={"limit": 100, **params}))["items"])


def one(entries: list[dict[str, Any]], action: str) -> dict[str, Any]:
    found = [e for e in entries if e["action"] == action]
    assert len(found) == 1, (action, [e["action"] for e in entries])
    return found[0]


def by(entry: dict[str, Any], user: User, request_id: str, org_id: str | None) -> None:
    """``entry`` was made by ``user`` through the API, in the request ``request_id``."""
    assert (entry["actor_type"], entry["actor_id"], entry["source"]) == ("user", user.id, "api")
    assert entry["request_id"] == request_id and entry["org_id"] == org_id, entry


def no_secret(entries: list[dict[str, Any]], *secrets: str) -> None:
    """None of ``secrets`` anywhere in the entries, and no detail named for a secret."""
    text = json.dumps(entries)
    for secret in secrets:
        assert secret not in text
    keys = {k for e in entries for k in e["details"]}
    assert not keys & {"password", "password_hash", "token", "token_hash", "setup_code"}, keys


def test_tenancy_changes_are_audited_for_the_orgs_admins_only(hub: RunningHub) -> None:
    """Organization, members, sites and areas: each change is one entry with actor, source
    and request id, written with the change; a refused change writes nothing. The org's
    admin reads them; a viewer of the org and another org's admin do not."""
    owner, member, stranger = register(hub), register(hub), register(hub)
    r = rid()
    with api(hub, owner, r) as c:
        org = ok(c.post("/orgs", json={"name": "Audited"}), 201)
        oid = org["id"]
        ok(c.patch(f"/orgs/{oid}", json={"name": "Audited Co"}))
        site = ok(c.post(f"/orgs/{oid}/sites", json={"name": "HQ"}), 201)
        ok(c.patch(f"/sites/{site['id']}", json={"name": "Head office"}))
        assert_error(c.patch(f"/sites/{site['id']}", json={"timezone": "Mars/Base"}), 400)
        area = ok(c.post(f"/sites/{site['id']}/areas", json={"name": "Lab"}), 201)
        ok(c.patch(f"/areas/{area['id']}", json={"name": "Lab 2"}))
        assert c.delete(f"/areas/{area['id']}").status_code == 204
        assert c.delete(f"/sites/{site['id']}").status_code == 204
        invitation = ok(
            c.post(f"/orgs/{oid}/members", json={"email": member.email, "role": "viewer"}), 201
        )
    with api(hub, member, r + "-m") as c:
        ok(c.post(f"/invitations/{invitation['id']}/accept"))
    with api(hub, owner, r) as c:
        ok(c.post(f"/orgs/{oid}/members", json={"user_id": member.id, "role": "operator"}))
        # the last owner cannot leave: refused, so not audited
        assert_error(c.delete(f"/orgs/{oid}/members/{owner.id}"), 409)
    with api(hub, member, r + "-m") as c:
        assert audit(hub, member, org_id=oid)["total"] == 0  # an operator reads no audit
        assert c.delete(f"/orgs/{oid}/members/{member.id}").status_code == 204
    with api(hub, owner, r) as c:
        assert c.delete(f"/orgs/{oid}").status_code == 204

    entries = admin_audit(hub, org_id=oid)
    mine = [e for e in entries if e["request_id"] == r]
    assert [e["action"] for e in reversed(mine)] == [
        "org_created",
        "org_renamed",
        "site_created",
        "site_updated",
        "area_created",
        "area_updated",
        "area_deleted",
        "site_deleted",
        "member_invited",
        "member_role_changed",
        "org_deleted",
    ]
    for entry in mine:
        by(entry, owner, r, oid)
    assert one(mine, "org_renamed")["details"] == {"name": "Audited Co", "previous_name": "Audited"}
    assert one(mine, "site_updated")["details"]["fields"] == ["name"]
    assert one(mine, "member_role_changed")["details"] == {
        "user_id": member.id,
        "role": "operator",
        "previous_role": "viewer",
    }
    by(one(entries, "invitation_accepted"), member, r + "-m", oid)
    left = one(entries, "member_left")
    by(left, member, r + "-m", oid)
    assert left["details"] == {"user_id": member.id, "role": "operator"}
    assert not [e for e in entries if e["action"] == "member_removed"]
    no_secret(entries, owner.password, owner.access_token, member.refresh_token)

    # the org is gone; its owner's admin view of a live org: visible to its admins only
    oid2 = new_org(hub, owner, "Second")["id"]
    with api(hub, owner, r) as c:
        ok(c.post(f"/orgs/{oid2}/members", json={"email": stranger.email, "role": "viewer"}), 201)
    assert audit(hub, owner, org_id=oid2, action="member_invited")["total"] == 1
    assert audit(hub, stranger, org_id=oid2)["total"] == 0  # another org's admin
    assert audit(hub, stranger, action="org_created")["items"] == []
    assert all(e["org_id"] in {stranger.org_id} for e in audit(hub, stranger)["items"])


def test_schedules_automations_and_tokens_are_audited(hub: RunningHub) -> None:
    """Create, update, enable, disable, delete of schedules and automations, and integration
    tokens created and revoked (never the token), with the ids to filter them by."""
    owner, other = register(hub), register(hub)
    _, dev = claimed_device(hub, owner)
    r = rid()
    with api(hub, owner, r) as c:
        s = ok(
            c.post(
                "/schedules",
                json={
                    "device_id": dev["id"],
                    "name": "Night",
                    "cron": "0 22 * * *",
                    "action": {"type": "set_all_relays", "state": False},
                },
            ),
            201,
        )
        ok(c.patch(f"/schedules/{s['id']}", json={"enabled": False}))
        ok(c.patch(f"/schedules/{s['id']}", json={"enabled": True}))
        ok(c.patch(f"/schedules/{s['id']}", json={"cron": "0 23 * * *", "name": "Later"}))
        assert_error(c.patch(f"/schedules/{s['id']}", json={"cron": "not cron"}), 400)
        assert c.delete(f"/schedules/{s['id']}").status_code == 204
        trigger = {"type": "device_online", "device_id": dev["id"]}
        actions = [{"type": "set_all_relays", "device_id": dev["id"], "state": True}]
        a = ok(
            c.post("/automations", json={"name": "Up", "trigger": trigger, "actions": actions}), 201
        )
        ok(c.patch(f"/automations/{a['id']}", json={"enabled": False}))
        ok(c.patch(f"/automations/{a['id']}", json={"cooldown_s": 5}))
        assert c.delete(f"/automations/{a['id']}").status_code == 204
        token = ok(c.post("/integrations/tokens", json={"name": "ha", "org_id": owner.org_id}), 201)
        assert_error(
            c.post("/integrations/tokens", json={"name": "ha", "org_id": owner.org_id}), 409
        )
        assert c.delete(f"/integrations/tokens/{token['id']}").status_code == 204

    entries = audit(hub, owner, request_id=r)["items"]
    assert [e["action"] for e in reversed(entries)] == [
        "schedule_created",
        "schedule_disabled",
        "schedule_enabled",
        "schedule_updated",
        "schedule_deleted",
        "automation_created",
        "automation_disabled",
        "automation_updated",
        "automation_deleted",
        "integration_token_created",
        "integration_token_revoked",
    ]
    for entry in entries:
        by(entry, owner, r, owner.org_id)
    assert one(entries, "schedule_updated")["details"]["fields"] == ["cron", "name"]
    assert {e["schedule_id"] for e in entries if e["action"].startswith("schedule")} == {s["id"]}
    assert audit(hub, owner, automation_id=a["id"], action="automation_deleted")["total"] == 1
    revoked = one(entries, "integration_token_revoked")
    assert revoked["details"] == {
        "integration_token_id": token["id"],
        "name": "ha",
        "kind": "generic",
    }
    no_secret(entries, token["token"], owner.access_token)
    assert audit(hub, other, request_id=r)["total"] == 0
    filtered = admin_audit(hub, actor_id=owner.id, action="integration_token_created")
    assert [e["request_id"] for e in filtered] == [r]


def test_sign_in_and_user_changes_are_seen_by_platform_admins_only(hub: RunningHub) -> None:
    """Logins (and failures, with no org and no attempted email), logouts, refresh token
    reuse and a platform admin's changes to users have no organization: only
    ``/admin/audit`` shows them. A refused alert drill writes nothing."""
    user = register(hub)
    wrong = f"Wrong-{uuid.uuid4().hex}"
    unknown = f"nobody-{uuid.uuid4().hex[:8]}@hexa.test"
    r = rid()
    with hub.api(**{"X-Request-ID": r}) as c:
        assert_error(c.post("/auth/login", json={"email": user.email, "password": wrong}), 401)
        assert_error(c.post("/auth/login", json={"email": unknown, "password": wrong}), 401)
        pair = ok(
            c.post("/auth/login", json={"email": user.email.upper(), "password": user.password})
        )
        rotated = ok(c.post("/auth/refresh", json={"refresh_token": pair["refresh_token"]}))
        assert_error(c.post("/auth/refresh", json={"refresh_token": pair["refresh_token"]}), 401)
        second = ok(c.post("/auth/login", json={"email": user.email, "password": user.password}))
        assert (
            c.post("/auth/logout", json={"refresh_token": second["refresh_token"]}).status_code
            == 204
        )
    admin = admin_token(hub)
    with hub.api(admin, **{"X-Request-ID": r}) as c:
        ok(c.patch(f"/admin/users/{user.id}", json={"is_active": False, "role": "admin"}))
        ok(c.patch(f"/admin/users/{user.id}", json={"role": "admin"}))  # no change: no entry
        ok(c.patch(f"/admin/users/{user.id}", json={"is_active": True, "role": "user"}))
        assert_error(c.post("/admin/alerts/simulate", json={"alert": "HexaHubDown"}), 409)
        assert_error(c.patch(f"/admin/users/{uuid.uuid4()}", json={"is_active": False}), 404)
    with hub.api(admin) as c:
        me = ok(c.get("/auth/me"))

    entries = admin_audit(hub, request_id=r)
    assert {e["org_id"] for e in entries} == {None}
    assert [e["action"] for e in reversed(entries)] == [
        "user_login_failed",
        "user_login_failed",
        "user_login",
        "refresh_token_reused",
        "user_login",
        "user_logout",
        "user_disabled",
        "user_promoted",
        "user_enabled",
        "user_demoted",
    ]
    failed = [e for e in reversed(entries) if e["action"] == "user_login_failed"]
    assert failed[0]["details"]["reason"] == "bad_password"
    assert failed[0]["details"]["user_id"] == user.id
    assert failed[1]["details"]["reason"] == "unknown_account"
    assert "user_id" not in failed[1]["details"]
    assert {(e["actor_type"], e["actor_id"]) for e in failed} == {("anonymous", None)}
    for entry in entries:
        assert entry["source"] == "api" and entry["request_id"] == r
        if entry["action"] in {"user_login", "refresh_token_reused", "user_logout"}:
            assert (entry["actor_type"], entry["actor_id"]) == ("user", user.id)
        if entry["action"] in {"user_disabled", "user_promoted", "user_enabled", "user_demoted"}:
            assert entry["actor_id"] == me["id"] and entry["details"]["user_id"] == user.id
    no_secret(
        entries,
        wrong,
        unknown,
        user.password,
        ADMIN_PASSWORD,
        pair["refresh_token"],
        rotated["refresh_token"],
        second["access_token"],
        admin,
    )
    # the user reads none of it (entries of no organization), even filtering for it
    assert audit(hub, user, request_id=r)["total"] == 0
    assert audit(hub, user, action="user_login")["total"] == 0
    assert admin_audit(hub, action="alert_simulated", request_id=r) == []
