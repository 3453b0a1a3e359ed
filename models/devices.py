"""Devices and their relays and inputs."""

from __future__ import annotations

import uuid
from typing import Any

from tortoise import fields
from tortoise.models import Model

from hexa.models.base import SoftDeleteModel


class Device(SoftDeleteModel):
    """A provisioned device. org is null until it is claimed."""

    device_uid = fields.CharField(max_length=64, unique=True)
    model = fields.CharField(max_length=64)
    device_class = fields.CharField(max_length=32)
    name = fields.CharField(max_length=200, null=True)
    serial = fields.CharField(max_length=128, null=True)
    fw_version = fields.CharField(max_length=64, null=True)
    token_hash = fields.CharField(max_length=64, db_index=True)
    claim_code_hash = fields.CharField(max_length=64, null=True, unique=True)
    claimed_at = fields.DatetimeField(null=True)
    org_id: uuid.UUID | None
    site_id: uuid.UUID | None
    area_id: uuid.UUID | None
    org: fields.ForeignKeyNullableRelation[Any] = fields.ForeignKeyField(
        "models.Organization", related_name="devices", null=True, on_delete=fields.SET_NULL
    )
    site: fields.ForeignKeyNullableRelation[Any] = fields.ForeignKeyField(
        "models.Site", related_name="devices", null=True, on_delete=fields.SET_NULL
    )
    area: fields.ForeignKeyNullableRelation[Any] = fields.ForeignKeyField(
        "models.Area", related_name="devices", null=True, on_delete=fields.SET_NULL
    )
    relay_count = fields.IntField()
    input_count = fields.IntField()
    online = fields.BooleanField(default=False, db_default=False)
    last_seen_at = fields.DatetimeField(null=True)
    metadata: fields.Field[dict[str, Any]] = fields.JSONField(default=dict)
    power_restore_mode = fields.CharField(
        max_length=16,
        default="off",
        db_default="off",
        description="what the relays do when power returns (off, on or restore)",
    )
    config_version = fields.IntField(
        default=0,
        db_default=0,
        description="bumped by every IO or power-restore change (0 = the factory defaults)",
    )
    config_applied_version = fields.IntField(
        default=0, db_default=0, description="the last config_version the device acknowledged"
    )
    ota_channel = fields.CharField(
        max_length=16, default="stable", db_default="stable", description="dev, beta or stable"
    )
    ota_security_version = fields.IntField(
        default=0, db_default=0, description="the highest security version applied (anti-rollback)"
    )
    ota_release_id = fields.UUIDField(null=True, description="the release of the last OTA report")
    ota_status = fields.CharField(max_length=16, null=True)
    ota_error = fields.CharField(max_length=500, null=True)
    ota_updated_at = fields.DatetimeField(null=True)

    class Meta:
        table = "devices"


class RelayState(Model):
    """The last known state of one relay (written only by the relay service)."""

    id = fields.UUIDField(primary_key=True, default=uuid.uuid4)
    device_id: uuid.UUID
    device: fields.ForeignKeyRelation[Device] = fields.ForeignKeyField(
        "models.Device", related_name="relays", on_delete=fields.CASCADE
    )
    index = fields.IntField()
    name = fields.CharField(max_length=200, null=True)
    state = fields.BooleanField(default=False, db_default=False)
    updated_at = fields.DatetimeField(auto_now=True)

    class Meta:
        table = "relay_states"
        unique_together = (("device", "index"),)


class DeviceInput(Model):
    """One physical input (a button or a switch) of a device."""

    id = fields.UUIDField(primary_key=True, default=uuid.uuid4)
    device_id: uuid.UUID
    device: fields.ForeignKeyRelation[Device] = fields.ForeignKeyField(
        "models.Device", related_name="inputs", on_delete=fields.CASCADE
    )
    index = fields.IntField()
    name = fields.CharField(max_length=200, null=True)
    mode = fields.CharField(max_length=32, default="momentary", db_default="momentary")
    type = fields.CharField(
        max_length=16, default="push", db_default="push", description="push or rocker"
    )
    link = fields.CharField(
        max_length=16,
        default="linked",
        db_default="linked",
        description="linked (drives its relay on the device) or detached (reports events only)",
    )
    rocker_mode = fields.CharField(
        max_length=16, null=True, description="follow or flip for a rocker, None for a push button"
    )
    state = fields.BooleanField(default=False, db_default=False)
    updated_at = fields.DatetimeField(auto_now=True)

    class Meta:
        table = "device_inputs"
        unique_together = (("device", "index"),)
