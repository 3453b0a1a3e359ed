"""Schedules over real HTTP and MQTT (contract §2 "Schedules and automations", "Audit";
issue 4): CRUD and validation, tenancy and roles, run-now against real devices, audit,
device removal, the scheduler loop (due runs, grace window, faults) and exactly-once
firing across two hub processes on one PostgreSQL database."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from support.accounts import User, add_member, audit, register
from support.checks import assert_error, wait_until
from support.databases import migrated_database_url, new_database_url
from support.devices import claimed_device, online_device
from support.hubs import RunningHub, spawn_hub, stop_hub

FAR_CRON = "0 0 1 1 *"  # once a year: never due by itself during a test run
READ_ONLY = ("next_execution", "last_execution", "execution_count", "failure_count", "last_result")
PAGE_KEYS = {"items", "total", "limit", "offset", "has_next", "has_prev"}
FAST_TICK_S = 0.5


# --- helpers -------------------------------------------------------------------------------
def body(device: str, **over: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "device_id": device,
        "name": "Porch light",
        "cron": FAR_CRON,
        "timezone": "UTC",
        "action": {"type": "set_relay", "relay_index": 0, "state": True},
    }
    b.update(over)
    return b


def create(hub: RunningHub, user: User, device_id: str, **over: Any) -> dict[str, Any]:
    with hub.api(user.access_token) as c:
        r = c.post("/schedules", json=body(device_id, **over))
    assert r.status_code == 201, r.text
    return dict(r.json())


def get(hub: RunningHub, user: User, schedule_id: str) -> dict[str, Any]:
    with hub.api(user.access_token) as c:
        r = c.get(f"/schedules/{schedule_id}")
    assert r.status_code == 200, r.text
    return dict(r.json())


def ts(value: str | None) -> datetime:
    assert value is not None and value.endswith("Z"), value
    return datetime.fromisoformat(value)


def next_wall_clock(hour: int, minute: int, tz_name: str) -> datetime:
    """The next hh:mm on the wall clock of ``tz_name`` after now, as UTC (non-DST days)."""
    tz = ZoneInfo(tz_name)
    now = datetime.now(UTC)
    cand = datetime.combine(now.astimezone(tz).date(), dtime(hour, minute), tzinfo=tz)
    if cand <= now:
        cand += timedelta(days=1)
    return cand.astimezone(UTC)


def sql(url: str, sqlite_stmt: str, pg_stmt: str, *args: Any) -> None:
    """Run one statement directly in the hub's database (SQLite file or PostgreSQL)."""
    if url.startswith("sqlite"):
        path = url.split("://", 1)[1]
        with contextlib.closing(sqlite3.connect(path, timeout=15)) as db:
            db.executescript(sqlite_stmt) if not args else db.execute(sqlite_stmt, args)
            db.commit()
        return
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            await conn.execute(pg_stmt, *args)
        finally:
            await conn.close()

    asyncio.run(run())


def set_next_execution(url: str, schedule_id: str, when: datetime, *, enable: bool = False) -> None:
    """Write next_execution (and optionally enabled) straight into the schedules table."""
    when = when.astimezone(UTC).replace(microsecond=0)
    if enable:
        lite = "UPDATE schedules SET next_execution = ?, enabled = 1 WHERE id = ?"
        pg = "UPDATE schedules SET next_execution = $1, enabled = TRUE WHERE id = $2::uuid"
    else:
        lite = "UPDATE schedules SET next_execution = ? WHERE id = ?"
        pg = "UPDATE schedules SET next_execution = $1 WHERE id = $2::uuid"
    value: Any = when.isoformat(" ") if url.startswith("sqlite") else when
    sql(url, lite, pg, value, schedule_id)


def serve(url: str, data_dir: Path, log: Path) -> RunningHub:
    """A `hexa serve` process of our own whose scheduler ticks every FAST_TICK_S.

    A process, not start_hub(): one test process holds one hub's database context and the
    session's shared hub is already running there."""
    return spawn_hub(url, data_dir, log=log, scheduler_tick_s=str(FAST_TICK_S))


@pytest.fixture(scope="module")
def fast_hub(db_kind: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningHub]:
    """A hub process of our own whose scheduler ticks every 0.5 s (grace: the default 60 s)."""
    tmp = tmp_path_factory.mktemp(f"sched-{db_kind}")
    url, drop = migrated_database_url(db_kind, tmp)
    h = serve(url, tmp / "data", tmp / "hub.log")
    try:
        yield h
    finally:
        stop_hub(h)
        drop()


def db_url(hub: RunningHub) -> str:
    url = hub.settings.database_url
    assert url
    return url


# --- CRUD ----------------------------------------------------------------------------------
def test_create_answers_201_with_read_only_fields(hub: RunningHub) -> None:
    """Creating answers 201 with the schedule, read-only counters zeroed and next_execution set."""
    user = register(hub)
    _, dev = claimed_device(hub, user)
    s = create(hub, user, dev["id"], cron="30 2 * * *", timezone="Europe/Berlin")
    uuid.UUID(s["id"])
    assert s["device_id"] == dev["id"] and s["name"] == "Porch light"
    assert s["cron"] == "30 2 * * *" and s["timezone"] == "Europe/Berlin"
    assert s["enabled"] is True
    assert s["action"] == {"type": "set_relay", "relay_index": 0, "state": True}
    assert set(READ_ONLY) <= set(s)
    assert s["last_execution"] is None and s["last_result"] is None
    assert s["execution_count"] == 0 and s["failure_count"] == 0
    assert ts(s["next_execution"]) == next_wall_clock(2, 30, "Europe/Berlin")
    plain = body(dev["id"], cron="0 7 * * *")
    del plain["timezone"]
    with hub.api(user.access_token) as c:
        r = c.post("/schedules", json=plain)
    assert r.status_code == 201, r.text
    assert r.json()["timezone"] == "UTC"
    assert ts(r.json()["next_execution"]) == next_wall_clock(7, 0, "UTC")


def test_next_execution_is_computed_in_the_schedules_timezone(hub: RunningHub) -> None:
    """One cron gives different next_execution instants in different zones; PATCH recomputes."""
    user = register(hub)
    _, dev = claimed_device(hub, user)
    got = {
        tz: ts(create(hub, user, dev["id"], cron="30 2 * * *", timezone=tz)["next_execution"])
        for tz in ("UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata")
    }
    for tz, when in got.items():
        assert when == next_wall_clock(2, 30, tz), tz
        assert when.astimezone(ZoneInfo(tz)).strftime("%H:%M") == "02:30"
    s = create(hub, user, dev["id"], cron="0 7 * * *")
    assert ts(s["next_execution"]) == next_wall_clock(7, 0, "UTC")
    with hub.api(user.access_token) as c:
        r = c.patch(f"/schedules/{s['id']}", json={"timezone": "America/New_York"})
        assert r.status_code == 200, r.text
        assert ts(r.json()["next_execution"]) == next_wall_clock(7, 0, "America/New_York")
        r = c.patch(f"/schedules/{s['id']}", json={"cron": "15 18 * * *"})
        assert r.status_code == 200, r.text
        assert ts(r.json()["next_execution"]) == next_wall_clock(18, 15, "America/New_York")


def test_get_patch_delete(hub: RunningHub) -> None:
    """GET returns the schedule, PATCH changes it (disable clears next run), DELETE answers 204."""
    user = register(hub)
    _, dev = claimed_device(hub, user)
    s = create(hub, user, dev["id"])
    with hub.api(user.access_token) as c:
        assert c.get(f"/schedules/{s['id']}").json() == s
        r = c.patch(
            f"/schedules/{s['id']}",
            json={"name": "Evening", "action": {"type": "set_all_relays", "state": False}},
        )
        assert r.status_code == 200, r.text
        p = r.json()
        assert p["name"] == "Evening"
        assert p["action"] == {"type": "set_all_relays", "state": False}
        assert p["next_execution"] == s["next_execution"]  # timing unchanged
        r = c.patch(f"/schedules/{s['id']}", json={"enabled": False})
        assert r.status_code == 200 and r.json()["enabled"] is False
        assert r.json()["next_execution"] is None
        r = c.patch(f"/schedules/{s['id']}", json={"enabled": True})
        assert r.status_code == 200 and r.json()["enabled"] is True
        assert r.json()["next_execution"] == s["next_execution"]
        assert c.get(f"/schedules/{s['id']}").json()["name"] == "Evening"
        r = c.delete(f"/schedules/{s['id']}")
        assert r.status_code == 204 and not r.content
        assert_error(c.get(f"/schedules/{s['id']}"), 404, "not_found")
        assert_error(c.delete(f"/schedules/{s['id']}"), 404, "not_found")


def test_list_paginates_and_filters(hub: RunningHub) -> None:
    """GET /schedules pages (limit/offset, has_next/has_prev), filters by device_id and enabled."""
    user, other = register(hub), register(hub)
    _, a = claimed_device(hub, user)
    _, b = claimed_device(hub, user)
    ids_a = [create(hub, user, a["id"], name=f"a{i}")["id"] for i in range(3)]
    ids_b = [create(hub, user, b["id"], name=f"b{i}")["id"] for i in range(2)]
    create(hub, user, a["id"], name="off", enabled=False)
    _, theirs = claimed_device(hub, other)
    create(hub, other, theirs["id"])
    with hub.api(user.access_token) as c:
        first = c.get("/schedules", params={"limit": 2}).json()
        assert set(first) >= PAGE_KEYS
        assert first["total"] == 6 and len(first["items"]) == 2
        assert first["limit"] == 2 and first["offset"] == 0
        assert first["has_next"] is True and first["has_prev"] is False
        last = c.get("/schedules", params={"limit": 2, "offset": 4}).json()
        assert len(last["items"]) == 2 and last["has_next"] is False and last["has_prev"] is True
        seen = {
            i["id"]
            for p in (0, 2, 4)
            for i in c.get("/schedules", params={"limit": 2, "offset": p}).json()["items"]
        }
        assert len(seen) == 6 and set(ids_a + ids_b) <= seen
        by_a = c.get("/schedules", params={"device_id": a["id"]}).json()
        assert by_a["total"] == 4 and {i["device_id"] for i in by_a["items"]} == {a["id"]}
        by_b = c.get("/schedules", params={"device_id": b["id"], "enabled": "true"}).json()
        assert {i["id"] for i in by_b["items"]} == set(ids_b)
        off = c.get("/schedules", params={"enabled": "false"}).json()
        assert off["total"] == 1 and off["items"][0]["name"] == "off"
        on = c.get("/schedules", params={"enabled": "true"}).json()
        assert on["total"] == 5 and all(i["enabled"] for i in on["items"])
        assert c.get("/schedules", params={"device_id": theirs["id"]}).json()["total"] == 0
        for bad in ({"limit": 0}, {"limit": 101}, {"offset": -1}, {"device_id": "nope"}):
            assert_error(c.get("/schedules", params=bad), 400, "validation_error")


# --- validation ----------------------------------------------------------------------------
BAD_BODIES: list[tuple[str, dict[str, Any]]] = [
    ("cron garbage", {"cron": "every day at noon"}),
    ("cron six fields", {"cron": "0 0 0 * * *"}),
    ("cron minute 61", {"cron": "61 * * * *"}),
    ("cron weekday 8", {"cron": "0 0 * * 8"}),
    ("impossible date 31 Feb", {"cron": "0 0 31 2 *"}),
    ("impossible date 31 Apr", {"cron": "0 0 31 4 *"}),
    ("empty cron", {"cron": ""}),
    ("unknown timezone", {"timezone": "Mars/Olympus_Mons"}),
    ("offset is not a zone", {"timezone": "+02:00"}),
    (
        "relay_index = relay_count",
        {"action": {"type": "set_relay", "relay_index": 3, "state": True}},
    ),
    ("relay_index negative", {"action": {"type": "set_relay", "relay_index": -1, "state": True}}),
    ("unknown action type", {"action": {"type": "explode", "state": True}}),
    ("action without type", {"action": {"relay_index": 0, "state": True}}),
    ("state not a bool", {"action": {"type": "set_all_relays", "state": "sometimes"}}),
    ("extra action field", {"action": {"type": "set_all_relays", "state": True, "x": 1}}),
    ("extra field", {"colour": "blue"}),
    ("read-only field", {"execution_count": 5}),
    ("read-only next_execution", {"next_execution": "2030-01-01T00:00:00Z"}),
    ("device_id not a uuid", {"device_id": "lamp"}),
]


@pytest.mark.parametrize(("why", "change"), BAD_BODIES, ids=[w for w, _ in BAD_BODIES])
def test_invalid_create_is_400(hub: RunningHub, why: str, change: dict[str, Any]) -> None:
    """Invalid cron, impossible dates, unknown zones, bad actions and extra fields → 400."""
    user = register(hub)
    _, dev = claimed_device(hub, user)
    with hub.api(user.access_token) as c:
        assert_error(c.post("/schedules", json=body(dev["id"], **change)), 400, "validation_error")
        assert c.get("/schedules").json()["total"] == 0, why


def test_invalid_patch_is_400_and_changes_nothing(hub: RunningHub) -> None:
    """PATCH with bad cron, zone, relay index, null or extra field → 400; nothing changes."""
    user = register(hub)
    _, dev = claimed_device(hub, user)
    s = create(hub, user, dev["id"])
    with hub.api(user.access_token) as c:
        for change in (
            {"cron": "0 0 31 2 *"},
            {"cron": "* * * * * *"},
            {"timezone": "Europe/Atlantis"},
            {"action": {"type": "set_relay", "relay_index": 7, "state": False}},
            {"action": {"type": "warp"}},
            {"enabled": None},
            {"last_result": "applied"},
        ):
            assert_error(c.patch(f"/schedules/{s['id']}", json=change), 400, "validation_error")
        assert c.get(f"/schedules/{s['id']}").json() == s


# --- tenancy and roles -----------------------------------------------------------------------
def test_other_tenants_device_and_schedule_are_404(hub: RunningHub) -> None:
    """Another tenant's device cannot be scheduled; another tenant's schedule is 404 everywhere."""
    owner, mallory = register(hub), register(hub)
    _, dev = claimed_device(hub, owner)
    _, own_dev = claimed_device(hub, mallory)
    s = create(hub, owner, dev["id"])
    with hub.api(mallory.access_token) as c:
        assert_error(c.post("/schedules", json=body(dev["id"])), 404, "not_found")
        assert_error(c.post("/schedules", json=body(str(uuid.uuid4()))), 404, "not_found")
        assert_error(c.get(f"/schedules/{s['id']}"), 404, "not_found")
        assert_error(c.patch(f"/schedules/{s['id']}", json={"name": "x"}), 404, "not_found")
        assert_error(c.post(f"/schedules/{s['id']}/run"), 404, "not_found")
        assert_error(c.delete(f"/schedules/{s['id']}"), 404, "not_found")
        assert c.get("/schedules").json()["total"] == 0
        assert audit_total(c, s["id"]) == 0
        mine = c.post("/schedules", json=body(own_dev["id"])).json()
        moved = c.patch(f"/schedules/{mine['id']}", json={"device_id": dev["id"]})
        assert_error(moved, 404, "not_found")
    with hub.api(owner.access_token) as c:
        moved = c.patch(f"/schedules/{s['id']}", json={"device_id": own_dev["id"]})
        assert_error(moved, 404, "not_found")
    assert get(hub, owner, s["id"]) == s


def audit_total(c: httpx.Client, schedule_id: str) -> int:
    r = c.get("/audit", params={"schedule_id": schedule_id})
    assert r.status_code == 200, r.text
    return int(r.json()["total"])


@pytest.mark.parametrize("role", ["viewer", "operator"])
def test_viewer_and_operator_can_read_but_not_change(hub: RunningHub, role: str) -> None:
    """viewer and operator members read schedules but get 403 on create, patch, delete and run."""
    owner, member = register(hub), register(hub)
    add_member(hub, owner, member, role)
    _, dev = claimed_device(hub, owner)
    s = create(hub, owner, dev["id"])
    with hub.api(member.access_token) as c:
        assert c.get(f"/schedules/{s['id']}").json() == s
        assert s["id"] in {i["id"] for i in c.get("/schedules").json()["items"]}
        assert_error(c.post("/schedules", json=body(dev["id"])), 403, "forbidden")
        assert_error(c.patch(f"/schedules/{s['id']}", json={"name": "x"}), 403, "forbidden")
        assert_error(c.post(f"/schedules/{s['id']}/run"), 403, "forbidden")
        assert_error(c.delete(f"/schedules/{s['id']}"), 403, "forbidden")
    after = get(hub, owner, s["id"])
    assert after == s and after["execution_count"] == 0


def test_manager_can_manage_schedules(hub: RunningHub) -> None:
    """A manager member creates, patches, runs and deletes schedules of the org's devices."""
    owner, manager = register(hub), register(hub)
    add_member(hub, owner, manager, "manager")
    _, dev = claimed_device(hub, owner)
    with hub.api(manager.access_token) as c:
        r = c.post("/schedules", json=body(dev["id"]))
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        r = c.patch(f"/schedules/{sid}", json={"name": "Managed"})
        assert r.status_code == 200 and r.json()["name"] == "Managed"
        r = c.post(f"/schedules/{sid}/run")
        assert r.status_code == 200, r.text
        assert r.json()["execution_count"] == 1
        assert c.delete(f"/schedules/{sid}").status_code == 204
    with hub.api(owner.access_token) as c:
        assert_error(c.get(f"/schedules/{sid}"), 404, "not_found")


# --- run now ---------------------------------------------------------------------------------
def test_run_now_switches_a_real_device(hub: RunningHub, track: Callable[[Any], Any]) -> None:
    """POST /schedules/{id}/run switches the relay of an online device and records applied."""
    user = register(hub)
    dev, m = online_device(hub, user, track)
    s = create(hub, user, dev["id"], action={"type": "set_relay", "relay_index": 1, "state": True})
    with hub.api(user.access_token) as c:
        r = c.post(f"/schedules/{s['id']}/run")
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["execution_count"] == 1 and out["last_result"] == "applied"
        assert out["failure_count"] == 0
        assert ts(out["last_execution"]) > datetime.now(UTC) - timedelta(seconds=30)
        assert out["next_execution"] == s["next_execution"]  # run-now keeps the timing
        assert m.relays == [False, True, False]
        assert [(x["type"], x.get("relay_index"), x["state"]) for x in m.commands] == [
            ("set_relay", 1, True)
        ]
        state = c.get(f"/devices/{dev['id']}/state").json()
        assert state["relays"] == [False, True, False]
        all_off = create(hub, user, dev["id"], action={"type": "set_all_relays", "state": True})
        r = c.post(f"/schedules/{all_off['id']}/run")
        assert r.status_code == 200 and r.json()["last_result"] == "applied"
        assert m.relays == [True, True, True]
        assert get(hub, user, s["id"])["execution_count"] == 1


def test_run_now_offline_device_records_offline(hub: RunningHub) -> None:
    """Running a schedule of an offline device records last_result offline and a failure."""
    user = register(hub)
    _, dev = claimed_device(hub, user)
    s = create(hub, user, dev["id"])
    with hub.api(user.access_token) as c:
        r = c.post(f"/schedules/{s['id']}/run")
        assert r.status_code == 200, r.text
        out = r.json()
    assert out["last_result"] == "offline"
    assert out["execution_count"] == 1 and out["failure_count"] == 1
    assert out["last_execution"] is not None
    again = get(hub, user, s["id"])
    assert again["last_result"] == "offline" and again["failure_count"] == 1


def test_every_run_is_audited_with_source_schedule(
    hub: RunningHub, track: Callable[[Any], Any]
) -> None:
    """Each run appears once in GET /audit?schedule_id= with source schedule and its outcome."""
    user = register(hub)
    dev, _m = online_device(hub, user, track)
    _, offline = claimed_device(hub, user)
    s = create(hub, user, dev["id"], action={"type": "set_relay", "relay_index": 2, "state": True})
    s_off = create(hub, user, offline["id"])
    with hub.api(user.access_token) as c:
        for _ in range(2):
            assert c.post(f"/schedules/{s['id']}/run").json()["last_result"] == "applied"
        assert c.post(f"/schedules/{s_off['id']}/run").json()["last_result"] == "offline"

    def runs(sid: str, n: int) -> list[dict[str, Any]]:
        items = audit(hub, user, schedule_id=sid, action="schedule_run")["items"]
        return items if len(items) >= n else []

    entries = wait_until(lambda: runs(s["id"], 2), 5)
    assert len(entries) == 2, entries
    for e in entries:
        assert e["source"] == "schedule" and e["schedule_id"] == s["id"]
        assert e["device_id"] == dev["id"] and e["action"] == "schedule_run"
        assert e["details"]["status"] == "applied"
        assert e["at"].endswith("Z")
    off = wait_until(lambda: runs(s_off["id"], 1), 5)
    assert len(off) == 1 and off[0]["details"]["status"] == "offline"
    assert off[0]["source"] == "schedule" and off[0]["device_id"] == offline["id"]
    by_source = audit(hub, user, schedule_id=s["id"], source="schedule")["items"]
    assert by_source and all(e["schedule_id"] == s["id"] for e in by_source)
    everything = audit(hub, user, schedule_id=s["id"])["items"]
    by_api = [e["action"] for e in everything if e["source"] != "schedule"]
    assert by_api == ["schedule_created"], everything  # the user's change, source api
    assert audit(hub, register(hub), schedule_id=s["id"])["total"] == 0


def test_run_now_is_idempotent_and_carries_the_request_id(
    hub: RunningHub, track: Callable[[Any], Any]
) -> None:
    """A replayed run-now (same Idempotency-Key) does not run again; audit has the request id."""
    user = register(hub)
    dev, m = online_device(hub, user, track)
    s = create(hub, user, dev["id"], action={"type": "set_relay", "relay_index": 0, "state": True})
    rid = f"req-{uuid.uuid4().hex[:12]}"
    key = uuid.uuid4().hex
    with hub.api(user.access_token, **{"X-Request-ID": rid, "Idempotency-Key": key}) as c:
        first = c.post(f"/schedules/{s['id']}/run")
        assert first.status_code == 200, first.text
        assert first.headers["X-Request-ID"] == rid
        again = c.post(f"/schedules/{s['id']}/run")
        assert again.status_code == 200 and again.headers.get("Idempotency-Replayed") == "true"
        assert again.json() == first.json()
    assert get(hub, user, s["id"])["execution_count"] == 1
    assert len(m.commands) == 1
    entries = wait_until(
        lambda: audit(hub, user, schedule_id=s["id"], action="schedule_run")["items"], 5
    )
    assert len(entries) == 1
    assert entries[0]["request_id"] == rid, entries[0]


# --- device removal --------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["release", "delete"])
def test_removing_the_device_disables_its_schedules(hub: RunningHub, how: str) -> None:
    """Releasing or deleting a device disables its schedules (last_result device_removed)."""
    user = register(hub)
    _, dev = claimed_device(hub, user)
    _, keep = claimed_device(hub, user)
    gone = [create(hub, user, dev["id"], name=f"s{i}") for i in range(2)]
    kept = create(hub, user, keep["id"])
    with hub.api(user.access_token) as c:
        if how == "release":
            assert c.post(f"/devices/{dev['id']}/release").status_code == 200
        else:
            assert c.delete(f"/devices/{dev['id']}").status_code == 204
        for s in gone:
            now = c.get(f"/schedules/{s['id']}").json()
            assert now["enabled"] is False and now["last_result"] == "device_removed", now
            r = c.post(f"/schedules/{s['id']}/run")  # a run now must not crash
            assert r.status_code == 200, r.text
            assert r.json()["last_result"] == "device_removed" and r.json()["enabled"] is False
            assert_error(c.patch(f"/schedules/{s['id']}", json={"enabled": True}), 404, "not_found")
        assert c.get(f"/schedules/{kept['id']}").json() == kept
        assert c.get("/schedules", params={"enabled": "false"}).json()["total"] == 2


def test_renaming_the_device_keeps_its_schedules(hub: RunningHub) -> None:
    """Renaming a device or its relays changes nothing about the schedules that use it."""
    user = register(hub)
    _, dev = claimed_device(hub, user)
    s = create(hub, user, dev["id"])
    with hub.api(user.access_token) as c:
        body = {"name": "Porch", "relay_names": ["Lamp", None, "Fan"]}
        assert c.patch(f"/devices/{dev['id']}", json=body).status_code == 200
        assert c.get(f"/schedules/{s['id']}").json() == s


@pytest.mark.parametrize("how", ["release", "delete"])
def test_schedule_disabled_by_device_removal_has_no_next_execution(
    hub: RunningHub, how: str
) -> None:
    """Like a schedule disabled by PATCH, one disabled by device removal shows no next run."""
    user = register(hub)
    _, dev = claimed_device(hub, user)
    by_patch = create(hub, user, dev["id"])
    by_removal = create(hub, user, dev["id"])
    with hub.api(user.access_token) as c:
        r = c.patch(f"/schedules/{by_patch['id']}", json={"enabled": False})
        assert r.status_code == 200 and r.json()["next_execution"] is None
        if how == "release":
            assert c.post(f"/devices/{dev['id']}/release").status_code == 200
        else:
            assert c.delete(f"/devices/{dev['id']}").status_code == 204
        now = c.get(f"/schedules/{by_removal['id']}").json()
    assert now["enabled"] is False and now["last_result"] == "device_removed"
    assert now["next_execution"] is None, now


# --- the scheduler loop ----------------------------------------------------------------------
def test_due_schedule_fires_once_within_a_tick(
    fast_hub: RunningHub, track: Callable[[Any], Any]
) -> None:
    """A schedule made due fires within a tick, exactly once, and moves next_execution ahead."""
    user = register(fast_hub)
    dev, m = online_device(fast_hub, user, track)
    s = create(fast_hub, user, dev["id"], cron="*/30 * * * *")
    due_at = datetime.now(UTC) - timedelta(seconds=2)
    set_next_execution(db_url(fast_hub), s["id"], due_at)
    made_due = time.monotonic()
    fired = wait_until(lambda: get(fast_hub, user, s["id"])["execution_count"] >= 1, 10)
    elapsed = time.monotonic() - made_due
    assert fired, get(fast_hub, user, s["id"])
    assert elapsed < FAST_TICK_S + 3, elapsed
    assert wait_until(lambda: m.relays[0], 3)
    time.sleep(FAST_TICK_S * 4)  # bounded: a second firing must NOT happen
    after = get(fast_hub, user, s["id"])
    assert after["execution_count"] == 1 and after["last_result"] == "applied"
    assert after["failure_count"] == 0
    assert ts(after["next_execution"]) > datetime.now(UTC)
    assert ts(after["next_execution"]).minute in (0, 30)
    assert len(m.commands) == 1 and m.relays == [True, False, False]
    entries = wait_until(
        lambda: audit(fast_hub, user, schedule_id=s["id"], action="schedule_run")["items"], 5
    )
    assert len(entries) == 1 and entries[0]["details"]["status"] == "applied"
    assert entries[0]["source"] == "schedule"


def test_run_older_than_grace_is_recorded_missed(
    fast_hub: RunningHub, track: Callable[[Any], Any]
) -> None:
    """A due run older than the grace window (60 s) is recorded as missed and sends no command."""
    user = register(fast_hub)
    dev, m = online_device(fast_hub, user, track)
    s = create(fast_hub, user, dev["id"], cron="*/30 * * * *")
    set_next_execution(db_url(fast_hub), s["id"], datetime.now(UTC) - timedelta(seconds=120))
    seen = wait_until(lambda: get(fast_hub, user, s["id"])["last_result"] == "missed", 10)
    assert seen, get(fast_hub, user, s["id"])
    time.sleep(FAST_TICK_S * 3)  # bounded: no command may follow
    after = get(fast_hub, user, s["id"])
    assert after["last_result"] == "missed" and after["enabled"] is True
    assert after["execution_count"] == 0 and after["last_execution"] is None
    assert ts(after["next_execution"]) > datetime.now(UTC)
    assert m.commands == [] and m.relays == [False, False, False]
    entries = wait_until(
        lambda: audit(fast_hub, user, schedule_id=s["id"], action="schedule_run")["items"], 5
    )
    assert len(entries) == 1 and entries[0]["details"]["status"] == "missed"


def test_run_within_grace_fires_once(fast_hub: RunningHub, track: Callable[[Any], Any]) -> None:
    """A run missed by less than the grace window (e.g. a hub restart) still fires, once."""
    user = register(fast_hub)
    dev, m = online_device(fast_hub, user, track)
    s = create(
        fast_hub,
        user,
        dev["id"],
        cron="* * * * *",
        action={"type": "set_all_relays", "state": True},
    )
    # several occurrences of "* * * * *" were skipped: the hub fires once, not once per minute
    set_next_execution(db_url(fast_hub), s["id"], datetime.now(UTC) - timedelta(seconds=45))
    assert wait_until(lambda: get(fast_hub, user, s["id"])["execution_count"] >= 1, 10)
    assert wait_until(lambda: m.relays == [True, True, True], 3)
    after = get(fast_hub, user, s["id"])
    assert after["execution_count"] == 1 and after["last_result"] == "applied"
    assert ts(after["next_execution"]) > datetime.now(UTC)
    assert len(m.commands) == 1


def test_loop_survives_a_schedule_whose_device_is_gone(
    fast_hub: RunningHub, track: Callable[[Any], Any]
) -> None:
    """A due schedule of a deleted device is disabled as device_removed; others still fire."""
    user = register(fast_hub)
    _, gone = claimed_device(fast_hub, user)
    dev, m = online_device(fast_hub, user, track)
    orphan = create(fast_hub, user, gone["id"])
    live = create(fast_hub, user, dev["id"])
    with fast_hub.api(user.access_token) as c:
        assert c.delete(f"/devices/{gone['id']}").status_code == 204
    assert get(fast_hub, user, orphan["id"])["enabled"] is False
    # the race the loop must survive: re-enabled and due although its device is gone
    past = datetime.now(UTC) - timedelta(seconds=2)
    set_next_execution(db_url(fast_hub), orphan["id"], past, enable=True)
    set_next_execution(db_url(fast_hub), live["id"], past)
    assert wait_until(lambda: get(fast_hub, user, live["id"])["execution_count"] == 1, 10)
    assert wait_until(lambda: m.relays[0], 3)
    o = wait_until(lambda: (x := get(fast_hub, user, orphan["id"]))["enabled"] is False and x, 10)
    assert o and o["last_result"] == "device_removed", o
    assert o["execution_count"] == 0
    later = datetime.now(UTC) - timedelta(seconds=1)
    set_next_execution(db_url(fast_hub), live["id"], later)
    assert wait_until(lambda: get(fast_hub, user, live["id"])["execution_count"] == 2, 10)


def test_database_error_in_one_run_does_not_stop_the_loop(
    fast_hub: RunningHub, track: Callable[[Any], Any]
) -> None:
    """A database error while recording one run (injected by a trigger) leaves the loop running."""
    user = register(fast_hub)
    dev, m = online_device(fast_hub, user, track)
    bad = create(
        fast_hub, user, dev["id"], action={"type": "set_relay", "relay_index": 2, "state": True}
    )
    good = create(fast_hub, user, dev["id"])
    url = db_url(fast_hub)
    trigger = f"hexa_test_boom_{uuid.uuid4().hex[:8]}"
    sql(
        url,
        f"CREATE TRIGGER {trigger} BEFORE UPDATE OF last_result ON schedules "
        f"WHEN NEW.id = '{bad['id']}' BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
        f"CREATE FUNCTION {trigger}() RETURNS trigger AS $$ BEGIN "
        f"RAISE EXCEPTION 'injected failure'; END $$ LANGUAGE plpgsql; "
        f"CREATE TRIGGER {trigger} BEFORE UPDATE OF last_result ON schedules FOR EACH ROW "
        f"WHEN (NEW.id = '{bad['id']}'::uuid) EXECUTE FUNCTION {trigger}();",
    )
    try:
        past = datetime.now(UTC) - timedelta(seconds=2)
        set_next_execution(url, bad["id"], past)
        set_next_execution(url, good["id"], past)
        assert wait_until(lambda: get(fast_hub, user, good["id"])["execution_count"] == 1, 10)
        assert wait_until(lambda: m.relays == [True, False, True], 3)  # both intents went out
        time.sleep(FAST_TICK_S * 3)  # bounded: the failed one is not retried in a loop
        assert sum(1 for x in m.commands if x.get("relay_index") == 2) == 1
        failed = get(fast_hub, user, bad["id"])
        assert failed["execution_count"] == 0, "the injected fault did not take effect"
        assert ts(failed["next_execution"]) > datetime.now(UTC)
    finally:
        sql(
            url,
            f"DROP TRIGGER IF EXISTS {trigger};",
            f"DROP TRIGGER IF EXISTS {trigger} ON schedules; DROP FUNCTION IF EXISTS {trigger}();",
        )
    set_next_execution(url, good["id"], datetime.now(UTC) - timedelta(seconds=1))
    assert wait_until(lambda: get(fast_hub, user, good["id"])["execution_count"] == 2, 10)


# --- exactly once across two hub processes (PostgreSQL) ------------------------------------
def schedule_runs_metric(hub: RunningHub) -> float:
    """Schedule runs recorded by one hub process (Prometheus counter, all outcomes)."""
    text = httpx.get(hub.base + "/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("hexa_schedule_runs_total{")
    )


def _pg_rows(url: str, query: str) -> list[Any]:
    import asyncpg

    async def run() -> list[Any]:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return list(await conn.fetch(query))
        finally:
            await conn.close()

    return asyncio.run(run())


def test_exactly_once_across_two_instances(db_kind: str, tmp_path: Path) -> None:
    """Two hub processes on one PostgreSQL fire each due schedule exactly once between them."""
    if db_kind != "postgres":
        pytest.skip("several hub instances share a database only on PostgreSQL")
    url, drop = new_database_url("postgres", tmp_path)
    hubs: list[RunningHub] = []
    try:
        for name in ("a", "b"):  # one after the other: the first one migrates
            hubs.append(serve(url, tmp_path / name, tmp_path / f"{name}.log"))
        a, b = hubs
        user = register(a)
        devices = [claimed_device(a, user)[1] for _ in range(3)]
        ids = [create(a, user, devices[i % 3]["id"], name=f"s{i}")["id"] for i in range(30)]
        assert get(b, user, ids[0])["id"] == ids[0]  # both instances see the same database
        sql(url, "", "UPDATE schedules SET next_execution = now() - interval '5 seconds'")

        def pending() -> int:
            return int(
                _pg_rows(url, "SELECT count(*) AS n FROM schedules WHERE last_execution IS NULL")[
                    0
                ]["n"]
            )

        assert wait_until(lambda: pending() == 0, 30, 0.2), f"{pending()} never ran"
        time.sleep(FAST_TICK_S * 3)  # bounded: a late duplicate must NOT appear
        with b.api(user.access_token) as c:
            page = c.get("/schedules", params={"limit": 100}).json()
        assert page["total"] == 30
        for s in page["items"]:
            assert s["execution_count"] == 1, s
            assert s["last_result"] == "offline", s
            assert ts(s["next_execution"]) > datetime.now(UTC)

        def audited() -> dict[str, int]:
            rows = _pg_rows(
                url,
                "SELECT schedule_id::text AS sid, count(*) AS n FROM audit_log "
                "WHERE action = 'schedule_run' GROUP BY schedule_id",
            )
            return {r["sid"]: int(r["n"]) for r in rows}

        assert wait_until(lambda: len(audited()) == 30, 10)
        counts = audited()
        assert counts == dict.fromkeys(ids, 1), counts
        with a.api(user.access_token) as c:
            for sid in ids[:5]:  # and the API agrees
                r = c.get("/audit", params={"schedule_id": sid, "action": "schedule_run"})
                assert r.json()["total"] == 1 and r.json()["items"][0]["source"] == "schedule"
        per_instance = [schedule_runs_metric(h) for h in (a, b)]
        assert sum(per_instance) == 30, per_instance  # no process ran one twice
        for h in hubs:
            assert h.proc.poll() is None, "a hub process died"
    finally:
        for h in hubs:
            stop_hub(h)
        drop()
    for name in ("a", "b"):
        text = (tmp_path / f"{name}.log").read_text(errors="replace")
        assert "Traceback" not in text, text


def test_crash_and_restart_fires_a_due_run_once(db_kind: str, tmp_path: Path) -> None:
    """A hub killed (SIGKILL) while a run is due fires it once after restart, never again."""
    url, drop = migrated_database_url(db_kind, tmp_path)
    data = tmp_path / "data"
    h = serve(url, data, tmp_path / "first.log")
    try:
        user = register(h)
        _, dev = claimed_device(h, user)
        s = create(
            h, user, dev["id"], cron="0 12 1 1 *", action={"type": "set_all_relays", "state": True}
        )
        h.proc.kill()
        h.proc.wait(10)
        set_next_execution(url, s["id"], datetime.now(UTC) - timedelta(seconds=5))
        h = serve(url, data, tmp_path / "second.log")
        assert wait_until(lambda: get(h, user, s["id"])["execution_count"] == 1, 15)
        stop_hub(h)  # a clean restart right after: the run is not repeated
        h = serve(url, data, tmp_path / "third.log")
        with h.api(user.access_token) as c:
            assert wait_until(lambda: c.get("/readyz").status_code in (200, 404), 5)
        runs = audit(h, user, schedule_id=s["id"], action="schedule_run")
        assert runs["total"] == 1, [(e["action"], e["details"]) for e in runs["items"]]
        after = get(h, user, s["id"])
        assert after["execution_count"] == 1 and after["last_result"] == "offline"
        assert ts(after["next_execution"]) > datetime.now(UTC)
    finally:
        stop_hub(h)
        drop()
