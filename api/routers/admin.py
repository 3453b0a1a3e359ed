"""``/admin``: platform-admin operations: users, the whole fleet, every organization's audit
log, and an overview of the hub. To anyone else these routes do not exist (404)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel
from tortoise.expressions import Q
from tortoise.transactions import in_transaction

from hexa.api.auditing import ActorDep
from hexa.api.deps import HubDep, PageDep, PrincipalDep, PrincipalsDep
from hexa.api.routers.audit import AuditEntryPublic, AuditFiltersDep, audit_page
from hexa.api.routers.devices import device_views
from hexa.api.schemas import (
    DevicePublic,
    Page,
    Timestamp,
    UserPatch,
    UserPublic,
    user_view,
)
from hexa.hub import __version__, operations
from hexa.hub.access import Principal
from hexa.hub.audit import write
from hexa.hub.errors import Conflict, NotFound
from hexa.hub.security import utcnow
from hexa.models import AuditEntry, Device, User

router = APIRouter(prefix="/admin", tags=["admin"])


async def platform_admin(principal: PrincipalDep) -> Principal:
    """The caller, if a platform admin. Declared first on each route, so that a normal
    user learns nothing, not even which query parameters the route takes."""
    if not principal.is_platform_admin:
        raise NotFound("route")  # the admin surface does not exist for others
    return principal


AdminDep = Annotated[Principal, Depends(platform_admin)]


@router.get("/users")
async def list_users(_: AdminDep, page: PageDep) -> Page[UserPublic]:
    return await page.of(User.all(), user_view)


@router.patch("/users/{user_id}")
async def patch_user(
    principal: AdminDep,
    user_id: uuid.UUID,
    body: UserPatch,
    actor: ActorDep,
    hub: HubDep,
    principals: PrincipalsDep,
) -> UserPublic:
    """Activate or deactivate a user, or change their platform role; each change that
    changes something is audited (``user_enabled``, ``user_disabled``, ``user_promoted``,
    ``user_demoted``; in no organization) in the transaction that makes it."""
    user = await User.get_or_none(id=user_id)
    if user is None:
        raise NotFound("user")
    if user.id == principal.id and (body.is_active is False or body.role == "user"):
        raise Conflict("platform admins cannot disable or demote themselves")
    changes = body.model_dump(exclude_unset=True, exclude_none=True)
    actions = []
    if "is_active" in changes and changes["is_active"] != user.is_active:
        actions.append("user_enabled" if changes["is_active"] else "user_disabled")
    if "role" in changes and changes["role"] != user.role:
        actions.append("user_promoted" if changes["role"] == "admin" else "user_demoted")
    try:
        async with in_transaction():
            if changes:
                user.update_from_dict(changes)
                await user.save()
            if body.is_active is False:
                await hub.accounts.revoke_all(user)
            for action in actions:
                details = {"user_id": str(user.id), "role": user.role, "is_active": user.is_active}
                await write(actor, action, details=details)
    finally:
        principals.forget(user.id)
    return user_view(user)


class DeviceCounts(BaseModel):
    """``online`` + ``offline`` = ``total``; ``unclaimed`` (in no organization) overlaps them."""

    total: int
    online: int
    offline: int
    unclaimed: int


class CommandCounts(BaseModel):
    applied: int
    timeout: int
    offline: int
    rejected: int


class ScheduleCounts(BaseModel):
    enabled: int
    failed_24h: int


class AutomationCounts(BaseModel):
    enabled: int
    fired_24h: int


class BrokerCounts(BaseModel):
    """``connections`` is null when the hub uses an external broker it cannot see into."""

    connections: int | None


class Overview(BaseModel):
    users: int
    orgs: int
    devices: DeviceCounts
    commands_24h: CommandCounts
    schedules: ScheduleCounts
    automations: AutomationCounts
    broker: BrokerCounts
    version: str
    uptime_s: int
    started_at: Timestamp


@router.get("/overview")
async def overview(_: AdminDep, hub: HubDep) -> Overview:
    """The hub at a glance; counts over the last 24 hours are by outcome."""
    o = await operations.overview(embedded_broker=not hub.settings.broker_url)
    d = o.devices
    return Overview(
        users=o.users,
        orgs=o.orgs,
        devices=DeviceCounts(
            total=d.total, online=d.online, offline=d.offline, unclaimed=d.unclaimed
        ),
        commands_24h=CommandCounts(**o.commands_24h),
        schedules=ScheduleCounts(enabled=o.schedules_enabled, failed_24h=o.schedules_failed_24h),
        automations=AutomationCounts(
            enabled=o.automations_enabled, fired_24h=o.automations_fired_24h
        ),
        broker=BrokerCounts(connections=o.broker_connections),
        version=__version__,
        uptime_s=max(0, int((utcnow() - hub.started_at).total_seconds())),
        started_at=hub.started_at,
    )


@router.get("/devices")
async def list_devices(
    _: AdminDep,
    page: PageDep,
    org_id: uuid.UUID | None = None,
    online: bool | None = None,
    model: Annotated[str | None, Query(max_length=64)] = None,
    claimed: bool | None = None,
    q: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
) -> Page[DevicePublic]:
    """Every device of the hub, unclaimed ones included, oldest first. ``q`` matches a
    substring of the uid or the name, ignoring case."""
    query = Device.filter(deleted_at=None)
    if org_id is not None:
        query = query.filter(org_id=org_id)
    if online is not None:
        query = query.filter(online=online)
    if model is not None:
        query = query.filter(model=model)
    if claimed is not None:
        query = query.filter(org_id__isnull=not claimed)
    if q is not None:
        query = query.filter(Q(device_uid__icontains=q) | Q(name__icontains=q))
    devices, total = await page.rows(query)
    return page.wrap(await device_views(devices), total)


@router.get("/audit")
async def list_audit(
    _: AdminDep,
    page: PageDep,
    filters: AuditFiltersDep,
    actor_id: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
) -> Page[AuditEntryPublic]:
    """Every organization's audit log (and entries of no organization), newest first,
    with the filters of ``/audit`` and the actor's id."""
    query = filters.apply(AuditEntry.all())
    if actor_id is not None:
        query = query.filter(actor_id=actor_id)
    return await audit_page(query, page)
