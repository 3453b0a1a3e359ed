"""``/automations``: event rules that switch relays (manager+ to change, viewer to read)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field, StrictBool
from tortoise.transactions import in_transaction

from hexa.api.auditing import ActorDep
from hexa.api.deps import (
    AUTOMATION,
    DEVICE,
    HubDep,
    PageDep,
    PrincipalDep,
    fetch,
    in_visible_orgs,
)
from hexa.api.schemas import Body, Name, Page, Timestamp
from hexa.hub.access import Principal
from hexa.hub.audit import change_action, write_rule
from hexa.hub.automations import validate_rule
from hexa.hub.errors import NotFound, ValidationFailed
from hexa.models import Automation, AutomationRun

router = APIRouter(tags=["automations"])

Cooldown = Annotated[int, Field(ge=0, le=86_400)]
Dedupe = Annotated[int, Field(ge=0, le=3_600_000)]


class AutomationCreate(Body):
    name: Name
    enabled: StrictBool = True
    trigger: dict[str, Any]
    conditions: Annotated[list[dict[str, Any]], Field(max_length=20)] = Field(default_factory=list)
    actions: Annotated[list[dict[str, Any]], Field(min_length=1, max_length=20)]
    cooldown_s: Cooldown = 0
    dedupe_window_ms: Dedupe = 0


class AutomationPatch(Body):
    name: Name | None = None
    enabled: StrictBool | None = None
    trigger: dict[str, Any] | None = None
    conditions: Annotated[list[dict[str, Any]], Field(max_length=20)] | None = None
    actions: Annotated[list[dict[str, Any]], Field(min_length=1, max_length=20)] | None = None
    cooldown_s: Cooldown | None = None
    dedupe_window_ms: Dedupe | None = None


class AutomationPublic(BaseModel):
    """A rule; ``trigger``, ``conditions`` and ``actions`` as in docs/automation.md."""

    id: uuid.UUID
    org_id: uuid.UUID
    device_id: uuid.UUID | None
    name: str
    enabled: bool
    trigger: dict[str, Any]
    conditions: list[dict[str, Any]]
    actions: list[dict[str, Any]]
    cooldown_s: int
    dedupe_window_ms: int
    is_default: bool
    last_fired_at: Timestamp | None
    fire_count: int
    created_at: Timestamp
    updated_at: Timestamp


class AutomationRunPublic(BaseModel):
    """One evaluation of a rule: fired, skipped or suppressed, with its results."""

    id: uuid.UUID
    at: Timestamp
    outcome: str
    event: dict[str, Any]
    results: list[dict[str, Any]]


def view(a: Automation) -> AutomationPublic:
    return AutomationPublic(
        id=a.id,
        org_id=a.org_id,
        device_id=a.device_id,
        name=a.name,
        enabled=a.enabled,
        trigger=a.trigger,
        conditions=a.conditions,
        actions=a.actions,
        cooldown_s=a.cooldown_s,
        dedupe_window_ms=a.dedupe_window_ms,
        is_default=a.is_default,
        last_fired_at=a.last_fired_at,
        fire_count=a.fire_count,
        created_at=a.created_at,
        updated_at=a.updated_at,
    )


async def _org_of_trigger(principal: Principal, trigger: dict[str, Any]) -> uuid.UUID:
    """Rules live in the organization of their trigger's device."""
    try:
        device_id = uuid.UUID(str(trigger.get("device_id")))
    except ValueError:
        raise ValidationFailed(
            "trigger.device_id must be a device id", details={"field": "trigger.device_id"}
        ) from None
    device = await fetch(DEVICE, device_id, principal, "manage_automations")
    assert device.org_id is not None  # DEVICE finds claimed devices only
    return device.org_id


@router.get("/automations")
async def list_automations(
    principal: PrincipalDep,
    page: PageDep,
    device_id: uuid.UUID | None = None,
    enabled: bool | None = None,
) -> Page[AutomationPublic]:
    query = in_visible_orgs(Automation.all(), principal)
    if device_id is not None:
        query = query.filter(device_id=device_id)
    if enabled is not None:
        query = query.filter(enabled=enabled)
    return await page.of(query, view)


@router.post("/automations", status_code=201)
async def create_automation(
    body: AutomationCreate, principal: PrincipalDep, actor: ActorDep, hub: HubDep
) -> AutomationPublic:
    org_id = await _org_of_trigger(principal, body.trigger)
    trigger, conditions, actions = await validate_rule(
        org_id, body.trigger, body.conditions, body.actions
    )
    async with in_transaction():
        rule = await Automation.create(
            org_id=org_id,
            device_id=trigger["device_id"],
            name=body.name,
            enabled=body.enabled,
            trigger=trigger,
            conditions=conditions,
            actions=actions,
            cooldown_s=body.cooldown_s,
            dedupe_window_ms=body.dedupe_window_ms,
        )
        await write_rule(actor, "automation_created", rule)
    hub.automations.invalidate()
    return view(rule)


@router.get("/automations/{automation_id}")
async def get_automation(automation_id: uuid.UUID, principal: PrincipalDep) -> AutomationPublic:
    return view(await fetch(AUTOMATION, automation_id, principal, "read"))


@router.patch("/automations/{automation_id}")
async def patch_automation(
    automation_id: uuid.UUID,
    body: AutomationPatch,
    principal: PrincipalDep,
    actor: ActorDep,
    hub: HubDep,
) -> AutomationPublic:
    rule = await fetch(AUTOMATION, automation_id, principal, "manage_automations")
    changes = body.changes()
    fields = set(changes)
    trigger = changes.get("trigger", rule.trigger)
    if "trigger" in changes and await _org_of_trigger(principal, trigger) != rule.org_id:
        raise NotFound("device")
    trigger, conditions, actions = await validate_rule(
        rule.org_id,
        trigger,
        changes.get("conditions", rule.conditions),
        changes.get("actions", rule.actions),
    )
    changes.update(trigger=trigger, conditions=conditions, actions=actions)
    rule.update_from_dict(changes)
    rule.device_id = uuid.UUID(trigger["device_id"])
    async with in_transaction():
        await rule.save()
        if fields:
            action = change_action("automation", fields, rule.enabled)
            await write_rule(actor, action, rule, fields)
    hub.automations.invalidate()
    return view(rule)


@router.delete("/automations/{automation_id}", status_code=204)
async def delete_automation(
    automation_id: uuid.UUID, principal: PrincipalDep, actor: ActorDep, hub: HubDep
) -> Response:
    rule = await fetch(AUTOMATION, automation_id, principal, "manage_automations")
    async with in_transaction():
        await rule.delete()
        await write_rule(actor, "automation_deleted", rule)
    hub.automations.invalidate()
    return Response(status_code=204)


@router.get("/automations/{automation_id}/runs")
async def list_runs(
    automation_id: uuid.UUID, principal: PrincipalDep, page: PageDep
) -> Page[AutomationRunPublic]:
    """The rule's evaluations, newest first: fired, skipped or suppressed, with results."""
    rule = await fetch(AUTOMATION, automation_id, principal, "read")
    rows, total = await page.rows(AutomationRun.filter(automation_id=rule.id), "-at", "-id")
    items = [
        AutomationRunPublic(id=r.id, at=r.at, outcome=r.outcome, event=r.event, results=r.results)
        for r in rows
    ]
    return page.wrap(items, total)
