"""The audit log writer: entries are queued and written in batches."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import anyio
from anyio.abc import TaskStatus

from hexa.models import AuditEntry

log = logging.getLogger(__name__)

SOURCES = frozenset(
    {
        "api",
        "ws_client",
        "schedule",
        "automation",
        "mqtt",
        "home_assistant",
        "homekit",
        "alexa",
        "device",
        "system",
    }
)
BATCH = 500
FLUSH_EVERY_S = 0.1


def _uuid(value: object) -> uuid.UUID | None:
    if value is None or isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


class AuditLog:
    """Queues entries and writes them in batches, so a hot path never waits on a write.

    Entries reach the database within about 100 ms; ``flush()`` writes what is queued.
    A failed batch is logged and retried once row by row; auditing never undoes an action.
    """

    def __init__(self, max_queued: int = 50_000) -> None:
        self._queue: asyncio.Queue[AuditEntry] = asyncio.Queue(max_queued)

    async def record(
        self,
        *,
        action: str,
        source: str,
        actor_type: str,
        actor_id: str | None = None,
        device_id: object = None,
        org_id: object = None,
        details: dict[str, Any] | None = None,
        request_id: str | None = None,
        automation_id: object = None,
        schedule_id: object = None,
    ) -> None:
        entry = AuditEntry(
            action=action,
            source=source if source in SOURCES else "mqtt",
            actor_type=actor_type,
            actor_id=actor_id,
            device_id=_uuid(device_id),
            org_id=_uuid(org_id),
            details=details or {},
            request_id=request_id,
            automation_id=_uuid(automation_id),
            schedule_id=_uuid(schedule_id),
        )
        await self._queue.put(entry)  # back-pressure only if the database stalls for long

    async def by_user(
        self,
        user_id: object,
        action: str,
        *,
        org_id: object,
        request_id: str | None,
        device_id: object = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        """Record a change a user made through the API."""
        await self.record(
            action=action,
            source="api",
            actor_type="user",
            actor_id=str(user_id),
            device_id=device_id,
            org_id=org_id,
            details=details,
            request_id=request_id,
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                await asyncio.sleep(FLUSH_EVERY_S)
                await self.flush()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self.flush()

    async def flush(self) -> None:
        while not self._queue.empty():
            batch: list[AuditEntry] = []
            while not self._queue.empty() and len(batch) < BATCH:
                batch.append(self._queue.get_nowait())
            try:
                await AuditEntry.bulk_create(batch)
            except Exception:
                log.exception("audit batch of %d failed; writing one by one", len(batch))
                for entry in batch:
                    try:
                        await entry.save()
                    except Exception:
                        log.exception("could not write audit entry %s", entry.action)
