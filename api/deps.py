"""Typed dependencies shared by the routers: the hub, the caller, pagination, and the one
access-checked fetch of an object by id."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from hexa.api.schemas import Page
from hexa.hub.access import (
    AREA,
    AUTOMATION,
    DEVICE,
    INTEGRATION_TOKEN,
    INVITATION,
    ORGANIZATION,
    SCHEDULE,
    SITE,
    ClaimedDevices,
    Principal,
    Principals,
    Scope,
    fetch,
    in_visible_orgs,
)
from hexa.hub.errors import Unauthorized
from hexa.hub.events import DeviceEvent

#: the access-checked fetch and its scopes live with the access rules (hexa.hub.access);
#: routers take them from here with the other dependencies
__all__ = [
    "AREA",
    "AUTOMATION",
    "DEVICE",
    "INTEGRATION_TOKEN",
    "INVITATION",
    "ORGANIZATION",
    "SCHEDULE",
    "SITE",
    "ClaimedDevicesDep",
    "HubDep",
    "PageDep",
    "PrincipalDep",
    "PrincipalsDep",
    "Scope",
    "client_address",
    "fetch",
    "in_visible_orgs",
]

if TYPE_CHECKING:
    from hexa.hub.runtime import Hub


async def get_hub(request: Request) -> Hub:
    return request.app.state.hub


HubDep = Annotated["Hub", Depends(get_hub)]

_bearer = HTTPBearer(auto_error=False)


def _caches(app: FastAPI) -> tuple[Principals, ClaimedDevices]:
    """The API's principals and claimed devices, made on first use. Kept in memory only
    on SQLite, where this hub is the database's one server and sees every change (see
    :class:`~hexa.hub.access.Principals`); on PostgreSQL other hubs may share it."""
    caches: tuple[Principals, ClaimedDevices] | None = getattr(app.state, "access", None)
    if caches is None:
        hub: Hub = app.state.hub
        assert hub.settings.jwt_secret is not None
        alone = hub.settings.database_is_ours_alone
        devices = ClaimedDevices(cache=alone)
        hub.events.subscribe(DeviceEvent, devices.on_change)
        caches = (Principals(hub.settings.jwt_secret, cache=alone), devices)
        app.state.access = caches
    return caches


async def get_principals(request: Request) -> Principals:
    return _caches(request.app)[0]


#: the routes that change what a user may do tell it (``forget``/``clear``) when committed
PrincipalsDep = Annotated[Principals, Depends(get_principals)]


async def get_claimed_devices(request: Request) -> ClaimedDevices:
    return _caches(request.app)[1]


ClaimedDevicesDep = Annotated[ClaimedDevices, Depends(get_claimed_devices)]


async def get_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("missing bearer token")
    principal = await _caches(request.app)[0].for_token(credentials.credentials)
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


T = TypeVar("T")


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


async def paging(
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> Paging:
    """The paging of a list request. A coroutine: FastAPI runs a class or a plain function
    dependency in the thread pool, a hand-off on every request."""
    return Paging(limit, offset)


PageDep = Annotated[Paging, Depends(paging)]


def client_address(request: Request) -> str | None:
    """The client's address: the TCP peer, or behind a trusted proxy the client it names
    (resolved once per request by the edge middleware, ``api/edge.py``)."""
    return request.client.host if request.client else None
