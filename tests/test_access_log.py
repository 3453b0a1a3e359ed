"""The access log (contract §7): one line per request and per WebSocket open and close,
with the route template, status, duration, request id, user id and client, in text and
JSON; and not one secret in the whole log, whatever the requests carried."""

from __future__ import annotations

import json
import re
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.accounts import unique_email
from support.databases import migrated_database_url
from support.hubs import RunningHub, spawn_hub, stop_hub
from support.ws import close_code_of, connect_ws


@pytest.fixture(params=["json", "text"])
def logged(
    request: pytest.FixtureRequest, db_kind: str, tmp_path: Path
) -> Iterator[tuple[RunningHub, Path, str, str]]:
    """A hub logging at INFO in one format, with a provision key of its own; the log file
    is complete once the hub stopped (the test stops it)."""
    key = "pk-" + secrets.token_urlsafe(24)
    url, drop = migrated_database_url(db_kind, tmp_path)
    hub = spawn_hub(
        url,
        tmp_path / "data",
        log_level="INFO",
        log_format=request.param,
        device_provision_key=key,
    )
    try:
        yield hub, tmp_path / "data" / "hub.log", request.param, key
    finally:
        stop_hub(hub)
        drop()


def _drive(hub: RunningHub, provision_key: str) -> tuple[list[str], dict[str, Any]]:
    """Everything that carries a secret, the right way and the wrong way: returns the
    secrets used and what the checks of the log lines need."""
    used: list[str] = [provision_key]
    email, password = unique_email(), "Pw-" + secrets.token_urlsafe(16)
    used.append(password)
    seen: dict[str, Any] = {}
    api = hub.api_base
    with httpx.Client(timeout=15) as c:
        reg = c.post(f"{api}/auth/register", json={"email": email, "password": password})
        assert reg.status_code == 201, reg.text
        seen["user_id"] = reg.json()["user"]["id"]
        used += [reg.json()["access_token"], reg.json()["refresh_token"]]
        login = c.post(f"{api}/auth/login", json={"email": email, "password": password})
        assert login.status_code == 200
        used += [login.json()["access_token"], login.json()["refresh_token"]]
        refreshed = c.post(
            f"{api}/auth/refresh", json={"refresh_token": login.json()["refresh_token"]}
        )
        assert refreshed.status_code == 200, refreshed.text
        access = refreshed.json()["access_token"]
        used += [access, refreshed.json()["refresh_token"]]
        bearer = {"Authorization": f"Bearer {access}"}

        # a device: provisioned with the key, claimed, used with its token
        p = c.post(
            f"{api}/provision/register",
            headers={"X-Provision-Key": provision_key},
            json={"model": "hexa-mini-switch-v1", "serial": uuid.uuid4().hex[:8]},
        )
        assert p.status_code == 201, p.text
        device_token, claim_code, uid = (
            p.json()["device_token"],
            p.json()["claim_code"],
            p.json()["device_uid"],
        )
        used += [device_token, claim_code]
        claimed = c.post(f"{api}/devices/claim", headers=bearer, json={"claim_code": claim_code})
        assert claimed.status_code == 200, claimed.text
        seen["device_id"] = claimed.json()["id"]
        rid = "req-" + uuid.uuid4().hex
        seen["request_id"] = rid
        got = c.get(f"{api}/devices/{seen['device_id']}", headers={**bearer, "X-Request-ID": rid})
        assert got.status_code == 200

        # failures, each with a secret of its own in the body, the query or a header
        wrong = ["wrong-" + secrets.token_urlsafe(12) for _ in range(12)]
        used += wrong
        failures = [
            c.post(f"{api}/auth/login", json={"email": email, "password": wrong[0]}),
            c.post(f"{api}/auth/refresh", json={"refresh_token": wrong[1]}),
            c.post(
                f"{api}/provision/register",
                headers={"X-Provision-Key": wrong[2]},
                json={"model": "hexa-mini-switch-v1", "serial": "s1"},
            ),
            c.get(f"{api}/devices", headers={"Authorization": f"Bearer {wrong[3]}"}),
            c.get(
                f"{api}/devices",
                params={"token": wrong[4], "password": wrong[5], "api_key": wrong[6]},
                headers=bearer,
            ),
            c.get(f"{api}/devices/{wrong[7]}", headers=bearer),  # in the path: never logged
            c.post(
                f"{api}/auth/register",
                content=b'{"email": "x", "password": "' + wrong[8].encode() + b'"',
                headers={"content-type": "application/json"},
            ),
            c.post(
                f"{api}/auth/login",
                content=('{"password": "' + wrong[9] + '", "pad": "')
                .encode()
                .ljust(hub.settings.max_body_bytes + 10, b"x"),
                headers={"content-type": "application/json"},
            ),
            c.get(f"{api}/auth/me", headers={"Cookie": f"session={wrong[10]}", **bearer}),
        ]
        statuses = [r.status_code for r in failures]
        assert statuses == [401, 401, 401, 401, 200, 400, 400, 413, 200], statuses

        # WebSockets: a device and a client with their secrets in the query string
        ws_base = hub.ws_base
        with connect_ws(f"{ws_base}/ws/device?uid={uid}&token={device_token}") as ws:
            ws.send(json.dumps({"type": "ping"}))
            assert json.loads(ws.recv(timeout=10))["type"] == "pong"
        with connect_ws(f"{ws_base}/ws/client?token={access}") as ws:
            ws.send(json.dumps({"type": "ping"}))
            while json.loads(ws.recv(timeout=10))["type"] != "pong":
                pass  # the device's state came first
        assert close_code_of(f"{ws_base}/ws/client?token={wrong[11]}") == 4401
        assert close_code_of(f"{ws_base}/ws/device?uid={uid}&token={wrong[11]}x") == 4401
        logout = c.post(
            f"{api}/auth/logout",
            headers=bearer,
            json={"refresh_token": refreshed.json()["refresh_token"]},
        )
        assert logout.status_code in (200, 204), logout.text
    return used, seen


def _access_lines(log: str, fmt: str) -> list[dict[str, Any]]:
    """The access lines of the log as dicts (the text format's key=value pairs parsed)."""
    lines: list[dict[str, Any]] = []
    for raw in log.splitlines():
        if raw.startswith("hexa "):
            continue  # the start-up banner (printed, not logged)
        if fmt == "json":
            record = json.loads(raw)  # every other line of the JSON log is one object
            if record["logger"] == "hexa.access":
                lines.append(record)
        elif " hexa.access: " in raw:
            event, _, rest = raw.split(" hexa.access: ", 1)[1].partition(" ")
            fields: dict[str, Any] = {"event": event}
            for pair in rest.split(" "):
                key, _, value = pair.partition("=")
                fields[key] = int(value) if value.isdigit() else value
            lines.append(fields)
    return lines


def test_access_log_lines_and_no_secret_in_either_format(
    logged: tuple[RunningHub, Path, str, str],
) -> None:
    hub, log_file, fmt, provision_key = logged
    used, seen = _drive(hub, provision_key)
    stop_hub(hub)
    log = log_file.read_text()

    for secret in used:
        for part in {secret, secret[:16], secret[-16:]}:
            assert part not in log, f"a secret ({part[:4]}...) reached the {fmt} log"
    assert "?token" not in log.replace("?token=***", "")

    lines = _access_lines(log, fmt)
    for line in lines:
        assert set(line) >= {"event", "method", "route", "status", "duration_ms", "request_id"}
        assert float(line["duration_ms"]) >= 0
        assert line["route"] == "unmatched" or line["route"].startswith(("/api/v1/", "/ws/"))
    # the request with our id: route template, status, user, client
    (mine,) = [line for line in lines if line["request_id"] == seen["request_id"]]
    assert mine["event"] == "http" and mine["method"] == "GET"
    assert mine["route"] == "/api/v1/devices/{device_id}"
    assert mine["status"] == 200 and mine["user_id"] == seen["user_id"]
    assert mine["client"] == "127.0.0.1"
    routes = {(line["event"], line["route"], line["status"]) for line in lines}
    assert {
        ("http", "/api/v1/auth/register", 201),
        ("http", "/api/v1/auth/login", 401),
        ("http", "/api/v1/auth/refresh", 200),
        ("http", "/api/v1/provision/register", 201),
        ("http", "/api/v1/devices/{device_id}", 400),
        ("http", "unmatched", 413),  # refused before routing: no template, no raw path
        ("ws_open", "/ws/device", 101),
        ("ws_close", "/ws/device", 101),
        ("ws_open", "/ws/client", 101),
        ("ws_close", "/ws/client", 101),
    } <= routes
    closes = [line for line in lines if line["event"] == "ws_close"]
    assert {int(line["close_code"]) for line in closes} >= {4401}
    # the client socket's user is known once its token was checked (after the accept)
    client_closes = [ln for ln in closes if ln["route"] == "/ws/client"]
    assert seen["user_id"] in {line.get("user_id") for line in client_closes}
    assert not [line for line in lines if re.search(r"/[0-9a-f-]{36}", line["route"])]


def test_access_log_can_be_turned_off(db_kind: str, tmp_path: Path) -> None:
    url, drop = migrated_database_url(db_kind, tmp_path)
    hub = spawn_hub(url, tmp_path / "data", log_level="INFO", access_log="false")
    try:
        assert httpx.get(hub.base + "/health").status_code == 200
        assert httpx.get(hub.api_base + "/devices").status_code == 401
    finally:
        stop_hub(hub)
        drop()
    assert "hexa.access" not in (tmp_path / "data" / "hub.log").read_text()
