"""The HTTP edge under attack: slow clients, secrets at rest, Idempotency-Key abuse."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import sqlite3
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from support.accounts import admin_token, register, unique_email
from support.checks import assert_error, wait_until
from support.databases import migrated_database_url
from support.devices import provision
from support.hubs import PROVISION_KEY, RunningHub, spawn_hub, stop_hub
from support.mqtt import MqttDevice
from websockets.sync.client import connect

PARTIAL_HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"  # the blank line never comes
SLOW_CLIENTS = 2000


def _own_open_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard one; the soft limit after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@contextlib.contextmanager
def partial_heads(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections that each sent part of a request head and then nothing."""
    count = min(count, _own_open_file_limit() - 300)
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            opened.append(sock)
            sock.sendall(PARTIAL_HEAD)
        yield opened
    finally:
        for sock in opened:
            sock.close()


def _closed_by_hub(sock: socket.socket, seen: bytearray) -> bool:
    """True once the hub closed ``sock`` (what it sent before is added to ``seen``)."""
    sock.setblocking(False)
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return True
            seen += chunk
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


def _http_port(hub: RunningHub) -> int:
    return int(hub.base.rsplit(":", 1)[1])


@pytest.fixture
def spawned(tmp_path: Path) -> Iterator[list[RunningHub]]:
    """Hubs started by a test in their own process; all stopped afterwards."""
    hubs: list[RunningHub] = []
    yield hubs
    for h in hubs:
        stop_hub(h)


# --- slow HTTP clients -------------------------------------------------------------------
def test_partial_request_heads_do_not_stop_rest_or_mqtt(
    tmp_path: Path, spawned: list[RunningHub], track: Any
) -> None:
    """With 2 000 connections stuck in their request head, REST and MQTT CONNECT still work,
    even for a hub started with a soft limit of 512 open files."""
    url, _ = migrated_database_url("sqlite", tmp_path)
    log = tmp_path / "hub.log"
    hub = spawn_hub(
        url,
        tmp_path / "data",
        log=log,
        open_files=512,
        http_header_timeout_s="60",
        log_level="INFO",
    )
    spawned.append(hub)
    device = provision(hub)
    # paho waits with select(), which takes no descriptor above 1023: keep a few low ones free
    low = [os.open(os.devnull, os.O_RDONLY) for _ in range(8)]
    with partial_heads(_http_port(hub), SLOW_CLIENTS) as stuck:
        assert len(stuck) >= 1500, "the test process could not open enough sockets"
        r = httpx.get(hub.base + "/healthz", timeout=15)
        assert r.status_code == 200, r.text
        r = httpx.post(
            hub.api_base + "/provision/register",
            json={"model": "hexa-mini-switch-v1", "serial": uuid.uuid4().hex[:8]},
            headers={"X-Provision-Key": PROVISION_KEY},
            timeout=15,
        )
        assert r.status_code == 201, r.text
        for fd in low:
            os.close(fd)
        mqtt = track(MqttDevice(hub, device["device_uid"], device["device_token"]))
        assert mqtt.ok(), "MQTT CONNECT was not accepted"
        still_open = [s for s in stuck if not _closed_by_hub(s, bytearray())]
        assert len(still_open) == len(stuck), "the slow connections were not all held open"
    assert "open-file limit raised from 512" in log.read_text()


def test_slow_and_idle_connections_are_closed_by_the_hub(
    tmp_path: Path, spawned: list[RunningHub]
) -> None:
    """Connections whose request head is incomplete after the header timeout get a 408 and are
    closed, including one that trickles a byte at a time; an idle kept-alive one is closed too;
    an open WebSocket is not."""
    url, _ = migrated_database_url("sqlite", tmp_path)
    hub = spawn_hub(
        url,
        tmp_path / "data",
        log=tmp_path / "hub.log",
        http_header_timeout_s="1",
        http_keepalive_timeout_s="1",
    )
    spawned.append(hub)
    port = _http_port(hub)
    user = register(hub)
    kept_alive = socket.create_connection(("127.0.0.1", port), timeout=10)
    trickle = socket.create_connection(("127.0.0.1", port), timeout=10)
    ws = connect(
        f"{hub.ws_base}/ws/client?{urlencode({'token': user.access_token})}",
        open_timeout=10,
        proxy=None,
    )
    try:
        kept_alive.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert kept_alive.recv(4096).startswith(b"HTTP/1.1 200")
        trickle.sendall(b"GET /healthz HTTP/1.1\r\n")
        with partial_heads(port, SLOW_CLIENTS) as stuck:
            answers = [bytearray() for _ in stuck]
            trickled = bytearray()

            def all_closed() -> bool:
                with contextlib.suppress(OSError):
                    trickle.send(b"x")  # a byte now and then never completes the head
                return _closed_by_hub(trickle, trickled) and all(
                    _closed_by_hub(s, seen) for s, seen in zip(stuck, answers, strict=True)
                )

            assert wait_until(all_closed, 60, step=0.2), "slow connections left open"
            assert all(seen.startswith(b"HTTP/1.1 408") for seen in answers)
        assert wait_until(lambda: _closed_by_hub(kept_alive, bytearray()), 30)
        ws.ping().wait(10)  # a WebSocket is past its head: the timeout does not apply
    finally:
        kept_alive.close()
        trickle.close()
        ws.close()
    r = httpx.get(hub.base + "/healthz", timeout=15)
    assert r.status_code == 200, r.text


# --- secrets at rest ---------------------------------------------------------------------
def _idempotency_rows(hub: RunningHub) -> list[tuple[Any, ...]]:
    """Every row of the idempotency table, read directly from the database."""
    url = hub.settings.resolved_database_url
    if url.startswith("sqlite://"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite://"))) as db:
            return db.execute("SELECT * FROM idempotency_records").fetchall()

    async def fetch() -> list[tuple[Any, ...]]:
        import asyncpg

        conn = await asyncpg.connect(url.replace("postgres://", "postgresql://", 1))
        try:
            return [tuple(r) for r in await conn.fetch("SELECT * FROM idempotency_records")]
        finally:
            await conn.close()

    return asyncio.run(fetch())


def test_idempotency_store_holds_no_secret(hub: RunningHub) -> None:
    """Stored idempotent answers (device token, claim code, refresh token) and the keys
    themselves appear in no column of the table, and the replay still returns the answer."""
    key, reg_key = f"pk-{uuid.uuid4().hex}", f"reg-{uuid.uuid4().hex}"
    body = {"model": "hexa-mini-switch-v1", "serial": uuid.uuid4().hex[:8]}
    password = f"Pw-{uuid.uuid4().hex}"
    with hub.api(**{"X-Provision-Key": PROVISION_KEY, "Idempotency-Key": key}) as c:
        first = c.post("/provision/register", json=body)
        again = c.post("/provision/register", json=body)
    with hub.api(**{"Idempotency-Key": reg_key}) as c:
        reg = c.post("/auth/register", json={"email": unique_email(), "password": password})
    assert first.status_code == 201 and reg.status_code == 201, (first.text, reg.text)
    assert again.headers.get("idempotency-replayed") == "true"
    assert again.json() == first.json()
    dump = repr(_idempotency_rows(hub))
    secrets = [
        first.json()["device_token"],
        first.json()["claim_code"],
        first.json()["claim_code"].replace("-", ""),
        reg.json()["refresh_token"],
        reg.json()["access_token"],
        key,
        reg_key,
        password,
        PROVISION_KEY,
    ]
    for secret in secrets:
        assert secret not in dump, "a secret is stored in plaintext"


def test_data_dir_and_its_files_are_private(tmp_path: Path, spawned: list[RunningHub]) -> None:
    """The hub tightens a 0755 data directory to 0700 and a 0644 database to 0600 (and says
    so); every file it writes there (secrets, SQLite database and journals) is 0600, and every
    directory it makes there (the backups) 0700."""
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o755)
    db = data / "hexa.db"
    db.touch()
    db.chmod(0o644)
    log = tmp_path / "hub.log"
    hub = spawn_hub(f"sqlite://{db}", data, log=log, jwt_secret="", device_provision_key="")
    spawned.append(hub)
    with hub.api(**{"Idempotency-Key": uuid.uuid4().hex}) as c:
        r = c.post("/auth/register", json={"email": unique_email(), "password": "S3cure-pass!"})
    assert r.status_code == 201, r.text
    names = {p.name for p in data.iterdir()}
    assert {"hexa.db", "hexa.db-wal", "hexa.db-shm", "secrets.json"} <= names, names
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert (data / "backups").is_dir()
    for path in data.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path
    text = log.read_text()
    assert "tightened to 0700" in text and "tightened to 0600" in text


def test_new_data_dir_is_created_private(tmp_path: Path) -> None:
    """A data directory the hub creates is 0700, and its generated secrets file 0600."""
    from hexa.hub.config import load_settings, prepare_storage

    data = tmp_path / "fresh" / "data"
    settings = load_settings(environ={"HEXA_DATA_DIR": str(data)})
    prepare_storage(settings)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "secrets.json").stat().st_mode) == 0o600


# --- Idempotency-Key edge cases ----------------------------------------------------------
def test_anonymous_callers_do_not_share_idempotency_keys(hub: RunningHub) -> None:
    """Two anonymous callers using the same Idempotency-Key each get their own answer: no
    replay of the other's tokens, and no 409 that lets one block the other's key."""
    key = f"shared-{uuid.uuid4().hex}"
    answers = []
    for _ in range(2):
        with hub.api(**{"Idempotency-Key": key}) as c:
            answers.append(
                c.post("/auth/register", json={"email": unique_email(), "password": "S3cure-pw!"})
            )
    for _ in range(2):
        with hub.api(**{"Idempotency-Key": key, "X-Provision-Key": PROVISION_KEY}) as c:
            body = {"model": "hexa-mini-switch-v1", "serial": uuid.uuid4().hex[:8]}
            answers.append(c.post("/provision/register", json=body))
    for r in answers:
        assert r.status_code == 201, r.text
        assert r.headers.get("idempotency-replayed") is None
    assert answers[0].json()["user"]["id"] != answers[1].json()["user"]["id"]
    assert answers[2].json()["device_token"] != answers[3].json()["device_token"]


def test_anonymous_replay_needs_the_same_credentials(hub: RunningHub) -> None:
    """A stored provisioning answer is not replayed to a caller presenting another provision
    key with the same Idempotency-Key and body: that caller gets its own 401."""
    key = uuid.uuid4().hex
    body = {"model": "hexa-mini-switch-v1", "serial": uuid.uuid4().hex[:8]}
    with hub.api(**{"Idempotency-Key": key, "X-Provision-Key": PROVISION_KEY}) as c:
        assert c.post("/provision/register", json=body).status_code == 201
    with hub.api(**{"Idempotency-Key": key, "X-Provision-Key": "wrong-key-0123456789"}) as c:
        assert_error(c.post("/provision/register", json=body), 401, "unauthorized")


def _disable(hub: RunningHub, user_id: str) -> None:
    with hub.api(admin_token(hub)) as c:
        r = c.patch(f"/admin/users/{user_id}", json={"is_active": False})
    assert r.status_code == 200, r.text


def test_stored_answer_not_replayed_to_a_disabled_user(hub: RunningHub) -> None:
    """Once a user is disabled, neither their stored 201 (token still unexpired) nor their
    stored registration answer (with its tokens) is replayed: 401 instead."""
    key, reg_key = uuid.uuid4().hex, uuid.uuid4().hex
    email, password = unique_email(), "S3cure-pass-word!"
    with hub.api(**{"Idempotency-Key": reg_key}) as c:
        reg = c.post("/auth/register", json={"email": email, "password": password})
    assert reg.status_code == 201, reg.text
    user = register(hub)
    with hub.api(user.access_token, **{"Idempotency-Key": key}) as c:
        assert c.post("/orgs", json={"name": "Before"}).status_code == 201
    _disable(hub, user.id)
    _disable(hub, reg.json()["user"]["id"])
    with hub.api(user.access_token, **{"Idempotency-Key": key}) as c:
        assert_error(c.post("/orgs", json={"name": "Before"}), 401, "unauthorized")
    with hub.api(**{"Idempotency-Key": reg_key}) as c:
        assert_error(
            c.post("/auth/register", json={"email": email, "password": password}),
            401,
            "unauthorized",
        )


def test_logins_and_refreshes_are_never_replayed(hub: RunningHub) -> None:
    """POST /auth/login and /auth/refresh with an Idempotency-Key are executed every time:
    a repeated login gets a fresh pair, never one from storage; a repeated refresh is refused."""
    user = register(hub)
    key = uuid.uuid4().hex
    creds = {"email": user.email, "password": user.password}
    with hub.api(**{"Idempotency-Key": key}) as c:
        wrong = c.post("/auth/login", json={**creds, "password": "not-the-password"})
        first = c.post("/auth/login", json=creds)
        second = c.post("/auth/login", json=creds)
    assert_error(wrong, 401, "unauthorized")
    for r in (first, second):
        assert r.status_code == 200, r.text
        assert r.headers.get("idempotency-replayed") is None
    assert first.json()["refresh_token"] != second.json()["refresh_token"]
    refresh = {"refresh_token": second.json()["refresh_token"]}
    with hub.api(**{"Idempotency-Key": key}) as c:
        assert c.post("/auth/refresh", json=refresh).status_code == 200
        repeated = c.post("/auth/refresh", json=refresh)
    assert_error(repeated, 401, "unauthorized")
    assert repeated.headers.get("idempotency-replayed") is None


def test_plaintext_answers_of_an_older_hub_are_purged_at_start(
    tmp_path: Path, spawned: list[RunningHub]
) -> None:
    """Answers an older hub stored in plaintext are deleted when the hub starts."""
    db = tmp_path / "hexa.db"
    hub = spawn_hub(f"sqlite://{db}", tmp_path / "data", log=tmp_path / "hub.log")
    stop_hub(hub)
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(
            "INSERT INTO idempotency_records (id, scope, key, method, path, request_hash,"
            " status_code, response_body, response_headers, created_at, expires_at)"
            " VALUES (?, 'anon', 'k', 'POST', '/api/v1/provision/register', 'h', 201,"
            " '{\"device_token\": \"plain-token\"}', '{}', '2026-01-01', '2999-01-01')",
            (str(uuid.uuid4()),),
        )
    spawned.append(spawn_hub(f"sqlite://{db}", tmp_path / "data", log=tmp_path / "hub2.log"))
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT response_body FROM idempotency_records").fetchall()
    assert not any("plain-token" in str(r) for r in rows)
