"""Invitations: an organization's offer of a role to an email address."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from tortoise import fields

from hexa.models.base import TimestampedModel

#: how long an invitation can be accepted
INVITATION_TTL = timedelta(days=7)

#: stored states; "expired" is never stored: a pending row past ``expires_at`` reads as it
STATUSES = ("pending", "accepted", "declined", "revoked")


class Invitation(TimestampedModel):
    """A role offered to whoever proves the (normalized) email address by signing in."""

    org_id: uuid.UUID
    org: fields.ForeignKeyRelation[Any] = fields.ForeignKeyField(
        "models.Organization", related_name="invitations", on_delete=fields.CASCADE
    )
    email = fields.CharField(max_length=254)
    role = fields.CharField(max_length=16)
    status = fields.CharField(max_length=16, default="pending", db_default="pending")
    expires_at = fields.DatetimeField()
    invited_by_id: uuid.UUID | None
    invited_by: fields.ForeignKeyNullableRelation[Any] = fields.ForeignKeyField(
        "models.User", related_name="invitations_sent", null=True, on_delete=fields.SET_NULL
    )
    responded_at = fields.DatetimeField(null=True)

    class Meta:
        table = "invitations"
        indexes = (("email", "status"), ("org_id", "status"))
