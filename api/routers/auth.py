"""``/auth``: register, login, refresh, logout, me."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from hexa.api.deps import HubDep, PrincipalDep, client_address
from hexa.api.errors import request_id_of
from hexa.api.schemas import (
    Credentials,
    Me,
    MembershipSummary,
    RefreshBody,
    TokenPairPublic,
    user_view,
)
from hexa.hub.accounts import TokenPair
from hexa.models import Membership

router = APIRouter(prefix="/auth", tags=["auth"])


def _pair(pair: TokenPair) -> TokenPairPublic:
    return TokenPairPublic(
        user=user_view(pair.user),
        access_token=pair.access_token,
        refresh_token=pair.refresh_token,
        expires_in=pair.expires_in,
    )


@router.post("/register", status_code=201)
async def register(body: Credentials, hub: HubDep, request: Request) -> TokenPairPublic:
    rid = request_id_of(request)
    return _pair(await hub.accounts.register(body.email, body.password, rid))


@router.post("/login")
async def login(body: Credentials, hub: HubDep, request: Request) -> TokenPairPublic:
    address, rid = client_address(request), request_id_of(request)
    return _pair(await hub.accounts.login(body.email, body.password, address, rid))


@router.post("/refresh")
async def refresh(body: RefreshBody, hub: HubDep, request: Request) -> TokenPairPublic:
    return _pair(await hub.accounts.refresh(body.refresh_token, request_id_of(request)))


@router.post("/logout", status_code=204)
async def logout(body: RefreshBody, hub: HubDep, request: Request) -> Response:
    await hub.accounts.logout(body.refresh_token, request_id_of(request))
    return Response(status_code=204)


@router.get("/me")
async def me(principal: PrincipalDep) -> Me:
    memberships = await Membership.filter(
        user_id=principal.id, org__deleted_at__isnull=True
    ).prefetch_related("org")
    user = principal.user
    return Me.model_validate(
        {
            "id": user.id,
            "email": user.email,
            "role": user.role,
            "is_active": user.is_active,
            "memberships": [
                MembershipSummary.model_validate(
                    {"org_id": m.org.id, "org_name": m.org.name, "role": m.role}
                )
                for m in sorted(memberships, key=lambda m: m.created_at)
            ],
            "created_at": user.created_at,
        }
    )
