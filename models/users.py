"""People: users and their refresh tokens."""

from __future__ import annotations

import uuid

from tortoise import fields
from tortoise.models import Model

from hexa.models.base import TimestampedModel


class User(TimestampedModel):
    """A person. role is admin for platform admins, user otherwise."""

    email = fields.CharField(max_length=254, unique=True)
    password_hash = fields.CharField(max_length=255)
    role = fields.CharField(max_length=16, default="user", db_default="user")
    is_active = fields.BooleanField(default=True, db_default=True)

    class Meta:
        table = "users"


class RefreshToken(Model):
    """One opaque refresh token, stored as its SHA-256 hash, in a rotation family."""

    id = fields.UUIDField(primary_key=True, default=uuid.uuid4)
    user_id: uuid.UUID
    user: fields.ForeignKeyRelation[User] = fields.ForeignKeyField(
        "models.User", related_name="refresh_tokens", on_delete=fields.CASCADE
    )
    family_id = fields.UUIDField(db_index=True)
    token_hash = fields.CharField(max_length=64, unique=True)
    created_at = fields.DatetimeField(auto_now_add=True)
    expires_at = fields.DatetimeField()
    rotated_at = fields.DatetimeField(null=True)
    revoked_at = fields.DatetimeField(null=True)

    class Meta:
        table = "refresh_tokens"
