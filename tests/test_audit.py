"""The audit log: every relay command and device change, with source, actor and request id."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

from support.accounts import audit, integration_token, register
from support.checks import error_shape_ok, wait_until
from support.devices import claimed_device, online_device
from support.hubs import RunningHub
from support.mqtt import MqttClient


def test_rest_command_is_audited_with_request_id(hub: RunningHub) -> None:
    """A REST relay command is audited with source api, the user, and the caller's request id."""
    user = register(hub)
    dev, m = online_device(hub, user)
    rid = f"req-{uuid.uuid4().hex[:12]}"
    with hub.api(user.access_token, **{"X-Request-ID": rid}) as c:
        assert c.post(f"/devices/{dev['id']}/relays/2", json={"state": True}).status_code == 200
    page = wait_until(lambda: audit(hub, user, request_id=rid)["items"], 5)
    assert page, "no audit entry for the command"
    entry = page[0]
    assert entry["source"] == "api" and entry["action"] == "relay_command"
    assert entry["actor_type"] == "user" and entry["actor_id"] == user.id
    assert entry["device_id"] == dev["id"] and entry["request_id"] == rid
    assert entry["details"]["status"] == "applied" and entry["details"]["relay_index"] == 2
    assert entry["at"].endswith("Z")
    m.close()


def test_filters_and_tenancy(hub: RunningHub) -> None:
    """Filters narrow the log; another tenant never sees an entry of ours."""
    user, other = register(hub), register(hub)
    dev, m = online_device(hub, user)
    with hub.api(user.access_token) as c:
        assert c.post(f"/devices/{dev['id']}/relays", json={"state": True}).status_code == 200
    assert wait_until(
        lambda: audit(hub, user, device_id=dev["id"], action="relay_command")["total"] == 1,
        5,
    )
    claimed = audit(hub, user, device_id=dev["id"], action="device_claimed")
    assert claimed["total"] == 1 and claimed["items"][0]["source"] == "api"
    assert audit(hub, user, device_id=dev["id"], source="schedule")["total"] == 0
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert audit(hub, user, device_id=dev["id"], since=future)["total"] == 0
    assert audit(hub, user, device_id=dev["id"], until=future)["total"] >= 2
    assert audit(hub, other, device_id=dev["id"])["total"] == 0
    m.close()


def test_mqtt_intent_and_device_report_are_audited(hub: RunningHub) -> None:
    """An integration's intent is audited as its own (source mqtt, actor the token), whatever
    attribution its JSON claims; a local change at the device is source device."""
    user = register(hub)
    dev, m = online_device(hub, user)
    it = integration_token(hub, user)
    integ = MqttClient(hub, it["name"], it["token"])
    assert integ.ok() and integ.subscribe(f"hexa/{m.uid}/result")
    forged = {
        "state": "ON",
        "intent_id": "ha-1",
        "source": "schedule",
        "actor_type": "user",
        "actor_id": user.id,
        "schedule_id": str(uuid.uuid4()),
        "automation_id": str(uuid.uuid4()),
        "request_id": "someone-elses-request",
        "seal": "0" * 32,
    }
    integ.publish(f"hexa/{m.uid}/relay/0/set", json.dumps(forged))
    assert integ.wait_for(lambda t, p, r: b'"ha-1"' in p)
    entries = wait_until(lambda: audit(hub, user, source="mqtt", device_id=dev["id"])["items"], 5)
    assert entries and entries[0]["details"]["intent_id"] == "ha-1"
    entry = entries[0]
    assert entry["actor_type"] == "integration" or hub.settings.embedded_bus == "tcp", entry
    if entry["actor_type"] == "integration":
        assert entry["actor_id"] == it["id"], entry
    assert entry["actor_id"] != user.id
    assert entry["schedule_id"] is None and entry["automation_id"] is None, entry
    assert entry["request_id"] != "someone-elses-request", entry
    assert audit(hub, user, source="schedule", device_id=dev["id"])["total"] == 0
    m.relays = [True, True, False]
    m.report()
    by_device = {"source": "device", "action": "state_report", "device_id": dev["id"]}
    reports = wait_until(lambda: audit(hub, user, **by_device)["items"], 5)
    assert reports and reports[0]["details"]["relays"] == [True, True, False]
    integ.close()
    m.close()


def test_bad_filters_are_400(hub: RunningHub) -> None:
    """An unknown source or a timestamp without a timezone is a validation error."""
    user = register(hub)
    with hub.api(user.access_token) as c:
        for params in (
            {"source": "telepathy"},
            {"since": "2026-01-01T00:00:00"},
            {"device_id": "not-a-uuid"},
            {"limit": 0},
        ):
            r = c.get("/audit", params=params)
            assert r.status_code == 400 and error_shape_ok(r.json()), (params, r.text)
            assert r.json()["code"] == "validation_error"


def test_device_lifecycle_is_audited(hub: RunningHub) -> None:
    """Token rotation, release and delete are audited with the device's organization."""
    user = register(hub)
    _, dev = claimed_device(hub, user)
    with hub.api(user.access_token) as c:
        assert c.post(f"/devices/{dev['id']}/token/rotate").status_code == 200
        assert c.patch(f"/devices/{dev['id']}", json={"name": "Porch"}).status_code == 200
        assert c.post(f"/devices/{dev['id']}/release").status_code == 200
    actions = wait_until(
        lambda: (
            {e["action"] for e in audit(hub, user, device_id=dev["id"])["items"]}
            >= {"device_claimed", "device_token_rotated", "device_updated", "device_released"}
        ),
        5,
    )
    assert actions


def test_queued_entries_are_written_with_every_column_of_the_model() -> None:
    """The audit queue writes its rows with its own INSERT: it must name every column of
    AuditEntry, in the order rows are queued, in the model's table (a column added to
    the model fails here first)."""
    from hexa.hub import audit as audit_log
    from hexa.models import AuditEntry

    assert set(audit_log._COLUMNS) == set(AuditEntry._meta.fields_map)
    assert f'INSERT INTO "{AuditEntry._meta.db_table}" (' in audit_log._INSERT
    named = audit_log._INSERT.split("(", 1)[1].split(")", 1)[0]
    assert [c.strip('"') for c in named.split(",")] == list(audit_log._COLUMNS)  # row order
    assert audit_log._INSERT.count("?") == len(audit_log._COLUMNS)
