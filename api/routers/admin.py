"""``/admin``: platform-admin operations on users."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from hexa.api.deps import HubDep, PageDep, PrincipalDep
from hexa.api.schemas import Page, UserPatch, UserPublic, user_view
from hexa.hub.access import Principal
from hexa.hub.errors import Conflict, NotFound
from hexa.models import User

router = APIRouter(prefix="/admin", tags=["admin"])


def _require_platform_admin(principal: Principal) -> None:
    if not principal.is_platform_admin:
        raise NotFound("route")  # the admin surface does not exist for others


@router.get("/users")
async def list_users(principal: PrincipalDep, page: PageDep) -> Page[UserPublic]:
    _require_platform_admin(principal)
    return await page.of(User.all(), user_view)


@router.patch("/users/{user_id}")
async def patch_user(
    user_id: uuid.UUID, body: UserPatch, principal: PrincipalDep, hub: HubDep
) -> UserPublic:
    """Activate or deactivate a user, or change their platform role."""
    _require_platform_admin(principal)
    user = await User.get_or_none(id=user_id)
    if user is None:
        raise NotFound("user")
    if user.id == principal.id and (body.is_active is False or body.role == "user"):
        raise Conflict("platform admins cannot disable or demote themselves")
    changes = body.model_dump(exclude_unset=True, exclude_none=True)
    if changes:
        user.update_from_dict(changes)
        await user.save()
    if body.is_active is False:
        await hub.accounts.revoke_all(user)
    return user_view(user)
