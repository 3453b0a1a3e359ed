"""Invitations over real HTTP (contract §2 "Tenancy"): inviting by email without revealing
which emails have accounts, accepting, declining, revoking, expiry, the role ceiling and
tenant isolation."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from support.accounts import User, add_member, admin_token, new_org, register, unique_email
from support.checks import assert_error, ok, wait_until
from support.hubs import RunningHub

INVITATION_KEYS = {"id", "org_id", "email", "role", "status", "expires_at"}


def invite(hub: RunningHub, by: User, org_id: str, email: str, role: str) -> dict[str, Any]:
    with hub.api(by.access_token) as c:
        body = ok(c.post(f"/orgs/{org_id}/members", json={"email": email, "role": role}), 201)
    return dict(body)


def members(hub: RunningHub, user: User, org_id: str) -> dict[str, str]:
    with hub.api(user.access_token) as c:
        page = ok(c.get(f"/orgs/{org_id}/members", params={"limit": 100}))
    return {m["email"]: m["role"] for m in page["items"]}


def mine(hub: RunningHub, user: User) -> list[dict[str, Any]]:
    with hub.api(user.access_token) as c:
        return list(ok(c.get("/invitations"))["items"])


def expire(hub: RunningHub, invitation_id: str) -> None:
    """Move an invitation's expires_at a day into the past, straight in the database."""
    url = hub.settings.resolved_database_url
    if url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(url.split("://", 1)[1], timeout=15)) as db:
            db.execute(
                "UPDATE invitations SET expires_at = ? WHERE id = ?",
                ("2000-01-01 00:00:00+00:00", invitation_id),
            )
            db.commit()
        return
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            await conn.execute(
                "UPDATE invitations SET expires_at = now() - interval '1 day' WHERE id = $1",
                uuid.UUID(invitation_id),
            )
        finally:
            await conn.close()

    asyncio.run(run())


def test_invitation_answer_does_not_reveal_accounts(hub: RunningHub) -> None:
    """Inviting a registered and an unknown email answers the same 201 shape, status pending,
    and neither becomes a member before accepting."""
    owner, known = register(hub), register(hub)
    org_id = new_org(hub, owner, "Invites")["id"]
    unknown = unique_email()
    answers = [
        invite(hub, owner, org_id, known.email, "operator"),
        invite(hub, owner, org_id, unknown, "operator"),
    ]
    for answer, email in zip(answers, (known.email, unknown), strict=True):
        assert set(answer) == set(answers[0]) and set(answer) >= INVITATION_KEYS
        assert (answer["org_id"], answer["email"], answer["role"], answer["status"]) == (
            org_id,
            email,
            "operator",
            "pending",
        )
        assert answer["expires_at"].endswith("Z")
    assert members(hub, owner, org_id) == {owner.email: "owner"}
    with hub.api(owner.access_token) as c:
        listed = ok(c.get(f"/orgs/{org_id}/invitations"))
    assert {i["email"] for i in listed["items"]} == {known.email, unknown}
    assert listed["total"] == 2


def test_invitation_email_is_normalized_and_reaches_later_accounts(hub: RunningHub) -> None:
    """An email invited in mixed case reaches the account registered for it later."""
    owner = register(hub)
    org_id = new_org(hub, owner, "Invites")["id"]
    email = unique_email()
    invitation = invite(hub, owner, org_id, f"  {email.upper()} ", "viewer")
    assert invitation["email"] == email
    newcomer = register(hub, email=email)
    assert [i["id"] for i in mine(hub, newcomer)] == [invitation["id"]]
    with hub.api(newcomer.access_token) as c:
        ok(c.post(f"/invitations/{invitation['id']}/accept"))
    assert members(hub, owner, org_id)[email] == "viewer"


def test_accept_joins_with_the_role_once(hub: RunningHub) -> None:
    """The invitee sees the invitation, accepts it (200, status accepted) and is a member
    with its role; accepting or declining again is 409 with the status found."""
    owner, invitee = register(hub), register(hub)
    org_id = new_org(hub, owner, "Invites")["id"]
    invitation = invite(hub, owner, org_id, invitee.email, "manager")
    seen = mine(hub, invitee)
    assert [(i["id"], i["org_id"], i["role"]) for i in seen] == [
        (invitation["id"], org_id, "manager")
    ]
    assert seen[0]["org_name"] == "Invites"
    with hub.api(invitee.access_token) as c:
        accepted = ok(c.post(f"/invitations/{invitation['id']}/accept"))
        assert (accepted["id"], accepted["status"]) == (invitation["id"], "accepted")
        again = assert_error(c.post(f"/invitations/{invitation['id']}/accept"), 409, "conflict")
        assert again["details"] == {"status": "accepted"}
        assert_error(c.post(f"/invitations/{invitation['id']}/decline"), 409, "conflict")
        me = ok(c.get("/auth/me"))
    assert {m["org_id"]: m["role"] for m in me["memberships"]}[org_id] == "manager"
    assert members(hub, owner, org_id) == {owner.email: "owner", invitee.email: "manager"}
    assert mine(hub, invitee) == []
    # a member's email now changes their role instead of inviting them (200, not 201)
    with hub.api(owner.access_token) as c:
        r = c.post(f"/orgs/{org_id}/members", json={"email": invitee.email, "role": "viewer"})
        assert ok(r)["role"] == "viewer" and ok(r)["user_id"] == invitee.id


def test_decline_leaves_no_membership(hub: RunningHub) -> None:
    """A declined invitation cannot be accepted afterwards (409) and grants nothing."""
    owner, invitee = register(hub), register(hub)
    org_id = new_org(hub, owner, "Invites")["id"]
    invitation = invite(hub, owner, org_id, invitee.email, "admin")
    with hub.api(invitee.access_token) as c:
        assert ok(c.post(f"/invitations/{invitation['id']}/decline"))["status"] == "declined"
        body = assert_error(c.post(f"/invitations/{invitation['id']}/accept"), 409, "conflict")
        assert body["details"] == {"status": "declined"}
        assert_error(c.get(f"/orgs/{org_id}"), 404, "not_found")
    assert mine(hub, invitee) == []
    assert invitee.email not in members(hub, owner, org_id)


def test_revoke(hub: RunningHub) -> None:
    """An admin revokes a pending invitation (204): it can no longer be accepted (409), a
    second revoke is 409, and the organization lists it as revoked."""
    owner, invitee = register(hub), register(hub)
    org_id = new_org(hub, owner, "Invites")["id"]
    invitation = invite(hub, owner, org_id, invitee.email, "viewer")
    with hub.api(owner.access_token) as c:
        r = c.delete(f"/invitations/{invitation['id']}")
        assert r.status_code == 204 and r.content == b"", r.text
        assert_error(c.delete(f"/invitations/{invitation['id']}"), 409, "conflict")
        listed = ok(c.get(f"/orgs/{org_id}/invitations", params={"status": "revoked"}))
        assert [i["id"] for i in listed["items"]] == [invitation["id"]]
        assert ok(c.get(f"/orgs/{org_id}/invitations", params={"status": "pending"}))["total"] == 0
    assert mine(hub, invitee) == []
    with hub.api(invitee.access_token) as c:
        body = assert_error(c.post(f"/invitations/{invitation['id']}/accept"), 409, "conflict")
        assert body["details"] == {"status": "revoked"}
    assert invitee.email not in members(hub, owner, org_id)


def test_expired_invitation_cannot_be_accepted(hub: RunningHub) -> None:
    """An invitation past expires_at is hidden from the invitee, reads expired, and
    accepting it is 409 with status expired; inviting again gives a fresh pending one."""
    owner, invitee = register(hub), register(hub)
    org_id = new_org(hub, owner, "Invites")["id"]
    invitation = invite(hub, owner, org_id, invitee.email, "operator")
    expire(hub, invitation["id"])
    assert mine(hub, invitee) == []
    with hub.api(invitee.access_token) as c:
        body = assert_error(c.post(f"/invitations/{invitation['id']}/accept"), 409, "conflict")
        assert body["details"] == {"status": "expired"}
        assert_error(c.post(f"/invitations/{invitation['id']}/decline"), 409, "conflict")
    with hub.api(owner.access_token) as c:
        listed = ok(c.get(f"/orgs/{org_id}/invitations", params={"status": "expired"}))
        assert [(i["id"], i["status"]) for i in listed["items"]] == [(invitation["id"], "expired")]
    fresh = invite(hub, owner, org_id, invitee.email, "operator")
    assert fresh["id"] != invitation["id"] and fresh["status"] == "pending"
    with hub.api(invitee.access_token) as c:
        assert ok(c.post(f"/invitations/{fresh['id']}/accept"))["status"] == "accepted"
    assert members(hub, owner, org_id)[invitee.email] == "operator"


def test_inviting_again_renews_the_pending_invitation(hub: RunningHub) -> None:
    """Inviting a pending email again updates that invitation's role instead of adding one."""
    owner, invitee = register(hub), register(hub)
    org_id = new_org(hub, owner, "Invites")["id"]
    first = invite(hub, owner, org_id, invitee.email, "viewer")
    second = invite(hub, owner, org_id, invitee.email, "manager")
    assert second["id"] == first["id"] and second["role"] == "manager"
    assert [(i["id"], i["role"]) for i in mine(hub, invitee)] == [(first["id"], "manager")]


def test_role_ceiling_applies_to_invitations(hub: RunningHub) -> None:
    """An admin cannot invite an owner nor revoke an owner's invitation (403); an admin
    invitation is fine; managers cannot invite at all."""
    owner, adm, mgr = register(hub), register(hub), register(hub)
    org_id = new_org(hub, owner, "Invites")["id"]
    add_member(hub, owner, adm, "admin", org_id)
    add_member(hub, owner, mgr, "manager", org_id)
    target = unique_email()
    with hub.api(adm.access_token) as c:
        path = f"/orgs/{org_id}/members"
        assert_error(c.post(path, json={"email": target, "role": "owner"}), 403, "forbidden")
        assert ok(c.post(path, json={"email": target, "role": "admin"}), 201)["role"] == "admin"
    owner_invite = invite(hub, owner, org_id, unique_email(), "owner")
    with hub.api(adm.access_token) as c:
        assert_error(c.delete(f"/invitations/{owner_invite['id']}"), 403, "forbidden")
    with hub.api(mgr.access_token) as c:
        r = c.post(f"/orgs/{org_id}/members", json={"email": unique_email(), "role": "viewer"})
        assert_error(r, 403, "forbidden")
        assert_error(c.get(f"/orgs/{org_id}/invitations"), 403, "forbidden")
        assert_error(c.delete(f"/invitations/{owner_invite['id']}"), 403, "forbidden")
    with hub.api(owner.access_token) as c:
        pending = ok(c.get(f"/orgs/{org_id}/invitations", params={"status": "pending"}))
    assert sorted(i["role"] for i in pending["items"]) == ["admin", "owner"]


def test_invitations_shrink_with_their_sender(hub: RunningHub) -> None:
    """An admin's pending invitations above their new role are revoked when they are
    demoted, and all of them when they leave: accepting one is then 409 revoked."""
    owner, adm = register(hub), register(hub)
    invitees = [register(hub) for _ in range(3)]
    org_id = new_org(hub, owner, "Invites")["id"]
    add_member(hub, owner, adm, "admin", org_id)
    high = invite(hub, adm, org_id, invitees[0].email, "admin")
    low = invite(hub, adm, org_id, invitees[1].email, "viewer")
    by_owner = invite(hub, owner, org_id, invitees[2].email, "admin")
    add_member(hub, owner, adm, "manager", org_id)  # demoted below admin
    with hub.api(owner.access_token) as c:
        listed = ok(c.get(f"/orgs/{org_id}/invitations"))["items"]
    assert {i["id"]: i["status"] for i in listed if i["email"] != adm.email} == {
        high["id"]: "revoked",
        low["id"]: "pending",
        by_owner["id"]: "pending",
    }
    with hub.api(invitees[0].access_token) as c:
        body = assert_error(c.post(f"/invitations/{high['id']}/accept"), 409, "conflict")
        assert body["details"] == {"status": "revoked"}
    with hub.api(adm.access_token) as c:
        assert c.delete(f"/orgs/{org_id}/members/{adm.id}").status_code == 204
    assert mine(hub, invitees[1]) == []
    assert [i["id"] for i in mine(hub, invitees[2])] == [by_owner["id"]]


def test_other_tenants_invitations_are_404(hub: RunningHub) -> None:
    """Someone else's invitation is 404 to accept, decline, revoke or list, exactly like an
    unknown id, and nothing changes."""
    owner, invitee, mallory = register(hub), register(hub), register(hub)
    org_id = new_org(hub, owner, "Invites")["id"]
    invitation = invite(hub, owner, org_id, invitee.email, "admin")
    ghost = str(uuid.uuid4())
    for who in (mallory, invitee):  # the invitee is no admin of the organization
        with hub.api(who.access_token) as c:
            for ident in (invitation["id"], ghost):
                body = assert_error(c.delete(f"/invitations/{ident}"), 404, "not_found")
                assert body["message"] == "invitation not found"
            assert_error(c.get(f"/orgs/{org_id}/invitations"), 404, "not_found")
    with hub.api(mallory.access_token) as c:
        for ident in (invitation["id"], ghost):
            for verb in ("accept", "decline"):
                body = assert_error(c.post(f"/invitations/{ident}/{verb}"), 404, "not_found")
                assert body["message"] == "invitation not found"
        assert ok(c.get("/invitations"))["total"] == 0
        assert_error(
            c.post(f"/orgs/{org_id}/members", json={"email": mallory.email, "role": "owner"}),
            404,
            "not_found",
        )
    assert [i["status"] for i in mine(hub, invitee)] == ["pending"]
    assert members(hub, owner, org_id) == {owner.email: "owner"}
    with hub.api(admin_token(hub)) as c:  # a platform admin manages every org's invitations
        listed = ok(c.get(f"/orgs/{org_id}/invitations"))
        assert [i["id"] for i in listed["items"]] == [invitation["id"]]


def test_invitations_require_authentication(hub: RunningHub) -> None:
    """Invitation routes without a token answer 401."""
    with hub.api() as c:
        assert_error(c.get("/invitations"), 401, "unauthorized")
        assert_error(c.post(f"/invitations/{uuid.uuid4()}/accept"), 401, "unauthorized")
        assert_error(c.delete(f"/invitations/{uuid.uuid4()}"), 401, "unauthorized")


def test_bad_status_filter_is_400(hub: RunningHub) -> None:
    """?status= accepts the invitation statuses only."""
    owner = register(hub)
    with hub.api(owner.access_token) as c:
        r = c.get(f"/orgs/{owner.org_id}/invitations", params={"status": "bogus"})
        assert_error(r, 400, "validation_error")


def test_invitations_are_audited(hub: RunningHub) -> None:
    """Inviting, accepting and revoking write audit entries with the actor and request id."""
    owner, invitee = register(hub), register(hub)
    org_id = new_org(hub, owner, "Invites")["id"]
    with hub.api(owner.access_token, **{"X-Request-ID": "invite-audit-1"}) as c:
        r = c.post(f"/orgs/{org_id}/members", json={"email": invitee.email, "role": "viewer"})
        invitation = ok(r, 201)
    with hub.api(invitee.access_token) as c:
        ok(c.post(f"/invitations/{invitation['id']}/accept"))
    revoked = invite(hub, owner, org_id, unique_email(), "viewer")
    with hub.api(owner.access_token) as c:
        assert c.delete(f"/invitations/{revoked['id']}").status_code == 204

        def entries() -> list[dict[str, Any]]:
            return list(ok(c.get("/audit", params={"org_id": org_id, "limit": 100}))["items"])

        wanted = {"member_invited", "invitation_accepted", "invitation_revoked"}
        assert wait_until(lambda: wanted <= {e["action"] for e in entries()}, 5), entries()
        found = entries()
    accepted = next(e for e in found if e["action"] == "invitation_accepted")
    assert accepted["actor_id"] == invitee.id
    assert accepted["details"]["invitation_id"] == invitation["id"]
    invited = next(e for e in found if e["request_id"] == "invite-audit-1")
    assert invited["action"] == "member_invited" and invited["actor_id"] == owner.id
    assert invited["details"]["email"] == invitee.email


@pytest.mark.parametrize("verb", ["accept", "decline"])
def test_concurrent_answers_settle_once(hub: RunningHub, verb: str) -> None:
    """The same invitation answered twice at once: one 200, one 409, and membership matches
    the answer that won."""
    owner, invitee = register(hub), register(hub)
    org_id = new_org(hub, owner, "Invites")["id"]
    invitation = invite(hub, owner, org_id, invitee.email, "viewer")
    gate = threading.Barrier(2)

    def answer(v: str) -> int:
        with hub.api(invitee.access_token) as c:
            gate.wait(30)
            return c.post(f"/invitations/{invitation['id']}/{v}").status_code

    with ThreadPoolExecutor(2) as pool:
        statuses = sorted(pool.map(answer, ["accept", verb]))
    assert statuses == [200, 409]
    with hub.api(owner.access_token) as c:
        status = ok(c.get(f"/orgs/{org_id}/invitations"))["items"][0]["status"]
    assert status in ("accepted", "declined")
    assert (invitee.email in members(hub, owner, org_id)) == (status == "accepted")
