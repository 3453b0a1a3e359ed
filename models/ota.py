"""OTA: the hub's signing keys, firmware releases and what each device reported of them."""

from __future__ import annotations

import uuid
from typing import Any

from tortoise import fields
from tortoise.models import Model

from hexa.models.base import TimestampedModel


class OtaKey(TimestampedModel):
    """An ECDSA P-256 signing key. The private key is stored sealed (AES-256-GCM under the
    key-encryption key, which is not in the database), bound to this key's id."""

    status = fields.CharField(max_length=16, db_index=True, description="active, next or retired")
    public_key_pem = fields.TextField()
    private_key_sealed = fields.TextField()
    activated_at = fields.DatetimeField(null=True)
    retired_at = fields.DatetimeField(null=True)

    class Meta:
        table = "ota_keys"


class OtaRelease(TimestampedModel):
    """A firmware image, the fields of its signed manifest, and where it is in its life."""

    model = fields.CharField(max_length=64)
    version = fields.CharField(max_length=64)
    channel = fields.CharField(max_length=16, description="dev, beta or stable")
    security_version = fields.IntField(default=0, db_default=0)
    notes = fields.TextField(null=True)
    sha256 = fields.CharField(max_length=64)
    size = fields.BigIntField()
    status = fields.CharField(
        max_length=16,
        default="draft",
        db_default="draft",
        db_index=True,
        description="draft, published, halted or withdrawn",
    )
    rollout_percent = fields.IntField(default=0, db_default=0)
    halt_failure_percent = fields.IntField(default=20, db_default=20)
    expires_at = fields.DatetimeField()
    key_id = fields.CharField(max_length=64, description="the key that signed the manifest")
    next_key_id = fields.CharField(max_length=64, null=True)
    #: the manifest as signed, in canonical JSON, with its algorithm and signature
    manifest = fields.TextField()
    alg = fields.CharField(max_length=32)
    signature = fields.TextField()
    created_by = fields.UUIDField(null=True)
    published_at = fields.DatetimeField(null=True)
    halted_at = fields.DatetimeField(null=True)
    #: reports before this time do not count towards halting (set when republished)
    resumed_at = fields.DatetimeField(null=True)

    class Meta:
        table = "ota_releases"
        unique_together = (("model", "version"),)


class OtaReport(Model):
    """The last report one device made about one release."""

    id = fields.UUIDField(primary_key=True, default=uuid.uuid4)
    device_id: uuid.UUID
    release_id: uuid.UUID
    device: fields.ForeignKeyRelation[Any] = fields.ForeignKeyField(
        "models.Device", related_name="ota_reports", on_delete=fields.CASCADE
    )
    release: fields.ForeignKeyRelation[OtaRelease] = fields.ForeignKeyField(
        "models.OtaRelease", related_name="reports", on_delete=fields.CASCADE
    )
    status = fields.CharField(max_length=16)
    error = fields.CharField(max_length=500, null=True)
    created_at = fields.DatetimeField(auto_now_add=True)
    updated_at = fields.DatetimeField(auto_now=True)

    class Meta:
        table = "ota_reports"
        unique_together = (("device", "release"),)
