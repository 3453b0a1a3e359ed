"""``/invitations`` and ``/orgs/{id}/invitations``: joining an organization by invitation.

An invitation is addressed to a normalized email. The signed-in user whose email it is
sees it, accepts or declines it; anyone else gets 404, as for an unknown id. Admins of the
organization list and revoke them. A pending invitation past ``expires_at`` is expired.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from fastapi import APIRouter, Response
from tortoise.exceptions import IntegrityError
from tortoise.transactions import in_transaction

from hexa.api.auditing import ActorDep
from hexa.api.deps import INVITATION, ORGANIZATION, PageDep, PrincipalDep, PrincipalsDep, fetch
from hexa.api.schemas import InvitationPublic, Page, invitation_view
from hexa.hub.access import Principal, Role
from hexa.hub.audit import Actor, write
from hexa.hub.errors import Conflict, Forbidden, NotFound
from hexa.hub.security import utcnow
from hexa.models import Invitation, Membership

router = APIRouter(tags=["invitations"])

Status = Literal["pending", "accepted", "declined", "revoked", "expired"]


@router.get("/invitations")
async def my_invitations(principal: PrincipalDep, page: PageDep) -> Page[InvitationPublic]:
    """The caller's own pending invitations, matched by their email."""
    query = Invitation.filter(
        email=principal.user.email,
        status="pending",
        expires_at__gt=utcnow(),
        org__deleted_at__isnull=True,
    ).prefetch_related("org")
    return await page.of(query, invitation_view)


@router.get("/orgs/{org_id}/invitations")
async def org_invitations(
    org_id: uuid.UUID, principal: PrincipalDep, page: PageDep, status: Status | None = None
) -> Page[InvitationPublic]:
    """An organization's invitations (admin+), optionally of one status."""
    await fetch(ORGANIZATION, org_id, principal, "manage_members")
    query = Invitation.filter(org_id=org_id)
    now = utcnow()
    if status == "expired":
        query = query.filter(status="pending", expires_at__lte=now)
    elif status == "pending":
        query = query.filter(status="pending", expires_at__gt=now)
    elif status is not None:
        query = query.filter(status=status)
    return await page.of(query.prefetch_related("org"), invitation_view)


@router.post("/invitations/{invitation_id}/accept")
async def accept(
    invitation_id: uuid.UUID, principal: PrincipalDep, actor: ActorDep, principals: PrincipalsDep
) -> InvitationPublic:
    """Join the organization with the invitation's role; the invitation becomes accepted."""
    invitation = await _addressed_to(principal, invitation_id)
    try:
        async with in_transaction() as conn:
            await _respond(invitation, "accepted", conn)
            if (
                await Membership.filter(org_id=invitation.org_id, user_id=principal.id)
                .using_db(conn)
                .exists()
            ):
                raise Conflict("already a member of this organization")
            await Membership.create(
                org_id=invitation.org_id,
                user_id=principal.id,
                role=invitation.role,
                using_db=conn,
            )
            await _audit(actor, "invitation_accepted", invitation)
    except IntegrityError:  # joined through a concurrent request
        raise Conflict("already a member of this organization") from None
    finally:
        principals.forget(principal.id)
    return invitation_view(invitation)


@router.post("/invitations/{invitation_id}/decline")
async def decline(
    invitation_id: uuid.UUID, principal: PrincipalDep, actor: ActorDep
) -> InvitationPublic:
    """Turn the invitation down; it cannot be accepted afterwards."""
    invitation = await _addressed_to(principal, invitation_id)
    async with in_transaction() as conn:
        await _respond(invitation, "declined", conn)
        await _audit(actor, "invitation_declined", invitation)
    return invitation_view(invitation)


@router.delete("/invitations/{invitation_id}", status_code=204)
async def revoke(invitation_id: uuid.UUID, principal: PrincipalDep, actor: ActorDep) -> Response:
    """Withdraw a pending (or expired) invitation (admin+ of its organization)."""
    invitation = await fetch(INVITATION, invitation_id, principal, "manage_members")
    role = Role.parse(invitation.role)
    mine = principal.role_in(invitation.org_id)
    if not principal.is_platform_admin and (mine is None or role > mine):
        raise Forbidden(f"revoking an invitation as {role.name} needs the {role.name} role")
    async with in_transaction() as conn:
        await _respond(invitation, "revoked", conn, expired_ok=True)
        await _audit(actor, "invitation_revoked", invitation)
    return Response(status_code=204)


async def _addressed_to(principal: Principal, invitation_id: uuid.UUID) -> Invitation:
    """The invitation if it is addressed to the caller's email, else NotFound."""
    invitation = await Invitation.get_or_none(
        id=invitation_id, email=principal.user.email, org__deleted_at__isnull=True
    ).prefetch_related("org")
    if invitation is None:
        raise NotFound("invitation")
    return invitation


async def _respond(
    invitation: Invitation, status: str, conn: Any, expired_ok: bool = False
) -> None:
    """Move a pending invitation to ``status`` in one conditional UPDATE.

    The WHERE clause is the check: of two concurrent answers exactly one changes the row,
    the other gets 409 with the status it found.
    """
    now = utcnow()
    pending = Invitation.filter(id=invitation.id, status="pending")
    if not expired_ok:
        pending = pending.filter(expires_at__gt=now)
    changed = await pending.using_db(conn).update(status=status, responded_at=now, updated_at=now)
    if changed:
        invitation.status, invitation.responded_at, invitation.updated_at = status, now, now
        return
    current = await Invitation.get(id=invitation.id, using_db=conn)
    found = current.status
    if found == "pending":
        found = "expired"
    raise Conflict(f"this invitation is {found}", details={"status": found})


async def _audit(actor: Actor, action: str, invitation: Invitation) -> None:
    """Write the entry on the current transaction's connection."""
    await write(
        actor,
        action,
        org_id=invitation.org_id,
        details={
            "invitation_id": str(invitation.id),
            "email": invitation.email,
            "role": invitation.role,
        },
    )
