"""``/audit``: the audit log, filtered and paged, scoped to the caller's organizations."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query

from hexa.api.deps import PageDep, PrincipalDep, in_visible_orgs
from hexa.api.schemas import iso
from hexa.hub.audit import SOURCES
from hexa.hub.errors import ValidationFailed
from hexa.models import AuditEntry

router = APIRouter(tags=["audit"])


def _view(e: AuditEntry) -> dict[str, Any]:
    def opt(value: Any) -> str | None:
        return None if value is None else str(value)

    return {
        "id": str(e.id),
        "at": iso(e.at),
        "org_id": opt(e.org_id),
        "actor_type": e.actor_type,
        "actor_id": e.actor_id,
        "source": e.source,
        "action": e.action,
        "device_id": opt(e.device_id),
        "details": e.details or {},
        "automation_id": opt(e.automation_id),
        "schedule_id": opt(e.schedule_id),
        "request_id": e.request_id,
    }


@router.get("/audit")
async def list_audit(
    principal: PrincipalDep,
    page: PageDep,
    org_id: uuid.UUID | None = None,
    device_id: uuid.UUID | None = None,
    source: Annotated[str | None, Query(max_length=32)] = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
    since: datetime | None = None,
    until: datetime | None = None,
    automation_id: uuid.UUID | None = None,
    schedule_id: uuid.UUID | None = None,
    request_id: Annotated[str | None, Query(max_length=128)] = None,
) -> dict[str, Any]:
    """Newest first. Entries of organizations the caller is not in are never returned."""
    if source is not None and source not in SOURCES:
        raise ValidationFailed(
            f"unknown source {source!r}", details={"field": "source", "known": sorted(SOURCES)}
        )
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise ValidationFailed(f"{name} needs a timezone (e.g. Z)", details={"field": name})
    query = in_visible_orgs(AuditEntry.all(), principal)
    filters: dict[str, Any] = {
        "org_id": org_id,
        "device_id": device_id,
        "source": source,
        "action": action,
        "at__gte": since,
        "at__lt": until,
        "automation_id": automation_id,
        "schedule_id": schedule_id,
        "request_id": request_id,
    }
    query = query.filter(**{k: v for k, v in filters.items() if v is not None})
    return await page.of(query, _view, "-at", "-id")
