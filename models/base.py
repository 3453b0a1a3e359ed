"""Shared column conventions: UUID keys, timestamps, soft delete."""

from __future__ import annotations

import uuid

from tortoise import fields
from tortoise.models import Model


class TimestampedModel(Model):
    """UUID primary key with created_at/updated_at."""

    id = fields.UUIDField(primary_key=True, default=uuid.uuid4)
    created_at = fields.DatetimeField(auto_now_add=True)
    updated_at = fields.DatetimeField(auto_now=True)

    class Meta:
        abstract = True


class SoftDeleteModel(TimestampedModel):
    """A row that is hidden, not removed, when deleted."""

    deleted_at = fields.DatetimeField(null=True)

    class Meta:
        abstract = True
