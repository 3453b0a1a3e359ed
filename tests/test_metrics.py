"""``/metrics`` of a real hub: every family of contract §7 is exported, moves with real
traffic (REST commands, a device that never acks, an offline device, API errors, a WS
session, a schedule run, MQTT clients), and carries no unbounded label value."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support.accounts import admin_token, register
from support.checks import assert_error, wait_until
from support.devices import claimed_device, online_device, provision
from support.hubs import (
    ADMIN_EMAIL,
    ADMIN_PASSWORD,
    COMMAND_TIMEOUT_MS,
    RunningHub,
    spawned_hub,
)
from support.ws import ws_client

#: the families contract §7 asks for (and that the alert rules and dashboard use)
FAMILIES = {
    "hexa_build_info": "gauge",
    "hexa_start_time_seconds": "gauge",
    "hexa_http_requests": "counter",
    "hexa_http_request_seconds": "histogram",
    "hexa_api_errors": "counter",
    "hexa_relay_commands": "counter",
    "hexa_relay_command_seconds": "histogram",
    "hexa_devices": "gauge",
    "hexa_mqtt_connections": "gauge",
    "hexa_mqtt_messages_received": "counter",
    "hexa_mqtt_messages_sent": "counter",
    "hexa_ws_sessions": "gauge",
    "hexa_schedule_runs": "counter",
    "hexa_automation_runs": "counter",
    "hexa_bus_connected": "gauge",
    "hexa_scheduler_lag_seconds": "gauge",
    "hexa_scheduler_last_tick_timestamp_seconds": "gauge",
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape_text(hub: RunningHub) -> str:
    r = httpx.get(hub.base + "/metrics", timeout=15)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return r.text


def scrape(hub: RunningHub) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(scrape_text(hub)):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_every_family_of_the_contract_is_exported(hub: RunningHub) -> None:
    families = {f.name: f.type for f in text_string_to_metric_families(scrape_text(hub))}
    for name, kind in FAMILIES.items():
        assert families.get(name) == kind, (name, families.get(name))
    samples = scrape(hub)
    from hexa.hub import __version__

    assert value(samples, "hexa_build_info", version=__version__) == 1
    assert value(samples, "hexa_bus_connected") == 1
    for state in ("online", "offline", "unclaimed"):
        assert ("hexa_devices", frozenset({("state", state)})) in samples
    for kind in ("device", "integration", "hub"):
        assert ("hexa_mqtt_connections", frozenset({("kind", kind)})) in samples
    assert value(samples, "hexa_mqtt_connections", kind="hub") >= 1


def test_applied_and_timed_out_commands_are_counted_and_timed(
    hub: RunningHub, track: Callable[[Any], Any]
) -> None:
    user = register(hub)
    dev, _ = online_device(hub, user, track)
    mute, _ = online_device(hub, user, track, auto_ack=False)
    before = scrape(hub)
    with hub.api(user.access_token) as c:
        assert c.post(f"/devices/{dev['id']}/relays/0", json={"state": True}).status_code == 200
        r = c.post(f"/devices/{mute['id']}/relays/0", json={"state": True})
        assert r.status_code == 504, r.text
    after = scrape(hub)
    assert delta(before, after, "hexa_relay_commands_total", status="applied", source="api") == 1
    assert delta(before, after, "hexa_relay_commands_total", status="timeout", source="api") == 1
    for status in ("applied", "timeout"):
        assert delta(before, after, "hexa_relay_command_seconds_count", status=status) == 1
    # the timeout is observed with how long the caller waited: at least the command timeout
    waited = delta(before, after, "hexa_relay_command_seconds_sum", status="timeout")
    assert waited >= COMMAND_TIMEOUT_MS / 1000 * 0.9
    assert delta(before, after, "hexa_api_errors_total", code="device_timeout") == 1
    assert delta(before, after, "hexa_mqtt_messages_received_total", kind="device") >= 1
    assert delta(before, after, "hexa_mqtt_messages_sent_total") >= 2


def test_offline_device_and_fleet_gauge(hub: RunningHub, track: Callable[[Any], Any]) -> None:
    user = register(hub)
    before = scrape(hub)
    provision(hub)  # never claimed
    _, offline = claimed_device(hub, user)  # claimed, never connected
    online_device(hub, user, track)
    after = scrape(hub)
    for state in ("online", "offline", "unclaimed"):
        assert delta(before, after, "hexa_devices", state=state) == 1, state
    assert delta(before, after, "hexa_mqtt_connections", kind="device") == 1
    with hub.api(user.access_token) as c:
        r = c.post(f"/devices/{offline['id']}/relays/0", json={"state": True})
    assert r.status_code == 503, r.text
    later = scrape(hub)
    assert delta(after, later, "hexa_api_errors_total", code="device_offline") == 1
    assert delta(after, later, "hexa_relay_command_seconds_count", status="offline") == 1
    assert delta(after, later, "hexa_relay_commands_total", status="offline") == 1


def test_http_requests_by_route_template_and_error_code(hub: RunningHub) -> None:
    user = register(hub)
    before = scrape(hub)
    with hub.api(user.access_token) as c:
        assert c.get(f"/devices/{uuid.uuid4()}").status_code == 404
        assert c.get(f"/no-such-route-{uuid.uuid4().hex}").status_code == 404
        assert c.get("/devices").status_code == 200
    after = scrape(hub)
    template = "/api/v1/devices/{device_id}"
    assert (
        delta(before, after, "hexa_http_requests_total", method="GET", route=template, status="404")
        == 1
    )
    assert (
        delta(before, after, "hexa_http_request_seconds_count", route=template, status="404") == 1
    )
    assert delta(before, after, "hexa_http_requests_total", route="unmatched", status="404") == 1
    assert (
        delta(before, after, "hexa_http_requests_total", route="/api/v1/devices", status="200") == 1
    )
    assert delta(before, after, "hexa_api_errors_total", code="not_found") == 2
    assert delta(before, after, "hexa_api_errors_total") == 2


def test_ws_session_is_counted_while_open(hub: RunningHub, track: Callable[[Any], Any]) -> None:
    user = register(hub)
    before = value(scrape(hub), "hexa_ws_sessions", kind="client")
    peer = ws_client(hub, user, track)
    assert value(scrape(hub), "hexa_ws_sessions", kind="client") == before + 1
    peer.close()
    assert wait_until(lambda: value(scrape(hub), "hexa_ws_sessions", kind="client") == before)


def test_schedule_run_is_counted(hub: RunningHub, track: Callable[[Any], Any]) -> None:
    user = register(hub)
    dev, _ = online_device(hub, user, track)
    before = scrape(hub)
    with hub.api(user.access_token) as c:
        s = c.post(
            "/schedules",
            json={
                "device_id": dev["id"],
                "name": "metrics",
                "cron": "0 3 * * *",
                "timezone": "UTC",
                "action": {"type": "set_relay", "relay_index": 0, "state": True},
            },
        )
        assert s.status_code == 201, s.text
        r = c.post(f"/schedules/{s.json()['id']}/run")
        assert r.status_code in (200, 202), r.text
    after = scrape(hub)
    assert delta(before, after, "hexa_schedule_runs_total") == 1
    assert delta(before, after, "hexa_relay_commands_total", source="schedule") == 1


def test_no_label_carries_a_uid_user_id_or_raw_path(
    hub: RunningHub, track: Callable[[Any], Any]
) -> None:
    user = register(hub)
    dev, sim = online_device(hub, user, track)
    secrets = {dev["id"], sim.uid, user.id, user.org_id}
    with hub.api(user.access_token) as c:
        c.post(f"/devices/{dev['id']}/relays/0", json={"state": True})
        c.get(f"/devices/{dev['id']}/state")
        c.get(f"/devices/{sim.uid}-nope")
    text = scrape_text(hub)
    for secret in secrets:
        assert secret not in text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            route = s.labels.get("route")
            if route is not None:
                assert route == "unmatched" or route.startswith("/"), route
                assert not any(ch.isdigit() for ch in route.replace("v1", "")), route


def test_scrapes_during_load_succeed(hub: RunningHub, track: Callable[[Any], Any]) -> None:
    user = register(hub)
    dev, _ = online_device(hub, user, track)
    stop = threading.Event()
    sent: list[int] = []

    def load() -> None:
        with hub.api(user.access_token) as c:
            state = False
            while not stop.is_set():
                state = not state
                r = c.post(f"/devices/{dev['id']}/relays/1", json={"state": state})
                sent.append(r.status_code)

    workers = [threading.Thread(target=load) for _ in range(4)]
    before = scrape(hub)
    for w in workers:
        w.start()
    try:
        for _ in range(15):
            samples = scrape(hub)
            assert value(samples, "hexa_build_info") == 1
    finally:
        stop.set()
        for w in workers:
            w.join()
    after = scrape(hub)
    assert sent and set(sent) <= {200, 429}
    assert delta(before, after, "hexa_relay_commands_total", source="api") >= sent.count(200)


OPS = Path(__file__).resolve().parent.parent / "docs" / "ops"
#: series Prometheus makes itself for every scrape target
PROMETHEUS_OWN = {"up"}
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or"}
_PROMQL_WORDS |= {"unless", "bool", "offset", "inf", "nan"}


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((OPS / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_queries() -> Iterator[str]:
    doc = json.loads((OPS / "grafana.json").read_text())
    for panel in doc["panels"]:
        for target in panel["targets"]:
            yield target["expr"]


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (functions, keywords, label names,
    strings, ranges and grouping clauses left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names: set[str] = set()
    for m in re.finditer(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()", text):
        if m.group(1).lower() not in _PROMQL_WORDS:
            names.add(m.group(1))
    return names


def exported_names(hub: RunningHub) -> set[str]:
    """Every series name the hub's /metrics can show, samples or not yet."""
    names: set[str] = set()
    for family in text_string_to_metric_families(scrape_text(hub)):
        names.add(family.name)
        names.update(s.name for s in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + end for end in ("_bucket", "_sum", "_count"))
    return names


def test_metric_name_extraction() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, status) (rate(hexa_relay_command_seconds_bucket"
        '{status="timeout"}[5m]))) / on(instance) up{job="hexa"} > 0.1'
    )
    assert metric_names(expr) == {"hexa_relay_command_seconds_bucket", "up"}


def test_alerts_and_dashboard_use_only_exported_metrics(hub: RunningHub) -> None:
    exported = exported_names(hub)
    exprs = [rule["expr"] for rule in alert_rules()] + list(dashboard_queries())
    assert len(exprs) >= 20
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        used |= names
        missing = names - exported - PROMETHEUS_OWN
        assert not missing, (expr, missing)
    assert {"hexa_devices", "hexa_relay_commands_total", "hexa_bus_connected"} <= used


def test_every_alert_has_a_firing_and_a_silent_promtool_case() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    assert names == {
        "HexaHubDown",
        "HexaBusDisconnected",
        "HexaCommandTimeoutRatio",
        "HexaFleetOffline",
        "HexaSchedulerLag",
        "HexaApi5xxRatio",
        "HexaBackupStale",
        "HexaOtaIntegrityFailure",
    }
    cases = yaml.safe_load((OPS / "alerts_test.yml").read_text())
    assert cases["rule_files"] == ["alerts.yml"]
    fires: set[str] = set()
    silent: set[str] = set()
    for test in cases["tests"]:
        for case in test["alert_rule_test"]:
            (fires if case["exp_alerts"] else silent).add(case["alertname"])
    assert fires == names
    assert silent == names


def test_alert_rules_pass_promtool() -> None:
    """CI sets HEXA_REQUIRE_PROMTOOL (and installs it): there a missing promtool fails."""
    if shutil.which("promtool") is None:
        reason = "promtool is not installed (Debian: apt-get install prometheus)"
        if os.environ.get("HEXA_REQUIRE_PROMTOOL"):
            pytest.fail(f"HEXA_REQUIRE_PROMTOOL is set but {reason}")
        pytest.skip(reason)
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        run = subprocess.run(
            ["promtool", *args], cwd=OPS, capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "SUCCESS" in run.stdout + run.stderr


FLEET = 10_000
_FLEET_SQLITE = """
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
INSERT INTO devices (id, created_at, updated_at, device_uid, model, device_class, token_hash,
                     relay_count, input_count, online, metadata, org_id)
SELECT printf('00000000-0000-4000-8000-%012x', i), '2026-01-01 00:00:00+00:00',
       '2026-01-01 00:00:00+00:00', printf('fleet-%05d', i), 'hexa-mini-switch-v1', 'switch',
       'x', 3, 3, i % 4 = 0, '{}', CASE WHEN i % 10 = 0 THEN NULL ELSE ? END
FROM n
"""
_FLEET_PG = """
INSERT INTO devices (id, created_at, updated_at, device_uid, model, device_class, token_hash,
                     relay_count, input_count, online, metadata, org_id)
SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid, now(), now(),
       'fleet-' || lpad(i::text, 5, '0'), 'hexa-mini-switch-v1', 'switch', 'x', 3, 3,
       i % 4 = 0, '{}'::jsonb, CASE WHEN i % 10 = 0 THEN NULL ELSE $2::uuid END
FROM generate_series(1, $1::int) AS i
"""


def _fill_fleet(url: str, org_id: str) -> None:
    """Write FLEET devices straight into the database: every tenth unclaimed, every
    fourth online."""
    if url.startswith("sqlite"):
        path = url.split("://", 1)[1]
        with contextlib.closing(sqlite3.connect(path, timeout=15)) as db:
            db.execute(_FLEET_SQLITE, (FLEET, org_id))
            db.commit()
        return
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            await conn.execute(_FLEET_PG, FLEET, org_id)
        finally:
            await conn.close()

    asyncio.run(run())


def test_fleet_of_ten_thousand_is_counted_exactly_and_scrapes_stay_cheap(
    db_kind: str, tmp_path: Path
) -> None:
    """The fleet gauge is exact with 10 000 devices; the scrape time is printed (median of
    20, run with -s), not asserted: the figure in docs/operations.md comes from here."""
    with spawned_hub(db_kind, tmp_path) as hub:
        user = register(hub)
        assert hub.settings.database_url
        _fill_fleet(hub.settings.database_url, user.org_id)
        with httpx.Client(base_url=hub.base, timeout=15) as c:
            times = []
            for _ in range(20):
                began = time.perf_counter()
                r = c.get("/metrics")
                times.append(time.perf_counter() - began)
                assert r.status_code == 200
        samples: Samples = {}
        for family in text_string_to_metric_families(r.text):
            for s in family.samples:
                samples[(s.name, frozenset(s.labels.items()))] = s.value
        unclaimed = FLEET // 10
        online = len([i for i in range(1, FLEET + 1) if i % 4 == 0 and i % 10])
        assert value(samples, "hexa_devices", state="unclaimed") == unclaimed
        assert value(samples, "hexa_devices", state="online") == online
        assert value(samples, "hexa_devices", state="offline") == FLEET - unclaimed - online
        median_ms = statistics.median(times) * 1000
        print(f"/metrics with {FLEET} devices on {db_kind}: median {median_ms:.1f} ms")


# --- alert drills (POST /admin/alerts/simulate) -------------------------------------------
DRILLS = (
    "HexaHubDown",
    "HexaBusDisconnected",
    "HexaCommandTimeoutRatio",
    "HexaFleetOffline",
    "HexaSchedulerLag",
    "HexaApi5xxRatio",
    "HexaBackupStale",
    "HexaOtaIntegrityFailure",
)


def test_alert_drill_is_refused_unless_allowed(hub: RunningHub) -> None:
    with hub.api(admin_token(hub)) as c:
        r = c.post("/admin/alerts/simulate", json={"alert": "HexaBusDisconnected"})
    assert_error(r, 409, "alert_simulation_disabled")
    assert value(scrape(hub), "hexa_bus_connected") == 1


def test_alert_drill_names_match_the_shipped_rules() -> None:
    assert set(DRILLS) == {rule["alert"] for rule in alert_rules()}


def test_alert_drills_make_the_metrics_show_each_condition(
    db_kind: str, tmp_path: Path, track: Callable[[Any], Any]
) -> None:
    with spawned_hub(
        db_kind,
        tmp_path,
        allow_alert_simulation="true",
        admin_email=ADMIN_EMAIL,
        admin_password=ADMIN_PASSWORD,
    ) as hub:
        user = register(hub)
        online_device(hub, user, track)
        admin = admin_token(hub)
        with hub.api(user.access_token) as c:  # a normal user: the route does not exist
            assert_error(c.post("/admin/alerts/simulate", json={"alert": "HexaHubDown"}), 404)
        before = scrape(hub)
        assert value(before, "hexa_bus_connected") == 1
        assert value(before, "hexa_devices", state="online") == 1
        assert value(before, "hexa_scheduler_lag_seconds") == 0
        with hub.api(admin) as c:
            assert_error(c.post("/admin/alerts/simulate", json={"alert": "Nope"}), 400)
            assert_error(
                c.post("/admin/alerts/simulate", json={"alert": "HexaHubDown", "duration_s": 5}),
                400,
            )
            for alert in DRILLS[1:]:
                r = c.post("/admin/alerts/simulate", json={"alert": alert})
                assert r.status_code == 202, r.text
                assert r.json()["alert"] == alert
            drills = c.get("/admin/audit", params={"action": "alert_simulated", "limit": 100})
            audited = [
                (e["details"]["alert"], e["source"], e["org_id"]) for e in drills.json()["items"]
            ]
            assert sorted(audited) == sorted((a, "api", None) for a in DRILLS[1:])
        after = scrape(hub)
        assert value(after, "hexa_bus_connected") == 0
        assert value(after, "hexa_devices", state="online") == 0
        assert value(after, "hexa_devices", state="offline") >= 1
        assert value(after, "hexa_scheduler_lag_seconds") > 60
        timeouts = delta(before, after, "hexa_relay_commands_total", status="timeout")
        assert timeouts / (value(after, "hexa_relay_commands_total") or 1) > 0.1
        errors = delta(before, after, "hexa_http_requests_total", status="500")
        assert errors / value(after, "hexa_http_requests_total") > 0.05
        assert value(after, "hexa_backup_scheduled") == 1
        assert value(after, "hexa_ota_integrity_failures_total", check="simulation") > 0
        assert value(after, "hexa_backup_last_success_timestamp_seconds") < 26 * 3600
        # the hub itself kept working: its API and the device are untouched
        with hub.api(user.access_token) as c:
            devices = c.get("/devices").json()["items"]
            assert devices and devices[0]["online"] is True
        with hub.api(admin) as c:
            assert (
                c.post("/admin/alerts/simulate", json={"alert": "HexaHubDown"}).status_code == 202
            )
        r = httpx.get(hub.base + "/metrics", timeout=15)
        assert r.status_code == 503  # Prometheus marks the target down: up == 0
        assert httpx.get(hub.base + "/healthz", timeout=15).status_code == 200
