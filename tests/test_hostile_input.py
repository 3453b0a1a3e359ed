"""Hostile JSON over real HTTP, on SQLite and PostgreSQL: deeply nested or oversized
free-form JSON and NUL characters in any string answer 400 validation_error (never 500),
and the stored data is left as it was."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from support.accounts import User, register, unique_email
from support.checks import assert_error
from support.devices import claimed_device
from support.hubs import RunningHub

NUL = "bad\u0000value"


def nested(depth: int) -> dict[str, Any]:
    """A JSON object ``depth`` levels deep."""
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"k": value}
    return value


def deep_list(depth: int) -> list[Any]:
    """A JSON array ``depth`` levels deep."""
    value: list[Any] = [1]
    for _ in range(depth - 1):
        value = [value]
    return value


@dataclass
class World:
    user: User
    site: dict[str, Any]
    area: dict[str, Any]
    device: dict[str, Any]


@pytest.fixture
def world(hub: RunningHub) -> World:
    user = register(hub)
    with hub.api(user.access_token) as c:
        site = c.post(
            f"/orgs/{user.org_id}/sites", json={"name": "Home", "metadata": {"floor": 1}}
        ).json()
        area = c.post(f"/sites/{site['id']}/areas", json={"name": "Hall"}).json()
    _, device = claimed_device(hub, user)
    return World(user, site, area, device)


def assert_400(r: httpx.Response) -> dict[str, Any]:
    return assert_error(r, 400, "validation_error")


def rule(w: World, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "Press",
        "trigger": {
            "type": "input_event",
            "device_id": w.device["id"],
            "input_index": 0,
            "event": "press",
        },
        "actions": [
            {"type": "set_relay", "device_id": w.device["id"], "relay_index": 0, "state": True}
        ],
    }
    body.update(over)
    return body


#: (name, method, path, body) builders for routes taking free-form JSON
Case = Callable[[World], tuple[str, str, dict[str, Any]]]

DEEP_CASES: dict[str, Case] = {
    "site-create": lambda w: (
        "POST",
        f"/orgs/{w.user.org_id}/sites",
        {"name": "S", "metadata": nested(300)},
    ),
    "site-patch": lambda w: ("PATCH", f"/sites/{w.site['id']}", {"metadata": nested(300)}),
    "area-create": lambda w: (
        "POST",
        f"/sites/{w.site['id']}/areas",
        {"name": "A", "metadata": nested(300)},
    ),
    "area-patch": lambda w: ("PATCH", f"/areas/{w.area['id']}", {"metadata": nested(300)}),
    "site-metadata-list": lambda w: (
        "PATCH",
        f"/sites/{w.site['id']}",
        {"metadata": {"list": deep_list(40)}},
    ),
    "automation-trigger": lambda w: ("POST", "/automations", rule(w, trigger=nested(300))),
    "automation-action": lambda w: ("POST", "/automations", rule(w, actions=[nested(300)])),
    "automation-condition": lambda w: (
        "POST",
        "/automations",
        rule(w, conditions=[nested(300)]),
    ),
}


@pytest.mark.parametrize("case", DEEP_CASES)
def test_deeply_nested_json_is_400(hub: RunningHub, world: World, case: str) -> None:
    """Free-form JSON nested deeper than 32 levels answers 400 and stores nothing."""
    method, path, body = DEEP_CASES[case](world)
    with hub.api(world.user.access_token) as c:
        r = c.request(method, path, json=body)
        err = assert_400(r)
        assert "deep" in err["message"], err
        assert c.get(f"/sites/{world.site['id']}").json()["metadata"] == {"floor": 1}
        assert c.get(f"/areas/{world.area['id']}").json()["metadata"] == {}
        assert c.get("/automations").json()["total"] == 1  # the device's default rule only
        sites = c.get(f"/orgs/{world.user.org_id}/sites").json()
        assert [s["name"] for s in sites["items"]] == ["Home"]


def test_nesting_within_the_limit_is_kept(hub: RunningHub, world: World) -> None:
    """Metadata 32 levels deep is accepted and read back unchanged."""
    with hub.api(world.user.access_token) as c:
        r = c.patch(f"/sites/{world.site['id']}", json={"metadata": nested(32)})
        assert r.status_code == 200, r.text
        assert c.get(f"/sites/{world.site['id']}").json()["metadata"] == nested(32)
        assert_400(c.patch(f"/sites/{world.site['id']}", json={"metadata": nested(33)}))


def test_oversized_metadata_is_400(hub: RunningHub, world: World) -> None:
    """Metadata larger than 16 KiB as JSON answers 400 and keeps the old metadata."""
    with hub.api(world.user.access_token) as c:
        r = c.patch(f"/sites/{world.site['id']}", json={"metadata": {"blob": "x" * 17_000}})
        assert "metadata" in assert_400(r)["message"]
        assert c.get(f"/sites/{world.site['id']}").json()["metadata"] == {"floor": 1}


def test_very_deep_json_body_is_400(hub: RunningHub, world: World) -> None:
    """A body nested 100 000 levels (deeper than any JSON parser recurses) answers 400."""
    raw = b'{"name": "S", "metadata": ' + b'{"k": ' * 100_000 + b"1" + b"}" * 100_001
    with hub.api(world.user.access_token) as c:
        r = c.post(
            f"/orgs/{world.user.org_id}/sites",
            content=raw,
            headers={"Content-Type": "application/json"},
        )
        assert_400(r)


def test_nan_and_infinity_are_400(hub: RunningHub, world: World) -> None:
    """NaN and Infinity (which Python's JSON parser accepts) answer 400, not 500."""
    with hub.api(world.user.access_token) as c:
        for raw in (b'{"metadata": {"x": NaN}}', b'{"metadata": {"x": [-Infinity]}}'):
            r = c.patch(
                f"/sites/{world.site['id']}",
                content=raw,
                headers={"Content-Type": "application/json"},
            )
            assert "finite" in assert_400(r)["message"]
        assert c.get(f"/sites/{world.site['id']}").json()["metadata"] == {"floor": 1}


NUL_CASES: dict[str, Case] = {
    "register-email": lambda w: (
        "POST",
        "/auth/register",
        {"email": f"a\u0000{unique_email()}", "password": "S3cure-pass-word!"},
    ),
    "register-password": lambda w: (
        "POST",
        "/auth/register",
        {"email": unique_email(), "password": "S3cure-\u0000-word!"},
    ),
    "login-email": lambda w: (
        "POST",
        "/auth/login",
        {"email": w.user.email + "\u0000", "password": w.user.password},
    ),
    "refresh-token": lambda w: ("POST", "/auth/refresh", {"refresh_token": "hxr_\u0000abc"}),
    "org-create": lambda w: ("POST", "/orgs", {"name": NUL}),
    "org-patch": lambda w: ("PATCH", f"/orgs/{w.user.org_id}", {"name": NUL}),
    "site-name": lambda w: ("POST", f"/orgs/{w.user.org_id}/sites", {"name": NUL}),
    "site-location": lambda w: ("PATCH", f"/sites/{w.site['id']}", {"location": NUL}),
    "site-timezone": lambda w: ("PATCH", f"/sites/{w.site['id']}", {"timezone": "UTC\u0000"}),
    "site-metadata-value": lambda w: (
        "PATCH",
        f"/sites/{w.site['id']}",
        {"metadata": {"a": {"b": [NUL]}}},
    ),
    "site-metadata-key": lambda w: ("PATCH", f"/sites/{w.site['id']}", {"metadata": {NUL: 1}}),
    "area-name": lambda w: ("PATCH", f"/areas/{w.area['id']}", {"name": NUL}),
    "area-metadata": lambda w: (
        "POST",
        f"/sites/{w.site['id']}/areas",
        {"name": "A", "metadata": {"x": NUL}},
    ),
    "device-name": lambda w: ("PATCH", f"/devices/{w.device['id']}", {"name": NUL}),
    "relay-names": lambda w: ("PATCH", f"/devices/{w.device['id']}", {"relay_names": [NUL]}),
    "claim-code": lambda w: ("POST", "/devices/claim", {"claim_code": "ABCD\u0000EFG"}),
    "automation-name": lambda w: ("POST", "/automations", rule(w, name=NUL)),
    "automation-trigger": lambda w: (
        "POST",
        "/automations",
        rule(w, trigger={**rule(w)["trigger"], "event": "press\u0000"}),
    ),
    "schedule-name": lambda w: (
        "POST",
        "/schedules",
        {
            "device_id": w.device["id"],
            "name": NUL,
            "cron": "0 7 * * *",
            "action": {"type": "set_all_relays", "state": True},
        },
    ),
    "schedule-cron": lambda w: (
        "POST",
        "/schedules",
        {
            "device_id": w.device["id"],
            "name": "Morning",
            "cron": "0 7 * * *\u0000",
            "action": {"type": "set_all_relays", "state": True},
        },
    ),
    "integration-name": lambda w: (
        "POST",
        "/integrations/tokens",
        {"name": "ha\u0000", "org_id": w.user.org_id},
    ),
}


@pytest.mark.parametrize("case", NUL_CASES)
def test_nul_in_any_string_is_400(hub: RunningHub, world: World, case: str) -> None:
    """A NUL character in any string of a request body answers 400 and changes nothing."""
    method, path, body = NUL_CASES[case](world)
    with hub.api(world.user.access_token) as c:
        err = assert_400(c.request(method, path, json=body))
        assert "NUL" in err["message"], err
        site = c.get(f"/sites/{world.site['id']}").json()
        assert (site["name"], site["location"], site["timezone"], site["metadata"]) == (
            "Home",
            None,
            "UTC",
            {"floor": 1},
        )
        assert c.get(f"/areas/{world.area['id']}").json()["name"] == "Hall"
        assert c.get(f"/devices/{world.device['id']}").json()["name"] == world.device["name"]
        assert c.get("/schedules").json()["total"] == 0
        assert c.get("/auth/me").json()["memberships"][0]["org_name"].endswith("(personal)")


@pytest.mark.parametrize(
    "path",
    ["/devices?model=a%00b", "/audit?action=x%00", "/audit?request_id=%00", "/orgs?limit=1%00"],
)
def test_nul_in_query_parameters_is_400(hub: RunningHub, world: World, path: str) -> None:
    """A NUL character in a query parameter answers 400 validation_error."""
    with hub.api(world.user.access_token) as c:
        err = assert_400(c.get(path))
        assert "NUL" in err["message"] or "integer" in err["message"], err
