"""The `hexa` command end to end: version, settings errors, migrations, admins, signals."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.checks import wait_until
from support.cli import HEXA, hexa_cli
from support.databases import new_database_url
from support.hubs import RunningHub
from support.mqtt import MqttClient

LISTEN_RE = re.compile(r"HTTP on http://[\d.]+:(\d+).*MQTT on [\d.]+:(\d+)")


def run(
    args: list[str], env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return hexa_cli(args, env, timeout=timeout)


@pytest.fixture
def database(db_kind: str, tmp_path: Path) -> Iterator[str]:
    url, drop = new_database_url(db_kind, tmp_path)
    yield url
    drop()


def test_version() -> None:
    """`hexa --version` prints the version."""
    from hexa.hub import __version__

    r = run(["--version"], {})
    assert r.returncode == 0 and r.stdout.strip() == f"hexa {__version__}"


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"HEXA_HTTP_PORT": "http"}, "HEXA_HTTP_PORT"),
        ({"HEXA_COMMAND_TIMEOUT_MS": "-5"}, "HEXA_COMMAND_TIMEOUT_MS"),
        ({"HEXA_DATABASE_URL": "oracle://db"}, "HEXA_DATABASE_URL"),
    ],
)
def test_bad_setting_is_one_line(tmp_path: Path, env: dict[str, str], needle: str) -> None:
    """A bad setting stops start-up with exit 2 and one line naming it, no traceback."""
    r = run(["serve"], {"HEXA_DATA_DIR": str(tmp_path), **env})
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert needle in lines[0] and "Traceback" not in r.stderr


def test_unwritable_backup_dir_is_one_line(tmp_path: Path) -> None:
    """A backup directory that cannot be created stops start-up in one line naming
    HEXA_BACKUP_DIR, rather than failing the first scheduled backup hours later."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = run(
        ["serve"],
        {
            "HEXA_DATA_DIR": str(tmp_path / "data"),
            "HEXA_BACKUP_DIR": str(blocker / "backups"),
            "HEXA_HTTP_PORT": "0",
            "HEXA_MQTT_PORT": "0",
        },
    )
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("hexa: ")]  # not logs
    assert len(lines) == 1 and "HEXA_BACKUP_DIR" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("which", ["HTTP", "MQTT"])
def test_taken_port_is_one_line(tmp_path: Path, which: str) -> None:
    """A port already in use stops start-up with one line saying what to set instead."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        other = "HEXA_MQTT_PORT" if which == "HTTP" else "HEXA_HTTP_PORT"
        r = run(
            ["serve"],
            {
                "HEXA_DATA_DIR": str(tmp_path),
                f"HEXA_{which}_PORT": str(port),
                other: "0",
                "HEXA_MQTT_WS_PORT": "off",
            },
        )
    assert r.returncode == 2, r.stderr
    assert f"HEXA_{which}_PORT" in r.stderr and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("hexa: ")]  # not logs
    assert len(lines) == 1, r.stderr
    assert f"port {port} " in lines[0] and "is taken" in lines[0]
    assert f"set HEXA_{which}_PORT to a free port (0 picks one)" in lines[0]
    if which == "MQTT":  # often Mosquitto: the hub can use it instead of its own broker
        assert "Mosquitto" in lines[0]
        assert f"HEXA_BROKER_URL=mqtt://USER:PASSWORD@127.0.0.1:{port}" in lines[0]


def _unique_indexes(url: str, table: str) -> set[tuple[str, ...]]:
    """The column tuples of ``table``'s unique indexes, read from the database itself."""
    if url.startswith("sqlite://"):
        import sqlite3

        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite://"))) as db:
            found = set()
            for _seq, name, unique, *_ in db.execute(f'PRAGMA index_list("{table}")'):
                if unique:
                    cols = db.execute(f'PRAGMA index_info("{name}")').fetchall()
                    found.add(tuple(c[2] for c in cols))
            return found

    import asyncio

    import asyncpg

    async def read() -> set[tuple[str, ...]]:
        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch(
                "SELECT array_agg(a.attname ORDER BY k.n) AS cols FROM pg_index i "
                "CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) "
                "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
                "WHERE i.indrelid = $1::regclass AND i.indisunique AND NOT i.indisprimary "
                "GROUP BY i.indexrelid",
                table,
            )
            return {tuple(r["cols"]) for r in rows}
        finally:
            await conn.close()

    return asyncio.run(read())


def test_reverting_a_column_keeps_the_tables_unique_indexes(database: str, tmp_path: Path) -> None:
    """Reverting the migration that added integration tokens' kind (SQLite rebuilds the table
    for it) leaves the (org_id, name) uniqueness of the migration before it in place."""
    env = {"HEXA_DATA_DIR": str(tmp_path), "HEXA_DATABASE_URL": database}
    names = sorted(p.stem for p in Path(__file__).parents[1].joinpath("migrations").glob("0*.py"))
    assert run(["migrate"], env).returncode == 0
    before = _unique_indexes(database, "integration_tokens")
    assert ("org_id", "name") in before
    back = len(names) - names.index("0004_integration_kind")
    down = run(["migrate", "--down", str(back)], env)
    assert down.returncode == 0, down.stderr
    assert _unique_indexes(database, "integration_tokens") == before
    assert run(["migrate"], env).returncode == 0
    assert _unique_indexes(database, "integration_tokens") == before


def test_migrate_up_down_up(database: str, tmp_path: Path) -> None:
    """`hexa migrate` applies, `--down 1` reverts, and applying again works (both databases)."""
    env = {"HEXA_DATA_DIR": str(tmp_path), "HEXA_DATABASE_URL": database}
    names = sorted(p.stem for p in Path(__file__).parents[1].joinpath("migrations").glob("0*.py"))
    up = run(["migrate"], env)
    assert up.returncode == 0, up.stderr
    assert f"applied {len(names)} migration(s): {', '.join(names)}" in up.stdout
    again = run(["migrate"], env)
    assert again.returncode == 0 and "up to date" in again.stdout
    down = run(["migrate", "--down", "1"], env)
    assert down.returncode == 0 and f"reverted 1 migration(s): {names[-1]}" in down.stdout
    all_down = run(["migrate", "--down", str(len(names))], env)
    assert all_down.returncode == 0 and f"reverted {len(names) - 1} migration(s)" in all_down.stdout
    up2 = run(["migrate"], env)
    assert up2.returncode == 0 and f"applied {len(names)} migration(s)" in up2.stdout


def test_migrations_match_models() -> None:
    """The models and the migration files agree (no schema change without a migration)."""
    r = subprocess.run(
        [sys.executable, "-c", _MAKEMIGRATIONS_CHECK],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr


_MAKEMIGRATIONS_CHECK = """
import asyncio, sys
from tortoise import Tortoise
from tortoise.migrations.autodetector import MigrationAutodetector
from hexa.hub.db import tortoise_config

async def main():
    config = tortoise_config("sqlite://:memory:")
    await Tortoise.init(config=config)
    try:
        writers = await MigrationAutodetector(Tortoise.apps, config["apps"]).changes()
    finally:
        await Tortoise.close_connections()
    if writers:
        print("models changed without a migration:", [w.operations for w in writers])
        sys.exit(1)

asyncio.run(main())
"""


def _start(env: dict[str, str]) -> tuple[subprocess.Popen[str], int, int]:
    proc = subprocess.Popen(
        [*HEXA, "serve"],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = LISTEN_RE.search(line)
        if m:
            return proc, int(m.group(1)), int(m.group(2))
    proc.kill()
    raise AssertionError(f"hexa serve did not start: {proc.stdout.read()}")


def test_admin_create_then_serve_and_sigterm(database: str, tmp_path: Path) -> None:
    """`hexa admin create` makes a working admin; SIGTERM exits 0 after publishing offline."""
    env = {
        "HEXA_DATA_DIR": str(tmp_path),
        "HEXA_DATABASE_URL": database,
        "HEXA_HTTP_PORT": "0",
        "HEXA_MQTT_PORT": "0",
        "HEXA_MQTT_WS_PORT": "off",
        "HEXA_LOG_LEVEL": "WARNING",
    }
    created = run(["admin", "create", "--email", "Root@Example.com"], env)
    assert created.returncode == 0, created.stderr
    password = re.search(r"password: (\S+)", created.stdout)
    assert password, created.stdout
    dup = run(["admin", "create", "--email", "root@example.com", "--password", "x" * 12], env)
    assert dup.returncode == 2 and "already exists" in dup.stderr

    proc, http_port, mqtt_port = _start(env)
    try:
        api = f"http://127.0.0.1:{http_port}/api/v1"
        login = httpx.post(
            f"{api}/auth/login", json={"email": "root@example.com", "password": password.group(1)}
        )
        assert login.status_code == 200, login.text
        token = login.json()["access_token"]
        me = httpx.get(f"{api}/auth/me", headers={"Authorization": f"Bearer {token}"}).json()
        assert me["role"] == "admin"
        created_by_cli = httpx.get(
            f"{api}/admin/audit",
            params={"action": "user_created", "source": "system", "actor_id": "cli"},
            headers={"Authorization": f"Bearer {token}"},
        ).json()["items"]
        assert [(e["actor_type"], e["details"]) for e in created_by_cli] == [
            ("system", {"user_id": me["id"], "role": "admin"})
        ]
        org = me["memberships"][0]["org_id"]
        it = httpx.post(
            f"{api}/integrations/tokens",
            json={"name": "sigterm-watch", "org_id": org},
            headers={"Authorization": f"Bearer {token}"},
        ).json()
        hub = RunningHub.__new__(RunningHub)
        hub.mqtt_port = mqtt_port
        watcher = MqttClient(hub, it["name"], it["token"])
        assert watcher.ok() and watcher.subscribe("hexa/hub/status")
        assert watcher.wait_for(lambda t, p, r: p == b"online")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert watcher.wait_for(lambda t, p, r: t == "hexa/hub/status" and p == b"offline")
        watcher.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    out = proc.stdout.read() if proc.stdout else ""
    assert "Traceback" not in out, out


def test_restart_keeps_generated_secrets(tmp_path: Path) -> None:
    """Two starts on one data dir share the generated provision key and JWT secret."""
    env = {
        "HEXA_DATA_DIR": str(tmp_path),
        "HEXA_HTTP_PORT": "0",
        "HEXA_MQTT_PORT": "0",
        "HEXA_MQTT_WS_PORT": "off",
        "HEXA_LOG_LEVEL": "WARNING",
    }
    first, http_port, _ = _start(env)
    try:
        api = f"http://127.0.0.1:{http_port}/api/v1"
        reg = httpx.post(f"{api}/auth/register", json={"email": "keep@x.io", "password": "p" * 12})
        token = reg.json()["access_token"]
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(20) == 0
    secrets_file = json.loads((tmp_path / "secrets.json").read_text())
    second, http_port, _ = _start(env)
    try:
        api = f"http://127.0.0.1:{http_port}/api/v1"
        me = httpx.get(f"{api}/auth/me", headers={"Authorization": f"Bearer {token}"})
        assert me.status_code == 200 and me.json()["email"] == "keep@x.io"
        key = secrets_file["device_provision_key"]
        prov = httpx.post(
            f"{api}/provision/register",
            json={"model": "hexa-mini-switch-v1"},
            headers={"X-Provision-Key": key},
        )
        assert prov.status_code == 201
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(20) == 0
    assert wait_until(lambda: True)
