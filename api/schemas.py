"""Request bodies and response shapes of the REST API, and ORM → JSON views."""

from __future__ import annotations

import json
import math
import uuid
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import Request
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictBool,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from hexa.hub.device_config import legacy_mode
from hexa.hub.errors import ValidationFailed
from hexa.hub.security import utcnow
from hexa.models import (
    Area,
    Device,
    DeviceInput,
    Invitation,
    Membership,
    Organization,
    RelayState,
    Site,
    User,
)

Name = Annotated[str, Field(min_length=1, max_length=200)]

#: free-form JSON in a request nests at most this deep (deeper structures exhaust the
#: recursion of JSON encoders and of PostgreSQL's jsonb parser)
MAX_JSON_DEPTH = 32
#: ``metadata`` objects are at most this large, encoded as JSON
MAX_METADATA_BYTES = 16 * 1024


def check_json_value(value: Any, field: str) -> None:
    """Refuse what no store keeps faithfully: NUL characters in strings or keys (PostgreSQL
    refuses them), NaN and infinities (not JSON), nesting deeper than ``MAX_JSON_DEPTH``."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise PydanticCustomError(
                    "nul_character",
                    "{field}: strings cannot contain NUL characters",
                    {"field": field},
                )
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise PydanticCustomError(
                    "finite_number", "{field}: numbers must be finite", {"field": field}
                )
        elif isinstance(item, dict | list):
            if depth >= MAX_JSON_DEPTH:
                raise PydanticCustomError(
                    "too_deep",
                    "{field}: nested deeper than {limit} levels",
                    {"field": field, "limit": MAX_JSON_DEPTH},
                )
            if isinstance(item, dict):
                stack.extend((k, depth) for k in item)
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)


async def refuse_nul_in_query(request: Request) -> None:
    """Query strings are checked like bodies: a NUL character answers 400."""
    for key, value in request.query_params.multi_items():
        if "\x00" in key or "\x00" in value:
            raise ValidationFailed(
                f"query parameter {key.replace(chr(0), '')[:64]!r} contains a NUL character",
                details={"field": key[:64], "in": "query"},
            )


class Body(BaseModel):
    """Every request body rejects unknown fields, NUL characters in any string and
    free-form JSON nested deeper than ``MAX_JSON_DEPTH``."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _refuse_hostile_json(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, value in data.items():
                check_json_value(value, str(key).replace("\x00", "")[:64])
        return data

    def changes(self, *nullable: str) -> dict[str, Any]:
        """The fields a PATCH sent; ``null`` is refused except for ``nullable`` fields."""
        sent = self.model_dump(exclude_unset=True)
        for key, value in sent.items():
            if value is None and key not in nullable:
                raise ValidationFailed(f"{key} cannot be null", details={"field": key})
        return sent


class Credentials(Body):
    email: Annotated[str, Field(min_length=3, max_length=254)]
    password: Annotated[str, Field(min_length=1, max_length=256)]


class UserPatch(Body):
    is_active: StrictBool | None = None
    role: Literal["admin", "user"] | None = None


class RefreshBody(Body):
    refresh_token: Annotated[str, Field(min_length=1, max_length=512)]


class OrgCreate(Body):
    name: Name


class OrgPatch(Body):
    name: Name | None = None


class MemberAdd(Body):
    email: Annotated[str, Field(min_length=3, max_length=254)] | None = None
    user_id: uuid.UUID | None = None
    role: Literal["viewer", "operator", "manager", "admin", "owner"] = "viewer"


def _check_tz(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown IANA timezone {value!r}") from None
    return value


def _metadata_size(value: dict[str, Any]) -> dict[str, Any]:
    encoded = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    if len(encoded) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is larger than {MAX_METADATA_BYTES} bytes as JSON")
    return value


Metadata = Annotated[dict[str, Any], Field(max_length=100), AfterValidator(_metadata_size)]


class SiteCreate(Body):
    name: Name
    location: Annotated[str, Field(max_length=500)] | None = None
    timezone: str = "UTC"
    metadata: Metadata = Field(default_factory=dict)

    _tz = field_validator("timezone")(_check_tz)


class SitePatch(Body):
    name: Name | None = None
    location: Annotated[str, Field(max_length=500)] | None = None
    timezone: str | None = None
    metadata: Metadata | None = None

    _tz = field_validator("timezone")(_check_tz)


class AreaCreate(Body):
    name: Name
    metadata: Metadata = Field(default_factory=dict)


class AreaPatch(Body):
    name: Name | None = None
    metadata: Metadata | None = None


class ProvisionBody(Body):
    model: Annotated[str, Field(min_length=1, max_length=64)]
    serial: Annotated[str, Field(max_length=128)] | None = None
    fw_version: Annotated[str, Field(max_length=64)] | None = None


class ClaimBody(Body):
    claim_code: Annotated[str, Field(min_length=4, max_length=64)]
    org_id: uuid.UUID | None = None
    site_id: uuid.UUID | None = None
    area_id: uuid.UUID | None = None
    name: Name | None = None


class DevicePatch(Body):
    name: Name | None = None
    site_id: uuid.UUID | None = None
    area_id: uuid.UUID | None = None
    relay_names: (
        Annotated[list[Annotated[str, Field(max_length=200)] | None], Field(max_length=64)] | None
    ) = None
    ota_channel: Literal["dev", "beta", "stable"] | None = None


class InputSetting(Body):
    """One input's wiring: ``rocker_mode`` is required for a rocker and refused for a push
    button (checked with the whole list, hub/device_config.py)."""

    index: Annotated[int, Field(ge=0, le=63, strict=True)]
    type: Literal["push", "rocker"]
    link: Literal["linked", "detached"]
    rocker_mode: Literal["follow", "flip"] | None = None


class IoConfigPatch(Body):
    """The inputs to change (the others keep their setting)."""

    inputs: Annotated[list[InputSetting], Field(min_length=1, max_length=64)]


class PowerRestorePatch(Body):
    mode: Literal["off", "on", "restore"]


class RelayCommand(Body):
    state: StrictBool | Literal["toggle"]


class AllRelaysCommand(Body):
    state: StrictBool


class IntegrationCreate(Body):
    name: Annotated[
        str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    ]
    org_id: uuid.UUID
    #: what will connect with it; ``home_assistant`` connections are audited as such,
    #: ``alexa`` tokens authorize Alexa directives
    kind: Literal["generic", "home_assistant", "alexa"] = "generic"


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.isoformat().replace("+00:00", "Z")


# --- response models -------------------------------------------------------------------
# Every route answers one of these, so /openapi.json types every body. Field order is
# the order of the keys in the JSON.

#: a UTC time, written ISO-8601 with ``Z`` (as :func:`iso` writes it)
Timestamp = Annotated[
    datetime,
    PlainSerializer(iso, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
RoleName = Literal["viewer", "operator", "manager", "admin", "owner"]
InvitationStatus = Literal["pending", "accepted", "declined", "revoked", "expired"]

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """One page of a list, ordered by creation unless the route says otherwise."""

    items: list[T]
    total: int
    limit: int
    offset: int
    has_next: bool
    has_prev: bool


class OrganizationPublic(BaseModel):
    id: uuid.UUID
    name: str
    created_at: Timestamp


class SitePublic(BaseModel):
    id: uuid.UUID
    org_id: uuid.UUID
    name: str
    location: str | None
    timezone: str
    metadata: dict[str, Any]
    created_at: Timestamp


class AreaPublic(BaseModel):
    id: uuid.UUID
    site_id: uuid.UUID
    name: str
    metadata: dict[str, Any]
    created_at: Timestamp


class MemberPublic(BaseModel):
    """A member of an organization."""

    user_id: uuid.UUID
    email: str
    role: RoleName
    org_id: uuid.UUID
    created_at: Timestamp


class InvitationPublic(BaseModel):
    """An invitation; a pending one past ``expires_at`` reads ``expired``."""

    id: uuid.UUID
    org_id: uuid.UUID
    org_name: str
    email: str
    role: RoleName
    status: InvitationStatus
    expires_at: Timestamp
    created_at: Timestamp


class UserPublic(BaseModel):
    """A user account: never a password or token hash."""

    id: uuid.UUID
    email: str
    role: Literal["admin", "user"]
    is_active: bool
    created_at: Timestamp


class MembershipSummary(BaseModel):
    org_id: uuid.UUID
    org_name: str
    role: RoleName


class Me(BaseModel):
    """The caller's account and organizations."""

    id: uuid.UUID
    email: str
    role: Literal["admin", "user"]
    is_active: bool
    memberships: list[MembershipSummary]
    created_at: Timestamp


class TokenPairPublic(BaseModel):
    """A login: the user, a short-lived access token and a single-use refresh token."""

    model_config = ConfigDict(json_schema_serialization_defaults_required=True)

    user: UserPublic
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 (the scheme's name, no secret)
    expires_in: int = Field(description="seconds until the access token expires")


class RelayPublic(BaseModel):
    index: int
    name: str | None
    state: bool


class InputPublic(BaseModel):
    index: int
    name: str | None
    mode: str = Field(
        description="derived from the input's io_config entry: momentary (linked push), "
        "toggle (linked rocker, follow), edge (linked rocker, flip) or detached"
    )
    state: bool


class InputConfigPublic(BaseModel):
    index: int
    type: Literal["push", "rocker"]
    link: Literal["linked", "detached"]
    rocker_mode: Literal["follow", "flip"] | None


class DeviceOtaPublic(BaseModel):
    """The device's last OTA report (all null before its first)."""

    release_id: uuid.UUID | None
    status: Literal["downloading", "verified", "installing", "applied", "failed"] | None
    error: str | None
    updated_at: Timestamp | None


class DevicePublic(BaseModel):
    id: uuid.UUID
    device_uid: str
    model: str
    device_class: str
    name: str | None
    org_id: uuid.UUID | None
    site_id: uuid.UUID | None
    area_id: uuid.UUID | None
    relay_count: int
    input_count: int
    relays: list[RelayPublic]
    inputs: list[InputPublic]
    online: bool
    last_seen_at: Timestamp | None
    fw_version: str | None
    serial: str | None
    created_at: Timestamp
    updated_at: Timestamp
    io_config: list[InputConfigPublic]
    power_restore_mode: Literal["off", "on", "restore"]
    config_version: int = Field(description="bumped by every configuration change")
    config_applied_version: int = Field(
        description="the last config_version the device acknowledged"
    )
    ota_channel: Literal["dev", "beta", "stable"]
    ota_security_version: int = Field(
        description="the highest security version the device applied (anti-rollback)"
    )
    ota: DeviceOtaPublic


class ClaimedDevice(DevicePublic):
    """The claimed device; ``device_token`` only for a device released before (shown once)."""

    device_token: str | None = Field(
        default=None,
        exclude_if=lambda token: token is None,
        description="the device's new token, to install on it: present only when the "
        "device was released before",
    )


class MqttEndpoint(BaseModel):
    host: str
    port: int | None
    tls_port: int | None


class ProvisionedDevice(BaseModel):
    """A new device: its token and claim code are shown only here."""

    id: uuid.UUID
    device_uid: str
    device_token: str
    claim_code: str
    model: str
    relay_count: int
    input_count: int
    mqtt: MqttEndpoint
    ws_url: str


class DeviceToken(BaseModel):
    device_token: str


class DeviceStatePublic(BaseModel):
    relays: list[bool]
    inputs: list[bool]
    online: bool
    last_seen_at: Timestamp | None


class CommandResult(BaseModel):
    """A relay command the device acknowledged."""

    device_id: uuid.UUID
    relays: list[bool]
    latency_ms: float
    command_id: str


def org_view(org: Organization) -> OrganizationPublic:
    return OrganizationPublic(id=org.id, name=org.name, created_at=org.created_at)


def invitation_view(invitation: Invitation) -> InvitationPublic:
    """An invitation (its ``org`` fetched); a pending one past ``expires_at`` reads expired."""
    status = invitation.status
    if status == "pending" and invitation.expires_at <= utcnow():
        status = "expired"
    return InvitationPublic.model_validate(
        {
            "id": invitation.id,
            "org_id": invitation.org_id,
            "org_name": invitation.org.name,
            "email": invitation.email,
            "role": invitation.role,
            "status": status,
            "expires_at": invitation.expires_at,
            "created_at": invitation.created_at,
        }
    )


def member_view(membership: Membership) -> MemberPublic:
    """A membership (its ``user`` fetched)."""
    return MemberPublic.model_validate(
        {
            "user_id": membership.user.id,
            "email": membership.user.email,
            "role": membership.role,
            "org_id": membership.org_id,
            "created_at": membership.created_at,
        }
    )


def site_view(site: Site) -> SitePublic:
    return SitePublic(
        id=site.id,
        org_id=site.org_id,
        name=site.name,
        location=site.location,
        timezone=site.timezone,
        metadata=site.metadata or {},
        created_at=site.created_at,
    )


def area_view(area: Area) -> AreaPublic:
    return AreaPublic(
        id=area.id,
        site_id=area.site_id,
        name=area.name,
        metadata=area.metadata or {},
        created_at=area.created_at,
    )


def user_view(user: User) -> UserPublic:
    return UserPublic.model_validate(
        {
            "id": user.id,
            "email": user.email,
            "role": user.role,
            "is_active": user.is_active,
            "created_at": user.created_at,
        }
    )


def device_fields(
    device: Device, relays: list[RelayState], inputs: list[DeviceInput]
) -> dict[str, Any]:
    """The fields of a device resource (:class:`DevicePublic` and its extensions)."""
    inputs = sorted(inputs, key=lambda i: i.index)
    return {
        "id": device.id,
        "device_uid": device.device_uid,
        "model": device.model,
        "device_class": device.device_class,
        "name": device.name,
        "org_id": device.org_id,
        "site_id": device.site_id,
        "area_id": device.area_id,
        "relay_count": device.relay_count,
        "input_count": device.input_count,
        "relays": [
            RelayPublic(index=r.index, name=r.name, state=r.state)
            for r in sorted(relays, key=lambda r: r.index)
        ],
        "inputs": [
            InputPublic(
                index=i.index,
                name=i.name,
                mode=legacy_mode(i.type, i.link, i.rocker_mode),
                state=i.state,
            )
            for i in inputs
        ],
        "online": device.online,
        "last_seen_at": device.last_seen_at,
        "fw_version": device.fw_version,
        "serial": device.serial,
        "created_at": device.created_at,
        "updated_at": device.updated_at,
        "io_config": [
            {"index": i.index, "type": i.type, "link": i.link, "rocker_mode": i.rocker_mode}
            for i in inputs
        ],
        "power_restore_mode": device.power_restore_mode,
        "config_version": device.config_version,
        "config_applied_version": device.config_applied_version,
        "ota_channel": device.ota_channel,
        "ota_security_version": device.ota_security_version,
        "ota": {
            "release_id": device.ota_release_id,
            "status": device.ota_status,
            "error": device.ota_error,
            "updated_at": device.ota_updated_at,
        },
    }


def device_view(
    device: Device, relays: list[RelayState], inputs: list[DeviceInput]
) -> DevicePublic:
    return DevicePublic.model_validate(device_fields(device, relays, inputs))
