"""``/orgs/{id}/homekit``: an organization's HomeKit bridge (admin and owner only: the
answer carries the setup code, which lets anyone on the network pair)."""

from __future__ import annotations

import dataclasses
import uuid
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter
from pydantic import BaseModel, Field

from hexa.api.auditing import ActorDep
from hexa.api.deps import ORGANIZATION, HubDep, PrincipalDep, fetch
from hexa.api.schemas import Body
from hexa.hub import homekit
from hexa.hub.audit import write

if TYPE_CHECKING:
    from hexa.hub.runtime import Hub

router = APIRouter(tags=["homekit"])


class HomeKitSettings(Body):
    """``enabled`` turns the bridge on or off; ``port`` (0: any free port, kept across
    restarts) is where it listens. Without ``port`` the one asked for before stays."""

    enabled: bool
    port: Annotated[int, Field(ge=0, le=65535)] | None = None


class HomeKitPublic(BaseModel):
    """The bridge as controllers see it: pair with ``setup_code`` (or the QR code of
    ``setup_uri``) at this hub's address and ``port``; ``accessories`` counts the devices
    it bridges."""

    enabled: bool
    port: int | None
    hap_id: str | None
    setup_code: str | None
    setup_uri: str | None
    paired: bool
    accessories: int


def _secret(hub: Hub) -> str:
    """The hub's secret, which seals the bridges' HAP keys in the database."""
    assert hub.settings.jwt_secret is not None  # generated or set before the API serves
    return hub.settings.jwt_secret


def _public(found: homekit.HomeKitView) -> HomeKitPublic:
    return HomeKitPublic.model_validate(dataclasses.asdict(found))


@router.get("/orgs/{org_id}/homekit")
async def get_homekit(org_id: uuid.UUID, principal: PrincipalDep, hub: HubDep) -> HomeKitPublic:
    await fetch(ORGANIZATION, org_id, principal, "manage_integrations")
    return _public(await homekit.view(_secret(hub), org_id))


@router.put("/orgs/{org_id}/homekit")
async def put_homekit(
    org_id: uuid.UUID,
    body: HomeKitSettings,
    principal: PrincipalDep,
    actor: ActorDep,
    hub: HubDep,
) -> HomeKitPublic:
    await fetch(ORGANIZATION, org_id, principal, "manage_integrations")
    found = await homekit.configure(
        hub.events, _secret(hub), org_id, enabled=body.enabled, port=body.port
    )
    # the bridge applied it (or refused, raising): audited once in effect, never the code
    action = "homekit_enabled" if found.enabled else "homekit_disabled"
    await write(actor, action, org_id=org_id, details={"port": found.port})
    return _public(found)


@router.delete("/orgs/{org_id}/homekit/pairings")
async def forget_homekit_pairings(
    org_id: uuid.UUID, principal: PrincipalDep, actor: ActorDep, hub: HubDep
) -> HomeKitPublic:
    await fetch(ORGANIZATION, org_id, principal, "manage_integrations")
    found = await homekit.forget_pairings(hub.events, _secret(hub), org_id)
    await write(actor, "homekit_pairings_reset", org_id=org_id)
    return _public(found)
