"""Automations over real HTTP, MQTT and WebSocket (contract §2 "Schedules and automations",
"Audit", §4 ``automation_fired``; issue 4): CRUD and validation, tenancy and roles, the
default hold rule on real MQTT devices, triggers, conditions, cooldown and dedupe, run
history and audit, WebSocket notifications, loop safety, device release and bad payloads.

Negative checks ("this did not fire") use a *sentinel*: the engine handles a device's events
in order, so once a rule triggered by a later event of the same device has a run, every
earlier event was evaluated. A short bounded wait (≤ 0.5 s) only backs up such checks."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from support.accounts import User, add_member, audit, register
from support.checks import NEGATIVE_WAIT_S, assert_error, error_shape_ok, wait_until
from support.devices import claimed_device, online_device, state_of
from support.hubs import RunningHub
from support.mqtt import MqttDevice
from support.ws import ws_client

AUDIT_KEYS = {
    "id",
    "at",
    "actor_type",
    "actor_id",
    "source",
    "action",
    "device_id",
    "details",
    "automation_id",
    "schedule_id",
    "request_id",
}
PAGE_KEYS = {"items", "total", "limit", "offset", "has_next", "has_prev"}
RULE_KEYS = {
    "id",
    "org_id",
    "device_id",
    "name",
    "enabled",
    "trigger",
    "conditions",
    "actions",
    "cooldown_s",
    "dedupe_window_ms",
    "is_default",
    "last_fired_at",
    "fire_count",
}


# --- REST helpers --------------------------------------------------------------------------
def press_rule(trigger_dev: str, target_dev: str, **over: Any) -> dict[str, Any]:
    """input 0 pressed on ``trigger_dev`` → relay 0 of ``target_dev`` on."""
    b: dict[str, Any] = {
        "name": "Press to switch",
        "trigger": {
            "type": "input_event",
            "device_id": trigger_dev,
            "input_index": 0,
            "event": "press",
        },
        "actions": [
            {"type": "set_relay", "device_id": target_dev, "relay_index": 0, "state": True}
        ],
    }
    b.update(over)
    return b


def create(hub: RunningHub, user: User, body: dict[str, Any]) -> dict[str, Any]:
    with hub.api(user.access_token) as c:
        r = c.post("/automations", json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


def get_rule(hub: RunningHub, user: User, rule_id: str) -> dict[str, Any]:
    with hub.api(user.access_token) as c:
        r = c.get(f"/automations/{rule_id}")
    assert r.status_code == 200, r.text
    return dict(r.json())


def patch(hub: RunningHub, user: User, rule_id: str, body: dict[str, Any]) -> dict[str, Any]:
    with hub.api(user.access_token) as c:
        r = c.patch(f"/automations/{rule_id}", json=body)
    assert r.status_code == 200, r.text
    return dict(r.json())


def rules_of(hub: RunningHub, user: User, device_id: str, **params: Any) -> dict[str, Any]:
    with hub.api(user.access_token) as c:
        r = c.get("/automations", params={"device_id": device_id, **params})
    assert r.status_code == 200, r.text
    return dict(r.json())


def default_rule_of(hub: RunningHub, user: User, device_id: str) -> dict[str, Any]:
    items = [r for r in rules_of(hub, user, device_id, limit=100)["items"] if r["is_default"]]
    assert len(items) == 1, items
    return items[0]


def runs(hub: RunningHub, user: User, rule_id: str, **params: Any) -> dict[str, Any]:
    with hub.api(user.access_token) as c:
        r = c.get(f"/automations/{rule_id}/runs", params=params)
    assert r.status_code == 200, r.text
    return dict(r.json())


def wait_runs(hub: RunningHub, user: User, rule_id: str, n: int, t: float = 8) -> list[Any]:
    """The rule's runs (newest first) once there are at least ``n``."""
    got = wait_until(
        lambda: (lambda b: b["items"] if b["total"] >= n else None)(
            runs(hub, user, rule_id, limit=100)
        ),
        t,
    )
    assert got, f"rule {rule_id} has fewer than {n} runs: {runs(hub, user, rule_id)}"
    return list(got)


def set_relay(hub: RunningHub, user: User, device_id: str, index: int, state: Any) -> None:
    with hub.api(user.access_token) as c:
        r = c.post(f"/devices/{device_id}/relays/{index}", json={"state": state})
    assert r.status_code == 200, r.text


def relays(hub: RunningHub, user: User, device_id: str) -> list[bool]:
    return list(state_of(hub, user, device_id)["relays"])


def commands(m: MqttDevice, kind: str) -> list[dict[str, Any]]:
    return [c for c in list(m.commands) if c.get("type") == kind]


def hhmm(dt: datetime) -> str:
    return dt.strftime("%H:%M")


def excluding_now_window(tz: str = "UTC") -> dict[str, Any]:
    now = datetime.now(UTC).astimezone(ZoneInfo(tz))
    return {
        "type": "time_window",
        "start": hhmm(now + timedelta(hours=2)),
        "end": hhmm(now + timedelta(hours=3)),
        "timezone": tz,
    }


def sentinel(hub: RunningHub, user: User, dev: dict[str, Any]) -> Callable[[MqttDevice], None]:
    """A rule on double_press of input 2 of ``dev`` that is always skipped by its condition.
    The returned function sends that event and waits until the engine recorded it, which
    proves every earlier event of the device has been evaluated."""
    rule = create(
        hub,
        user,
        {
            "name": "sentinel",
            "trigger": {
                "type": "input_event",
                "device_id": dev["id"],
                "input_index": 2,
                "event": "double_press",
            },
            "conditions": [excluding_now_window()],
            "actions": [
                {"type": "set_relay", "device_id": dev["id"], "relay_index": 2, "state": False}
            ],
        },
    )
    seen = [0]

    def mark(m: MqttDevice) -> None:
        seen[0] += 1
        m.event(2, "double_press")
        wait_runs(hub, user, rule["id"], seen[0])

    return mark


# --- CRUD ----------------------------------------------------------------------------------
def test_create_get_patch_delete(hub: RunningHub) -> None:
    """POST is 201 with the full rule; GET returns it; PATCH changes it; DELETE is 204, then 404."""
    u = register(hub)
    _, a = claimed_device(hub, u)
    _, b = claimed_device(hub, u)
    body = {
        "name": "Hall: hold for all off",
        "enabled": True,
        "trigger": {
            "type": "button_hold",
            "device_id": a["id"],
            "input_index": 1,
            "min_duration_ms": 3000,
        },
        "conditions": [
            {"type": "relay_state", "device_id": b["id"], "relay_index": 2, "state": True},
            {"type": "time_window", "start": "22:00", "end": "06:30", "timezone": "Europe/Berlin"},
            {"type": "weekday", "days": [0, 1, 2, 3, 4]},
        ],
        "actions": [
            {"type": "set_all_relays", "device_id": a["id"], "state": False},
            {"type": "set_relay", "device_id": b["id"], "relay_index": 1, "state": "toggle"},
        ],
        "cooldown_s": 30,
        "dedupe_window_ms": 1500,
    }
    rule = create(hub, u, body)
    assert set(rule) >= RULE_KEYS, rule
    uuid.UUID(rule["id"])
    assert rule["org_id"] == u.org_id and rule["device_id"] == a["id"]
    assert rule["name"] == body["name"] and rule["enabled"] is True
    assert rule["trigger"]["type"] == "button_hold" and rule["trigger"]["device_id"] == a["id"]
    assert rule["trigger"]["input_index"] == 1 and rule["trigger"]["min_duration_ms"] == 3000
    assert [c["type"] for c in rule["conditions"]] == ["relay_state", "time_window", "weekday"]
    assert rule["conditions"][1]["start"] == "22:00" and rule["conditions"][1]["end"] == "06:30"
    assert rule["conditions"][2]["days"] == [0, 1, 2, 3, 4]
    assert [x["type"] for x in rule["actions"]] == ["set_all_relays", "set_relay"]
    assert rule["actions"][1]["state"] == "toggle"
    assert rule["cooldown_s"] == 30 and rule["dedupe_window_ms"] == 1500
    assert rule["is_default"] is False and rule["last_fired_at"] is None
    assert rule["fire_count"] == 0

    fetched = get_rule(hub, u, rule["id"])
    assert {k: fetched[k] for k in RULE_KEYS} == {k: rule[k] for k in RULE_KEYS}

    changed = patch(hub, u, rule["id"], {"name": "Renamed", "enabled": False, "cooldown_s": 5})
    assert changed["name"] == "Renamed" and changed["enabled"] is False
    assert changed["cooldown_s"] == 5 and changed["trigger"] == rule["trigger"]
    moved = patch(hub, u, rule["id"], {"trigger": {"type": "device_offline", "device_id": b["id"]}})
    assert moved["device_id"] == b["id"] and moved["trigger"]["type"] == "device_offline"
    again = get_rule(hub, u, rule["id"])
    assert again["name"] == "Renamed" and again["enabled"] is False
    assert again["device_id"] == b["id"]

    with hub.api(u.access_token) as c:
        r = c.delete(f"/automations/{rule['id']}")
        assert r.status_code == 204, r.text
        assert_error(c.get(f"/automations/{rule['id']}"), 404, "not_found")
        assert_error(c.get(f"/automations/{rule['id']}/runs"), 404, "not_found")
        assert_error(c.patch(f"/automations/{rule['id']}", json={"name": "x"}), 404)
        assert_error(c.delete(f"/automations/{rule['id']}"), 404)
        assert_error(c.get(f"/automations/{uuid.uuid4()}"), 404, "not_found")


def test_list_filters_and_pagination(hub: RunningHub) -> None:
    """GET /automations filters by device_id and enabled and pages with limit/offset."""
    u = register(hub)
    other = register(hub)
    _, a = claimed_device(hub, u)
    _, b = claimed_device(hub, u)
    _, x = claimed_device(hub, other)
    made = [
        create(hub, u, press_rule(a["id"], b["id"], name=f"r{i}", enabled=i != 1)) for i in range(3)
    ]
    create(hub, other, press_rule(x["id"], x["id"]))

    on_a = rules_of(hub, u, a["id"], limit=100)
    assert set(on_a) >= PAGE_KEYS
    assert on_a["total"] == 4, on_a  # three of ours + the default rule
    assert {r["id"] for r in on_a["items"]} >= {r["id"] for r in made}
    assert all(r["device_id"] == a["id"] for r in on_a["items"])
    on_b = rules_of(hub, u, b["id"])
    assert on_b["total"] == 1 and on_b["items"][0]["is_default"] is True

    disabled = rules_of(hub, u, a["id"], enabled="false")
    assert [r["id"] for r in disabled["items"]] == [made[1]["id"]]
    enabled = rules_of(hub, u, a["id"], enabled="true")
    assert enabled["total"] == 3 and made[1]["id"] not in {r["id"] for r in enabled["items"]}

    with hub.api(u.access_token) as c:
        everything = c.get("/automations", params={"limit": 100}).json()
        assert everything["total"] == 5  # 3 on A + the default rules of A and B
        assert all(r["org_id"] == u.org_id for r in everything["items"])
        p1 = c.get("/automations", params={"device_id": a["id"], "limit": 3}).json()
        p2 = c.get("/automations", params={"device_id": a["id"], "limit": 3, "offset": 3}).json()
        assert (p1["limit"], p1["offset"], p1["has_next"], p1["has_prev"]) == (3, 0, True, False)
        assert (p2["limit"], p2["offset"], p2["has_next"], p2["has_prev"]) == (3, 3, False, True)
        assert len(p1["items"]) == 3 and len(p2["items"]) == 1
        assert {r["id"] for r in p1["items"] + p2["items"]} == {r["id"] for r in on_a["items"]}
        for bad in ({"limit": 0}, {"limit": 101}, {"offset": -1}, {"device_id": "nope"}):
            assert_error(c.get("/automations", params=bad), 400, "validation_error")
    # the other tenant sees none of these, even when naming the device
    theirs = rules_of(hub, other, a["id"])
    assert theirs["total"] == 0 and theirs["items"] == []


# --- validation ----------------------------------------------------------------------------
def test_validation_errors_are_400(hub: RunningHub) -> None:
    """Unknown types, missing fields, bad indexes, bad HH:MM, unknown timezone, extra fields,
    empty actions and out-of-range numbers are 400 validation_error, on create and patch."""
    u = register(hub)
    _, a = claimed_device(hub, u)
    _, b = claimed_device(hub, u)
    A, B = a["id"], b["id"]
    ok = press_rule(A, B)

    def with_(**over: Any) -> dict[str, Any]:
        return {**ok, **over}

    trig = ok["trigger"]
    act = ok["actions"][0]
    cases: dict[str, dict[str, Any]] = {
        "unknown trigger type": with_(trigger={"type": "sunrise", "device_id": A}),
        "trigger without type": with_(trigger={"device_id": A, "input_index": 0}),
        "unknown condition type": with_(conditions=[{"type": "moon_phase", "phase": "full"}]),
        "unknown action type": with_(actions=[{"type": "explode", "device_id": B}]),
        "missing trigger": {k: v for k, v in ok.items() if k != "trigger"},
        "missing actions": {k: v for k, v in ok.items() if k != "actions"},
        "missing name": {k: v for k, v in ok.items() if k != "name"},
        "empty actions": with_(actions=[]),
        "trigger missing event": with_(trigger={k: v for k, v in trig.items() if k != "event"}),
        "trigger missing device_id": with_(
            trigger={k: v for k, v in trig.items() if k != "device_id"}
        ),
        "trigger device_id not a uuid": with_(trigger={**trig, "device_id": "kitchen"}),
        "unknown event name": with_(trigger={**trig, "event": "long_press"}),
        "input_index past inputs": with_(trigger={**trig, "input_index": 3}),
        "negative input_index": with_(trigger={**trig, "input_index": -1}),
        "hold input_index past inputs": with_(
            trigger={
                "type": "button_hold",
                "device_id": A,
                "input_index": 7,
                "min_duration_ms": 1000,
            }
        ),
        "negative min_duration_ms": with_(
            trigger={"type": "button_hold", "device_id": A, "min_duration_ms": -5}
        ),
        "action relay_index past relays": with_(actions=[{**act, "relay_index": 3}]),
        "action relay_index negative": with_(actions=[{**act, "relay_index": -1}]),
        "action missing relay_index": with_(
            actions=[{k: v for k, v in act.items() if k != "relay_index"}]
        ),
        "action missing state": with_(actions=[{k: v for k, v in act.items() if k != "state"}]),
        "action bad state": with_(actions=[{**act, "state": "maybe"}]),
        "set_all_relays toggle": with_(
            actions=[{"type": "set_all_relays", "device_id": B, "state": "toggle"}]
        ),
        "condition relay_index past relays": with_(
            conditions=[{"type": "relay_state", "device_id": B, "relay_index": 5, "state": True}]
        ),
        "condition relay_state missing state": with_(
            conditions=[{"type": "relay_state", "device_id": B, "relay_index": 0}]
        ),
        "bad HH:MM 25:00": with_(
            conditions=[{"type": "time_window", "start": "25:00", "end": "06:00"}]
        ),
        "bad HH:MM 12:60": with_(
            conditions=[{"type": "time_window", "start": "12:00", "end": "12:60"}]
        ),
        "bad HH:MM 7pm": with_(
            conditions=[{"type": "time_window", "start": "7pm", "end": "08:00"}]
        ),
        "time_window missing end": with_(conditions=[{"type": "time_window", "start": "07:00"}]),
        "unknown timezone": with_(
            conditions=[
                {
                    "type": "time_window",
                    "start": "07:00",
                    "end": "08:00",
                    "timezone": "Mars/Olympus",
                }
            ]
        ),
        "weekday 7": with_(conditions=[{"type": "weekday", "days": [1, 7]}]),
        "weekday empty": with_(conditions=[{"type": "weekday", "days": []}]),
        "extra top-level field": with_(colour="red"),
        "extra trigger field": with_(trigger={**trig, "debounce": 3}),
        "extra condition field": with_(
            conditions=[{"type": "weekday", "days": [1], "holidays": True}]
        ),
        "extra action field": with_(actions=[{**act, "delay_s": 5}]),
        "negative cooldown": with_(cooldown_s=-1),
        "negative dedupe": with_(dedupe_window_ms=-1),
        "enabled not a bool": with_(enabled="yes"),
        "trigger not an object": with_(trigger="press"),
        "conditions not a list": with_(conditions={"type": "weekday", "days": [1]}),
    }
    rule = create(hub, u, ok)
    failures = []
    with hub.api(u.access_token) as c:
        for what, body in cases.items():
            r = c.post("/automations", json=body)
            if (
                r.status_code != 400
                or not error_shape_ok(r.json())
                or r.json()["code"] != "validation_error"
            ):
                failures.append(f"POST {what}: {r.status_code} {r.text[:200]}")
        patches: dict[str, dict[str, Any]] = {
            "empty actions": {"actions": []},
            "relay_index past relays": {"actions": [{**act, "relay_index": 9}]},
            "unknown condition": {"conditions": [{"type": "tide"}]},
            "bad timezone": {
                "conditions": [{"type": "weekday", "days": [1], "timezone": "Nowhere/Atlantis"}]
            },
            "null name": {"name": None},
            "extra field": {"colour": "red"},
        }
        for what, body in patches.items():
            r = c.patch(f"/automations/{rule['id']}", json=body)
            if r.status_code != 400 or not error_shape_ok(r.json()):
                failures.append(f"PATCH {what}: {r.status_code} {r.text[:200]}")
        total = c.get("/automations", params={"device_id": A}).json()["total"]
    assert not failures, "\n".join(failures)
    assert total == 2  # nothing invalid was stored: the default rule and ``rule``
    assert get_rule(hub, u, rule["id"])["actions"] == rule["actions"]


def test_other_tenants_device_is_404(hub: RunningHub) -> None:
    """A device of another tenant (or none at all) in trigger, condition or action is 404, and
    another tenant's rule is 404 on GET, PATCH, DELETE and runs."""
    u = register(hub)
    them = register(hub)
    _, mine = claimed_device(hub, u)
    _, theirs = claimed_device(hub, them)
    M, T = mine["id"], theirs["id"]
    base = press_rule(M, M)
    cases = {
        "trigger": {**base, "trigger": {**base["trigger"], "device_id": T}},
        "condition": {
            **base,
            "conditions": [
                {"type": "relay_state", "device_id": T, "relay_index": 0, "state": True}
            ],
        },
        "action": {**base, "actions": [{"type": "set_all_relays", "device_id": T, "state": False}]},
        "unknown device": {
            **base,
            "actions": [{"type": "set_all_relays", "device_id": str(uuid.uuid4()), "state": False}],
        },
    }
    rule = create(hub, u, base)
    their_rule = default_rule_of(hub, them, T)
    with hub.api(u.access_token) as c:
        for what, body in cases.items():
            r = c.post("/automations", json=body)
            assert r.status_code == 404, f"{what}: {r.status_code} {r.text}"
            assert error_shape_ok(r.json()) and r.json()["code"] == "not_found", what
        assert_error(
            c.patch(f"/automations/{rule['id']}", json={"actions": cases["action"]["actions"]}),
            404,
            "not_found",
        )
        assert_error(
            c.patch(f"/automations/{rule['id']}", json={"trigger": cases["trigger"]["trigger"]}),
            404,
            "not_found",
        )
        assert_error(
            c.patch(
                f"/automations/{rule['id']}", json={"conditions": cases["condition"]["conditions"]}
            ),
            404,
        )
        assert_error(c.get(f"/automations/{their_rule['id']}"), 404, "not_found")
        assert_error(c.get(f"/automations/{their_rule['id']}/runs"), 404, "not_found")
        assert_error(c.patch(f"/automations/{their_rule['id']}", json={"enabled": False}), 404)
        assert_error(c.delete(f"/automations/{their_rule['id']}"), 404)
        listed = c.get("/automations", params={"limit": 100}).json()
    assert their_rule["id"] not in {r["id"] for r in listed["items"]}
    assert default_rule_of(hub, them, T)["enabled"] is True  # untouched
    assert get_rule(hub, u, rule["id"])["actions"] == base["actions"]


# --- roles ---------------------------------------------------------------------------------
def test_roles_viewer_operator_read_only_manager_manages(hub: RunningHub) -> None:
    """viewer and operator read rules and runs but get 403 on create/patch/delete; manager may."""
    owner = register(hub)
    _, dev = claimed_device(hub, owner)
    rule = create(hub, owner, press_rule(dev["id"], dev["id"]))
    members = {role: register(hub) for role in ("viewer", "operator", "manager")}
    for role, who in members.items():
        add_member(hub, owner, who, role)
    for role in ("viewer", "operator"):
        with hub.api(members[role].access_token) as c:
            listed = c.get("/automations", params={"device_id": dev["id"]})
            assert listed.status_code == 200 and listed.json()["total"] == 2, listed.text
            assert c.get(f"/automations/{rule['id']}").status_code == 200
            assert c.get(f"/automations/{rule['id']}/runs").status_code == 200
            assert_error(
                c.post("/automations", json=press_rule(dev["id"], dev["id"])), 403, "forbidden"
            )
            assert_error(
                c.patch(f"/automations/{rule['id']}", json={"name": "x"}), 403, "forbidden"
            )
            assert_error(c.delete(f"/automations/{rule['id']}"), 403, "forbidden")
    assert get_rule(hub, owner, rule["id"])["name"] == rule["name"]
    with hub.api(members["manager"].access_token) as c:
        r = c.post("/automations", json=press_rule(dev["id"], dev["id"], name="by manager"))
        assert r.status_code == 201, r.text
        assert r.json()["org_id"] == owner.org_id
        r2 = c.patch(f"/automations/{rule['id']}", json={"name": "managed"})
        assert r2.status_code == 200 and r2.json()["name"] == "managed", r2.text
        assert c.delete(f"/automations/{r.json()['id']}").status_code == 204
    assert rules_of(hub, owner, dev["id"])["total"] == 2


# --- the default rule ----------------------------------------------------------------------
def test_default_rule_on_every_claimed_switch(hub: RunningHub) -> None:
    """Every claimed hexa-mini-switch-v1 gets exactly one enabled default rule: hold any input
    ≥ 10 s → all its relays off."""
    u = register(hub)
    devs = [claimed_device(hub, u)[1] for _ in range(2)]
    ids = set()
    for dev in devs:
        listed = rules_of(hub, u, dev["id"], limit=100)
        assert listed["total"] == 1, listed
        rule = listed["items"][0]
        ids.add(rule["id"])
        assert rule["is_default"] is True and rule["enabled"] is True
        assert rule["org_id"] == u.org_id and rule["device_id"] == dev["id"]
        t = rule["trigger"]
        assert t["type"] == "button_hold" and t["device_id"] == dev["id"]
        assert t["min_duration_ms"] == 10_000 and t.get("input_index") is None
        assert rule["actions"] == [
            {"type": "set_all_relays", "device_id": dev["id"], "state": False}
        ]
        assert rule["conditions"] == [] and rule["fire_count"] == 0
        assert rule["last_fired_at"] is None
    assert len(ids) == 2


def test_default_rule_long_hold_turns_all_relays_off_once(hub: RunningHub, track: Any) -> None:
    """A real MQTT device's ≥ 10 s hold on any input turns all relays off; a repeated hold
    report inside the dedupe window does not fire again; the run is audited."""
    u = register(hub)
    dev, m = online_device(hub, u, track)
    rule = default_rule_of(hub, u, dev["id"])
    set_relay(hub, u, dev["id"], 0, True)
    set_relay(hub, u, dev["id"], 2, True)
    assert relays(hub, u, dev["id"]) == [True, False, True]

    m.event(1, "hold", 10_500)
    assert wait_until(lambda: relays(hub, u, dev["id"]) == [False, False, False], 8)
    assert m.relays == [False, False, False]
    first = wait_runs(hub, u, rule["id"], 1)
    assert first[0]["outcome"] == "fired", first
    assert [r["status"] for r in first[0]["results"]] == ["applied"]

    m.event(1, "hold", 11_000)  # the same hold reported again
    later = wait_runs(hub, u, rule["id"], 2)
    assert [r["outcome"] for r in later] == ["suppressed_dedupe", "fired"], later
    assert later[0]["results"] == []
    time.sleep(NEGATIVE_WAIT_S)
    assert len(commands(m, "set_all_relays")) == 1, m.commands
    assert runs(hub, u, rule["id"])["total"] == 2
    after = get_rule(hub, u, rule["id"])
    assert after["fire_count"] == 1 and after["last_fired_at"].endswith("Z")

    def audited() -> list[Any]:
        items = audit(hub, u, automation_id=rule["id"])["items"]
        return items if len(items) >= 3 else []  # 2 runs + 1 relay command

    entries = wait_until(audited, 5)
    assert entries, audit(hub, u, automation_id=rule["id"])
    assert all(e["source"] == "automation" and e["automation_id"] == rule["id"] for e in entries)
    cmd = [e for e in entries if e["action"] == "relay_command"]
    assert len(cmd) == 1 and cmd[0]["device_id"] == dev["id"]
    assert cmd[0]["details"]["status"] == "applied"


def test_default_rule_short_hold_does_not_fire(hub: RunningHub, track: Any) -> None:
    """A 5000 ms hold (below the default 10 s) does not switch anything off."""
    u = register(hub)
    dev, m = online_device(hub, u, track)
    rule = default_rule_of(hub, u, dev["id"])
    mark = sentinel(hub, u, dev)
    set_relay(hub, u, dev["id"], 1, True)
    m.event(0, "hold", 5_000)
    m.event(2, "hold", 9_999)
    mark(m)
    time.sleep(NEGATIVE_WAIT_S)
    assert runs(hub, u, rule["id"])["total"] == 0
    assert get_rule(hub, u, rule["id"])["last_fired_at"] is None
    assert commands(m, "set_all_relays") == []
    assert relays(hub, u, dev["id"]) == [False, True, False]


def test_default_rule_is_editable(hub: RunningHub, track: Any) -> None:
    """PATCHing the default rule's min_duration_ms to 3000 makes a 5000 ms hold fire it."""
    u = register(hub)
    dev, m = online_device(hub, u, track)
    rule = default_rule_of(hub, u, dev["id"])
    changed = patch(hub, u, rule["id"], {"trigger": {**rule["trigger"], "min_duration_ms": 3000}})
    assert changed["trigger"]["min_duration_ms"] == 3000 and changed["is_default"] is True
    assert changed["enabled"] is True
    set_relay(hub, u, dev["id"], 0, True)
    m.event(2, "hold", 5_000)
    assert wait_until(lambda: relays(hub, u, dev["id"]) == [False, False, False], 8)
    assert wait_runs(hub, u, rule["id"], 1)[0]["outcome"] == "fired"


def test_default_rule_is_deletable(hub: RunningHub, track: Any) -> None:
    """After DELETE of the default rule a long hold switches nothing off."""
    u = register(hub)
    dev, m = online_device(hub, u, track)
    rule = default_rule_of(hub, u, dev["id"])
    with hub.api(u.access_token) as c:
        assert c.delete(f"/automations/{rule['id']}").status_code == 204
    assert rules_of(hub, u, dev["id"])["total"] == 0
    mark = sentinel(hub, u, dev)
    set_relay(hub, u, dev["id"], 0, True)
    m.event(0, "hold", 15_000)
    mark(m)
    time.sleep(NEGATIVE_WAIT_S)
    assert commands(m, "set_all_relays") == []
    assert relays(hub, u, dev["id"]) == [True, False, False]


# --- triggers, conditions, cooldown --------------------------------------------------------
def test_press_rule_switches_another_device(hub: RunningHub, track: Any) -> None:
    """A press on device A toggles / sets a relay of device B of the same org; a disabled
    rule does not fire."""
    u = register(hub)
    a, ma = online_device(hub, u, track)
    b, mb = online_device(hub, u, track)
    toggle = create(
        hub,
        u,
        press_rule(
            a["id"],
            b["id"],
            actions=[
                {"type": "set_relay", "device_id": b["id"], "relay_index": 1, "state": "toggle"}
            ],
        ),
    )
    setter = create(
        hub,
        u,
        {
            "name": "double press: B relay 2 on",
            "trigger": {
                "type": "input_event",
                "device_id": a["id"],
                "input_index": 1,
                "event": "double_press",
            },
            "actions": [
                {"type": "set_relay", "device_id": b["id"], "relay_index": 2, "state": True}
            ],
        },
    )
    ma.event(0, "press")
    assert wait_until(lambda: relays(hub, u, b["id"]) == [False, True, False], 8)
    ma.event(0, "press")
    assert wait_until(lambda: relays(hub, u, b["id"]) == [False, False, False], 8)
    ma.event(1, "double_press")
    assert wait_until(lambda: relays(hub, u, b["id"]) == [False, False, True], 8)
    assert mb.relays == [False, False, True]
    assert [r["outcome"] for r in wait_runs(hub, u, toggle["id"], 2)] == ["fired", "fired"]
    assert wait_until(lambda: get_rule(hub, u, toggle["id"])["fire_count"] == 2, 5)
    assert wait_runs(hub, u, setter["id"], 1)[0]["outcome"] == "fired"
    assert commands(ma, "set_relay") == []  # the trigger device itself is not switched

    patch(hub, u, toggle["id"], {"enabled": False})
    mark = sentinel(hub, u, a)
    ma.event(0, "press")
    mark(ma)
    time.sleep(NEGATIVE_WAIT_S)
    assert runs(hub, u, toggle["id"])["total"] == 2
    assert relays(hub, u, b["id"]) == [False, False, True]


def test_relay_state_condition_false_skips(hub: RunningHub, track: Any) -> None:
    """A relay_state condition that does not hold records skipped_condition and sends no
    command; once it holds the rule fires."""
    u = register(hub)
    a, ma = online_device(hub, u, track)
    b, mb = online_device(hub, u, track)
    rule = create(
        hub,
        u,
        press_rule(
            a["id"],
            b["id"],
            conditions=[
                {"type": "relay_state", "device_id": b["id"], "relay_index": 2, "state": True}
            ],
        ),
    )
    ma.event(0, "press")
    got = wait_runs(hub, u, rule["id"], 1)
    assert got[0]["outcome"] == "skipped_condition" and got[0]["results"] == []
    time.sleep(NEGATIVE_WAIT_S)
    assert mb.commands == []
    assert relays(hub, u, b["id"]) == [False, False, False]

    set_relay(hub, u, b["id"], 2, True)
    ma.event(0, "press")
    assert wait_until(lambda: relays(hub, u, b["id"]) == [True, False, True], 8)
    got = wait_runs(hub, u, rule["id"], 2)
    assert [r["outcome"] for r in got] == ["fired", "skipped_condition"]


def test_time_window_and_weekday_conditions(hub: RunningHub, track: Any) -> None:
    """A time_window or weekday condition that excludes now skips the rule; ones that include
    now let it fire (evaluated in the condition's timezone)."""
    u = register(hub)
    a, ma = online_device(hub, u, track)
    b, mb = online_device(hub, u, track)
    tz = "Asia/Tokyo"
    now = datetime.now(UTC).astimezone(ZoneInfo(tz))
    today = now.weekday()
    # correct whether the hub counts 0 = Monday or 0 = Sunday
    today_both = {today, (today + 1) % 7}
    outside_window = create(
        hub,
        u,
        press_rule(a["id"], b["id"], name="night only", conditions=[excluding_now_window(tz)]),
    )
    other_days = create(
        hub,
        u,
        press_rule(
            a["id"],
            b["id"],
            name="other days",
            conditions=[
                {"type": "weekday", "days": sorted(set(range(7)) - today_both), "timezone": tz}
            ],
        ),
    )
    matching = create(
        hub,
        u,
        press_rule(
            a["id"],
            b["id"],
            name="now",
            conditions=[
                {
                    "type": "time_window",
                    "start": hhmm(now - timedelta(hours=1)),
                    "end": hhmm(now + timedelta(hours=1)),
                    "timezone": tz,
                },
                {"type": "weekday", "days": sorted(today_both), "timezone": tz},
            ],
            actions=[{"type": "set_relay", "device_id": b["id"], "relay_index": 1, "state": True}],
        ),
    )
    ma.event(0, "press")
    assert wait_runs(hub, u, outside_window["id"], 1)[0]["outcome"] == "skipped_condition"
    assert wait_runs(hub, u, other_days["id"], 1)[0]["outcome"] == "skipped_condition"
    assert wait_runs(hub, u, matching["id"], 1)[0]["outcome"] == "fired"
    assert wait_until(lambda: relays(hub, u, b["id"]) == [False, True, False], 8)
    time.sleep(NEGATIVE_WAIT_S)
    assert [c["relay_index"] for c in commands(mb, "set_relay")] == [1]


def test_cooldown_suppresses_second_trigger(hub: RunningHub, track: Any) -> None:
    """Within cooldown_s after firing, a second trigger is recorded as suppressed_cooldown
    and sends no command."""
    u = register(hub)
    a, ma = online_device(hub, u, track)
    b, mb = online_device(hub, u, track)
    rule = create(
        hub,
        u,
        press_rule(
            a["id"],
            b["id"],
            cooldown_s=60,
            actions=[
                {"type": "set_relay", "device_id": b["id"], "relay_index": 0, "state": "toggle"}
            ],
        ),
    )
    ma.event(0, "press")
    assert wait_runs(hub, u, rule["id"], 1)[0]["outcome"] == "fired"
    ma.event(0, "press")
    got = wait_runs(hub, u, rule["id"], 2)
    assert [r["outcome"] for r in got] == ["suppressed_cooldown", "fired"]
    time.sleep(NEGATIVE_WAIT_S)
    assert len(commands(mb, "set_relay")) == 1
    assert relays(hub, u, b["id"]) == [True, False, False]
    assert get_rule(hub, u, rule["id"])["fire_count"] == 1


def test_device_offline_and_online_triggers(hub: RunningHub, track: Any) -> None:
    """When A's connection drops (its will says offline) a device_offline rule switches B;
    when A comes back a device_online rule fires."""
    u = register(hub)
    a, ma = online_device(hub, u, track)
    b, _mb = online_device(hub, u, track)
    off = create(
        hub,
        u,
        {
            "name": "pump on when A drops",
            "trigger": {"type": "device_offline", "device_id": a["id"]},
            "actions": [
                {"type": "set_relay", "device_id": b["id"], "relay_index": 0, "state": True}
            ],
        },
    )
    on = create(
        hub,
        u,
        {
            "name": "back online",
            "trigger": {"type": "device_online", "device_id": a["id"]},
            "actions": [
                {"type": "set_relay", "device_id": b["id"], "relay_index": 2, "state": True}
            ],
        },
    )
    ma.drop()
    assert wait_until(lambda: relays(hub, u, b["id"]) == [True, False, False], 10)
    got = wait_runs(hub, u, off["id"], 1)
    assert got[0]["outcome"] == "fired" and got[0]["event"]["event"] == "device_offline"
    assert got[0]["event"]["device_id"] == a["id"]
    assert runs(hub, u, on["id"])["total"] == 0

    back = track(
        MqttDevice(hub, a["device_uid"], a["device_token"], client_id=f"re-{uuid.uuid4().hex[:6]}")
    )
    assert back.ok()
    assert wait_until(lambda: relays(hub, u, b["id"]) == [True, False, True], 10)
    assert wait_runs(hub, u, on["id"], 1)[0]["outcome"] == "fired"
    assert runs(hub, u, off["id"])["total"] == 1


# --- runs, audit, WebSocket ----------------------------------------------------------------
def test_every_run_in_runs_and_audit(hub: RunningHub, track: Any) -> None:
    """Each evaluation (fired, suppressed_cooldown, skipped_condition) is in /runs newest first
    with outcome and results, and in /audit?automation_id= with source automation."""
    u = register(hub)
    a, ma = online_device(hub, u, track)
    b, _mb = online_device(hub, u, track)
    rule = create(hub, u, press_rule(a["id"], b["id"], cooldown_s=300))
    ma.event(0, "press")
    wait_runs(hub, u, rule["id"], 1)
    ma.event(0, "press")
    wait_runs(hub, u, rule["id"], 2)
    patch(hub, u, rule["id"], {"cooldown_s": 0, "conditions": [excluding_now_window()]})
    ma.event(0, "press")
    got = wait_runs(hub, u, rule["id"], 3)
    assert [r["outcome"] for r in got] == ["skipped_condition", "suppressed_cooldown", "fired"]
    assert all({"id", "at", "outcome", "event", "results"} <= set(r) for r in got)
    stamps = [datetime.fromisoformat(r["at"]) for r in got]
    assert all(r["at"].endswith("Z") for r in got) and stamps == sorted(stamps, reverse=True)
    fired = got[2]
    assert fired["event"]["device_id"] == a["id"] and fired["event"]["input_index"] == 0
    assert len(fired["results"]) == 1 and fired["results"][0]["status"] == "applied"
    assert fired["results"][0]["action"]["device_id"] == b["id"]
    page = runs(hub, u, rule["id"], limit=1, offset=1)
    assert set(page) >= PAGE_KEYS and page["total"] == 3
    assert [r["id"] for r in page["items"]] == [got[1]["id"]]
    assert page["has_next"] is True and page["has_prev"] is True

    def run_entries() -> list[Any]:
        items = audit(hub, u, automation_id=rule["id"], action="automation_run")["items"]
        return items if len(items) >= 3 else []

    entries = wait_until(run_entries, 5)
    assert len(entries) == 3, audit(hub, u, automation_id=rule["id"])
    assert [e["details"]["outcome"] for e in entries] == [r["outcome"] for r in got]
    for e in entries:
        assert set(e) >= AUDIT_KEYS, e
        assert e["source"] == "automation" and e["automation_id"] == rule["id"]
        assert e["device_id"] == a["id"] and e["schedule_id"] is None
    by_source = audit(hub, u, automation_id=rule["id"], source="automation")
    cmds = [e for e in by_source["items"] if e["action"] == "relay_command"]
    assert len(cmds) == 1 and cmds[0]["device_id"] == b["id"]
    assert by_source["total"] == 4
    # another tenant cannot read these entries
    other = register(hub)
    assert audit(hub, other, automation_id=rule["id"])["total"] == 0


def test_ws_automation_fired_only_to_owner(hub: RunningHub, track: Any) -> None:
    """The owner's WS client receives automation_fired {automation_id, device_id, at}; another
    tenant's client does not."""
    u = register(hub)
    stranger = register(hub)
    a, ma = online_device(hub, u, track)
    rule = create(hub, u, press_rule(a["id"], a["id"]))
    mine, theirs = ws_client(hub, u, track), ws_client(hub, stranger, track)
    ma.event(0, "press")
    got = wait_until(lambda: mine.of_type("automation_fired"), 8)
    assert got, mine.docs
    doc = got[0]
    assert doc["automation_id"] == rule["id"] and doc["device_id"] == a["id"]
    assert isinstance(doc["at"], str) and doc["at"].endswith("Z")
    datetime.fromisoformat(doc["at"])
    time.sleep(NEGATIVE_WAIT_S)
    assert theirs.of_type("automation_fired") == []
    assert len(mine.of_type("automation_fired")) == 1


# --- safety --------------------------------------------------------------------------------
def test_rule_on_own_device_cannot_run_away(hub: RunningHub, track: Any) -> None:
    """press → toggle a relay of the same device fires exactly once per press, even when the
    device then reports its new state."""
    u = register(hub)
    a, ma = online_device(hub, u, track)
    rule = create(
        hub,
        u,
        press_rule(
            a["id"],
            a["id"],
            actions=[
                {"type": "set_relay", "device_id": a["id"], "relay_index": 0, "state": "toggle"}
            ],
        ),
    )
    ma.event(0, "press")
    assert wait_until(lambda: relays(hub, u, a["id"]) == [True, False, False], 8)
    ma.report()  # the device reports its changed state, as a real one does
    ma.event(0, "release")
    time.sleep(NEGATIVE_WAIT_S)
    assert len(commands(ma, "set_relay")) == 1
    assert wait_until(lambda: get_rule(hub, u, rule["id"])["fire_count"] == 1, 5)
    assert runs(hub, u, rule["id"])["total"] == 1

    ma.event(0, "press")
    assert wait_until(lambda: relays(hub, u, a["id"]) == [False, False, False], 8)
    ma.report()
    time.sleep(NEGATIVE_WAIT_S)
    assert len(commands(ma, "set_relay")) == 2
    assert wait_until(lambda: get_rule(hub, u, rule["id"])["fire_count"] == 2, 5)
    assert [r["outcome"] for r in runs(hub, u, rule["id"])["items"]] == ["fired", "fired"]


def test_release_and_delete_disable_rules(hub: RunningHub, track: Any) -> None:
    """Releasing a device disables every rule that uses it (trigger, action, default rule);
    deleting a device disables its rules; other rules stay enabled."""
    u = register(hub)
    a, ma = online_device(hub, u, track)
    b, mb = online_device(hub, u, track)
    _, c_dev = claimed_device(hub, u)
    from_b = create(hub, u, press_rule(b["id"], a["id"], name="B switches A"))
    from_a = create(hub, u, press_rule(a["id"], b["id"], name="A switches B"))
    b_cond = create(
        hub,
        u,
        press_rule(
            b["id"],
            b["id"],
            name="B if A",
            conditions=[
                {"type": "relay_state", "device_id": a["id"], "relay_index": 0, "state": False}
            ],
        ),
    )
    keep = create(
        hub,
        u,
        press_rule(
            b["id"],
            b["id"],
            name="B only",
            actions=[{"type": "set_relay", "device_id": b["id"], "relay_index": 1, "state": True}],
        ),
    )
    default_a = default_rule_of(hub, u, a["id"])
    default_b = default_rule_of(hub, u, b["id"])
    default_c = default_rule_of(hub, u, c_dev["id"])
    with hub.api(u.access_token) as c:
        r = c.post(f"/devices/{a['id']}/release")
        assert r.status_code in (200, 204), r.text
        r = c.delete(f"/devices/{c_dev['id']}")
        assert r.status_code == 204, r.text
    for rule in (from_b, from_a, b_cond, default_a, default_c):
        assert get_rule(hub, u, rule["id"])["enabled"] is False, rule["name"]
    for rule in (keep, default_b):
        assert get_rule(hub, u, rule["id"])["enabled"] is True, rule["name"]

    mb.event(0, "press")
    assert wait_until(lambda: relays(hub, u, b["id"]) == [False, True, False], 8)
    assert wait_runs(hub, u, keep["id"], 1)[0]["outcome"] == "fired"
    time.sleep(NEGATIVE_WAIT_S)
    assert runs(hub, u, from_b["id"])["total"] == 0
    assert runs(hub, u, b_cond["id"])["total"] == 0
    assert commands(ma, "set_relay") == []


def test_malformed_event_payloads_do_not_break_engine(hub: RunningHub, track: Any) -> None:
    """Garbage on hexa/<uid>/event is dropped without firing; a later valid event still fires."""
    u = register(hub)
    a, ma = online_device(hub, u, track)
    rule = create(
        hub,
        u,
        press_rule(
            a["id"],
            a["id"],
            actions=[{"type": "set_relay", "device_id": a["id"], "relay_index": 1, "state": True}],
        ),
    )
    topic = f"hexa/{a['device_uid']}/event"
    for payload in (
        b"",
        b"not json",
        b"\xff\xfe\x00",
        b"[1, 2, 3]",
        b"null",
        b'"press"',
        json.dumps({"input_index": 0}).encode(),
        json.dumps({"event": "press"}).encode(),
        json.dumps({"input_index": "zero", "event": "press"}).encode(),
        json.dumps({"input_index": 99, "event": "press"}).encode(),
        json.dumps({"input_index": -1, "event": "press"}).encode(),
        json.dumps({"input_index": 0, "event": "explode"}).encode(),
        json.dumps({"input_index": 0, "event": "hold", "duration_ms": "long"}).encode(),
        json.dumps({"input_index": 0, "event": "hold", "duration_ms": -10}).encode(),
        b"{" * 1000,
    ):
        ma.publish(topic, payload)
    ma.event(0, "press")
    assert wait_until(lambda: relays(hub, u, a["id"]) == [False, True, False], 8)
    wait_runs(hub, u, rule["id"], 1)
    time.sleep(NEGATIVE_WAIT_S)
    got = runs(hub, u, rule["id"])["items"]
    assert [r["outcome"] for r in got] == ["fired"], got
    # nor did a malformed hold trip the default rule
    assert runs(hub, u, default_rule_of(hub, u, a["id"])["id"])["total"] == 0
