"""Who may do what: the role table, enforced here and nowhere else.

Roles, lowest to highest: viewer < operator < manager < admin < owner. Platform admins
(``User.role == "admin"``) may do everything everywhere. An object in an organization the
caller is not a member of does not exist for them (NotFound, never Forbidden).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from hexa.hub.errors import Forbidden, NotFound, Unauthorized
from hexa.hub.security import decode_access_token
from hexa.models import (
    Area,
    Automation,
    Device,
    IntegrationToken,
    Invitation,
    Membership,
    Organization,
    Schedule,
    Site,
    User,
)

if TYPE_CHECKING:
    from hexa.hub.events import DeviceEvent

M = TypeVar("M")
K = TypeVar("K")
V = TypeVar("V")


class Role(IntEnum):
    viewer = 1
    operator = 2
    manager = 3
    admin = 4
    owner = 5

    @classmethod
    def parse(cls, value: str) -> Role:
        return cls[value]


#: action → the lowest role that may perform it
PERMISSIONS: dict[str, Role] = {
    "read": Role.viewer,
    "command_relays": Role.operator,
    "configure_devices": Role.manager,
    "manage_schedules": Role.manager,
    "manage_automations": Role.manager,
    "manage_sites": Role.manager,
    "update_org": Role.admin,
    "manage_devices": Role.admin,
    "manage_members": Role.admin,
    "manage_integrations": Role.admin,
    "read_audit": Role.admin,
    "delete_org": Role.owner,
}


def require_role(role: Role | None, action: str, kind: str = "organization") -> None:
    """The one check of a caller's role in an object's organization against ``action``:
    NotFound when they have none (the object does not exist for them), Forbidden when it
    is too low. Callers that are not users (an Alexa integration token) use it too."""
    needed = PERMISSIONS[action]
    if role is None:
        raise NotFound(kind)
    if role < needed:
        raise Forbidden(
            f"{action.replace('_', ' ')} needs the {needed.name} role",
            details={"required_role": needed.name, "role": role.name},
        )


@dataclass(frozen=True)
class Grants:
    """What a user may see and do: platform admin or not, and a role per organization."""

    platform_admin: bool
    roles: Mapping[uuid.UUID, Role]

    def covers(self, other: Grants) -> bool:
        """True when these grants allow everything ``other`` allows."""
        if self.platform_admin:
            return True
        if other.platform_admin:
            return False
        return all(
            (mine := self.roles.get(org)) is not None and mine >= role
            for org, role in other.roles.items()
        )


@dataclass(frozen=True)
class Principal:
    """An authenticated user with their memberships, loaded once per request."""

    user: User
    roles: dict[uuid.UUID, Role] = field(default_factory=dict)

    @property
    def id(self) -> uuid.UUID:
        return self.user.id

    @property
    def is_platform_admin(self) -> bool:
        return self.user.role == "admin"

    def role_in(self, org_id: uuid.UUID | None) -> Role | None:
        if org_id is None:
            return None
        return self.roles.get(org_id)

    def can_see(self, org_id: uuid.UUID | None) -> bool:
        return self.is_platform_admin or self.role_in(org_id) is not None

    def require(self, org_id: uuid.UUID | None, action: str, kind: str = "organization") -> None:
        """Raise NotFound when the org is invisible, Forbidden when the role is too low."""
        if not self.is_platform_admin:
            require_role(self.role_in(org_id), action, kind)

    @property
    def grants(self) -> Grants:
        return Grants(self.is_platform_admin, dict(self.roles))

    def visible_org_ids(self) -> list[uuid.UUID] | None:
        """The organizations this principal sees, or None for all (platform admin)."""
        return None if self.is_platform_admin else list(self.roles)


async def load_principal(user_id: uuid.UUID) -> Principal:
    """Load an active user and their roles; raises Unauthorized if gone or disabled."""
    user = await User.get_or_none(id=user_id)
    if user is None or not user.is_active:
        raise Unauthorized("user is unknown or disabled")
    memberships = await Membership.filter(user_id=user.id, org__deleted_at__isnull=True).all()
    return Principal(user=user, roles={m.org_id: Role.parse(m.role) for m in memberships})


async def principal_for_token(secret: str, token: str) -> Principal:
    """The user an access token stands for, with their roles: how REST, and the bridges
    that take a Hexa access token (Alexa), authenticate a caller. Raises Unauthorized
    (CredentialExpired for a token that has only run out)."""
    return await load_principal(decode_access_token(secret, token).user_id)


class _Bounded(Generic[K, V]):
    """A dict that drops its oldest entries beyond ``size``, and the generation of what it
    holds: a value loaded while :meth:`clear` or :meth:`forget` ran may be stale, and
    :meth:`keep` refuses it (the request that loaded it uses it; no later one does).
    Call :meth:`forget` / :meth:`clear` after the change is committed."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.generation = 0
        self._items: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        return self._items.get(key)

    def keep(self, key: K, value: V, generation: int) -> None:
        if generation != self.generation:
            return
        self._items[key] = value
        while len(self._items) > self.size:
            del self._items[next(iter(self._items))]

    def forget(self, *keys: K) -> None:
        self.generation += 1
        for key in keys:
            self._items.pop(key, None)

    def clear(self) -> None:
        self.generation += 1
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class Principals:
    """The caller behind each access token, for the REST API.

    The token's claims are kept by the token (a pure function of the token and the hub's
    secret; the expiry is checked again on every use). The principal itself (user and
    roles) is kept by user id only where ``cache`` is set, which is right only when this
    process sees every change to users, memberships and organizations: the hub is its
    database's only server (SQLite; several hubs share a PostgreSQL database). Whatever
    changes what a user may do calls :meth:`forget` (that user) or :meth:`clear` (an
    organization gone) once it is committed, so the next request loads it again: a role
    changed, a member removed, an organization created, joined or deleted, a user
    disabled, promoted or demoted.
    """

    def __init__(self, secret: str, *, cache: bool, size: int = 10_000) -> None:
        self.secret = secret
        self.cache = cache
        #: token → (user id, expiry as a UNIX time)
        self._claims: _Bounded[str, tuple[uuid.UUID, float]] = _Bounded(size)
        self._principals: _Bounded[uuid.UUID, Principal] = _Bounded(size)

    async def for_token(self, token: str) -> Principal:
        """Like :func:`principal_for_token`."""
        claims = self._claims.get(token)
        if claims is None or claims[1] <= time.time():
            decoded = decode_access_token(self.secret, token)  # raises for a stale one
            claims = (decoded.user_id, decoded.expires_at.timestamp())
            self._claims.keep(token, claims, self._claims.generation)
        user_id = claims[0]
        if not self.cache:
            return await load_principal(user_id)
        principal = self._principals.get(user_id)
        if principal is None:
            generation = self._principals.generation
            principal = await load_principal(user_id)
            self._principals.keep(user_id, principal, generation)
        return principal

    def forget(self, *user_ids: uuid.UUID) -> None:
        """What these users may do changed (committed): load them again when they call."""
        self._principals.forget(*user_ids)

    def clear(self) -> None:
        """What many users may do changed (committed): load everyone again."""
        self._principals.clear()


#: ids per query in :func:`load_grants` (below SQLite's and PostgreSQL's parameter limits)
GRANTS_BATCH = 500


async def load_grants(user_ids: Collection[uuid.UUID]) -> dict[uuid.UUID, Grants]:
    """The grants of the active users among ``user_ids``, one query per ``GRANTS_BATCH`` ids.

    Disabled and deleted users are absent from the answer; memberships of deleted
    organizations grant nothing.
    """
    ids = list(user_ids)
    admin: dict[uuid.UUID, bool] = {}
    roles: dict[uuid.UUID, dict[uuid.UUID, Role]] = {}
    for start in range(0, len(ids), GRANTS_BATCH):
        rows = await User.filter(id__in=ids[start : start + GRANTS_BATCH]).values(
            "id",
            "is_active",
            "role",
            "memberships__org_id",
            "memberships__role",
            "memberships__org__deleted_at",
        )
        for row in rows:  # one row per membership (a LEFT JOIN: one with NULLs for none)
            if not row["is_active"]:
                continue
            admin[row["id"]] = row["role"] == "admin"
            mine = roles.setdefault(row["id"], {})
            org_id = row["memberships__org_id"]
            if org_id is not None and row["memberships__org__deleted_at"] is None:
                mine[org_id] = Role.parse(row["memberships__role"])
    return {user_id: Grants(admin[user_id], roles[user_id]) for user_id in admin}


# --- fetching one tenant-owned object -----------------------------------------------------
def in_visible_orgs(query: Any, principal: Principal, field: str = "org_id") -> Any:
    """Narrow a queryset to the caller's organizations (platform admins: everything)."""
    visible = principal.visible_org_ids()
    return query if visible is None else query.filter(**{f"{field}__in": visible})


@dataclass(frozen=True)
class Scope(Generic[M]):
    """How to find one kind of tenant-owned object by id, and whose it is."""

    #: the name 404 and 403 answers give the object ("site not found")
    kind: str
    #: the live object with this id, or None (soft-deleted ones and orphans are None)
    find: Callable[[uuid.UUID], Awaitable[M | None]]
    #: the organization the object belongs to
    org_of: Callable[[M], uuid.UUID | None]


ORGANIZATION = Scope[Organization](
    "organization", lambda i: Organization.get_or_none(id=i, deleted_at=None), lambda o: o.id
)
SITE = Scope[Site](
    "site",
    lambda i: Site.get_or_none(id=i, deleted_at=None, org__deleted_at__isnull=True),
    lambda s: s.org_id,
)
AREA = Scope[Area](
    "area",
    lambda i: Area.get_or_none(
        id=i, deleted_at=None, site__deleted_at__isnull=True
    ).prefetch_related("site"),
    lambda a: a.site.org_id,
)
#: claimed devices only: an unclaimed device belongs to nobody yet
DEVICE = Scope[Device](
    "device",
    lambda i: Device.get_or_none(id=i, deleted_at=None, org_id__isnull=False),
    lambda d: d.org_id,
)
SCHEDULE = Scope[Schedule]("schedule", lambda i: Schedule.get_or_none(id=i), lambda s: s.org_id)
AUTOMATION = Scope[Automation](
    "automation", lambda i: Automation.get_or_none(id=i), lambda a: a.org_id
)
INTEGRATION_TOKEN = Scope[IntegrationToken](
    "integration token", lambda i: IntegrationToken.get_or_none(id=i), lambda t: t.org_id
)
#: with its ``org`` fetched (the invitation's view names it)
INVITATION = Scope[Invitation](
    "invitation",
    lambda i: Invitation.get_or_none(id=i, org__deleted_at__isnull=True).prefetch_related("org"),
    lambda v: v.org_id,
)


@dataclass(frozen=True, slots=True)
class DeviceRef:
    """What a relay command needs of a claimed device: its ids, organization and relays."""

    id: uuid.UUID
    uid: str
    org_id: uuid.UUID
    relay_count: int


class ClaimedDevices:
    """Claimed, live devices by id, for the relay command routes (:attr:`scope`).

    A device's id, uid and relay count never change; its organization and whether it is
    live change only by a claim, a release or a deletion, each a ``DeviceEvent`` of the
    registry, published once committed. Subscribed to those (:meth:`on_change`), the
    devices are kept where ``cache`` is set, under the same condition as
    :class:`Principals`: this process sees every change (SQLite); the first lookup loads
    every claimed device (up to ``size``), a device claimed later is loaded when first
    looked up. Elsewhere every lookup is a query.
    """

    def __init__(self, *, cache: bool, size: int = 100_000) -> None:
        self.cache = cache
        self.size = size
        self._refs: _Bounded[uuid.UUID, DeviceRef] = _Bounded(size)
        self._loaded = False
        self._loading = asyncio.Lock()
        self.scope = Scope[DeviceRef]("device", self.find, lambda d: d.org_id)

    async def find(self, device_id: uuid.UUID) -> DeviceRef | None:
        ref = self._refs.get(device_id)
        if ref is not None:
            return ref
        if self.cache and not self._loaded:
            # the first lookup loads every claimed device in one query: commands to a
            # fleet go to many devices, each rarely
            async with self._loading:
                if not self._loaded:
                    await self._load(Device.filter(deleted_at=None, org_id__isnull=False))
                    self._loaded = True
            ref = self._refs.get(device_id)
            if ref is not None:
                return ref
        found = await self._load(Device.filter(id=device_id, deleted_at=None, org_id__isnull=False))
        return found[0] if found else None

    async def _load(self, query: Any) -> list[DeviceRef]:
        generation = self._refs.generation
        rows = await query.limit(self.size).values_list("id", "device_uid", "org_id", "relay_count")
        refs = [
            DeviceRef(_as_uuid(i), str(uid), _as_uuid(org_id), int(relays))
            for i, uid, org_id, relays in rows
        ]
        if self.cache:
            for ref in refs:
                self._refs.keep(ref.id, ref, generation)
        return refs

    async def on_change(self, event: DeviceEvent) -> None:
        """A device was claimed, released or deleted: look it up again."""
        self._refs.forget(event.device.id)


def _as_uuid(value: Any) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


async def fetch(scope: Scope[M], object_id: uuid.UUID, principal: Principal, action: str) -> M:
    """The object, if the caller may perform ``action`` on it (an action of
    ``hexa.hub.access.PERMISSIONS``).

    404 ``not_found`` when it does not exist or belongs to an organization the caller is
    not in (the hub never confirms another tenant's object exists); 403 ``forbidden``
    when the caller sees it but their role is too low for ``action``.
    """
    found = await scope.find(object_id)
    org_id = None if found is None else scope.org_of(found)
    if found is None or not principal.can_see(org_id):
        raise NotFound(scope.kind)
    principal.require(org_id, action, kind=scope.kind)
    return found
