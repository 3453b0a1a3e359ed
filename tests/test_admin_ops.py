"""The admin operations API: ``/admin/overview``, ``/admin/devices`` and ``/admin/audit``,
for platform admins only, on a real hub with real MQTT devices."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.accounts import User, admin_token, audit, register
from support.checks import assert_error, ok, wait_until
from support.devices import claim, claimed_device, online_device, provision
from support.hubs import ADMIN_EMAIL, ADMIN_PASSWORD, RunningHub, free_port, spawned_hub
from support.mqtt import MqttDevice

ADMIN_ROUTES = ("/admin/overview", "/admin/devices", "/admin/audit")
MOSQUITTO = shutil.which("mosquitto")


def admin_get(hub: RunningHub, token: str, path: str, **params: Any) -> Any:
    with hub.api(token) as c:
        return ok(c.get(path, params=params))


def devices(hub: RunningHub, token: str, **params: Any) -> dict[str, Any]:
    return dict(admin_get(hub, token, "/admin/devices", limit=100, **params))


def command(hub: RunningHub, user: User, device_id: str, state: bool) -> httpx.Response:
    with hub.api(user.access_token) as c:
        return c.post(f"/devices/{device_id}/relays/0", json={"state": state})


def make_due(url: str, schedule_id: str) -> None:
    """Make a schedule due now, straight in the hub's database, instead of waiting for its
    cron: the scheduler runs it on its next tick."""
    when = (datetime.now(UTC) - timedelta(seconds=1)).replace(microsecond=0)
    if url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(url.split("://", 1)[1], timeout=15)) as db:
            stmt = "UPDATE schedules SET next_execution = ? WHERE id = ?"
            db.execute(stmt, (when.isoformat(" "), schedule_id))
            db.commit()
        return
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            stmt = "UPDATE schedules SET next_execution = $1 WHERE id = $2::uuid"
            await conn.execute(stmt, when, schedule_id)
        finally:
            await conn.close()

    asyncio.run(run())


def test_overview_follows_the_fleet(db_kind: str, tmp_path: Path) -> None:
    """On a fresh hub every number of the overview moves by exactly what was done: a user
    and their organization, a provisioned then claimed device (and its default rule), a
    device that connects, applied and timed-out commands, a rule that fires, a schedule that
    fails because its device went away."""
    admin = {"admin_email": ADMIN_EMAIL, "admin_password": ADMIN_PASSWORD}
    admin["scheduler_tick_s"] = "0.5"
    with spawned_hub(db_kind, tmp_path, **admin) as hub:
        token = admin_token(hub)
        before = admin_get(hub, token, "/admin/overview")
        assert (before["users"], before["orgs"]) == (1, 1), before  # the admin and their own
        assert before["devices"] == {"total": 0, "online": 0, "offline": 0, "unclaimed": 0}
        assert before["commands_24h"] == {"applied": 0, "timeout": 0, "offline": 0, "rejected": 0}
        assert before["schedules"] == {"enabled": 0, "failed_24h": 0}
        assert before["automations"] == {"enabled": 0, "fired_24h": 0}
        assert isinstance(before["broker"]["connections"], int)
        with hub.api() as c:
            assert before["version"] == c.get(hub.base + "/version").json()["version"]
        started = datetime.fromisoformat(before["started_at"].replace("Z", "+00:00"))
        assert started <= datetime.now(UTC) and before["uptime_s"] >= 0

        user = register(hub)
        p = provision(hub)
        lone = provision(hub)  # stays unclaimed
        view = admin_get(hub, token, "/admin/overview")
        assert (view["users"], view["orgs"]) == (2, 2)
        assert view["devices"] == {"total": 2, "online": 0, "offline": 2, "unclaimed": 2}

        dev = claim(hub, user, p["claim_code"])
        m = MqttDevice(hub, p["device_uid"], p["device_token"])
        try:
            assert m.ok()
            expected = {"total": 2, "online": 1, "offline": 1, "unclaimed": 1}
            assert wait_until(
                lambda: admin_get(hub, token, "/admin/overview")["devices"] == expected, 5
            )
            view = admin_get(hub, token, "/admin/overview")
            assert view["broker"]["connections"] == before["broker"]["connections"] + 1
            assert view["automations"] == {"enabled": 1, "fired_24h": 0}  # the default rule

            assert command(hub, user, dev["id"], True).status_code == 200
            m.auto_ack = False
            assert command(hub, user, dev["id"], False).json()["code"] == "device_timeout"
            m.auto_ack = True
            m.event(1, "hold", 10_500)  # the default rule fires: all relays off, applied
            counts = {"applied": 2, "timeout": 1, "offline": 0, "rejected": 0}
            assert wait_until(
                lambda: admin_get(hub, token, "/admin/overview")["commands_24h"] == counts, 8
            ), admin_get(hub, token, "/admin/overview")
            assert wait_until(
                lambda: admin_get(hub, token, "/admin/overview")["automations"]["fired_24h"] == 1
            )
            with hub.api(user.access_token) as c:
                schedule = {
                    "device_id": dev["id"],
                    "name": "Yearly",
                    "cron": "0 0 1 1 *",
                    "timezone": "UTC",
                    "action": {"type": "set_relay", "relay_index": 0, "state": True},
                }
                schedule_id = ok(c.post("/schedules", json=schedule), 201)["id"]
            view = admin_get(hub, token, "/admin/overview")
            assert view["schedules"] == {"enabled": 1, "failed_24h": 0}
        finally:
            m.close()
        # the device is gone: online falls back, the connection count with it
        expected = {"total": 2, "online": 0, "offline": 2, "unclaimed": 1}
        assert wait_until(
            lambda: admin_get(hub, token, "/admin/overview")["devices"] == expected, 8
        )
        assert (
            admin_get(hub, token, "/admin/overview")["broker"]["connections"]
            == before["broker"]["connections"]
        )
        assert lone["device_uid"] != p["device_uid"]

        # the schedule runs while its device is away: one failed run, one offline command
        assert hub.settings.database_url is not None
        make_due(hub.settings.database_url, schedule_id)
        assert wait_until(
            lambda: (
                admin_get(hub, token, "/admin/overview")["schedules"]
                == {"enabled": 1, "failed_24h": 1}
            ),
            8,
        ), admin_get(hub, token, "/admin/overview")
        counts = {"applied": 2, "timeout": 1, "offline": 1, "rejected": 0}
        assert wait_until(
            lambda: admin_get(hub, token, "/admin/overview")["commands_24h"] == counts, 5
        ), admin_get(hub, token, "/admin/overview")


@contextlib.contextmanager
def open_mosquitto(work: Path) -> Iterator[int]:
    """A private Mosquitto that takes anyone, on a free port; its port."""
    assert MOSQUITTO is not None
    port = free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen(
        [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        assert wait_until(listening, 10), "mosquitto did not start"
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")
def test_overview_on_an_external_broker_has_no_connection_count(
    db_kind: str, tmp_path: Path
) -> None:
    """With an external broker the hub cannot count its clients: ``connections`` is null,
    and the rest of the overview is there as usual."""
    with (
        open_mosquitto(tmp_path) as port,
        spawned_hub(
            db_kind,
            tmp_path,
            admin_email=ADMIN_EMAIL,
            admin_password=ADMIN_PASSWORD,
            broker_url=f"mqtt://127.0.0.1:{port}",
        ) as hub,
    ):
        token = admin_token(hub)
        provision(hub)
        view = admin_get(hub, token, "/admin/overview")
        assert view["broker"] == {"connections": None}
        assert view["devices"] == {"total": 1, "online": 0, "offline": 1, "unclaimed": 1}


def test_admin_devices_lists_the_whole_fleet_with_filters(hub: RunningHub, track: Any) -> None:
    """Unclaimed devices are listed with claimed ones of every organization; each filter
    narrows the list; ``q`` finds a uid or a name by substring, in any case."""
    token = admin_token(hub)
    a, b = register(hub), register(hub)
    tag = uuid.uuid4().hex[:8]
    on, m = online_device(hub, a, track)
    off = claimed_device(hub, a)[1]
    with hub.api(a.access_token) as c:
        ok(c.patch(f"/devices/{off['id']}", json={"name": f"Porch {tag} lamp"}))
    theirs = claimed_device(hub, b)[1]
    unclaimed = provision(hub)

    ids = lambda page: {d["id"] for d in page["items"]}  # noqa: E731
    assert ids(devices(hub, token, org_id=a.org_id)) == {on["id"], off["id"]}
    assert ids(devices(hub, token, org_id=b.org_id)) == {theirs["id"]}
    assert ids(devices(hub, token, org_id=a.org_id, online=True)) == {on["id"]}
    assert ids(devices(hub, token, org_id=a.org_id, online=False)) == {off["id"]}
    assert ids(devices(hub, token, org_id=a.org_id, model="hexa-mini-switch-v1")) == {
        on["id"],
        off["id"],
    }
    assert devices(hub, token, org_id=a.org_id, model="no-such-model")["total"] == 0
    assert devices(hub, token, q=tag.upper())["items"] == [
        devices(hub, token, org_id=a.org_id, online=False)["items"][0]
    ]
    found = devices(hub, token, q=unclaimed["device_uid"])
    assert [d["device_uid"] for d in found["items"]] == [unclaimed["device_uid"]]
    assert found["items"][0]["org_id"] is None
    assert devices(hub, token, q=unclaimed["device_uid"], claimed=False)["total"] == 1
    assert devices(hub, token, q=unclaimed["device_uid"], claimed=True)["total"] == 0
    assert devices(hub, token, q=m.uid, claimed=True)["total"] == 1
    unclaimed_page = devices(hub, token, claimed=False)
    assert all(d["org_id"] is None for d in unclaimed_page["items"])
    assert unclaimed_page["total"] >= 1

    # paging: two pages of one over organization a, in creation order, without overlap
    first = admin_get(hub, token, "/admin/devices", org_id=a.org_id, limit=1)
    second = admin_get(hub, token, "/admin/devices", org_id=a.org_id, limit=1, offset=1)
    assert (first["total"], first["has_next"], first["has_prev"]) == (2, True, False)
    assert (second["total"], second["has_next"], second["has_prev"]) == (2, False, True)
    assert [first["items"][0]["id"], second["items"][0]["id"]] == [on["id"], off["id"]]
    assert len(first["items"][0]["relays"]) == 3 and "token_hash" not in first["items"][0]


def test_admin_audit_spans_organizations(hub: RunningHub, track: Any) -> None:
    """The platform admin reads every organization's audit entries, narrowed by org_id,
    actor_id and the filters of /audit; a member reads only their own organization's."""
    token = admin_token(hub)
    a, b = register(hub), register(hub)
    dev_a, _ = online_device(hub, a, track)
    dev_b = claimed_device(hub, b)[1]
    rid = f"req-{uuid.uuid4().hex[:12]}"
    with hub.api(a.access_token, **{"X-Request-ID": rid}) as c:
        assert c.post(f"/devices/{dev_a['id']}/relays/1", json={"state": True}).status_code == 200

    def entries(**params: Any) -> list[dict[str, Any]]:
        page = admin_get(hub, token, "/admin/audit", limit=100, **params)
        return list(page["items"])

    assert wait_until(lambda: entries(request_id=rid), 5)
    [cmd] = entries(request_id=rid)
    assert (cmd["org_id"], cmd["actor_id"], cmd["action"]) == (a.org_id, a.id, "relay_command")
    of_a = entries(org_id=a.org_id)
    assert {e["org_id"] for e in of_a} == {a.org_id}
    assert {"device_claimed", "relay_command"} <= {e["action"] for e in of_a}
    by_b = entries(actor_id=b.id)
    assert [(e["action"], e["device_id"]) for e in by_b] == [
        ("device_claimed", dev_b["id"]),
        ("user_registered", None),
    ]
    assert entries(actor_id=b.id, org_id=a.org_id) == []
    assert entries(org_id=b.org_id, source="api", action="device_claimed") == by_b[:1]
    claims = entries(action="device_claimed", source="api")
    assert {dev_a["id"], dev_b["id"]} <= {e["device_id"] for e in claims}
    newest = [e["at"] for e in of_a]
    assert newest == sorted(newest, reverse=True)
    paged = admin_get(hub, token, "/admin/audit", org_id=a.org_id, limit=1, offset=1)
    assert paged["items"][0]["id"] == of_a[1]["id"] and paged["has_prev"] is True

    # a member of a sees none of b's entries, whichever way they ask
    assert audit(hub, a, org_id=b.org_id)["total"] == 0
    assert audit(hub, a, device_id=dev_b["id"])["total"] == 0
    with hub.api(a.access_token) as c:
        assert_error(c.get("/admin/audit", params={"org_id": b.org_id}), 404, "not_found")


def test_normal_users_get_what_admin_users_gives_them(hub: RunningHub) -> None:
    """A normal user's token gets on every admin route the answer ``/admin/users`` gives it
    (404, as if the route did not exist), whatever the query; no token gets 401."""
    user = register(hub)
    with hub.api(user.access_token) as c:
        reference = c.get("/admin/users")
        assert_error(reference, 404, "not_found")
        for path in ADMIN_ROUTES:
            for params in ({}, {"limit": 0}, {"org_id": "nope"}, {"source": "telepathy"}):
                r = c.get(path, params=params)
                assert (r.status_code, r.json()["code"]) == (404, "not_found"), (path, params)
                assert r.json()["message"] == reference.json()["message"], (path, r.text)
    with hub.api() as c:
        for path in ADMIN_ROUTES:
            assert_error(c.get(path), 401)


def test_bad_filters_are_400(hub: RunningHub) -> None:
    """A malformed filter on either list is a validation error, never a silent empty page."""
    token = admin_token(hub)
    bad: dict[str, list[dict[str, Any]]] = {
        "/admin/devices": [
            {"org_id": "not-a-uuid"},
            {"online": "maybe"},
            {"claimed": "perhaps"},
            {"q": ""},
            {"q": "x" * 201},
            {"model": "m" * 65},
            {"limit": 0},
            {"limit": 101},
            {"offset": -1},
        ],
        "/admin/audit": [
            {"org_id": "not-a-uuid"},
            {"device_id": "not-a-uuid"},
            {"source": "telepathy"},
            {"since": "2026-01-01T00:00:00"},
            {"until": "yesterday"},
            {"actor_id": ""},
            {"actor_id": "a" * 65},
            {"limit": 0},
        ],
    }
    with hub.api(token) as c:
        for path, cases in bad.items():
            for params in cases:
                assert_error(c.get(path, params=params), 400, "validation_error")
