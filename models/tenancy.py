"""Tenancy: organizations, memberships, sites and areas."""

from __future__ import annotations

import uuid
from typing import Any

from tortoise import fields
from tortoise.models import Model

from hexa.models.base import SoftDeleteModel

ROLES = ("viewer", "operator", "manager", "admin", "owner")


class Organization(SoftDeleteModel):
    """A tenant. Every user owns a personal one."""

    name = fields.CharField(max_length=200)
    personal = fields.BooleanField(default=False, db_default=False)

    class Meta:
        table = "organizations"


class Membership(Model):
    """A user's role in an organization."""

    id = fields.UUIDField(primary_key=True, default=uuid.uuid4)
    org_id: uuid.UUID
    user_id: uuid.UUID
    org: fields.ForeignKeyRelation[Organization] = fields.ForeignKeyField(
        "models.Organization", related_name="memberships", on_delete=fields.CASCADE
    )
    user: fields.ForeignKeyRelation[Any] = fields.ForeignKeyField(
        "models.User", related_name="memberships", on_delete=fields.CASCADE
    )
    role = fields.CharField(max_length=16)
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "memberships"
        unique_together = (("org", "user"),)


class Site(SoftDeleteModel):
    """A place (a house, an office) inside an organization."""

    org_id: uuid.UUID
    org: fields.ForeignKeyRelation[Organization] = fields.ForeignKeyField(
        "models.Organization", related_name="sites", on_delete=fields.CASCADE
    )
    name = fields.CharField(max_length=200)
    location = fields.CharField(max_length=500, null=True)
    timezone = fields.CharField(max_length=64, default="UTC", db_default="UTC")
    metadata: fields.Field[dict[str, Any]] = fields.JSONField(default=dict)

    class Meta:
        table = "sites"


class Area(SoftDeleteModel):
    """A part of a site (a room, a floor)."""

    site_id: uuid.UUID
    site: fields.ForeignKeyRelation[Site] = fields.ForeignKeyField(
        "models.Site", related_name="areas", on_delete=fields.CASCADE
    )
    name = fields.CharField(max_length=200)
    metadata: fields.Field[dict[str, Any]] = fields.JSONField(default=dict)

    class Meta:
        table = "areas"
