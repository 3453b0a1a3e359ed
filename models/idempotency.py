"""Stored responses of mutating requests, keyed by Idempotency-Key."""

from __future__ import annotations

import uuid

from tortoise import fields
from tortoise.models import Model


class IdempotencyRecord(Model):
    """One key in one scope (the caller), with a null status_code while in flight.

    Nothing here is readable without the hub's secret: ``key`` and ``request_hash`` are
    HMACs, an anonymous caller's ``scope`` too, and ``response_body`` holds the whole answer
    (body and kept headers) encrypted; ``response_headers`` stays empty (older hubs stored
    plaintext there).
    """

    id = fields.UUIDField(primary_key=True, default=uuid.uuid4)
    scope = fields.CharField(max_length=80)
    key = fields.CharField(max_length=255)
    method = fields.CharField(max_length=8)
    path = fields.CharField(max_length=1000)
    request_hash = fields.CharField(max_length=64)
    status_code = fields.IntField(null=True)
    response_body = fields.TextField(null=True)
    response_headers: fields.Field[dict[str, str]] = fields.JSONField(default=dict)
    created_at = fields.DatetimeField(auto_now_add=True)
    expires_at = fields.DatetimeField(db_index=True)

    class Meta:
        table = "idempotency_records"
        unique_together = (("scope", "key"),)
