"""Users, organizations, members and integration tokens, made through the API the way
users make them; and the audit log that records what they did."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from support.checks import ok
from support.hubs import ADMIN_EMAIL, ADMIN_PASSWORD, RunningHub


def unique_email() -> str:
    return f"u{uuid.uuid4().hex[:10]}@hexa.test"


@dataclass
class User:
    email: str
    password: str
    access_token: str
    refresh_token: str
    id: str
    org_id: str


def register(
    hub: RunningHub, email: str | None = None, password: str = "S3cure-pass-word!"
) -> User:
    """A new user, logged in, with the personal organization registration creates."""
    email = email or unique_email()
    with hub.api() as c:
        r = c.post("/auth/register", json={"email": email, "password": password})
        assert r.status_code == 201, r.text
        body = r.json()
        me = c.get("/auth/me", headers={"Authorization": f"Bearer {body['access_token']}"}).json()
    return User(
        email,
        password,
        body["access_token"],
        body["refresh_token"],
        body["user"]["id"],
        me["memberships"][0]["org_id"],
    )


def admin_token(hub: RunningHub) -> str:
    """An access token of the platform admin the test hub is configured with."""
    with hub.api() as c:
        r = c.post("/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


def new_org(hub: RunningHub, user: User, name: str = "Team") -> dict[str, Any]:
    """A new organization owned by ``user``."""
    with hub.api(user.access_token) as c:
        return dict(ok(c.post("/orgs", json={"name": name}), 201))


def add_member(
    hub: RunningHub, by: User, who: User, role: str, org_id: str | None = None
) -> dict[str, Any]:
    """Make ``who`` a member of ``by``'s organization (or ``org_id``) with ``role``, the way
    users do: a member's role is changed at once, anyone else is invited and accepts.
    Returns the member as ``GET /orgs/{id}/members`` lists them."""
    org_id = org_id or by.org_id
    with hub.api(by.access_token) as c:
        r = c.post(f"/orgs/{org_id}/members", json={"email": who.email, "role": role})
    assert r.status_code in (200, 201), r.text
    if r.status_code == 201:
        with hub.api(who.access_token) as c:
            accepted = c.post(f"/invitations/{r.json()['id']}/accept")
        assert accepted.status_code == 200, accepted.text
    with hub.api(by.access_token) as c:
        page = c.get(f"/orgs/{org_id}/members", params={"limit": 100}).json()
    return next(dict(m) for m in page["items"] if m["user_id"] == who.id)


def integration_token(hub: RunningHub, user: User, name: str | None = None) -> dict[str, Any]:
    """A new integration token of ``user``'s organization, as created (``name``, ``token``
    and the rest); the token is shown only in this answer."""
    name = name or f"int-{uuid.uuid4().hex[:10]}"
    with hub.api(user.access_token) as c:
        r = c.post("/integrations/tokens", json={"name": name, "org_id": user.org_id})
    assert r.status_code == 201, r.text
    body = dict(r.json())
    assert body["name"] == name and body["org_id"] == user.org_id, body
    return body


def audit(hub: RunningHub, user: User, **params: Any) -> dict[str, Any]:
    """A page (up to 100 entries unless ``limit`` says otherwise) of the audit log as
    ``user`` may read it, filtered by ``params``."""
    with hub.api(user.access_token) as c:
        r = c.get("/audit", params={"limit": 100, **params})
    assert r.status_code == 200, r.text
    return dict(r.json())
