"""``/schedules``: cron schedules that switch relays (manager+ to change, viewer to read)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field, StrictBool
from tortoise.transactions import in_transaction

from hexa.api.auditing import ActorDep
from hexa.api.deps import (
    DEVICE,
    SCHEDULE,
    HubDep,
    PageDep,
    PrincipalDep,
    fetch,
    in_visible_orgs,
)
from hexa.api.errors import request_id_of
from hexa.api.schemas import Body, Name, Page, Timestamp
from hexa.hub.audit import change_action, write_rule
from hexa.hub.errors import NotFound, ValidationFailed
from hexa.hub.schedules import check_cron, check_timezone, next_run
from hexa.hub.security import utcnow
from hexa.models import Device, Schedule

router = APIRouter(tags=["schedules"])


class SetRelay(Body):
    type: Literal["set_relay"]
    relay_index: Annotated[int, Field(ge=0, le=63)]
    state: StrictBool


class SetAllRelays(Body):
    type: Literal["set_all_relays"]
    state: StrictBool


ScheduleAction = Annotated[SetRelay | SetAllRelays, Field(discriminator="type")]
Cron = Annotated[str, Field(min_length=1, max_length=120)]
Tz = Annotated[str, Field(min_length=1, max_length=64)]


class ScheduleCreate(Body):
    device_id: uuid.UUID
    name: Name
    cron: Cron
    timezone: Tz = "UTC"
    enabled: StrictBool = True
    action: ScheduleAction


class SchedulePatch(Body):
    device_id: uuid.UUID | None = None
    name: Name | None = None
    cron: Cron | None = None
    timezone: Tz | None = None
    enabled: StrictBool | None = None
    action: ScheduleAction | None = None


class SetRelayAction(BaseModel):
    type: Literal["set_relay"]
    relay_index: int
    state: bool


class SetAllRelaysAction(BaseModel):
    type: Literal["set_all_relays"]
    state: bool


class SchedulePublic(BaseModel):
    id: uuid.UUID
    org_id: uuid.UUID
    device_id: uuid.UUID
    name: str
    cron: str
    timezone: str
    enabled: bool
    action: Annotated[SetRelayAction | SetAllRelaysAction, Field(discriminator="type")]
    next_execution: Timestamp | None
    last_execution: Timestamp | None
    execution_count: int
    failure_count: int
    last_result: str | None = Field(
        description="how the last run ended: applied, timeout, offline, rejected, error, "
        "device_removed"
    )
    created_at: Timestamp
    updated_at: Timestamp


class ScheduleRun(SchedulePublic):
    """The schedule after running it now, and how that run ended."""

    result: str


def _fields(s: Schedule) -> dict[str, Any]:
    return {
        "id": s.id,
        "org_id": s.org_id,
        "device_id": s.device_id,
        "name": s.name,
        "cron": s.cron,
        "timezone": s.timezone,
        "enabled": s.enabled,
        "action": s.action,
        "next_execution": s.next_execution,
        "last_execution": s.last_execution,
        "execution_count": s.execution_count,
        "failure_count": s.failure_count,
        "last_result": s.last_result,
        "created_at": s.created_at,
        "updated_at": s.updated_at,
    }


def view(s: Schedule) -> SchedulePublic:
    return SchedulePublic.model_validate(_fields(s))


def _check(device: Device, cron: str, tz: str, action: dict[str, Any]) -> None:
    check_timezone(tz)
    check_cron(cron, tz)
    index = action.get("relay_index")
    if index is not None and index >= device.relay_count:
        raise ValidationFailed(
            f"relay_index {index} out of range (0-{device.relay_count - 1})",
            details={"field": "action.relay_index"},
        )


def _next(cron: str, tz: str, enabled: bool) -> Any:
    if not enabled:
        return None
    upcoming = next_run(cron, check_timezone(tz), utcnow(), None)
    return upcoming[0] if upcoming else None


@router.get("/schedules")
async def list_schedules(
    principal: PrincipalDep,
    page: PageDep,
    device_id: uuid.UUID | None = None,
    enabled: bool | None = None,
) -> Page[SchedulePublic]:
    query = in_visible_orgs(Schedule.all(), principal)
    if device_id is not None:
        query = query.filter(device_id=device_id)
    if enabled is not None:
        query = query.filter(enabled=enabled)
    return await page.of(query, view)


@router.post("/schedules", status_code=201)
async def create_schedule(
    body: ScheduleCreate, principal: PrincipalDep, actor: ActorDep
) -> SchedulePublic:
    device = await fetch(DEVICE, body.device_id, principal, "manage_schedules")
    action = body.action.model_dump()
    _check(device, body.cron, body.timezone, action)
    async with in_transaction():
        schedule = await Schedule.create(
            org_id=device.org_id,
            device_id=device.id,
            name=body.name,
            cron=body.cron,
            timezone=body.timezone,
            enabled=body.enabled,
            action=action,
            next_execution=_next(body.cron, body.timezone, body.enabled),
        )
        await write_rule(actor, "schedule_created", schedule)
    return view(schedule)


@router.get("/schedules/{schedule_id}")
async def get_schedule(schedule_id: uuid.UUID, principal: PrincipalDep) -> SchedulePublic:
    return view(await fetch(SCHEDULE, schedule_id, principal, "read"))


@router.patch("/schedules/{schedule_id}")
async def patch_schedule(
    schedule_id: uuid.UUID, body: SchedulePatch, principal: PrincipalDep, actor: ActorDep
) -> SchedulePublic:
    schedule = await fetch(SCHEDULE, schedule_id, principal, "manage_schedules")
    changes = body.changes()
    device_id = changes.get("device_id", schedule.device_id)
    device = await fetch(DEVICE, device_id, principal, "manage_schedules")
    if device.org_id != schedule.org_id:
        raise NotFound("device")
    cron = changes.get("cron", schedule.cron)
    tz = changes.get("timezone", schedule.timezone)
    action = changes.get("action", schedule.action)
    enabled = changes.get("enabled", schedule.enabled)
    _check(device, cron, tz, action)
    schedule.update_from_dict(changes)
    if {"cron", "timezone", "enabled"} & changes.keys():
        schedule.next_execution = _next(cron, tz, enabled)
        schedule.last_fired_local = None
    async with in_transaction():
        await schedule.save()
        if changes:
            fields = set(changes)
            await write_rule(actor, change_action("schedule", fields, enabled), schedule, fields)
    return view(schedule)


@router.delete("/schedules/{schedule_id}", status_code=204)
async def delete_schedule(
    schedule_id: uuid.UUID, principal: PrincipalDep, actor: ActorDep
) -> Response:
    schedule = await fetch(SCHEDULE, schedule_id, principal, "manage_schedules")
    async with in_transaction():
        await schedule.delete()
        await write_rule(actor, "schedule_deleted", schedule)
    return Response(status_code=204)


@router.post("/schedules/{schedule_id}/run")
async def run_schedule(
    schedule_id: uuid.UUID, principal: PrincipalDep, hub: HubDep, request: Request
) -> ScheduleRun:
    """Run the schedule's action now (its timing is unchanged); answers with the outcome."""
    schedule = await fetch(SCHEDULE, schedule_id, principal, "manage_schedules")
    status = await hub.scheduler.execute(schedule, request_id=request_id_of(request))
    refreshed = await Schedule.get(id=schedule.id)
    return ScheduleRun.model_validate({**_fields(refreshed), "result": status})
