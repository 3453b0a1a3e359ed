"""The audit log writer."""

from __future__ import annotations

import logging
import uuid
from typing import Any

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


def _uuid(value: object) -> uuid.UUID | None:
    if value is None or isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


async def record(
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
    """Write one entry. A failure is logged, never raised: auditing must not undo an action."""
    try:
        await AuditEntry.create(
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
    except Exception:
        log.exception("could not write audit entry %s", action)
