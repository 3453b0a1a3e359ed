"""Integration tokens: MQTT and API credentials scoped to one organization."""

from __future__ import annotations

import uuid
from typing import Any

from tortoise import fields

from hexa.models.base import TimestampedModel

#: the kinds of integration token (contract §6)
INTEGRATION_KINDS = ("generic", "home_assistant", "alexa")


class IntegrationToken(TimestampedModel):
    """A named token: the MQTT username is name, the password the token itself.

    Names are unique within an organization only; the broker tells tokens apart by the
    token (its hash is unique and indexed), never by the name.
    """

    org_id: uuid.UUID
    org: fields.ForeignKeyRelation[Any] = fields.ForeignKeyField(
        "models.Organization", related_name="integration_tokens", on_delete=fields.CASCADE
    )
    name = fields.CharField(max_length=100)
    #: what connects with it, one of INTEGRATION_KINDS
    kind = fields.CharField(max_length=16, default="generic", db_default="generic")
    token_hash = fields.CharField(max_length=64, unique=True)
    created_by: fields.ForeignKeyNullableRelation[Any] = fields.ForeignKeyField(
        "models.User", related_name="integration_tokens", null=True, on_delete=fields.SET_NULL
    )
    last_used_at = fields.DatetimeField(null=True)

    class Meta:
        table = "integration_tokens"
        unique_together = (("org", "name"),)
