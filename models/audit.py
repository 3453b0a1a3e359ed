"""The audit log: who did what to which device, from which source."""

from __future__ import annotations

import uuid
from typing import Any

from tortoise import fields
from tortoise.models import Model


class AuditEntry(Model):
    """One audited action. Ids are plain UUIDs so entries outlive what they name."""

    id = fields.UUIDField(primary_key=True, default=uuid.uuid4)
    at = fields.DatetimeField(auto_now_add=True, db_index=True)
    org_id = fields.UUIDField(null=True, db_index=True)
    actor_type = fields.CharField(max_length=32)
    actor_id = fields.CharField(max_length=64, null=True)
    source = fields.CharField(max_length=32, db_index=True)
    action = fields.CharField(max_length=64, db_index=True)
    device_id = fields.UUIDField(null=True, db_index=True)
    details: fields.Field[dict[str, Any]] = fields.JSONField(default=dict)
    automation_id = fields.UUIDField(null=True)
    schedule_id = fields.UUIDField(null=True)
    request_id = fields.CharField(max_length=128, null=True)

    class Meta:
        table = "audit_log"
