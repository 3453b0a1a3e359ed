"""Backups of a running hub: taken under traffic, restored into fresh SQLite and PostgreSQL
databases (across engines both ways), and a hub started on the restored database serves
the same users, devices (their tokens still valid), schedules, automations and HomeKit
bridge; the admin API starts and lists backups."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.accounts import admin_token, register
from support.checks import assert_error, ok, wait_until
from support.cli import hexa_cli
from support.databases import migrated_database_url, new_database_url, pg_unreachable
from support.devices import online_device
from support.hubs import RunningHub, spawn_hub, stop_hub
from support.mqtt import MqttDevice

KEY = "backup-key-for-hub-tests-0123456789abcdefgh"


def hexa(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return hexa_cli(args, {"HEXA_BACKUP_KEY": KEY, **env}, timeout=180)


def test_backup_under_traffic_restores_into_each_engine(
    hub: RunningHub, tmp_path: Path, track: Callable[[Any], Any]
) -> None:
    """A backup taken while users register and relays switch restores into a fresh SQLite
    and a fresh PostgreSQL database; hubs on them log the user in, accept the device's
    token over MQTT, and list the schedule, the automation and the HomeKit bridge."""
    user = register(hub)
    dev, device = online_device(hub, user, track)
    with hub.api(user.access_token) as c:
        schedule = ok(
            c.post(
                "/schedules",
                json={
                    "device_id": dev["id"],
                    "name": "Porch light",
                    "cron": "0 0 1 1 *",
                    "timezone": "UTC",
                    "action": {"type": "set_relay", "relay_index": 0, "state": True},
                },
            ),
            201,
        )
        automations = ok(c.get("/automations"))["items"]
        assert automations  # the claimed switch's default hold rule
        homekit = ok(c.get(f"/orgs/{user.org_id}/homekit"))

    stop = threading.Event()
    done = {"registered": 0, "commands": 0}

    def traffic() -> None:
        with hub.api(user.access_token) as c:
            while not stop.is_set():
                register(hub)
                done["registered"] += 1
                r = c.post(f"/devices/{dev['id']}/relays/1", json={"state": "toggle"})
                done["commands"] += r.status_code == 200

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: done["registered"] >= 2, 20)
        out = tmp_path / "live.hexabak"
        r = hexa(
            ["backup", "create", "--out", str(out)],
            {
                "HEXA_DATA_DIR": str(hub.settings.data_dir),
                "HEXA_DATABASE_URL": hub.settings.resolved_database_url,
            },
        )
        assert r.returncode == 0, r.stderr
        assert wait_until(lambda: done["registered"] >= 4, 20)  # traffic went on
    finally:
        stop.set()
        thread.join(30)
    assert done["commands"] >= 1

    kinds = ["sqlite"] + ([] if pg_unreachable() else ["postgres"])
    for kind in kinds:
        url, drop = new_database_url(kind, tmp_path)
        data = tmp_path / f"restored-{kind}"
        try:
            r = hexa(
                ["backup", "restore", str(out)],
                {"HEXA_DATA_DIR": str(data), "HEXA_DATABASE_URL": url},
            )
            assert r.returncode == 0, r.stderr
            restored = spawn_hub(url, data)
            try:
                with restored.api() as c:
                    login = c.post(
                        "/auth/login", json={"email": user.email, "password": user.password}
                    )
                token = ok(login)["access_token"]
                with restored.api(token) as c:
                    names = [s["name"] for s in ok(c.get("/schedules"))["items"]]
                    assert schedule["name"] in names
                    ids = {a["id"] for a in ok(c.get("/automations"))["items"]}
                    assert {a["id"] for a in automations} <= ids
                    again = ok(c.get(f"/orgs/{user.org_id}/homekit"))
                    assert again.get("setup_code") == homekit.get("setup_code")
                    assert again.get("paired") == homekit.get("paired")
                device.close()  # the device moves to the restored hub with the same token
                moved = track(MqttDevice(restored, dev["device_uid"], dev["device_token"]))
                assert moved.ok()
                with restored.api(token) as c:
                    assert wait_until(
                        lambda: c.get(f"/devices/{dev['id']}").json().get("online"), 10
                    )
            finally:
                stop_hub(restored)
        finally:
            drop()


def test_admin_api_starts_and_lists_backups(hub: RunningHub) -> None:
    """POST /admin/backups answers 202; the backup is then listed, verified, with its size
    and checksum; the metrics show its success; to others the routes do not exist."""
    admin = admin_token(hub)
    user = register(hub)
    with hub.api(user.access_token) as c:
        assert_error(c.post("/admin/backups"), 404)
        assert_error(c.get("/admin/backups"), 404)
    with hub.api(admin) as c:
        before = ok(c.get("/admin/backups"))["total"]
        started = ok(c.post("/admin/backups"), 202)
        assert started["status"] == "running" and started["name"].endswith(".hexabak")

        def listed() -> dict[str, Any] | None:
            body = ok(c.get("/admin/backups"))
            found = [i for i in body["items"] if i["name"] == started["name"]]
            return found[0] if found and found[0]["verified"] is not None else None

        item = wait_until(listed, 60)
        assert item, ok(c.get("/admin/backups"))
        assert item["verified"] is True and item["size"] > 0 and len(item["checksum"]) == 64
        assert ok(c.get("/admin/backups"))["total"] == before + 1

        def audited() -> bool:
            entries = ok(c.get("/admin/audit", params={"action": "backup_created"}))["items"]
            return any(e["details"].get("file") == started["name"] for e in entries)

        assert wait_until(audited, 10)
    text = httpx.get(hub.base + "/metrics", timeout=15).text
    stamp = [
        line for line in text.splitlines() if line.startswith("hexa_backup_last_success_timestamp")
    ]
    assert stamp and float(stamp[0].split()[-1]) > 0


@pytest.fixture
def frequent_hub(tmp_path: Path) -> Any:
    url, drop = migrated_database_url("sqlite", tmp_path)
    h = spawn_hub(
        url,
        tmp_path / "data",
        backup_key=KEY,
        backup_schedule="* * * * * */2",  # croniter's sixth field: every 2 seconds
        backup_keep="2",
    )
    yield h
    stop_hub(h)
    drop()


def test_scheduled_backups_keep_the_newest(frequent_hub: RunningHub) -> None:
    """With a schedule every 2 s and HEXA_BACKUP_KEEP=2, backups keep coming and only the
    two newest stay. A new backup is complete (written and verified) before the oldest is
    pruned, so for a moment there may be three, never more."""
    directory = frequent_hub.settings.data_dir / "backups"
    seen: set[str] = set()
    most = 0

    def enough() -> bool:
        nonlocal most
        present = {p.name for p in directory.glob("*.hexabak")}
        seen.update(present)
        most = max(most, len(present))
        return len(seen) >= 4

    assert wait_until(enough, 60)
    assert most <= 3
    # between one backup's prune and the next backup's write, the two newest alone
    assert wait_until(lambda: len(list(directory.glob("*.hexabak"))) == 2, 10)
