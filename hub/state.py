"""The in-memory view of devices: identity, tenancy, relay/input state, presence.

The database is the source of truth; this cache is filled from it on first use and
kept current by the relay service and presence, which are its only writers.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio
from anyio.abc import TaskStatus
from tortoise import connections

from hexa.hub.batch import Batched
from hexa.hub.security import utcnow
from hexa.models import Device, DeviceInput, RelayState

#: how often last_seen_at is written for a device that keeps talking
LAST_SEEN_EVERY_S = 5.0
#: last_seen_at updates wait this long to share one write with other devices'
SEEN_FLUSH_S = 1.0
#: devices loaded into the cache with one set of queries at most (SQL parameters)
LOAD_BATCH = 500

log = logging.getLogger(__name__)


@dataclass
class DeviceInfo:
    id: uuid.UUID
    uid: str
    org_id: uuid.UUID | None
    relay_count: int
    input_count: int
    relays: list[bool]
    inputs: list[bool]
    online: bool = False
    fw_version: str | None = None
    seen_written: float = 0.0
    #: the configuration version set, and the last one the device acknowledged
    config_version: int = 0
    config_applied_version: int = 0


class DeviceCache:
    """uid → DeviceInfo for live (not deleted) devices."""

    def __init__(self) -> None:
        self._by_uid: dict[str, DeviceInfo] = {}
        self._online: set[str] = set()  # uids of cached devices that are online
        self._seen: dict[uuid.UUID, datetime] = {}
        self._seen_due = asyncio.Event()
        #: bumped by every forget(): a load that overlapped one is not kept
        self._generation = 0
        #: devices not cached yet, loaded together (a connect storm is thousands)
        self._loads: Batched[str, DeviceInfo] = Batched(self._load)
        #: online/offline changes, written together
        self._online_writes: Batched[tuple[uuid.UUID, bool], None] = Batched(_write_online)

    def peek(self, uid: str) -> DeviceInfo | None:
        return self._by_uid.get(uid)

    async def get(self, uid: str) -> DeviceInfo | None:
        """The live device ``uid``; one not cached yet is loaded together with the others
        asked for at the same time (three queries for them all, not three each)."""
        info = self._by_uid.get(uid)
        if info is not None:
            return info
        return await self._loads.one(uid)

    async def _load(self, uids: list[str]) -> dict[str, DeviceInfo]:
        generation = self._generation
        found: dict[str, DeviceInfo] = {}
        for i in range(0, len(uids), LOAD_BATCH):
            for info in await _load_devices(uids[i : i + LOAD_BATCH]):
                if self._generation != generation:
                    # a claim, release or delete happened meanwhile: this read may be
                    # older than it, so it answers its callers but is not kept
                    found[info.uid] = info
                    continue
                info = found[info.uid] = self._by_uid.setdefault(info.uid, info)
                if info.online:
                    self._online.add(info.uid)
        return found

    async def set_online(self, device: DeviceInfo, online: bool) -> None:
        """Record a presence change; the row is written with the other changes of the
        same moment, and this returns once it is."""
        device.online = online
        device.seen_written = time.monotonic()
        (self._online.add if online else self._online.discard)(device.uid)
        self._seen.pop(device.id, None)
        await self._online_writes.one((device.id, online))

    async def touch(self, device: DeviceInfo) -> None:
        """Record ``last_seen_at``. Every ack and report counts as seen, so that is written
        at most every few seconds per device, and for many devices at once
        (:meth:`flush_seen`)."""
        now = time.monotonic()
        if now - device.seen_written < LAST_SEEN_EVERY_S:
            return
        device.seen_written = now
        self._seen[device.id] = utcnow()
        self._seen_due.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Write pending ``last_seen_at`` values a second after the first one, for many
        devices at once; what is pending when this stops is written before it returns."""
        task_status.started()
        try:
            while True:
                await self._seen_due.wait()
                await anyio.sleep(SEEN_FLUSH_S)
                self._seen_due.clear()
                try:
                    await self.flush_seen()
                except Exception:
                    log.warning("last_seen_at not written (retried with the next)", exc_info=True)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(3):
                try:
                    await self.flush_seen()
                except Exception:
                    log.warning("last_seen_at not written at shutdown", exc_info=True)

    async def flush_seen(self) -> None:
        """Write the pending ``last_seen_at`` values in one statement batch."""
        if not self._seen:
            return
        pending, self._seen = self._seen, {}
        try:
            await execute_rows(_UPDATE_SEEN, [[at, str(did)] for did, at in pending.items()])
        except Exception:
            for did, at in pending.items():  # keep what newer touches did not replace
                self._seen.setdefault(did, at)
            raise

    async def touch_uid(self, uid: str) -> None:
        device = await self.get(uid)
        if device is not None:
            await self.touch(device)

    def forget(self, uid: str) -> None:
        self._generation += 1
        self._by_uid.pop(uid, None)
        self._online.discard(uid)

    def online_count(self) -> int:
        return len(self._online)


@dataclass
class _Batch:
    relays: list[list[Any]] = field(default_factory=list)
    inputs: list[list[Any]] = field(default_factory=list)
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class StateWriter:
    """Group commit for relay and input state rows.

    A write joins the batch being gathered and waits for it to be committed. One task
    writes batches one after the other, each in one ``executemany`` transaction, so
    under load one commit carries the changes of many devices, and when idle a write
    costs about what a single UPDATE does. A failed batch fails every writer in it.
    """

    def __init__(self) -> None:
        self._next: _Batch | None = None
        self._due = asyncio.Event()

    async def write(
        self, device_id: uuid.UUID, relays: dict[int, bool], inputs: dict[int, bool]
    ) -> None:
        """Join the batch being gathered; returns once it is committed (or raises)."""
        batch = self._next
        if batch is None:
            batch = self._next = _Batch()
        now, key = utcnow(), str(device_id)
        batch.relays.extend([state, now, key, index] for index, state in relays.items())
        batch.inputs.extend([state, now, key, index] for index, state in inputs.items())
        self._due.set()
        await asyncio.shield(batch.done)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Commit batches one after the other; a batch gathered when this stops is still
        committed (shielded, bounded) before it returns."""
        task_status.started()
        try:
            while True:
                await self._due.wait()
                self._due.clear()
                await self._drain()
        finally:
            # what was gathered, once: writes still arriving (devices flooding the hub
            # while it stops) must not keep shutdown waiting
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self._drain(passes=1)

    async def _drain(self, passes: int | None = None) -> None:
        while self._next is not None and passes != 0:
            if passes is not None:
                passes -= 1
            batch, self._next = self._next, None
            try:
                await self._commit(batch)
            except Exception as exc:  # noqa: BLE001 - handed to every writer of the batch
                batch.done.set_exception(exc)
                batch.done.exception()  # each writer re-raises it; none is left unread
            else:
                batch.done.set_result(None)

    async def _commit(self, batch: _Batch) -> None:
        for sql, rows in ((_UPDATE_RELAY, batch.relays), (_UPDATE_INPUT, batch.inputs)):
            if rows:
                await execute_rows(sql, rows)


_UPDATE_RELAY = (
    'UPDATE "relay_states" SET "state"=?,"updated_at"=? WHERE "device_id"=? AND "index"=?'
)
_UPDATE_SEEN = 'UPDATE "devices" SET "last_seen_at"=? WHERE "id"=?'
_UPDATE_INPUT = (
    'UPDATE "device_inputs" SET "state"=?,"updated_at"=? WHERE "device_id"=? AND "index"=?'
)


async def _load_devices(uids: list[str]) -> list[DeviceInfo]:
    """The live devices among ``uids`` as the cache keeps them, in three queries."""
    rows = await Device.filter(device_uid__in=uids, deleted_at=None).values(
        "id",
        "device_uid",
        "org_id",
        "relay_count",
        "input_count",
        "online",
        "fw_version",
        "config_version",
        "config_applied_version",
    )
    if not rows:
        return []
    ids = [_uuid(row["id"]) for row in rows]
    relays: dict[uuid.UUID, list[bool]] = {}
    inputs: dict[uuid.UUID, list[bool]] = {}
    for model, states in ((RelayState, relays), (DeviceInput, inputs)):
        for device_id, state in (
            await model.filter(device_id__in=ids)
            .order_by("device_id", "index")
            .values_list("device_id", "state")
        ):
            states.setdefault(_uuid(device_id), []).append(bool(state))
    return [
        DeviceInfo(
            id=device_id,
            uid=row["device_uid"],
            org_id=None if row["org_id"] is None else _uuid(row["org_id"]),
            relay_count=row["relay_count"],
            input_count=row["input_count"],
            relays=relays.get(device_id) or [False] * row["relay_count"],
            inputs=inputs.get(device_id) or [False] * row["input_count"],
            online=bool(row["online"]),
            fw_version=row["fw_version"],
            config_version=row["config_version"],
            config_applied_version=row["config_applied_version"],
        )
        for row, device_id in zip(rows, ids, strict=True)
    ]


def _uuid(value: Any) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


async def _write_online(changes: list[tuple[uuid.UUID, bool]]) -> dict[Any, None]:
    """Write devices' ``online`` (and ``last_seen_at``) in one statement batch."""
    now = utcnow()
    await execute_rows(
        _SET_ONLINE, [[online, now, str(device_id)] for device_id, online in changes]
    )
    return {}


_SET_ONLINE = 'UPDATE "devices" SET "online"=?,"last_seen_at"=? WHERE "id"=?'


async def execute_rows(sql: str, rows: list[list[Any]]) -> None:
    """Run one ``?``-parameterised statement for every row, in one transaction (the
    placeholders are numbered for PostgreSQL)."""
    client = connections.get("default")
    if client.capabilities.dialect == "postgres":
        sql = _numbered(sql)
    if len(rows) == 1:
        await client.execute_query(sql, rows[0])
    else:
        await client.execute_many(sql, rows)


@functools.cache
def _numbered(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1, $2, …``."""
    parts = sql.split("?")
    return "".join(p + (f"${i}" if i < len(parts) else "") for i, p in enumerate(parts, 1))
