"""``/orgs``, ``/sites``, ``/areas``: the tenancy tree and its members."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.transactions import in_transaction

from hexa.api.auditing import ActorDep
from hexa.api.deps import (
    AREA,
    ORGANIZATION,
    SITE,
    PageDep,
    PrincipalDep,
    PrincipalsDep,
    fetch,
    in_visible_orgs,
)
from hexa.api.schemas import (
    AreaCreate,
    AreaPatch,
    AreaPublic,
    InvitationPublic,
    MemberAdd,
    MemberPublic,
    OrganizationPublic,
    OrgCreate,
    OrgPatch,
    Page,
    SiteCreate,
    SitePatch,
    SitePublic,
    area_view,
    invitation_view,
    member_view,
    org_view,
    site_view,
)
from hexa.hub.access import PERMISSIONS, Principal, Role
from hexa.hub.accounts import normalize_email
from hexa.hub.audit import Actor, write
from hexa.hub.errors import Conflict, Forbidden, NotFound, ValidationFailed
from hexa.hub.security import utcnow
from hexa.models import Area, Device, Invitation, Membership, Organization, Site
from hexa.models.invitations import INVITATION_TTL

router = APIRouter(tags=["tenancy"])


# --- organizations ---------------------------------------------------------------------
@router.get("/orgs")
async def list_orgs(principal: PrincipalDep, page: PageDep) -> Page[OrganizationPublic]:
    query = in_visible_orgs(Organization.filter(deleted_at=None), principal, field="id")
    return await page.of(query, org_view)


@router.post("/orgs", status_code=201)
async def create_org(
    body: OrgCreate, principal: PrincipalDep, actor: ActorDep, principals: PrincipalsDep
) -> OrganizationPublic:
    try:
        async with in_transaction():
            org = await Organization.create(name=body.name)
            await Membership.create(org=org, user_id=principal.id, role="owner")
            await write(actor, "org_created", org_id=org.id, details={"name": org.name})
    finally:
        principals.forget(principal.id)
    return org_view(org)


@router.get("/orgs/{org_id}")
async def get_org(org_id: uuid.UUID, principal: PrincipalDep) -> OrganizationPublic:
    return org_view(await fetch(ORGANIZATION, org_id, principal, "read"))


@router.patch("/orgs/{org_id}")
async def patch_org(
    org_id: uuid.UUID, body: OrgPatch, principal: PrincipalDep, actor: ActorDep
) -> OrganizationPublic:
    org = await fetch(ORGANIZATION, org_id, principal, "update_org")
    if body.name is not None and body.name != org.name:
        previous, org.name = org.name, body.name
        async with in_transaction():
            await org.save()
            details = {"name": org.name, "previous_name": previous}
            await write(actor, "org_renamed", org_id=org.id, details=details)
    return org_view(org)


@router.delete("/orgs/{org_id}", status_code=204)
async def delete_org(
    org_id: uuid.UUID, principal: PrincipalDep, actor: ActorDep, principals: PrincipalsDep
) -> Response:
    org = await fetch(ORGANIZATION, org_id, principal, "delete_org")
    if await Device.filter(org_id=org.id, deleted_at=None).exists():
        raise Conflict("release or delete this organization's devices first")
    now = utcnow()
    try:
        async with in_transaction():
            await Organization.filter(id=org.id).update(deleted_at=now)
            await Site.filter(org_id=org.id, deleted_at=None).update(deleted_at=now)
            await write(actor, "org_deleted", org_id=org.id, details={"name": org.name})
    finally:
        principals.clear()  # every member's roles
    return Response(status_code=204)


# --- members ---------------------------------------------------------------------------
@router.get("/orgs/{org_id}/members")
async def list_members(
    org_id: uuid.UUID, principal: PrincipalDep, page: PageDep
) -> Page[MemberPublic]:
    org = await fetch(ORGANIZATION, org_id, principal, "read")
    return await page.of(Membership.filter(org_id=org.id).prefetch_related("user"), member_view)


@router.post(
    "/orgs/{org_id}/members",
    status_code=201,
    response_model=InvitationPublic,
    responses={
        200: {
            "model": MemberPublic,
            "description": "the email or user_id is a member's: their role was changed",
        },
        201: {"description": "an invitation was created (or a pending one renewed)"},
    },
)
async def add_member(
    org_id: uuid.UUID,
    body: MemberAdd,
    principal: PrincipalDep,
    actor: ActorDep,
    principals: PrincipalsDep,
) -> InvitationPublic | JSONResponse:
    """Change an existing member's role (200), or invite the email (201).

    The answer to an invitation is the same whether or not the email has an account:
    accounts are looked at only through this organization's memberships, so neither the
    body nor the timing tells whether a stranger's email is registered.
    """
    org = await fetch(ORGANIZATION, org_id, principal, "manage_members")
    if (body.email is None) == (body.user_id is None):
        raise ValidationFailed("give exactly one of email or user_id", details={"field": "email"})
    _check_can_grant(principal, org.id, Role.parse(body.role))
    email = normalize_email(body.email) if body.email is not None else None
    members = Membership.filter(org_id=org.id)
    existing = await (
        members.filter(user__email=email)
        if email is not None
        else members.filter(user_id=body.user_id)
    ).first()
    if existing is not None:
        _check_can_grant(principal, org.id, Role.parse(existing.role))
        try:
            membership = await _change_role(principal, actor, org.id, existing.user_id, body.role)
        finally:
            principals.forget(existing.user_id)
        await membership.fetch_related("user")
        # 200, not the route's 201: a role change creates nothing
        return JSONResponse(member_view(membership).model_dump(mode="json"), status_code=200)
    if email is None:  # user ids only name existing members: invitations go to an email
        raise NotFound("member")
    invitation = await _invite(principal, actor, org, email, body.role)
    return invitation_view(invitation)


async def _invite(
    principal: Principal, actor: Actor, org: Organization, email: str, role: str
) -> Invitation:
    """A pending invitation of ``email``; one still pending is renewed instead of doubled."""
    now = utcnow()
    async with in_transaction() as conn:
        await _lock_org(conn, org.id)
        invitation = await (
            Invitation.filter(org_id=org.id, email=email, status="pending", expires_at__gt=now)
            .using_db(conn)
            .first()
        )
        if invitation is None:
            invitation = await Invitation.create(
                org=org,
                email=email,
                role=role,
                expires_at=now + INVITATION_TTL,
                invited_by_id=principal.id,
                using_db=conn,
            )
        else:
            invitation.role, invitation.expires_at = role, now + INVITATION_TTL
            invitation.invited_by_id = principal.id
            await invitation.save(using_db=conn)
        details = {"invitation_id": str(invitation.id), "email": email, "role": role}
        await write(actor, "member_invited", org_id=org.id, details=details)
    invitation.org = org
    return invitation


async def _change_role(
    principal: Principal, actor: Actor, org_id: uuid.UUID, user_id: uuid.UUID, role: str
) -> Membership:
    """Set a member's role under the organization's lock, audited with the old one."""
    async with in_transaction() as conn:
        await _lock_org(conn, org_id)
        membership = await Membership.get_or_none(org_id=org_id, user_id=user_id, using_db=conn)
        if membership is None:
            raise NotFound("member")
        old_role = membership.role
        if old_role == "owner" and role != "owner":
            await _keep_an_owner(conn, org_id)
        _check_authority(await _current_role(conn, principal, org_id), Role.parse(old_role))
        membership.role = role
        await membership.save(using_db=conn, update_fields=["role"])
        await _revoke_invitations_by(conn, org_id, user_id, above=Role.parse(role))
        details = {"user_id": str(user_id), "role": role, "previous_role": old_role}
        await write(actor, "member_role_changed", org_id=org_id, details=details)
    return membership


@router.delete("/orgs/{org_id}/members/{user_id}", status_code=204)
async def remove_member(
    org_id: uuid.UUID,
    user_id: uuid.UUID,
    principal: PrincipalDep,
    actor: ActorDep,
    principals: PrincipalsDep,
) -> Response:
    org = await fetch(ORGANIZATION, org_id, principal, "read")
    membership = await Membership.get_or_none(org_id=org.id, user_id=user_id)
    if membership is None:
        raise NotFound("member")
    leaving = user_id == principal.id  # leaving an organization needs no role
    if not leaving:
        principal.require(org.id, "manage_members")
        _check_can_grant(principal, org.id, Role.parse(membership.role))
    try:
        async with in_transaction() as conn:
            await _lock_org(conn, org.id)
            membership = await Membership.get_or_none(org_id=org.id, user_id=user_id, using_db=conn)
            if membership is None:
                raise NotFound("member")
            if membership.role == "owner":
                await _keep_an_owner(conn, org.id)
            if not leaving:
                _check_authority(
                    await _current_role(conn, principal, org.id), Role.parse(membership.role)
                )
            await membership.delete(using_db=conn)
            await _revoke_invitations_by(conn, org_id=org.id, user_id=user_id, above=None)
            action = "member_left" if leaving else "member_removed"
            details = {"user_id": str(user_id), "role": membership.role}
            await write(actor, action, org_id=org.id, details=details)
    finally:
        principals.forget(user_id)
    return Response(status_code=204)


async def _lock_org(conn: BaseDBAsyncClient, org_id: uuid.UUID) -> None:
    """Serialize membership changes of one organization until the transaction ends.

    PostgreSQL: a row lock on the organization (``SELECT ... FOR UPDATE``), so a second
    transaction counts owners only after the first committed. SQLite: the hub's one
    connection runs one transaction at a time, and SQLite transactions are serializable.
    """
    await Organization.filter(id=org_id).select_for_update().using_db(conn).first()


async def _revoke_invitations_by(
    conn: BaseDBAsyncClient, org_id: uuid.UUID, user_id: uuid.UUID, above: Role | None
) -> None:
    """Revoke what a member invited beyond their new role (everything, once they left):
    an invitation never grants more than its sender could grant today."""
    roles = [r.name for r in Role if above is None or r > above]
    now = utcnow()
    await (
        Invitation.filter(org_id=org_id, invited_by_id=user_id, status="pending", role__in=roles)
        .using_db(conn)
        .update(status="revoked", responded_at=now, updated_at=now)
    )


async def _keep_an_owner(conn: BaseDBAsyncClient, org_id: uuid.UUID) -> None:
    """Refuse to remove or demote the last owner (call under :func:`_lock_org`)."""
    if await Membership.filter(org_id=org_id, role="owner").using_db(conn).count() <= 1:
        raise Conflict("an organization keeps at least one owner")


async def _current_role(conn: BaseDBAsyncClient, principal: Principal, org_id: uuid.UUID) -> Role:
    """The caller's role as it is now, not as it was when the request began."""
    if principal.is_platform_admin:
        return Role.owner
    mine = await Membership.get_or_none(org_id=org_id, user_id=principal.id, using_db=conn)
    if mine is None:
        raise NotFound("organization")
    return Role.parse(mine.role)


def _check_authority(mine: Role, role: Role) -> None:
    """Managing members needs admin, and a member whose role is above one's own is out of reach."""
    if mine < PERMISSIONS["manage_members"]:
        raise Forbidden(
            "manage members needs the admin role",
            details={"required_role": "admin", "role": mine.name},
        )
    if role > mine:
        raise Forbidden(f"granting {role.name} needs the {role.name} role")


def _check_can_grant(principal: Principal, org_id: uuid.UUID, role: Role) -> None:
    """Nobody grants or removes a role above their own."""
    if principal.is_platform_admin:
        return
    mine = principal.role_in(org_id)
    if mine is None or role > mine:
        raise Forbidden(f"granting {role.name} needs the {role.name} role")


# --- sites -----------------------------------------------------------------------------
@router.get("/orgs/{org_id}/sites")
async def list_sites(org_id: uuid.UUID, principal: PrincipalDep, page: PageDep) -> Page[SitePublic]:
    org = await fetch(ORGANIZATION, org_id, principal, "read")
    return await page.of(Site.filter(org_id=org.id, deleted_at=None), site_view)


@router.post("/orgs/{org_id}/sites", status_code=201)
async def create_site(
    org_id: uuid.UUID, body: SiteCreate, principal: PrincipalDep, actor: ActorDep
) -> SitePublic:
    org = await fetch(ORGANIZATION, org_id, principal, "manage_sites")
    async with in_transaction():
        site = await Site.create(org=org, **body.model_dump())
        await write(actor, "site_created", org_id=org.id, details=_site(site))
    return site_view(site)


def _site(site: Site, fields: Any = ()) -> dict[str, Any]:
    """What a site's audit entry says: its id and name, and which fields changed."""
    details: dict[str, Any] = {"site_id": str(site.id), "name": site.name}
    if fields:
        details["fields"] = sorted(fields)
    return details


def _area(area: Area, fields: Any = ()) -> dict[str, Any]:
    details: dict[str, Any] = {
        "area_id": str(area.id),
        "site_id": str(area.site_id),
        "name": area.name,
    }
    if fields:
        details["fields"] = sorted(fields)
    return details


@router.get("/sites/{site_id}")
async def get_site(site_id: uuid.UUID, principal: PrincipalDep) -> SitePublic:
    return site_view(await fetch(SITE, site_id, principal, "read"))


@router.patch("/sites/{site_id}")
async def patch_site(
    site_id: uuid.UUID, body: SitePatch, principal: PrincipalDep, actor: ActorDep
) -> SitePublic:
    site = await fetch(SITE, site_id, principal, "manage_sites")
    changes = body.changes("location")
    if changes:
        site.update_from_dict(changes)
        async with in_transaction():
            await site.save()
            await write(actor, "site_updated", org_id=site.org_id, details=_site(site, changes))
    return site_view(site)


@router.delete("/sites/{site_id}", status_code=204)
async def delete_site(site_id: uuid.UUID, principal: PrincipalDep, actor: ActorDep) -> Response:
    site = await fetch(SITE, site_id, principal, "manage_sites")
    now = utcnow()
    async with in_transaction():
        await Site.filter(id=site.id).update(deleted_at=now)
        await Area.filter(site_id=site.id, deleted_at=None).update(deleted_at=now)
        await Device.filter(site_id=site.id).update(site_id=None, area_id=None)
        await write(actor, "site_deleted", org_id=site.org_id, details=_site(site))
    return Response(status_code=204)


# --- areas -----------------------------------------------------------------------------
@router.get("/sites/{site_id}/areas")
async def list_areas(
    site_id: uuid.UUID, principal: PrincipalDep, page: PageDep
) -> Page[AreaPublic]:
    site = await fetch(SITE, site_id, principal, "read")
    return await page.of(Area.filter(site_id=site.id, deleted_at=None), area_view)


@router.post("/sites/{site_id}/areas", status_code=201)
async def create_area(
    site_id: uuid.UUID, body: AreaCreate, principal: PrincipalDep, actor: ActorDep
) -> AreaPublic:
    site = await fetch(SITE, site_id, principal, "manage_sites")
    async with in_transaction():
        area = await Area.create(site=site, **body.model_dump())
        await write(actor, "area_created", org_id=site.org_id, details=_area(area))
    return area_view(area)


@router.get("/areas/{area_id}")
async def get_area(area_id: uuid.UUID, principal: PrincipalDep) -> AreaPublic:
    return area_view(await fetch(AREA, area_id, principal, "read"))


@router.patch("/areas/{area_id}")
async def patch_area(
    area_id: uuid.UUID, body: AreaPatch, principal: PrincipalDep, actor: ActorDep
) -> AreaPublic:
    area = await fetch(AREA, area_id, principal, "manage_sites")
    changes = body.changes()
    if changes:
        area.update_from_dict(changes)
        async with in_transaction():
            await area.save()
            details = _area(area, changes)
            await write(actor, "area_updated", org_id=area.site.org_id, details=details)
    return area_view(area)


@router.delete("/areas/{area_id}", status_code=204)
async def delete_area(area_id: uuid.UUID, principal: PrincipalDep, actor: ActorDep) -> Response:
    area = await fetch(AREA, area_id, principal, "manage_sites")
    org_id = area.site.org_id
    async with in_transaction():
        await Area.filter(id=area.id).update(deleted_at=utcnow())
        await Device.filter(area_id=area.id).update(area_id=None)
        await write(actor, "area_deleted", org_id=org_id, details=_area(area))
    return Response(status_code=204)


@router.delete("/orgs/{org_id}/members", status_code=204)
async def remove_member_by_query(
    org_id: uuid.UUID,
    user_id: uuid.UUID,
    principal: PrincipalDep,
    actor: ActorDep,
    principals: PrincipalsDep,
) -> Response:
    """``DELETE /orgs/{id}/members?user_id=`` — the same as the path form."""
    return await remove_member(org_id, user_id, principal, actor, principals)
