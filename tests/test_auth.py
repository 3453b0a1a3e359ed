"""Auth over real HTTP (contract §2 "Auth"): register, login and its throttling, refresh-token
rotation with reuse detection, logout, /auth/me, JWT forgeries and disabled accounts."""

from __future__ import annotations

import threading
import time
import uuid
import warnings
from typing import Any

import httpx
import jwt
import pytest
from support.accounts import User, admin_token, register, unique_email
from support.checks import assert_error
from support.hubs import RunningHub, fake_ip

PASSWORD = "S3cure-pass-word!"


def login(hub: RunningHub, email: str, password: str, ip: str | None = None) -> httpx.Response:
    headers = {"X-Forwarded-For": ip or fake_ip()}
    with hub.api(**headers) as c:
        return c.post("/auth/login", json={"email": email, "password": password})


def refresh(hub: RunningHub, token: str) -> httpx.Response:
    with hub.api() as c:
        return c.post("/auth/refresh", json={"refresh_token": token})


def me(hub: RunningHub, token: str) -> httpx.Response:
    with hub.api(token) as c:
        return c.get("/auth/me")


def assert_token_pair(body: dict[str, Any], email: str) -> None:
    assert set(body) >= {"user", "access_token", "refresh_token", "token_type", "expires_in"}
    assert body["token_type"] == "bearer"
    assert isinstance(body["expires_in"], int) and body["expires_in"] > 0
    assert isinstance(body["access_token"], str) and body["access_token"].count(".") == 2
    assert isinstance(body["refresh_token"], str) and len(body["refresh_token"]) >= 32
    assert body["refresh_token"] != body["access_token"]
    user = body["user"]
    assert user["email"] == email
    assert_no_secrets(user)


def assert_no_secrets(user: dict[str, Any]) -> None:
    for key in user:
        assert "password" not in key.lower() and "hash" not in key.lower(), user
    text = repr(user)
    assert "argon2" not in text and PASSWORD not in text


def forge(
    hub: RunningHub,
    user_id: str,
    *,
    key: str | None = None,
    alg: str = "HS256",
    exp_delta: int = 600,
    aud: str = "hexa-api",
    typ: str = "access",
    drop: tuple[str, ...] = (),
) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": user_id,
        "iat": now,
        "exp": now + exp_delta,
        "aud": aud,
        "typ": typ,
    }
    for k in drop:
        claims.pop(k)
    secret = hub.settings.jwt_secret if key is None else key
    with warnings.catch_warnings():  # HS512 with a 42-byte key warns; that is the point
        warnings.simplefilter("ignore")
        return jwt.encode(claims, secret, algorithm=alg)


# --- register ----------------------------------------------------------------------------
def test_register_returns_201_with_token_pair_and_safe_user(hub: RunningHub) -> None:
    """Registering answers 201 with user, access/refresh tokens, bearer type and expires_in."""
    email = unique_email()
    with hub.api() as c:
        r = c.post("/auth/register", json={"email": email, "password": PASSWORD})
    assert r.status_code == 201, r.text
    body = r.json()
    assert_token_pair(body, email)
    user = body["user"]
    assert set(user) >= {"id", "email", "role", "is_active", "created_at"}
    uuid.UUID(user["id"])
    assert user["role"] == "user" and user["is_active"] is True
    assert user["created_at"].endswith("Z")
    claims = jwt.decode(
        body["access_token"], hub.settings.jwt_secret, algorithms=["HS256"], audience="hexa-api"
    )
    assert claims["sub"] == user["id"]
    assert claims["exp"] - claims["iat"] == body["expires_in"]
    assert "x-request-id" in r.headers


def test_register_normalizes_email_case(hub: RunningHub) -> None:
    """Email addresses are stored lower-cased and trimmed, and login works with any case."""
    local = f"Mixed{uuid.uuid4().hex[:8]}"
    with hub.api() as c:
        r = c.post("/auth/register", json={"email": f"  {local}@Hexa.TEST ", "password": PASSWORD})
    assert r.status_code == 201, r.text
    assert r.json()["user"]["email"] == f"{local.lower()}@hexa.test"
    r = login(hub, f"{local.upper()}@HEXA.test", PASSWORD)
    assert r.status_code == 200, r.text


def test_register_duplicate_email_is_409(hub: RunningHub) -> None:
    """A second registration with the same email (any case) answers 409 conflict."""
    user = register(hub)
    with hub.api() as c:
        r1 = c.post("/auth/register", json={"email": user.email, "password": "An0ther-password"})
        r2 = c.post("/auth/register", json={"email": user.email.upper(), "password": PASSWORD})
    assert_error(r1, 409, "conflict")
    assert_error(r2, 409, "conflict")
    # the original account is untouched
    assert login(hub, user.email, user.password).status_code == 200


@pytest.mark.parametrize(
    "payload",
    [
        {"email": "not-an-email", "password": PASSWORD},
        {"email": "two@@hexa.test", "password": PASSWORD},
        {"email": "spaces in@hexa.test", "password": PASSWORD},
        {"email": "nodomain@", "password": PASSWORD},
        {"email": "", "password": PASSWORD},
        {"email": "SHORTPASS", "password": "short"},
        {"email": "SHORTPASS", "password": ""},
        {"email": "LONGPASS", "password": "x" * 200},
    ],
    ids=[
        "no-at",
        "double-at",
        "space",
        "no-domain",
        "empty-email",
        "short-pw",
        "empty-pw",
        "long-pw",
    ],
)
def test_register_invalid_email_or_password_is_400(
    hub: RunningHub, payload: dict[str, str]
) -> None:
    """Invalid emails and passwords outside 8-128 characters answer 400 validation_error."""
    if payload["email"] in ("SHORTPASS", "LONGPASS"):
        payload = {**payload, "email": unique_email()}
    with hub.api() as c:
        r = c.post("/auth/register", json=payload)
    assert_error(r, 400, "validation_error")
    if "@hexa.test" in payload["email"] and "@@" not in payload["email"]:
        assert login(hub, payload["email"], payload["password"] or "whatever1").status_code == 401


def test_register_rejects_unknown_fields(hub: RunningHub) -> None:
    """Unknown body fields (e.g. trying to set role) answer 400 and create nothing."""
    email = unique_email()
    with hub.api() as c:
        r = c.post("/auth/register", json={"email": email, "password": PASSWORD, "role": "admin"})
    body = assert_error(r, 400, "validation_error")
    assert "role" in repr(body["details"])
    assert login(hub, email, PASSWORD).status_code == 401


@pytest.mark.parametrize(
    "payload",
    [
        {"email": 12345, "password": PASSWORD},
        {"email": "EMAIL", "password": 12345678},
        {"email": "EMAIL", "password": ["S3cure-pass-word!"]},
        {"email": None, "password": PASSWORD},
        {"email": "EMAIL"},
        {"password": PASSWORD},
        {},
    ],
    ids=["email-int", "pw-int", "pw-list", "email-null", "no-pw", "no-email", "empty"],
)
def test_register_wrong_types_or_missing_fields_is_400(
    hub: RunningHub, payload: dict[str, Any]
) -> None:
    """Wrong JSON types and missing fields answer 400 validation_error."""
    payload = {k: (unique_email() if v == "EMAIL" else v) for k, v in payload.items()}
    with hub.api() as c:
        r = c.post("/auth/register", json=payload)
    body = assert_error(r, 400, "validation_error")
    assert isinstance(body["details"], dict)


@pytest.mark.parametrize(
    "raw",
    [b'{"email": "a@b.test", "password": ', b"not json at all", b'["a@b.test", "x"]', b"null"],
    ids=["truncated", "garbage", "array", "null"],
)
def test_register_malformed_json_is_400(hub: RunningHub, raw: bytes) -> None:
    """A body that is not a JSON object answers 400 validation_error."""
    with hub.api() as c:
        r = c.post("/auth/register", content=raw, headers={"Content-Type": "application/json"})
    assert_error(r, 400, "validation_error")


def test_login_malformed_or_unknown_fields_is_400(hub: RunningHub) -> None:
    """Login validates its body too: malformed JSON, wrong types and unknown fields are 400."""
    user = register(hub)
    with hub.api(**{"X-Forwarded-For": fake_ip()}) as c:
        r1 = c.post("/auth/login", content=b"{", headers={"Content-Type": "application/json"})
        r2 = c.post("/auth/login", json={"email": user.email, "password": 12345678})
        r3 = c.post("/auth/login", json={"email": user.email, "password": user.password, "x": 1})
    for r in (r1, r2, r3):
        assert_error(r, 400, "validation_error")


# --- login -------------------------------------------------------------------------------
def test_login_ok_returns_token_pair(hub: RunningHub) -> None:
    """Login with the right password answers 200 with a fresh, working token pair."""
    user = register(hub)
    r = login(hub, user.email, user.password)
    assert r.status_code == 200, r.text
    body = r.json()
    assert_token_pair(body, user.email)
    assert body["user"]["id"] == user.id
    assert body["refresh_token"] != user.refresh_token
    m = me(hub, body["access_token"])
    assert m.status_code == 200 and m.json()["id"] == user.id


def test_login_bad_password_and_unknown_email_are_401_alike(hub: RunningHub) -> None:
    """A wrong password and an unknown email both answer 401 with the same message."""
    user = register(hub)
    bad_pw = login(hub, user.email, "Wrong-password-123")
    unknown = login(hub, unique_email(), "Wrong-password-123")
    b1 = assert_error(bad_pw, 401, "unauthorized")
    b2 = assert_error(unknown, 401, "unauthorized")
    assert b1["message"] == b2["message"]
    assert b1["details"] == b2["details"]
    assert "access_token" not in bad_pw.text and "access_token" not in unknown.text


def test_login_throttled_after_five_failures_per_account_and_address(hub: RunningHub) -> None:
    """After 5 failed logins for one account from one address, the next attempt from that
    address is 429 with Retry-After; the right password from another address still logs in."""
    user = register(hub)
    ip = fake_ip()
    for _ in range(5):
        assert_error(login(hub, user.email, "Wrong-password-123", ip), 401, "unauthorized")
    r = login(hub, user.email, "Wrong-password-123", ip)
    body = assert_error(r, 429, "rate_limited")
    retry = int(r.headers["Retry-After"])
    assert 1 <= retry <= 10
    assert body["details"]["retry_after_s"] == retry
    # the guessing address waits, the right password included ...
    r = login(hub, user.email, user.password, ip)
    assert_error(r, 429, "rate_limited")
    assert "Retry-After" in r.headers
    # ... the owner elsewhere does not, and other accounts from that address do not either
    assert login(hub, user.email.upper(), user.password, fake_ip()).status_code == 200
    other = register(hub)
    assert login(hub, other.email, other.password, ip).status_code == 200


def test_failures_from_many_addresses_do_not_lock_out_the_owner(hub: RunningHub) -> None:
    """Failures from address A (and from a few more) never refuse the right password from B."""
    user = register(hub)
    a = fake_ip()
    for _ in range(5):
        assert_error(login(hub, user.email, "Wrong-password-123", a), 401, "unauthorized")
    for _ in range(5):
        assert_error(login(hub, user.email, "Wrong-password-123", fake_ip()), 401, "unauthorized")
    r = login(hub, user.email, user.password, fake_ip())
    assert r.status_code == 200, r.text


def test_distributed_attack_slows_guessers_but_not_the_owner(hub: RunningHub) -> None:
    """Past 100 failures from many addresses an address gets one failure before backing off,
    while the right password from a clean address logs in at once."""
    user = register(hub)
    for _ in range(100):
        assert_error(login(hub, user.email, "Wrong-password-123", fake_ip()), 401, "unauthorized")
    guesser = fake_ip()
    assert_error(login(hub, user.email, "Wrong-password-123", guesser), 401, "unauthorized")
    assert_error(login(hub, user.email, "Wrong-password-123", guesser), 429, "rate_limited")
    r = login(hub, user.email, user.password, fake_ip())
    assert r.status_code == 200, r.text


def test_successful_login_resets_pair_failures(hub: RunningHub) -> None:
    """A successful login clears the pair's failure count (4 failures, ok, 4 more: no 429)."""
    user = register(hub)
    ip = fake_ip()
    for _ in range(4):
        assert_error(login(hub, user.email, "Wrong-password-123", ip), 401, "unauthorized")
    assert login(hub, user.email, user.password, ip).status_code == 200
    for _ in range(4):
        assert_error(login(hub, user.email, "Wrong-password-123", ip), 401, "unauthorized")
    assert login(hub, user.email, user.password, ip).status_code == 200


def test_hammering_one_account_does_not_block_other_accounts_at_that_address(
    hub: RunningHub,
) -> None:
    """25 attempts on account X from one address (5 failures, then 429s) leave account Y's
    right password from that same address unaffected."""
    x, y = register(hub), register(hub)
    ip = fake_ip()
    statuses = [login(hub, x.email, "Wrong-password-123", ip).status_code for _ in range(25)]
    assert statuses == [401] * 5 + [429] * 20
    r = login(hub, y.email, y.password, ip)
    assert r.status_code == 200, r.text


def test_password_spraying_from_one_address_is_throttled(hub: RunningHub) -> None:
    """One password tried on 20 accounts from one address: the 21st attempt there is 429,
    for any account; other addresses are not affected."""
    ip = fake_ip()
    victims = [register(hub) for _ in range(20)]
    for v in victims:
        assert_error(login(hub, v.email, "Summer2026!", ip), 401, "unauthorized")
    r = login(hub, unique_email(), "Summer2026!", ip)
    body = assert_error(r, 429, "rate_limited")
    assert 1 <= int(r.headers["Retry-After"]) <= 10
    assert body["details"]["retry_after_s"] == int(r.headers["Retry-After"])
    user = register(hub)
    assert_error(login(hub, user.email, user.password, ip), 429, "rate_limited")
    assert login(hub, user.email, user.password, fake_ip()).status_code == 200


# --- refresh / logout --------------------------------------------------------------------
def test_refresh_rotates_and_old_token_dies(hub: RunningHub) -> None:
    """Refresh answers a new working pair; the presented refresh token no longer works."""
    user = register(hub)
    r = refresh(hub, user.refresh_token)
    assert r.status_code == 200, r.text
    body = r.json()
    assert_token_pair(body, user.email)
    assert body["refresh_token"] != user.refresh_token
    assert me(hub, body["access_token"]).status_code == 200
    old = refresh(hub, user.refresh_token)
    assert_error(old, 401, "unauthorized")


def test_refresh_reuse_revokes_whole_family(hub: RunningHub) -> None:
    """Presenting an already-rotated refresh token revokes the family: the newest fails too."""
    user = register(hub)
    r2 = refresh(hub, user.refresh_token)
    assert r2.status_code == 200, r2.text
    t2 = r2.json()["refresh_token"]
    r3 = refresh(hub, t2)
    assert r3.status_code == 200, r3.text
    t3 = r3.json()["refresh_token"]
    # an attacker replays the first (rotated) token
    assert_error(refresh(hub, user.refresh_token), 401, "unauthorized")
    # the newest token of the family is dead now, and so is the middle one
    assert_error(refresh(hub, t3), 401, "unauthorized")
    assert_error(refresh(hub, t2), 401, "unauthorized")


def test_refresh_reuse_does_not_touch_other_sessions(hub: RunningHub) -> None:
    """Reuse detection revokes one login's family only; another login's session survives."""
    user = register(hub)
    other = login(hub, user.email, user.password)
    assert other.status_code == 200
    assert refresh(hub, user.refresh_token).status_code == 200
    assert_error(refresh(hub, user.refresh_token), 401, "unauthorized")
    r = refresh(hub, other.json()["refresh_token"])
    assert r.status_code == 200, r.text


def test_refresh_unknown_or_invalid_token_is_401_or_400(hub: RunningHub) -> None:
    """An unknown refresh token is 401; an access JWT is not a refresh token; empty is 400."""
    user = register(hub)
    assert_error(refresh(hub, "hxr_" + uuid.uuid4().hex), 401, "unauthorized")
    assert_error(refresh(hub, user.access_token), 401, "unauthorized")
    with hub.api() as c:
        assert_error(c.post("/auth/refresh", json={"refresh_token": ""}), 400, "validation_error")
        assert_error(c.post("/auth/refresh", json={}), 400, "validation_error")
        r = c.post("/auth/refresh", json={"refresh_token": user.refresh_token, "extra": 1})
        assert_error(r, 400, "validation_error")
    # none of that harmed the real token
    assert refresh(hub, user.refresh_token).status_code == 200


def test_concurrent_refreshes_at_most_one_succeeds(hub: RunningHub) -> None:
    """Many simultaneous refreshes of one token: at most one gets a new pair, the rest 401."""
    user = register(hub)
    n = 8
    barrier = threading.Barrier(n)
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def worker() -> None:
        with hub.api() as c:
            barrier.wait()
            r = c.post("/auth/refresh", json={"refresh_token": user.refresh_token})
        with lock:
            results.append(r)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == n
    ok = [r for r in results if r.status_code == 200]
    assert len(ok) <= 1, [r.status_code for r in results]
    for r in results:
        if r.status_code != 200:
            assert_error(r, 401, "unauthorized")
    # the original token is certainly dead now
    assert_error(refresh(hub, user.refresh_token), 401, "unauthorized")


def test_concurrent_refresh_reuse_leaves_no_live_token(hub: RunningHub) -> None:
    """When a concurrent refresh is flagged as reuse, the winner's new token is revoked too."""
    n, rounds = 6, 25
    for _ in range(rounds):
        user = register(hub)
        barrier = threading.Barrier(n)
        results: list[httpx.Response] = []
        lock = threading.Lock()

        def worker(
            token: str = user.refresh_token,
            b: threading.Barrier = barrier,
            out: list[httpx.Response] = results,
            guard: threading.Lock = lock,
        ) -> None:
            with hub.api() as c:
                b.wait()
                r = c.post("/auth/refresh", json={"refresh_token": token})
            with guard:
                out.append(r)

        threads = [threading.Thread(target=worker) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        winners = [r for r in results if r.status_code == 200]
        assert len(winners) <= 1
        if not winners or len(results) - len(winners) == 0:
            continue
        # the losers presented an already-rotated token: the whole family must be dead,
        # including the pair handed to the winner a moment earlier or later
        newest = winners[0].json()["refresh_token"]
        assert_error(refresh(hub, newest), 401, "unauthorized")


def test_logout_revokes_token_family(hub: RunningHub) -> None:
    """Logout answers 204 and every refresh token of that family stops working."""
    user = register(hub)
    r = refresh(hub, user.refresh_token)
    assert r.status_code == 200
    newest = r.json()["refresh_token"]
    other = login(hub, user.email, user.password).json()["refresh_token"]
    with hub.api() as c:
        out = c.post("/auth/logout", json={"refresh_token": newest})
    assert out.status_code == 204, out.text
    assert out.content == b""
    assert_error(refresh(hub, newest), 401, "unauthorized")
    assert_error(refresh(hub, user.refresh_token), 401, "unauthorized")
    # a separate login (another family) is not logged out
    assert refresh(hub, other).status_code == 200


def test_logout_validates_body(hub: RunningHub) -> None:
    """Logout with a missing or malformed body answers 400 validation_error."""
    with hub.api() as c:
        assert_error(c.post("/auth/logout", json={}), 400, "validation_error")
        r = c.post("/auth/logout", content=b"{]", headers={"Content-Type": "application/json"})
        assert_error(r, 400, "validation_error")


# --- /auth/me ----------------------------------------------------------------------------
def test_me_shape(hub: RunningHub) -> None:
    """/auth/me has id, email, role, is_active, memberships (personal org, owner), created_at."""
    user = register(hub)
    r = me(hub, user.access_token)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"id", "email", "role", "is_active", "memberships", "created_at"}
    assert body["id"] == user.id
    assert body["email"] == user.email
    assert body["role"] == "user"
    assert body["is_active"] is True
    assert body["created_at"].endswith("Z")
    assert len(body["memberships"]) == 1
    m = body["memberships"][0]
    assert set(m) >= {"org_id", "org_name", "role"}
    assert m["role"] == "owner"
    assert m["org_id"] == user.org_id
    assert isinstance(m["org_name"], str) and m["org_name"]
    assert_no_secrets(body)


def test_me_of_platform_admin_has_admin_role(hub: RunningHub) -> None:
    """The bootstrap platform admin's /auth/me says role admin."""
    r = me(hub, admin_token(hub))
    assert r.status_code == 200, r.text
    assert r.json()["role"] == "admin"
    assert_no_secrets(r.json())


# --- JWT forgeries -----------------------------------------------------------------------
def test_crafted_valid_token_is_accepted(hub: RunningHub) -> None:
    """Control: a token crafted exactly like the hub's (right key, claims) is accepted."""
    user = register(hub)
    r = me(hub, forge(hub, user.id))
    assert r.status_code == 200, r.text
    assert r.json()["id"] == user.id


@pytest.mark.parametrize(
    "kind",
    [
        "wrong-key",
        "alg-none",
        "expired",
        "wrong-aud",
        "refresh-typ",
        "hs512",
        "no-exp",
        "no-sub",
        "unknown-sub",
        "bad-sub",
    ],
)
def test_forged_jwts_are_401(hub: RunningHub, kind: str) -> None:
    """Forged, expired or malformed access JWTs answer 401 unauthorized."""
    user = register(hub)
    if kind == "wrong-key":
        token = forge(hub, user.id, key="another-secret-0123456789abcdef0123456789")
    elif kind == "alg-none":
        now = int(time.time())
        token = jwt.encode(
            {"sub": user.id, "iat": now, "exp": now + 600, "aud": "hexa-api", "typ": "access"},
            None,
            algorithm="none",
        )
    elif kind == "expired":
        token = forge(hub, user.id, exp_delta=-120)
    elif kind == "wrong-aud":
        token = forge(hub, user.id, aud="someone-else")
    elif kind == "refresh-typ":
        token = forge(hub, user.id, typ="refresh")
    elif kind == "hs512":
        token = forge(hub, user.id, alg="HS512")
    elif kind == "no-exp":
        token = forge(hub, user.id, drop=("exp",))
    elif kind == "no-sub":
        token = forge(hub, user.id, drop=("sub",))
    elif kind == "unknown-sub":
        token = forge(hub, str(uuid.uuid4()))
    else:
        token = forge(hub, "not-a-uuid")
    r = me(hub, token)
    assert_error(r, 401, "unauthorized")
    assert user.email not in r.text


@pytest.mark.parametrize(
    "header",
    ["", "Bearer", "Bearer garbage", "Bearer a.b.c", "Basic dXNlcjpwYXNz", "TOKEN"],
    ids=["empty", "bearer-only", "garbage", "fake-jwt", "basic", "no-scheme"],
)
def test_missing_or_garbage_authorization_is_401(hub: RunningHub, header: str) -> None:
    """No Authorization, a non-Bearer scheme or a garbage token answers 401 with the error shape."""
    user = register(hub)
    headers = {"Authorization": header} if header else {}
    if header == "TOKEN":
        headers = {"Authorization": user.access_token}  # a real token without "Bearer"
    with httpx.Client(base_url=hub.api_base, timeout=15) as c:
        r = c.get("/auth/me", headers=headers)
        assert_error(r, 401, "unauthorized")
        r2 = c.get("/orgs", headers=headers)
        assert_error(r2, 401, "unauthorized")


# --- disabled users and the admin surface ------------------------------------------------
def test_disabled_user_is_locked_out(hub: RunningHub) -> None:
    """A user deactivated by a platform admin cannot log in (403), use access (401) or refresh."""
    user = register(hub)
    admin = admin_token(hub)
    assert me(hub, user.access_token).status_code == 200
    with hub.api(admin) as c:
        r = c.patch(f"/admin/users/{user.id}", json={"is_active": False})
    assert r.status_code == 200, r.text
    assert r.json()["id"] == user.id and r.json()["is_active"] is False
    assert_no_secrets(r.json())
    assert_error(login(hub, user.email, user.password), 403, "forbidden")
    assert_error(me(hub, user.access_token), 401, "unauthorized")
    with hub.api(user.access_token) as c:
        assert_error(c.get("/orgs"), 401, "unauthorized")
    assert_error(refresh(hub, user.refresh_token), 401, "unauthorized")
    # a disabled account with a wrong password is still just 401
    assert_error(login(hub, user.email, "Wrong-password-123"), 401, "unauthorized")


def test_reactivated_user_can_log_in_again(hub: RunningHub) -> None:
    """Re-activating a user restores login; tokens revoked at deactivation stay dead."""
    user = register(hub)
    admin = admin_token(hub)
    with hub.api(admin) as c:
        assert c.patch(f"/admin/users/{user.id}", json={"is_active": False}).status_code == 200
        r = c.patch(f"/admin/users/{user.id}", json={"is_active": True})
    assert r.status_code == 200 and r.json()["is_active"] is True
    r = login(hub, user.email, user.password)
    assert r.status_code == 200, r.text
    assert me(hub, r.json()["access_token"]).status_code == 200
    assert_error(refresh(hub, user.refresh_token), 401, "unauthorized")


def test_admin_users_list_and_patch_validation(hub: RunningHub) -> None:
    """Platform admins list users (paged, no secrets); bad PATCH bodies are 400, unknown ids 404."""
    user = register(hub)
    admin = admin_token(hub)
    with hub.api(admin) as c:
        r = c.get("/admin/users", params={"limit": 100})
        assert r.status_code == 200, r.text
        page = r.json()
        assert set(page) >= {"items", "total", "limit", "offset", "has_next", "has_prev"}
        assert page["limit"] == 100 and page["offset"] == 0 and page["total"] >= 2
        for u in page["items"]:
            assert_no_secrets(u)
        assert_error(
            c.patch(f"/admin/users/{user.id}", json={"is_active": "no"}), 400, "validation_error"
        )
        assert_error(
            c.patch(f"/admin/users/{user.id}", json={"password_hash": "x"}), 400, "validation_error"
        )
        assert_error(
            c.patch(f"/admin/users/{uuid.uuid4()}", json={"is_active": False}), 404, "not_found"
        )
    assert me(hub, user.access_token).json()["is_active"] is True


def test_non_admins_get_404_on_admin_routes(hub: RunningHub) -> None:
    """The admin surface does not exist for ordinary users: 404 not_found, and nothing changes."""
    user = register(hub)
    victim: User = register(hub)
    with hub.api(user.access_token) as c:
        assert_error(c.get("/admin/users"), 404, "not_found")
        r = c.patch(f"/admin/users/{victim.id}", json={"is_active": False})
        assert_error(r, 404, "not_found")
        r = c.patch(f"/admin/users/{user.id}", json={"role": "admin"})
        assert_error(r, 404, "not_found")
    assert me(hub, victim.access_token).json()["is_active"] is True
    assert me(hub, user.access_token).json()["role"] == "user"
    with hub.api() as c:
        assert_error(c.get("/admin/users"), 401, "unauthorized")
