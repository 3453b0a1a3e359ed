"""``/integrations/tokens``: MQTT/API credentials scoped to one organization."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Response
from tortoise.exceptions import IntegrityError

from hexa.api.deps import HubDep, PageDep, PrincipalDep
from hexa.api.schemas import IntegrationCreate, iso
from hexa.hub.access import Role
from hexa.hub.errors import Conflict, NotFound
from hexa.hub.security import new_token, token_hash
from hexa.models import IntegrationToken, Organization

router = APIRouter(prefix="/integrations", tags=["integrations"])


def _view(row: IntegrationToken) -> dict[str, Any]:
    return {
        "id": str(row.id),
        "name": row.name,
        "org_id": str(row.org_id),
        "created_at": iso(row.created_at),
        "last_used_at": iso(row.last_used_at),
    }


@router.post("/tokens", status_code=201)
async def create_token(body: IntegrationCreate, principal: PrincipalDep) -> dict[str, Any]:
    if not await Organization.filter(id=body.org_id, deleted_at=None).exists():
        raise NotFound("organization")
    principal.require(body.org_id, "manage_integrations")
    token = new_token("hxi_")
    try:
        row = await IntegrationToken.create(
            org_id=body.org_id,
            name=body.name,
            token_hash=token_hash(token),
            created_by_id=principal.id,
        )
    except IntegrityError:
        # (org_id, name) is unique: names are per organization, so this tells nothing of others
        raise Conflict(
            "this organization already has an integration token with this name",
            details={"field": "name"},
        ) from None
    return {**_view(row), "token": token}


@router.get("/tokens")
async def list_tokens(
    principal: PrincipalDep, page: PageDep, org_id: uuid.UUID | None = None
) -> dict[str, Any]:
    query = IntegrationToken.all()
    if not principal.is_platform_admin:
        manageable = [o for o, r in principal.roles.items() if r >= Role.admin]
        query = query.filter(org_id__in=manageable)
    if org_id is not None:
        query = query.filter(org_id=org_id)
    return await page.of(query, _view)


@router.delete("/tokens/{token_id}", status_code=204)
async def delete_token(token_id: uuid.UUID, principal: PrincipalDep, hub: HubDep) -> Response:
    row = await IntegrationToken.get_or_none(id=token_id)
    if row is None or not principal.can_see(row.org_id):
        raise NotFound("integration token")
    principal.require(row.org_id, "manage_integrations", kind="integration token")
    await row.delete()
    await hub.close_integration_sessions(str(row.id))
    return Response(status_code=204)
