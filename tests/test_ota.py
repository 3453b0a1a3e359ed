"""Signed OTA updates (contract §5) against a real hub on SQLite and PostgreSQL: keys and
rotation, uploads, the device side with HTTP Basic auth, the selection rules, every
fail-closed check with the stored row and the stored file tampered, halting, and a
``hexa sim`` device updating itself end to end."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import random
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from support.accounts import add_member, admin_token, audit, register
from support.checks import assert_error, ok, wait_until
from support.devices import SimThread, claimed_device
from support.hubs import PROVISION_KEY, RunningHub

from hexa.hub.tools.sim_ota import Refused, check_manifest

MODEL = "hexa-mini-switch-v1"


# --- helpers ------------------------------------------------------------------------------
def sql(hub: RunningHub, statement: str, *args: Any) -> Any:
    """Run one statement straight in the hub's database (``?`` placeholders), as someone with
    access to the database would; the first column of the first row, if any."""
    url = hub.settings.resolved_database_url
    if url.startswith("sqlite"):
        args = tuple(a.isoformat() if isinstance(a, datetime) else a for a in args)
        with contextlib.closing(sqlite3.connect(url.split("://", 1)[1], timeout=15)) as db:
            row = db.execute(statement, args).fetchone()
            db.commit()
        return row[0] if row else None
    import asyncpg

    parts = statement.split("?")
    pg = parts[0] + "".join(f"${i}{p}" for i, p in enumerate(parts[1:], 1))

    async def run() -> Any:
        conn = await asyncpg.connect(url.replace("postgres://", "postgresql://", 1), timeout=10)
        try:
            return await conn.fetchval(pg, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


def metric(hub: RunningHub, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(hub.base + "/metrics", timeout=15).text.splitlines():
        if not line.startswith(name):
            continue
        series, _, number = line.rpartition(" ")
        if series.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(number)
    return total


def basic(uid: str, token: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{uid}:{token}".encode()).decode()}


class Device:
    """A device's HTTP side of OTA (Basic auth with its uid and token)."""

    def __init__(self, hub: RunningHub, p: dict[str, Any]) -> None:
        self.uid, self.token = p["device_uid"], p["device_token"]
        self.c = httpx.Client(
            base_url=hub.api_base, headers=basic(self.uid, self.token), timeout=15
        )

    def check(self, **params: str) -> dict[str, Any]:
        return dict(ok(self.c.get("/ota/check", params=params)))

    def manifest(self) -> httpx.Response:
        return self.c.get(f"/ota/manifest/{self.uid}")

    def artifact(self, release_id: str, **headers: str) -> httpx.Response:
        return self.c.get(f"/ota/artifacts/{release_id}", headers=headers)

    def report(self, release_id: str, status: str, **extra: Any) -> httpx.Response:
        return self.c.post(
            "/ota/report", json={"release_id": release_id, "status": status, **extra}
        )

    def close(self) -> None:
        self.c.close()


class Releases:
    """Uploads releases as the platform admin; withdraws them all when the test ends, so
    that the next test sees none of them published."""

    def __init__(self, hub: RunningHub) -> None:
        self.hub = hub
        self.admin = hub.api(admin_token(hub))
        self.made: list[str] = []
        #: a band of versions of this test's own, above the devices' 1.0.0
        self.major = random.randint(10, 10**8)
        ensure_active_key(self.admin)

    def version(self, minor: int) -> str:
        return f"{self.major}.{minor}.0"

    def upload(
        self,
        minor: int,
        data: bytes | None = None,
        *,
        channel: str = "stable",
        security_version: int = 0,
        **fields: str,
    ) -> dict[str, Any]:
        data = os.urandom(4096 + minor) if data is None else data
        r = self.admin.post(
            "/ota/releases",
            files={"file": ("fw.bin", data, "application/octet-stream")},
            data={
                "model": MODEL,
                "version": self.version(minor),
                "channel": channel,
                "security_version": str(security_version),
                **fields,
            },
        )
        body = dict(ok(r, 201))
        self.made.append(body["id"])
        return body

    def publish(self, release: dict[str, Any], rollout: int = 100, **extra: Any) -> dict[str, Any]:
        r = self.admin.patch(
            f"/ota/releases/{release['id']}",
            json={"status": "published", "rollout_percent": rollout, **extra},
        )
        return dict(ok(r))

    def published(self, minor: int, **kwargs: Any) -> tuple[dict[str, Any], bytes]:
        data = os.urandom(6000 + minor)
        release = self.upload(minor, data, **kwargs)
        return self.publish(release), data

    def close(self) -> None:
        for rid in self.made:
            self.admin.patch(f"/ota/releases/{rid}", json={"status": "withdrawn"})
        self.admin.close()


def ensure_active_key(admin: httpx.Client) -> None:
    if not any(k["status"] == "active" for k in ok(admin.get("/ota/keys"))["items"]):
        ok(admin.post("/ota/keys"), 201)


@pytest.fixture
def releases(hub: RunningHub) -> Iterator[Releases]:
    r = Releases(hub)
    yield r
    r.close()


def ota_device(hub: RunningHub, **fields: Any) -> tuple[Device, dict[str, Any]]:
    """A provisioned device at firmware 1.0.0 (the provisioning answer as the second)."""
    with hub.api(**{"X-Provision-Key": PROVISION_KEY}) as c:
        p = ok(c.post("/provision/register", json={"model": MODEL, "fw_version": "1.0.0"}), 201)
    return Device(hub, p), p


def verify_signed(signed: dict[str, Any], keys: list[dict[str, Any]]) -> None:
    """Verify a signed manifest the way docs/protocol.md tells firmware to."""
    key = next(k for k in keys if k["key_id"] == signed["key_id"])
    assert key["status"] in ("active", "next")
    public = serialization.load_pem_public_key(key["public_key_pem"].encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    text = json.dumps(signed["manifest"], sort_keys=True, separators=(",", ":"))
    public.verify(base64.b64decode(signed["signature"]), text.encode(), ec.ECDSA(hashes.SHA256()))


# --- keys ---------------------------------------------------------------------------------
def test_key_list_is_a_page_newest_first(hub: RunningHub, releases: Releases) -> None:
    """``GET /ota/keys`` answers the contract's list shape, newest key first, so the
    active and next keys are on the first page however many keys were retired."""
    ensure_active_key(releases.admin)
    dev, _ = ota_device(hub)
    body = ok(dev.c.get("/ota/keys", params={"limit": 1}))
    assert set(body) == {"items", "total", "limit", "offset", "has_next", "has_prev"}
    assert body["limit"] == 1 and body["offset"] == 0 and not body["has_prev"]
    assert len(body["items"]) == 1 and body["has_next"] == (body["total"] > 1)
    everything = ok(dev.c.get("/ota/keys", params={"limit": 100}))["items"]
    assert body["items"][0]["key_id"] == everything[0]["key_id"]
    stamps = [k["created_at"] for k in everything]
    assert stamps == sorted(stamps, reverse=True)
    assert any(k["status"] == "active" for k in everything[:2])


def test_keys_are_created_rotated_and_listed(hub: RunningHub, releases: Releases) -> None:
    """The first key is active, a later one next (one of each), rotation retires the active
    key and re-signs the releases in use, which stay offered; 409 without a next key."""
    admin = releases.admin
    user = register(hub)
    with hub.api(user.access_token) as c:
        assert_error(c.post("/ota/keys"), 403, "forbidden")
        assert_error(c.post("/ota/keys/rotate"), 403, "forbidden")
        assert ok(c.get("/ota/keys"))["items"]  # any signed-in user reads the public keys
    assert_error(httpx.post(hub.api_base + "/ota/keys"), 401)
    if any(k["status"] == "next" for k in ok(admin.get("/ota/keys"))["items"]):
        ok(admin.post("/ota/keys/rotate"))
    assert_error(admin.post("/ota/keys/rotate"), 409, "conflict")
    release, _ = releases.published(1)
    dev, _ = ota_device(hub)
    before = ok(dev.manifest())
    assert before["manifest"]["next_key_id"] is None
    active = before["key_id"]

    nxt = ok(admin.post("/ota/keys"), 201)
    assert nxt["status"] == "next" and "PRIVATE" not in json.dumps(nxt)
    assert nxt["public_key_pem"].startswith("-----BEGIN PUBLIC KEY-----")
    assert_error(admin.post("/ota/keys"), 409, "conflict")
    announced = ok(dev.manifest())  # re-signed by the active key, naming the next one
    assert announced["key_id"] == active
    assert announced["manifest"]["next_key_id"] == nxt["key_id"]
    verify_signed(announced, ok(dev.c.get("/ota/keys"))["items"])  # devices read keys too

    keys = {k["key_id"]: k["status"] for k in ok(admin.post("/ota/keys/rotate"))["items"]}
    assert keys[nxt["key_id"]] == "active" and keys[active] == "retired"
    rotated = ok(dev.manifest())
    assert rotated["key_id"] == nxt["key_id"] and rotated["manifest"]["next_key_id"] is None
    verify_signed(rotated, ok(dev.c.get("/ota/keys"))["items"])
    assert dev.check()["release_id"] == release["id"]
    assert_error(admin.post("/ota/keys/rotate"), 409, "conflict")

    # at rest: sealed, no private key in clear, bound to its row
    sealed = sql(hub, "SELECT private_key_sealed FROM ota_keys WHERE id = ?", nxt["key_id"])
    assert sealed.startswith("v1:") and "PRIVATE" not in sealed
    kek = Path(hub.settings.data_dir) / "ota" / "kek"
    assert kek.stat().st_mode & 0o777 == 0o600
    wanted = {"ota_key_created", "ota_keys_rotated", "ota_releases_resigned"}
    assert wait_until(lambda: wanted <= {e["action"] for e in audit_all(admin)}, 5)


def audit_all(admin: httpx.Client) -> list[dict[str, Any]]:
    return list(ok(admin.get("/admin/audit", params={"limit": 100}))["items"])


# --- uploads --------------------------------------------------------------------------------
def test_upload_is_hashed_signed_and_refused_when_bad(hub: RunningHub, releases: Releases) -> None:
    """The hub computes sha256 and size and answers the §5 shape; empty, not semver,
    duplicate, too large, a bad channel or security version, or a non-admin are refused."""
    data = os.urandom(70_000)
    r = releases.upload(1, data, notes="first", security_version=2)
    assert r["sha256"] == hashlib.sha256(data).hexdigest() and r["size"] == len(data)
    assert r["status"] == "draft" and r["rollout_percent"] == 0
    assert r["security_version"] == 2 and r["channel"] == "stable" and r["key_id"]
    expires = datetime.fromisoformat(r["expires_at"].replace("Z", "+00:00"))
    assert timedelta(days=89) < expires - datetime.now(UTC) <= timedelta(days=90)
    stored = Path(hub.settings.data_dir) / "ota" / "artifacts" / f"{r['id']}.bin"
    assert stored.read_bytes() == data
    assert ok(releases.admin.get(f"/ota/releases/{r['id']}"))["sha256"] == r["sha256"]
    listed = ok(releases.admin.get("/ota/releases", params={"status": "draft", "limit": 100}))
    assert r["id"] in {x["id"] for x in listed["items"]}

    def upload(content: bytes, **fields: str) -> httpx.Response:
        form = {"model": MODEL, "version": releases.version(9), "channel": "stable"}
        form |= {"security_version": "0", **fields}
        return releases.admin.post("/ota/releases", files={"file": ("f", content)}, data=form)

    keyed = {"Idempotency-Key": "upload-" + releases.version(2)}
    form = {"model": MODEL, "version": releases.version(2), "channel": "beta"}
    form |= {"security_version": "0"}
    first = releases.admin.post(
        "/ota/releases", files={"file": ("f", b"fw")}, data=form, headers=keyed
    )
    releases.made.append(ok(first, 201)["id"])
    # a retry with the same key (and a fresh multipart boundary) replays the answer ...
    again = releases.admin.post(
        "/ota/releases", files={"file": ("f", b"fw")}, data=form, headers=keyed
    )
    assert ok(again, 201) == first.json() and again.headers["Idempotency-Replayed"] == "true"
    # ... the same key with another image or field is refused, and creates nothing
    other = releases.admin.post(
        "/ota/releases", files={"file": ("f", b"fx")}, data=form, headers=keyed
    )
    assert_error(other, 409, "idempotency_conflict")
    form3 = form | {"version": releases.version(3)}
    other = releases.admin.post(
        "/ota/releases", files={"file": ("f", b"fw")}, data=form3, headers=keyed
    )
    assert_error(other, 409, "idempotency_conflict")
    assert_error(
        releases.admin.post("/ota/releases", files={"file": ("f", b"fw")}, data=form),
        409,
        "conflict",
    )  # without a key, the same release again is a duplicate
    assert_error(upload(b""), 400, "validation_error")
    assert_error(upload(b"x", version="1.2"), 400, "validation_error")
    assert_error(upload(b"x", version="v1.2.3"), 400, "validation_error")
    assert_error(upload(b"x", version=releases.version(1)), 409, "conflict")
    assert_error(upload(b"x", channel="nightly"), 400, "validation_error")
    assert_error(upload(b"x", security_version="-1"), 400, "validation_error")
    assert_error(upload(b"x", expires_at="2001-01-01T00:00:00Z"), 400, "validation_error")
    limit = hub.settings.ota_max_bytes
    assert_error(upload(b"\0" * (limit + 1)), 413, "payload_too_large")
    leftovers = [p.name for p in stored.parent.iterdir() if p.name.startswith(".upload")]
    assert leftovers == []
    with hub.api(register(hub).access_token) as c:
        r2 = c.post(
            "/ota/releases",
            files={"file": ("f", b"x")},
            data={"model": MODEL, "version": "1.0.1", "channel": "stable", "security_version": "0"},
        )
        assert_error(r2, 403, "forbidden")
        assert_error(c.get("/ota/releases"), 403, "forbidden")

    def uploaded() -> bool:
        entries = audit_all(releases.admin)
        return any(
            e["action"] == "ota_release_uploaded"
            and e["details"]["release_id"] == r["id"]
            and e["request_id"]
            and e["actor_type"] == "user"
            for e in entries
        )

    assert wait_until(uploaded, 5)


# --- the device side --------------------------------------------------------------------------
def test_device_credentials_and_paths(hub: RunningHub, releases: Releases) -> None:
    """Wrong, missing or revoked credentials are 401; another device's uid is 404; unknown
    report states are 400; a report on a release never offered is 404."""
    release, _ = releases.published(1)
    dev, p = ota_device(hub)
    other, _ = ota_device(hub)
    assert dev.check()["update"] is True
    bad = {
        "none": {},
        "wrong": basic(dev.uid, "hxd_wrong"),
        "other's token": basic(dev.uid, other.token),
        "garbage": {"Authorization": "Basic !!!"},
        "bearer": {"Authorization": f"Bearer {dev.token}"},
    }
    for headers in bad.values():
        assert_error(httpx.get(hub.api_base + "/ota/check", headers=headers), 401)
        assert_error(
            httpx.get(f"{hub.api_base}/ota/artifacts/{release['id']}", headers=headers), 401
        )
    assert_error(dev.c.get(f"/ota/manifest/{other.uid}"), 404, "not_found")
    assert_error(dev.report(release["id"], "rebooting"), 400, "validation_error")
    assert_error(dev.report(release["id"], "applied", error="x" * 600), 400, "validation_error")
    assert_error(dev.report("00000000-0000-0000-0000-000000000000", "downloading"), 404)
    assert dev.report(release["id"], "downloading").status_code == 204
    # a device that was never offered the release (fw above it) cannot report on it
    assert ok(other.c.get("/ota/check", params={"current_version": "99999999999.0.0"}))
    assert_error(other.report(release["id"], "failed"), 404, "not_found")
    assert_error(other.artifact(release["id"]), 404, "not_found")

    user = register(hub)  # a revoked token stops working for OTA at once
    with hub.api(user.access_token) as c:
        claimed = ok(c.post("/devices/claim", json={"claim_code": p["claim_code"]}))
        ok(c.post(f"/devices/{claimed['id']}/token/rotate"))
    assert_error(dev.c.get("/ota/check"), 401, "unauthorized")
    dev.close()
    other.close()


def test_fleet_routes_answer_alike_by_either_path(hub: RunningHub, releases: Releases) -> None:
    """``GET /ota/check`` and ``GET /ota/manifest/{uid}`` as a device sends them are answered
    ahead of FastAPI's dependencies; with anything unusual in the query they go through the
    FastAPI route. Both answer the same bytes and headers, the same errors (envelope, request
    id, security headers), are counted under the route's template, and unusual queries are
    still validated."""
    release, _ = releases.published(1)
    dev, _ = ota_device(hub)
    other, _ = ota_device(hub)

    def alike(fast: httpx.Response, slow: httpx.Response) -> None:
        assert fast.status_code == slow.status_code, (fast.text, slow.text)
        if fast.status_code == 200:
            assert fast.content == slow.content
        else:  # the same envelope; each answer has its own request id
            a, b = fast.json(), slow.json()
            assert a.pop("request_id") == fast.headers["x-request-id"]
            assert b.pop("request_id") == slow.headers["x-request-id"]
            assert a == b
        skip = {"x-request-id", "date"}
        assert {k: v for k, v in fast.headers.items() if k not in skip} == {
            k: v for k, v in slow.headers.items() if k not in skip
        }

    routes = "hexa_http_requests_total"
    checks = metric(hub, routes, route="/api/v1/ota/check", status="200")
    manifests = metric(hub, routes, route="/api/v1/ota/manifest/{device_uid}", status="200")
    # an unknown parameter is ignored by the FastAPI route and sends the request there
    pairs = [
        ("/ota/check", "/ota/check?also=1"),
        ("/ota/check?current_version=1.0.0", "/ota/check?current_version=1.0.0&also=1"),
        ("/ota/check?current_version=1.0.0", "/ota/check?current_version=1%2E0%2E0"),
        (f"/ota/manifest/{dev.uid}", f"/ota/manifest/{dev.uid}?also=1"),
        (f"/ota/manifest/{other.uid}", f"/ota/manifest/{other.uid}?also=1"),  # 404
    ]
    for fast, slow in pairs:
        alike(dev.c.get(fast), dev.c.get(slow))
    assert ok(dev.c.get("/ota/check"))["release_id"] == release["id"]
    assert metric(hub, routes, route="/api/v1/ota/check", status="200") >= checks + 7
    assert metric(hub, routes, route="/api/v1/ota/manifest/{device_uid}", status="200") >= (
        manifests + 2
    )
    for headers in ({}, basic(dev.uid, "hxd_wrong"), {"Authorization": "Basic !!!"}):
        anon = httpx.Client(base_url=hub.api_base, headers=headers, timeout=15)
        alike(anon.get("/ota/check"), anon.get("/ota/check?also=1"))
        alike(anon.get(f"/ota/manifest/{dev.uid}"), anon.get(f"/ota/manifest/{dev.uid}?also=1"))
        assert anon.get("/ota/check").headers["www-authenticate"] == "Bearer"
        anon.close()
    # what only the FastAPI route accepts is still validated there
    assert_error(dev.c.get("/ota/check", params={"current_version": "1" * 65}), 400)
    assert_error(dev.c.get("/ota/check?current_version=1.0.0%00"), 400, "validation_error")
    assert_error(dev.c.get(f"/ota/manifest/{dev.uid}?x=%00"), 400, "validation_error")
    # the version a device reports by either path is recorded alike
    assert ok(dev.c.get("/ota/check?current_version=99999999999.0.0")) == {"update": False}
    assert_error(dev.manifest(), 404, "no_update")
    assert ok(dev.c.get("/ota/check?current_version=1%2E0%2E0"))["release_id"] == release["id"]
    assert ok(dev.manifest())["manifest"]["release_id"] == release["id"]
    dev.close()
    other.close()


def test_artifact_ranges(hub: RunningHub, releases: Releases) -> None:
    """The artifact is served whole or by Range (206, suffix ranges; 416 past the end)."""
    release, data = releases.published(1)
    dev, _ = ota_device(hub)
    whole = dev.artifact(release["id"])
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["accept-ranges"] == "bytes"
    part = dev.artifact(release["id"], Range="bytes=100-199")
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    tail = dev.artifact(release["id"], Range="bytes=-10")
    assert tail.status_code == 206 and tail.content == data[-10:]
    rest = dev.artifact(release["id"], Range=f"bytes={len(data) - 5}-")
    assert rest.status_code == 206 and rest.content == data[-5:]
    assert dev.artifact(release["id"], Range=f"bytes={len(data) + 10}-").status_code == 416
    # a newer release appears mid-download: the device still finishes and reports this one
    newer, _ = releases.published(2)
    assert dev.check()["release_id"] == newer["id"]
    assert dev.artifact(release["id"], Range="bytes=200-").content == data[200:]
    assert dev.report(release["id"], "verified").status_code == 204
    dev.close()


def test_selection_channels_rollout_and_anti_rollback(hub: RunningHub, releases: Releases) -> None:
    """Highest version above the device's among its channels (beta takes stable, dev takes
    all), inside the rollout bucket, never below its security version."""
    stable, _ = releases.published(1, security_version=5)
    beta, _ = releases.published(2, channel="beta")
    dev_rel = releases.upload(3, channel="dev")
    releases.publish(dev_rel, rollout=0)
    draft = releases.upload(4)
    device, p = ota_device(hub)
    answer = device.check()
    assert answer == {
        "update": True,
        "release_id": stable["id"],
        "version": stable["version"],
        "security_version": 5,
        "manifest_url": f"{hub.api_base}/ota/manifest/{device.uid}",
    }
    assert_error(device.artifact(beta["id"]), 404, "not_found")  # not its channel
    assert_error(device.artifact(draft["id"]), 404, "not_found")  # not published
    user = register(hub)
    with hub.api(user.access_token) as c:
        d = ok(c.post("/devices/claim", json={"claim_code": p["claim_code"]}))
        assert d["ota_channel"] == "stable" and d["ota_security_version"] == 0
        assert d["ota"] == {"release_id": None, "status": None, "error": None, "updated_at": None}
        assert (
            ok(c.patch(f"/devices/{d['id']}", json={"ota_channel": "beta"}))["ota_channel"]
            == "beta"
        )
        assert device.check()["release_id"] == beta["id"]
        ok(c.patch(f"/devices/{d['id']}", json={"ota_channel": "dev"}))
        assert device.check()["release_id"] == beta["id"]  # dev's 0 % rollout leaves it out
        releases.admin.patch(f"/ota/releases/{dev_rel['id']}", json={"rollout_percent": 100})
        assert device.check()["release_id"] == dev_rel["id"]
        assert_error(c.patch(f"/devices/{d['id']}", json={"ota_channel": "nightly"}), 400)
        viewer = register(hub)
        add_member(hub, user, viewer, "viewer")
        with hub.api(viewer.access_token) as v:
            assert_error(v.patch(f"/devices/{d['id']}", json={"ota_channel": "stable"}), 403)
        ok(c.patch(f"/devices/{d['id']}", json={"ota_channel": "stable"}))

        # applying raises the security version: a later release below it is never offered
        assert device.report(stable["id"], "downloading").status_code == 204
        assert device.report(stable["id"], "applied").status_code == 204
        d = ok(c.get(f"/devices/{d['id']}"))
        assert d["fw_version"] == stable["version"] and d["ota_security_version"] == 5
        assert d["ota"]["status"] == "applied" and d["ota"]["release_id"] == stable["id"]
    older_security, _ = releases.published(7, security_version=3)
    assert device.check() == {"update": False}
    assert_error(device.manifest(), 404, "no_update")
    assert_error(device.artifact(older_security["id"]), 404, "not_found")
    assert_error(device.report(older_security["id"], "downloading"), 404, "not_found")
    # a fresh device (security version 0) is offered it
    fresh, _ = ota_device(hub)
    assert fresh.check()["release_id"] == older_security["id"]

    # rollout buckets are stable: the same devices in, the same out, more with a higher %
    half = releases.upload(8)
    releases.publish(half, rollout=50)
    devices = [ota_device(hub)[0] for _ in range(30)]
    first = [d.check().get("release_id") == half["id"] for d in devices]
    assert first == [d.check().get("release_id") == half["id"] for d in devices]
    assert 0 < sum(first) < 30
    releases.admin.patch(f"/ota/releases/{half['id']}", json={"rollout_percent": 100})
    assert all(d.check().get("release_id") == half["id"] for d in devices)
    for d in [device, fresh, *devices]:
        d.close()


# --- fail closed --------------------------------------------------------------------------
def test_tampered_release_row_is_never_served(hub: RunningHub, releases: Releases) -> None:
    """Any change to the stored release or its key after signing, an algorithm other than
    the signed one, or a manifest whose signature no longer matches: not offered, 409
    release_integrity_failed on a direct request, counted by check; restored, it is served."""
    release, _ = releases.published(1, security_version=1)
    dev, _ = ota_device(hub)
    rid = release["id"]
    manifest_text = sql(hub, "SELECT manifest FROM ota_releases WHERE id = ?", rid)
    signature = sql(hub, "SELECT signature FROM ota_releases WHERE id = ?", rid)
    key_id = sql(hub, "SELECT key_id FROM ota_releases WHERE id = ?", rid)
    assert dev.check()["release_id"] == rid
    forged = json.loads(manifest_text)
    forged["security_version"] = 9
    forged_text = json.dumps(forged, sort_keys=True, separators=(",", ":"))
    fake_key = ec.generate_private_key(ec.SECP256R1())
    fake_pem = (
        fake_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    forged_sig = base64.b64encode(
        fake_key.sign(forged_text.encode(), ec.ECDSA(hashes.SHA256()))
    ).decode()
    real_pem = sql(hub, "SELECT public_key_pem FROM ota_keys WHERE id = ?", key_id)
    update = "UPDATE ota_releases SET {} WHERE id = ?"
    cases: list[tuple[str, str, tuple[Any, ...], tuple[Any, ...]]] = [
        ("fields", "sha256 = ?", ("0" * 64,), (release["sha256"],)),
        ("fields", "version = ?", (releases.version(5),), (release["version"],)),
        ("fields", "security_version = ?", (0,), (1,)),
        # the manifest and the row changed alike: only the signature tells
        ("signature", "manifest = ?, security_version = ?", (forged_text, 9), (manifest_text, 1)),
        ("signature", "signature = ?", (forged_sig,), (signature,)),
        ("algorithm", "alg = ?", ("none",), ("ecdsa-p256-sha256",)),
    ]
    for check, columns, bad, good in cases:
        before = metric(hub, "hexa_ota_integrity_failures_total", check=check)
        sql(hub, update.format(columns), *bad, rid)
        assert dev.check() == {"update": False}, columns
        body = assert_error(dev.manifest(), 409, "release_integrity_failed")
        assert body["details"]["check"] == check, (columns, body)
        assert_error(dev.artifact(rid), 409, "release_integrity_failed")
        assert metric(hub, "hexa_ota_integrity_failures_total", check=check) > before
        sql(hub, update.format(columns), *good, rid)
        assert dev.check()["release_id"] == rid, columns

    # the key: retired, or its public key swapped for another (with a matching signature)
    sql(hub, "UPDATE ota_keys SET status = ? WHERE id = ?", "retired", key_id)
    assert dev.check() == {"update": False}
    assert assert_error(dev.manifest(), 409)["details"]["check"] == "key"
    sql(hub, "UPDATE ota_keys SET status = ? WHERE id = ?", "active", key_id)
    sql(hub, "UPDATE ota_keys SET public_key_pem = ? WHERE id = ?", fake_pem, key_id)
    sql(
        hub,
        "UPDATE ota_releases SET manifest = ?, signature = ? WHERE id = ?",
        forged_text,
        forged_sig,
        rid,
    )
    sql(hub, "UPDATE ota_releases SET security_version = ? WHERE id = ?", 9, rid)
    assert dev.check() == {"update": False}
    assert assert_error(dev.manifest(), 409)["details"]["check"] == "key"
    sql(hub, "UPDATE ota_keys SET public_key_pem = ? WHERE id = ?", real_pem, key_id)
    sql(
        hub,
        "UPDATE ota_releases SET manifest = ?, signature = ?, security_version = ? WHERE id = ?",
        manifest_text,
        signature,
        1,
        rid,
    )
    assert dev.check()["release_id"] == rid
    # a publish never goes out over a tampered row
    sql(hub, "UPDATE ota_releases SET status = ?, size = ? WHERE id = ?", "draft", 1, rid)
    r = releases.admin.patch(f"/ota/releases/{rid}", json={"status": "published"})
    assert_error(r, 409, "release_integrity_failed")
    dev.close()


def test_tampered_artifact_file_is_never_served(hub: RunningHub, releases: Releases) -> None:
    """A changed byte in the stored artifact (its size and mtime kept), a truncated or a
    missing file: not offered and 409; the original file back, it is served again."""
    release, data = releases.published(1)
    dev, _ = ota_device(hub)
    path = Path(hub.settings.data_dir) / "ota" / "artifacts" / f"{release['id']}.bin"
    assert dev.artifact(release["id"]).content == data
    stat = path.stat()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(flipped))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    before = metric(hub, "hexa_ota_integrity_failures_total", check="artifact")
    assert dev.check() == {"update": False}
    assert assert_error(dev.manifest(), 409)["details"]["check"] == "artifact"
    assert_error(dev.artifact(release["id"], Range="bytes=0-9"), 409, "release_integrity_failed")
    assert metric(hub, "hexa_ota_integrity_failures_total", check="artifact") > before
    path.write_bytes(data[:-1])
    assert assert_error(dev.artifact(release["id"]), 409)["details"]["check"] == "artifact"
    path.unlink()
    assert assert_error(dev.artifact(release["id"]), 409)["details"]["check"] == "artifact"
    path.write_bytes(data)
    assert dev.check()["release_id"] == release["id"]
    assert dev.artifact(release["id"]).content == data
    dev.close()


def test_expired_release_is_not_offered(hub: RunningHub, releases: Releases) -> None:
    """Past its expiry a release is no longer offered and its artifact is 409 (expired);
    a stored expiry moved later than the signed one is a fields failure."""
    later, _ = releases.published(2)
    dev, _ = ota_device(hub)
    assert dev.check()["release_id"] == later["id"]
    # the later one's stored expiry moved (its signed one unchanged): refused
    sql(
        hub,
        "UPDATE ota_releases SET expires_at = ? WHERE id = ?",
        datetime.now(UTC) + timedelta(days=400),
        later["id"],
    )
    assert dev.check() == {"update": False}
    assert assert_error(dev.manifest(), 409)["details"]["check"] == "fields"
    releases.admin.patch(f"/ota/releases/{later['id']}", json={"status": "withdrawn"})
    soon = (datetime.now(UTC) + timedelta(seconds=4)).strftime("%Y-%m-%dT%H:%M:%SZ")
    release, _ = releases.published(1, expires_at=soon)
    assert dev.check()["release_id"] == release["id"]
    assert wait_until(lambda: dev.check() == {"update": False}, 10)
    assert_error(dev.manifest(), 404, "no_update")
    body = assert_error(dev.artifact(release["id"]), 409, "release_integrity_failed")
    assert body["details"]["check"] == "expired"
    dev.close()


# --- halting --------------------------------------------------------------------------------
def test_release_halts_on_failures_and_resumes(hub: RunningHub, releases: Releases) -> None:
    """More than halt_failure_percent of at least 5 reporting devices failed: halted, not
    offered, audited, counted; published again it resumes, counting reports afresh."""
    release = releases.publish(releases.upload(1), halt_failure_percent=30)
    assert release["halt_failure_percent"] == 30
    devices = [ota_device(hub)[0] for _ in range(8)]
    halts = metric(hub, "hexa_ota_releases_halted_total")
    failed_before = metric(hub, "hexa_ota_reports_total", status="failed")
    for d in devices[:4]:
        assert d.report(release["id"], "applied").status_code == 204
    assert devices[4].report(release["id"], "failed", error="boot loop").status_code == 204
    assert devices[5].report(release["id"], "failed").status_code == 204  # 2 of 6: 33 %
    admin = releases.admin
    assert ok(admin.get(f"/ota/releases/{release['id']}"))["status"] == "halted"
    assert metric(hub, "hexa_ota_releases_halted_total") == halts + 1
    assert metric(hub, "hexa_ota_reports_total", status="failed") == failed_before + 2
    assert devices[6].check() == {"update": False}
    assert_error(devices[6].artifact(release["id"]), 404)

    def halted() -> list[dict[str, Any]]:
        return [
            e
            for e in audit_all(admin)
            if e["action"] == "ota_release_halted" and e["details"]["release_id"] == release["id"]
        ]

    assert wait_until(halted, 5) and halted()[0]["source"] == "system"
    assert devices[7].report(release["id"], "failed").status_code == 404  # never offered

    resumed = releases.publish(release)
    assert resumed["status"] == "published" and resumed["halted_at"] is None
    assert devices[6].check()["release_id"] == release["id"]
    assert devices[6].report(release["id"], "failed").status_code == 204  # 1 since resumed
    assert ok(admin.get(f"/ota/releases/{release['id']}"))["status"] == "published"
    withdrawn = ok(admin.patch(f"/ota/releases/{release['id']}", json={"status": "withdrawn"}))
    assert withdrawn["status"] == "withdrawn"
    assert_error(admin.patch(f"/ota/releases/{release['id']}", json={"status": "published"}), 409)
    assert_error(admin.patch(f"/ota/releases/{release['id']}", json={"rollout_percent": 101}), 400)
    for d in devices:
        d.close()


# --- end to end -------------------------------------------------------------------------------
def test_sim_refuses_manifests_that_do_not_verify(hub: RunningHub, releases: Releases) -> None:
    """The simulator's firmware-side checks refuse a manifest changed after signing, one
    signed by a key it does not trust, for another model, expired or not above its version."""
    release, _ = releases.published(1, security_version=2)
    dev, _ = ota_device(hub)
    signed = ok(dev.manifest())
    keys = ok(dev.c.get("/ota/keys"))["items"]
    now = datetime.now(UTC)
    args: dict[str, Any] = {"model": MODEL, "fw_version": "1.0.0", "security_version": 0}
    assert check_manifest(signed, keys, now=now, **args)["release_id"] == release["id"]

    def refused(doc: dict[str, Any], key_list: list[dict[str, Any]] = keys, **over: Any) -> str:
        with pytest.raises(Refused) as info:
            check_manifest(doc, key_list, now=over.pop("now", now), **(args | over))
        return str(info.value)

    changed = json.loads(json.dumps(signed))
    changed["manifest"]["sha256"] = "0" * 64
    assert "signature" in refused(changed)
    assert "algorithm" in refused(signed | {"alg": "none"})
    retired = [k | {"status": "retired"} for k in keys]
    assert "retired" in refused(signed, retired)
    assert "model" in refused(signed, model="another-model")
    assert "not above" in refused(signed, fw_version=release["version"])
    assert "anti-rollback" in refused(signed, security_version=3)
    assert "expired" in refused(signed, now=now + timedelta(days=91))
    dev.close()


def test_sim_device_updates_end_to_end(hub: RunningHub, releases: Releases, track: Any) -> None:
    """POST /devices/{id}/ota tells a connected `hexa sim` device to update: it verifies the
    manifest with the hub's keys, downloads, checks size and sha256, reports each step and
    runs the new version; a tampered image is refused and reported failed."""
    user = register(hub)
    p, d = claimed_device(hub, user)
    sim = track(SimThread(hub, p))
    with hub.api(user.access_token) as c:
        assert wait_until(lambda: c.get(f"/devices/{d['id']}").json()["fw_version"] == "1.0.0", 5)
        assert_error(c.post(f"/devices/{d['id']}/ota"), 404, "no_update")
        release, _ = releases.published(1, security_version=3)
        applied = metric(hub, "hexa_ota_reports_total", status="applied")
        sent = ok(c.post(f"/devices/{d['id']}/ota"), 202)
        assert sent["release_id"] == release["id"] and sent["manifest_url"].endswith(
            p["device_uid"]
        )

        def device() -> dict[str, Any]:
            return dict(c.get(f"/devices/{d['id']}").json())

        assert wait_until(lambda: device()["ota"]["status"] == "applied", 15), device()
        now = device()
        assert now["fw_version"] == release["version"] and now["ota_security_version"] == 3
        assert now["ota"]["release_id"] == release["id"] and now["ota"]["error"] is None
        assert sim.dev.ota.outcomes == [f"applied {release['version']}"]
        assert sim.dev.ota.fw_version == release["version"]
        assert metric(hub, "hexa_ota_reports_total", status="applied") == applied + 1
        assert wait_until(lambda: audit(hub, user, action="ota_update_requested")["items"], 5)
        requested = audit(hub, user, action="ota_update_requested")["items"]
        assert requested and requested[0]["request_id"] and requested[0]["device_id"] == d["id"]

        # the device itself refuses what does not verify for it: here a security version
        # below the one it runs (its own memory, whatever the hub recorded)
        sim.dev.ota.security_version = 10
        releases.published(2, security_version=3)
        ok(c.post(f"/devices/{d['id']}/ota"), 202)
        assert wait_until(lambda: len(sim.dev.ota.outcomes) == 2, 15)
        assert "anti-rollback" in sim.dev.ota.outcomes[1]
        assert wait_until(lambda: device()["ota"]["status"] == "failed", 5), device()
        assert "anti-rollback" in device()["ota"]["error"]
        assert device()["fw_version"] == release["version"]

        # a device that is not connected is not told
        _, offline = claimed_device(hub, user)
        assert_error(c.post(f"/devices/{offline['id']}/ota"), 503, "device_offline")
        other = register(hub)
        with hub.api(other.access_token) as o:
            assert_error(o.post(f"/devices/{d['id']}/ota"), 404, "not_found")


def test_sim_device_checks_by_itself(hub: RunningHub, releases: Releases, track: Any) -> None:
    """A `hexa sim --ota-check-every` device finds and applies a published release without
    being told, over the WebSocket transport too."""
    user = register(hub)
    p, d = claimed_device(hub, user)
    release, _ = releases.published(1)
    sim = track(SimThread(hub, p, transport="ws", ota_check_every=0.2))
    with hub.api(user.access_token) as c:
        assert wait_until(
            lambda: c.get(f"/devices/{d['id']}").json()["fw_version"] == release["version"], 15
        )
    assert sim.dev.ota.outcomes == [f"applied {release['version']}"]
