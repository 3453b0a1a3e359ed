"""The lookups the OTA routes of a whole fleet share: concurrent callers asking the same
question share one query (:class:`SingleFlight`), and devices authenticating at once are
read in batches (:class:`DeviceBatches`), with :data:`DEVICE_FIELDS` alone.

Neither is a cache: every answer comes from a query that started after the question was
asked, so a changed row is seen by the next lookup.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from hexa.models import Device


class SingleFlight:
    """Concurrent callers asking the same question share one database query.

    Not a cache: a caller never gets an answer from a query that finished before it asked;
    it joins one still running, or starts its own. A fleet checking at once thus costs a
    few queries instead of one per device, and a changed row is seen by the next query.
    """

    def __init__(self) -> None:
        self._running: dict[Any, asyncio.Future[Any]] = {}

    async def run(self, key: Any, query: Callable[[], Any]) -> Any:
        running = self._running.get(key)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._running[key] = future
        try:
            result = await query()
        except BaseException as exc:
            future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("cancelled"))
            future.exception()  # retrieved: joiners re-raise it, nobody else must
            raise
        finally:
            self._running.pop(key, None)
        future.set_result(result)
        return result


#: the fields of a device the OTA routes use: a device authenticated for them is read with
#: these alone (a full row, with its dates and metadata, cost a fleet's checks a tenth of
#: their CPU); reading any other field of it raises AttributeError
DEVICE_FIELDS = (
    "id",
    "device_uid",
    "model",
    "fw_version",
    "token_hash",
    "ota_channel",
    "ota_security_version",
)


class DeviceBatches:
    """Device lookups by uid, batched: at most one ``WHERE device_uid IN (…)`` query runs at
    a time, and the lookups made while it runs become the next one (HTTP Basic auth of a
    fleet at once). An idle hub answers a lookup at once, a busy one in few queries.

    Not a cache: every lookup is answered by a query that started after it was made."""

    #: uids per query (well under SQLite's and PostgreSQL's limits on parameters)
    MAX_BATCH = 500

    def __init__(self) -> None:
        self._waiting: dict[str, list[asyncio.Future[Device | None]]] = {}
        self._flight: asyncio.Task[None] | None = None

    async def get(self, uid: str) -> Device | None:
        future: asyncio.Future[Device | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(uid, []).append(future)
        if self._flight is None:
            self._flight = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            await asyncio.sleep(0)  # the other lookups of this turn join the first batch
            while self._waiting:
                uids = list(self._waiting)[: self.MAX_BATCH]
                batch = {uid: self._waiting.pop(uid) for uid in uids}
                try:
                    rows = await Device.filter(device_uid__in=uids, deleted_at=None).only(
                        *DEVICE_FIELDS
                    )
                except Exception as exc:  # noqa: BLE001 - each caller of the batch re-raises it
                    _fail(batch, exc)
                    continue
                found = {d.device_uid: d for d in rows}
                for uid, waiting in batch.items():
                    for f in waiting:
                        if not f.done():
                            # each caller its own copy: a route may change its device
                            f.set_result(_copy(found[uid]) if uid in found else None)
        except BaseException as exc:  # cancelled (the hub stops): nobody waits forever
            _fail(self._waiting, exc)
            self._waiting = {}
            raise
        finally:
            self._flight = None


def _fail(batch: dict[str, list[asyncio.Future[Device | None]]], exc: BaseException) -> None:
    for waiting in batch.values():
        for f in waiting:
            if not f.done():
                f.set_exception(RuntimeError(f"device lookup failed: {exc!r}"))
                f.exception()  # retrieved: the caller re-raises it, nobody else must


def _copy(device: Device) -> Device:
    clone = Device.__new__(Device)
    clone.__dict__.update(device.__dict__)
    return clone
