"""Schedules and automations: rules that publish relay intents on their own."""

from __future__ import annotations

import uuid
from typing import Any

from tortoise import fields
from tortoise.models import Model

from hexa.models.base import TimestampedModel


class Schedule(TimestampedModel):
    """A cron expression in a timezone that switches a device's relays."""

    org_id: uuid.UUID
    device_id: uuid.UUID
    org: fields.ForeignKeyRelation[Any] = fields.ForeignKeyField(
        "models.Organization", related_name="schedules", on_delete=fields.CASCADE
    )
    device: fields.ForeignKeyRelation[Any] = fields.ForeignKeyField(
        "models.Device", related_name="schedules", on_delete=fields.CASCADE
    )
    name = fields.CharField(max_length=200)
    cron = fields.CharField(max_length=120)
    timezone = fields.CharField(max_length=64, default="UTC", db_default="UTC")
    enabled = fields.BooleanField(default=True, db_default=True)
    action: fields.Field[dict[str, Any]] = fields.JSONField()
    next_execution = fields.DatetimeField(null=True, db_index=True)
    last_execution = fields.DatetimeField(null=True)
    last_fired_local = fields.CharField(max_length=32, null=True)
    execution_count = fields.IntField(default=0, db_default=0)
    failure_count = fields.IntField(default=0, db_default=0)
    last_result = fields.CharField(max_length=32, null=True)

    class Meta:
        table = "schedules"


class Automation(TimestampedModel):
    """A trigger, optional conditions and actions, with cooldown and de-duplication."""

    org_id: uuid.UUID
    device_id: uuid.UUID | None
    org: fields.ForeignKeyRelation[Any] = fields.ForeignKeyField(
        "models.Organization", related_name="automations", on_delete=fields.CASCADE
    )
    device: fields.ForeignKeyNullableRelation[Any] = fields.ForeignKeyField(
        "models.Device", related_name="automations", null=True, on_delete=fields.SET_NULL
    )
    name = fields.CharField(max_length=200)
    enabled = fields.BooleanField(default=True, db_default=True)
    trigger: fields.Field[dict[str, Any]] = fields.JSONField()
    conditions: fields.Field[list[dict[str, Any]]] = fields.JSONField(default=list)
    actions: fields.Field[list[dict[str, Any]]] = fields.JSONField()
    cooldown_s = fields.IntField(default=0, db_default=0)
    dedupe_window_ms = fields.IntField(default=0, db_default=0)
    is_default = fields.BooleanField(default=False, db_default=False)
    last_fired_at = fields.DatetimeField(null=True)
    fire_count = fields.IntField(default=0, db_default=0)

    class Meta:
        table = "automations"


class AutomationRun(Model):
    """One evaluation of an automation that a trigger matched."""

    id = fields.UUIDField(primary_key=True, default=uuid.uuid4)
    automation_id: uuid.UUID
    automation: fields.ForeignKeyRelation[Automation] = fields.ForeignKeyField(
        "models.Automation", related_name="runs", on_delete=fields.CASCADE
    )
    at = fields.DatetimeField(auto_now_add=True, db_index=True)
    outcome = fields.CharField(max_length=32)
    event: fields.Field[dict[str, Any]] = fields.JSONField(default=dict)
    results: fields.Field[list[dict[str, Any]]] = fields.JSONField(default=list)

    class Meta:
        table = "automation_runs"
