"""HomeKit: one HAP bridge per organization that enables it, and its bridged devices."""

from __future__ import annotations

import uuid
from typing import Any

from tortoise import fields
from tortoise.models import Model

from hexa.models.base import TimestampedModel


class HomeKitBridge(TimestampedModel):
    """The HomeKit bridge of an organization: its settings and its HAP identity.

    Everything a paired controller relies on lives here, so that pairings survive a
    restart, a move to another machine and a restore from backup: the accessory id
    (``hap_id``, shaped like a MAC address), the setup code, and ``hap_state`` — the HAP
    long-term key pair, the paired controllers and the configuration number. The key pair
    is a secret: whoever holds it can impersonate the bridge to paired controllers.
    """

    org_id: uuid.UUID
    org: fields.OneToOneRelation[Any] = fields.OneToOneField(
        "models.Organization", related_name="homekit_bridge", on_delete=fields.CASCADE
    )
    enabled = fields.BooleanField(default=False, db_default=False)
    #: the TCP port the bridge listens on, chosen once when any free one (0) was asked for
    port = fields.IntField(null=True)
    #: the port asked for (0: any free one), kept so a restart knows whether it may move
    requested_port = fields.IntField(default=0, db_default=0)
    hap_id = fields.CharField(max_length=17)
    setup_code = fields.CharField(max_length=10)
    #: four characters of the X-HM setup URI that tell this bridge from others
    setup_id = fields.CharField(max_length=4)
    #: the next accessory id (AID) to hand out (AIDs are never reused within a bridge)
    next_aid = fields.IntField(default=2, db_default=2)
    #: the persisted state of HAP-python (keys, pairings, configuration number), or None
    #: before the bridge first ran
    hap_state: fields.Field[dict[str, Any] | None] = fields.JSONField(null=True)

    class Meta:
        table = "homekit_bridges"


class HomeKitAccessory(Model):
    """A device bridged into the HomeKit bridge of its organization, with its accessory id.

    The AID is what controllers know the accessory by (rooms, scenes and automations
    in the Home app hang off it), so it is stored rather than derived from list order:
    it stays the same across restarts and when other devices come and go.
    """

    id = fields.UUIDField(primary_key=True, default=uuid.uuid4)
    bridge_id: uuid.UUID
    device_id: uuid.UUID
    bridge: fields.ForeignKeyRelation[HomeKitBridge] = fields.ForeignKeyField(
        "models.HomeKitBridge", related_name="accessories", on_delete=fields.CASCADE
    )
    device: fields.ForeignKeyRelation[Any] = fields.ForeignKeyField(
        "models.Device", related_name="homekit_accessories", on_delete=fields.CASCADE
    )
    aid = fields.IntField()
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "homekit_accessories"
        unique_together = (("bridge", "aid"), ("bridge", "device"))
