"""Tortoise ORM models, one module per aggregate. No I/O beyond the ORM."""

from hexa.models.audit import AuditEntry
from hexa.models.automation import Automation, AutomationRun, Schedule
from hexa.models.devices import Device, DeviceInput, RelayState
from hexa.models.homekit import HomeKitAccessory, HomeKitBridge
from hexa.models.idempotency import IdempotencyRecord
from hexa.models.integrations import IntegrationToken
from hexa.models.invitations import Invitation
from hexa.models.ota import OtaKey, OtaRelease, OtaReport
from hexa.models.tenancy import Area, Membership, Organization, Site
from hexa.models.users import RefreshToken, User

__all__ = [
    "Area",
    "AuditEntry",
    "Automation",
    "AutomationRun",
    "Device",
    "DeviceInput",
    "HomeKitAccessory",
    "HomeKitBridge",
    "IdempotencyRecord",
    "IntegrationToken",
    "Invitation",
    "Membership",
    "Organization",
    "OtaKey",
    "OtaRelease",
    "OtaReport",
    "RefreshToken",
    "RelayState",
    "Schedule",
    "Site",
    "User",
]
