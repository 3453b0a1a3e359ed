"""Typed dependencies shared by the routers: the hub, the caller, pagination, and the one
access-checked fetch of an object by id."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Generic, TypeVar

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from hexa.api.schemas import Page
from hexa.hub.access import Principal, load_principal
from hexa.hub.errors import NotFound, Unauthorized
from hexa.hub.security import decode_access_token
from hexa.models import (
    Area,
    Automation,
    Device,
    IntegrationToken,
    Invitation,
    Organization,
    Schedule,
    Site,
)

if TYPE_CHECKING:
    from hexa.hub.runtime import Hub


def get_hub(request: Request) -> Hub:
    return request.app.state.hub


HubDep = Annotated["Hub", Depends(get_hub)]

_bearer = HTTPBearer(auto_error=False)


async def get_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("missing bearer token")
    hub: Hub = request.app.state.hub
    assert hub.settings.jwt_secret is not None
    claims = decode_access_token(hub.settings.jwt_secret, credentials.credentials)
    principal = await load_principal(claims.user_id)
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


T = TypeVar("T")
M = TypeVar("M")


class Paging:
    """``?limit=`` (1-100, default 20) and ``&offset=``."""

    def __init__(
        self,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    ) -> None:
        self.limit, self.offset = limit, offset

    async def rows(self, query: Any, *order: str) -> tuple[list[Any], int]:
        """This page of a queryset (ordered by creation unless told) and the total."""
        total = await query.count()
        rows = (
            await query.order_by(*(order or ("created_at", "id")))
            .offset(self.offset)
            .limit(self.limit)
        )
        return list(rows), total

    async def of(self, query: Any, view: Callable[[Any], T], *order: str) -> Page[T]:
        """The list response for a queryset, each row rendered with ``view``."""
        rows, total = await self.rows(query, *order)
        return self.wrap([view(r) for r in rows], total)

    def wrap(self, items: Sequence[T], total: int) -> Page[T]:
        return Page(
            items=list(items),
            total=total,
            limit=self.limit,
            offset=self.offset,
            has_next=self.offset + len(items) < total,
            has_prev=self.offset > 0,
        )


PageDep = Annotated[Paging, Depends()]


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


def client_address(request: Request) -> str | None:
    hub: Hub = request.app.state.hub
    if hub.settings.trust_proxy:
        forwarded = request.headers.get("x-forwarded-for")
        if forwarded:
            # The last entry is the one our proxy appended; earlier ones are the client's say.
            return forwarded.split(",")[-1].strip()
    return request.client.host if request.client else None
