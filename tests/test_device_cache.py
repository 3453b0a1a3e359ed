"""The hub's device cache on a real database: loads many devices with one set of queries,
writes presence changes together, and never keeps a read that a forget() overtook."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from support.databases import migrated_database_url
from tortoise import Tortoise
from tortoise.backends.base.executor import EXECUTOR_CACHE

from hexa.hub import db, state
from hexa.models import Device


async def _with_orm(url: str, body: Any) -> None:
    """The ORM on ``url`` for this event loop only: the suite's shared hub, running in
    the same process, holds the global context."""
    # compiled INSERTs are kept by connection name, not by database (see db.database):
    # none of another database's may be used here, none of this one's left behind
    EXECUTOR_CACHE.clear()
    await Tortoise.init(config=db.tortoise_config(url), _enable_global_fallback=False)
    try:
        await body()
    finally:
        await Tortoise.close_connections()
        EXECUTOR_CACHE.clear()


async def _device(uid: str, *, online: bool = False) -> Device:
    return await Device.create(
        device_uid=uid,
        model="hexa-mini-switch-v1",
        device_class="switch",
        token_hash="0" * 64,
        relay_count=3,
        input_count=3,
        online=online,
    )


def test_many_gets_at_once_share_one_load_and_presence_is_written(
    db_kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, drop = migrated_database_url(db_kind, tmp_path)

    async def body() -> None:
        uids = [f"hx-cache-{i:03d}" for i in range(40)]
        for i, uid in enumerate(uids):
            await _device(uid, online=i % 2 == 0)
        loads: list[int] = []
        real = state._load_devices

        async def counted(batch: list[str]) -> list[state.DeviceInfo]:
            loads.append(len(batch))
            return await real(batch)

        monkeypatch.setattr(state, "_load_devices", counted)
        cache = state.DeviceCache()
        got = await asyncio.gather(*(cache.get(uid) for uid in [*uids, "hx-no-such"]))
        assert loads == [41]  # one load for all of them
        assert [d.uid for d in got if d is not None] == uids
        assert got[-1] is None
        assert cache.online_count() == 20
        assert all(d.relays == [False] * 3 for d in got if d is not None)
        assert await cache.get(uids[0]) is got[0]  # now from the cache
        assert loads == [41]

        devices = [d for d in got if d is not None]
        await asyncio.gather(*(cache.set_online(d, True) for d in devices))
        assert cache.online_count() == 40
        rows = await Device.filter(device_uid__in=uids).values_list("online", "last_seen_at")
        assert all(online and seen is not None for online, seen in rows)
        await cache.set_online(devices[3], False)
        assert not (await Device.get(device_uid=uids[3])).online
        assert cache.online_count() == 39

    try:
        asyncio.run(_with_orm(url, body))
    finally:
        drop()


def test_a_load_overtaken_by_forget_is_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, drop = migrated_database_url("sqlite", tmp_path)

    async def body() -> None:
        device = await _device("hx-cache-race")
        cache = state.DeviceCache()
        reading, go_on = asyncio.Event(), asyncio.Event()
        real = state._load_devices

        async def slow(batch: list[str]) -> list[state.DeviceInfo]:
            rows = await real(batch)  # the row as it was before the change below
            reading.set()
            await go_on.wait()
            return rows

        monkeypatch.setattr(state, "_load_devices", slow)
        load = asyncio.create_task(cache.get("hx-cache-race"))
        await reading.wait()
        # meanwhile the device is claimed by an organisation: the registry forgets it
        await Device.filter(id=device.id).update(org_id=None, name="claimed meanwhile")
        cache.forget("hx-cache-race")
        go_on.set()
        stale = await load
        assert stale is not None and stale.uid == "hx-cache-race"  # answers its caller
        assert cache.peek("hx-cache-race") is None  # but is not kept
        monkeypatch.setattr(state, "_load_devices", real)
        fresh = await cache.get("hx-cache-race")
        assert fresh is not None and fresh is not stale
        assert cache.peek("hx-cache-race") is fresh

    try:
        asyncio.run(_with_orm(url, body))
    finally:
        drop()
