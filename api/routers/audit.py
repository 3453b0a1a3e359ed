"""``/audit``: the audit log, filtered and paged, scoped to the caller's organizations."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel

from hexa.api.deps import PageDep, Paging, PrincipalDep
from hexa.api.schemas import Page, Timestamp
from hexa.hub.access import PERMISSIONS
from hexa.hub.audit import SOURCES
from hexa.hub.errors import ValidationFailed
from hexa.models import AuditEntry

router = APIRouter(tags=["audit"])


class AuditEntryPublic(BaseModel):
    """One change: who (actor), through what (source), what (action), on what, when."""

    id: uuid.UUID
    at: Timestamp
    org_id: uuid.UUID | None
    actor_type: str
    actor_id: str | None
    source: str
    action: str
    device_id: uuid.UUID | None
    details: dict[str, Any]
    automation_id: uuid.UUID | None
    schedule_id: uuid.UUID | None
    request_id: str | None


def _view(e: AuditEntry) -> AuditEntryPublic:
    return AuditEntryPublic(
        id=e.id,
        at=e.at,
        org_id=e.org_id,
        actor_type=e.actor_type,
        actor_id=e.actor_id,
        source=e.source,
        action=e.action,
        device_id=e.device_id,
        details=e.details or {},
        automation_id=e.automation_id,
        schedule_id=e.schedule_id,
        request_id=e.request_id,
    )


class AuditFilters:
    """The query parameters of ``/audit`` (also those of ``/admin/audit``), checked."""

    def __init__(
        self,
        org_id: uuid.UUID | None = None,
        device_id: uuid.UUID | None = None,
        source: Annotated[str | None, Query(max_length=32)] = None,
        action: Annotated[str | None, Query(max_length=64)] = None,
        since: datetime | None = None,
        until: datetime | None = None,
        automation_id: uuid.UUID | None = None,
        schedule_id: uuid.UUID | None = None,
        request_id: Annotated[str | None, Query(max_length=128)] = None,
    ) -> None:
        if source is not None and source not in SOURCES:
            raise ValidationFailed(
                f"unknown source {source!r}", details={"field": "source", "known": sorted(SOURCES)}
            )
        for name, value in (("since", since), ("until", until)):
            if value is not None and value.tzinfo is None:
                raise ValidationFailed(f"{name} needs a timezone (e.g. Z)", details={"field": name})
        self.given: dict[str, Any] = {
            k: v
            for k, v in {
                "org_id": org_id,
                "device_id": device_id,
                "source": source,
                "action": action,
                "at__gte": since,
                "at__lt": until,
                "automation_id": automation_id,
                "schedule_id": schedule_id,
                "request_id": request_id,
            }.items()
            if v is not None
        }

    def apply(self, query: Any) -> Any:
        """``query`` narrowed by the filters given."""
        return query.filter(**self.given)


AuditFiltersDep = Annotated[AuditFilters, Depends()]


async def audit_page(query: Any, page: Paging) -> Page[AuditEntryPublic]:
    """A page of audit entries, newest first."""
    return await page.of(query, _view, "-at", "-id")


@router.get("/audit")
async def list_audit(
    principal: PrincipalDep, page: PageDep, filters: AuditFiltersDep
) -> Page[AuditEntryPublic]:
    """Newest first: the entries of the organizations the caller is an admin (or owner) of.
    Others' entries, and those of no organization (logins, changes to users, alert drills),
    are never returned here; platform admins read everything through ``/admin/audit``."""
    query = AuditEntry.all()
    if not principal.is_platform_admin:
        readable = [o for o, role in principal.roles.items() if role >= PERMISSIONS["read_audit"]]
        query = query.filter(org_id__in=readable)
    return await audit_page(filters.apply(query), page)
