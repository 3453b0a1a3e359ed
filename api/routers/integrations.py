"""``/integrations/tokens``: MQTT/API credentials scoped to one organization."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel
from tortoise.exceptions import IntegrityError
from tortoise.transactions import in_transaction

from hexa.api.auditing import ActorDep
from hexa.api.deps import INTEGRATION_TOKEN, ORGANIZATION, HubDep, PageDep, PrincipalDep, fetch
from hexa.api.schemas import IntegrationCreate, Page, Timestamp
from hexa.hub.access import Role
from hexa.hub.audit import Actor, write
from hexa.hub.errors import Conflict
from hexa.hub.security import new_token, token_hash
from hexa.models import IntegrationToken

router = APIRouter(prefix="/integrations", tags=["integrations"])


class IntegrationTokenPublic(BaseModel):
    id: uuid.UUID
    name: str
    org_id: uuid.UUID
    kind: str
    created_at: Timestamp
    last_used_at: Timestamp | None


class IntegrationTokenCreated(IntegrationTokenPublic):
    """A new token: ``token`` is shown only here (MQTT username = name, password = token)."""

    token: str


def _fields(row: IntegrationToken) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "org_id": row.org_id,
        "kind": row.kind,
        "created_at": row.created_at,
        "last_used_at": row.last_used_at,
    }


def _view(row: IntegrationToken) -> IntegrationTokenPublic:
    return IntegrationTokenPublic.model_validate(_fields(row))


@router.post("/tokens", status_code=201)
async def create_token(
    body: IntegrationCreate, principal: PrincipalDep, actor: ActorDep
) -> IntegrationTokenCreated:
    await fetch(ORGANIZATION, body.org_id, principal, "manage_integrations")
    token = new_token("hxi_")
    try:
        async with in_transaction():
            row = await IntegrationToken.create(
                org_id=body.org_id,
                name=body.name,
                kind=body.kind,
                token_hash=token_hash(token),
                created_by_id=principal.id,
            )
            await _audit(actor, "integration_token_created", row)
    except IntegrityError:
        # (org_id, name) is unique: names are per organization, so this tells nothing of others
        raise Conflict(
            "this organization already has an integration token with this name",
            details={"field": "name"},
        ) from None
    return IntegrationTokenCreated.model_validate({**_fields(row), "token": token})


@router.get("/tokens")
async def list_tokens(
    principal: PrincipalDep, page: PageDep, org_id: uuid.UUID | None = None
) -> Page[IntegrationTokenPublic]:
    query = IntegrationToken.all()
    if not principal.is_platform_admin:
        manageable = [o for o, r in principal.roles.items() if r >= Role.admin]
        query = query.filter(org_id__in=manageable)
    if org_id is not None:
        query = query.filter(org_id=org_id)
    return await page.of(query, _view)


@router.delete("/tokens/{token_id}", status_code=204)
async def delete_token(
    token_id: uuid.UUID, principal: PrincipalDep, actor: ActorDep, hub: HubDep
) -> Response:
    row = await fetch(INTEGRATION_TOKEN, token_id, principal, "manage_integrations")
    async with in_transaction():
        await row.delete()
        await _audit(actor, "integration_token_revoked", row)
    await hub.close_integration_sessions(str(row.id))
    return Response(status_code=204)


async def _audit(actor: Actor, action: str, row: IntegrationToken) -> None:
    """The token's id, name and kind: never the token or its hash."""
    details = {"integration_token_id": str(row.id), "name": row.name, "kind": row.kind}
    await write(actor, action, org_id=row.org_id, details=details)
