"""A HomeKit pairing survives a backup and restore: a controller paired with the hub before
the backup talks to the hub started on the restored database with the keys it has."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohomekit.controller.ip.pairing import IpPairing
from support.accounts import register
from support.checks import ok
from support.cli import hexa_cli
from support.databases import new_database_url
from support.devices import online_device
from support.homekit import controller, pair
from support.hubs import RunningHub, spawn_hub, stop_hub

pytestmark = pytest.mark.anyio

KEY = "backup-key-for-homekit-tests-0123456789abcd"


async def serials(pairing: IpPairing) -> set[str]:
    """The serial numbers (device uids) of the accessories a pairing lists."""
    found = set()
    for accessory in await pairing.list_accessories_and_characteristics():
        for service in accessory["services"]:
            for char in service["characteristics"]:
                if char["type"].upper().startswith("00000030"):  # SerialNumber
                    found.add(char["value"])
    return found


def backup_and_restore(hub: RunningHub, tmp: Path) -> tuple[str, Any]:
    """`hexa backup create` of the running hub, restored into a fresh SQLite database."""
    out = tmp / "homekit.hexabak"
    source = {
        "HEXA_BACKUP_KEY": KEY,
        "HEXA_DATA_DIR": str(hub.settings.data_dir),
        "HEXA_DATABASE_URL": hub.settings.resolved_database_url,
    }
    r = hexa_cli(["backup", "create", "--out", str(out)], source)
    assert r.returncode == 0, r.stderr
    url, drop = new_database_url("sqlite", tmp)
    target = {
        "HEXA_BACKUP_KEY": KEY,
        "HEXA_DATA_DIR": str(tmp / "restored"),
        "HEXA_DATABASE_URL": url,
    }
    r = hexa_cli(["backup", "restore", str(out)], target)
    assert r.returncode == 0, r.stderr
    return url, drop


async def test_a_paired_controller_works_with_the_restored_hub(
    hub: RunningHub, tmp_path: Path, track: Any
) -> None:
    """Pair a controller, back up, restore into a fresh database, start a hub on it: the
    same controller keys open a session with the restored bridge and list the device."""
    user = register(hub)
    _dev, device = online_device(hub, user, track)
    with hub.api(user.access_token) as c:
        bridge = ok(c.put(f"/orgs/{user.org_id}/homekit", json={"enabled": True}))
    pairing = await pair(bridge)
    try:
        assert device.uid in await serials(pairing)
        data = dict(pairing.pairing_data)
    finally:
        await pairing.close()
    url, drop = await asyncio.to_thread(backup_and_restore, hub, tmp_path)
    restored = await asyncio.to_thread(spawn_hub, url, tmp_path / "restored")
    try:
        with restored.api() as c:
            login = c.post("/auth/login", json={"email": user.email, "password": user.password})
            token = ok(login)["access_token"]
            again = ok(
                c.get(f"/orgs/{user.org_id}/homekit", headers={"Authorization": f"Bearer {token}"})
            )
        assert again["paired"] is True and again["hap_id"] == bridge["hap_id"]
        assert again["setup_code"] == bridge["setup_code"]
        assert again["port"] != bridge["port"]  # the restored hub's own bridge, not the first
        data["AccessoryPort"] = again["port"]
        moved = IpPairing(controller(), data)
        try:
            assert device.uid in await serials(moved)
        finally:
            await moved.close()
    finally:
        await asyncio.to_thread(stop_hub, restored)
        drop()
