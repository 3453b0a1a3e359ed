"""Accounts: registration, login with throttling, refresh-token rotation, admins."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import timedelta

from tortoise.exceptions import IntegrityError
from tortoise.transactions import in_transaction

from hexa.hub.audit import Actor, write
from hexa.hub.config import Settings
from hexa.hub.errors import Conflict, Forbidden, Unauthorized, ValidationFailed
from hexa.hub.security import (
    Passwords,
    issue_access_token,
    new_token,
    token_hash,
    utcnow,
)
from hexa.hub.throttle import LoginThrottle
from hexa.models import Membership, Organization, RefreshToken, User

EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$")
MIN_PASSWORD, MAX_PASSWORD = 8, 128


@dataclass(frozen=True)
class TokenPair:
    user: User
    access_token: str
    refresh_token: str
    expires_in: int


def normalize_email(email: str) -> str:
    email = email.strip().lower()
    if len(email) > 254 or not EMAIL_RE.match(email):
        raise ValidationFailed("email is not a valid address", details={"field": "email"})
    return email


def check_password_policy(password: str) -> None:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise ValidationFailed(
            f"password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters",
            details={"field": "password"},
        )


class Accounts:
    """Account operations used by the REST API and the CLI."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.throttle = LoginThrottle(settings.login_max_failures, settings.login_window_s)
        self.passwords = Passwords(settings.password_hash)

    @property
    def _secret(self) -> str:
        assert self.settings.jwt_secret is not None
        return self.settings.jwt_secret

    async def create_user(
        self,
        email: str,
        password: str,
        *,
        role: str = "user",
        by: Actor | None = None,
        request_id: str | None = None,
    ) -> User:
        """Create a user and their personal organization (role owner), audited in the same
        transaction: ``user_registered`` by the new user (``by`` None: they signed up,
        through the request ``request_id``), else ``user_created`` by ``by``."""
        email = normalize_email(email)
        check_password_policy(password)
        password_hash = await self.passwords.hash(password)
        try:
            async with in_transaction():
                user = await User.create(email=email, password_hash=password_hash, role=role)
                org = await Organization.create(name=f"{email} (personal)", personal=True)
                await Membership.create(org=org, user=user, role="owner")
                details = {"user_id": str(user.id), "role": role}
                if by is None:
                    actor = Actor.user(user.id, request_id)
                    await write(actor, "user_registered", org_id=org.id, details=details)
                else:
                    await write(by, "user_created", details=details)
        except IntegrityError:
            raise Conflict("an account with this email already exists") from None
        return user

    async def register(self, email: str, password: str, request_id: str | None = None) -> TokenPair:
        user = await self.create_user(email, password, request_id=request_id)
        return await self.issue(user)

    async def login(
        self, email: str, password: str, address: str | None, request_id: str | None = None
    ) -> TokenPair:
        """Audited: ``user_login``, or ``user_login_failed`` with a reason. A failure names
        the account by its id when the email is one; an unknown email is not recorded (it
        may be someone else's address, or a password typed in the wrong field)."""
        email = email.strip().lower()
        with self.throttle.attempt(email, address) as attempt:
            user = await User.get_or_none(email=email)
            ok = await self.passwords.verify(user.password_hash if user else None, password)
            if user is None or not ok:
                attempt.failed()
                reason = "unknown_account" if user is None else "bad_password"
                await _login_failed(reason, user, address, request_id)
                raise Unauthorized("invalid email or password")
            if not user.is_active:
                await _login_failed("disabled", user, address, request_id)
                raise Forbidden("this account is disabled")
            attempt.succeeded()
        async with in_transaction():
            pair = await self.issue(user)
            actor = Actor.user(user.id, request_id)
            await write(actor, "user_login", details={"address": address})
        return pair

    async def issue(self, user: User, family_id: uuid.UUID | None = None) -> TokenPair:
        refresh = new_token("hxr_")
        await RefreshToken.create(
            user=user,
            family_id=family_id or uuid.uuid4(),
            token_hash=token_hash(refresh),
            expires_at=utcnow() + timedelta(seconds=self.settings.refresh_token_ttl_s),
        )
        ttl = self.settings.access_token_ttl_s
        return TokenPair(user, issue_access_token(self._secret, user.id, ttl), refresh, ttl)

    async def refresh(self, refresh_token: str, request_id: str | None = None) -> TokenPair:
        """Rotate a refresh token. Presenting a rotated one revokes its whole family
        (audited as ``refresh_token_reused``)."""
        row = await RefreshToken.get_or_none(token_hash=token_hash(refresh_token))
        if row is None:
            raise Unauthorized("invalid refresh token")
        now = utcnow()
        if row.revoked_at is not None:
            raise Unauthorized("refresh token revoked")
        # Claim the row atomically: of two concurrent refreshes only one may win.
        claimed = await RefreshToken.filter(id=row.id, rotated_at=None, revoked_at=None).update(
            rotated_at=now
        )
        if not claimed:
            await self._reused(row, request_id)
            raise Unauthorized("refresh token reuse detected: all sessions of this login revoked")
        if row.expires_at <= now:
            raise Unauthorized("refresh token expired")
        user = await User.get(id=row.user_id)
        if not user.is_active:
            await self.revoke_family(row.family_id)
            raise Unauthorized("user is disabled")
        pair = await self.issue(user, family_id=row.family_id)
        # A concurrent reuse may have revoked the family between our claim and our insert;
        # its revocation missed the token we just made, so honour it now.
        if await RefreshToken.filter(family_id=row.family_id, revoked_at__isnull=False).exists():
            await self._reused(row, request_id)
            raise Unauthorized("refresh token reuse detected: all sessions of this login revoked")
        return pair

    async def _reused(self, row: RefreshToken, request_id: str | None) -> None:
        """Revoke the family of a refresh token presented again, and audit it."""
        async with in_transaction():
            await self.revoke_family(row.family_id)
            actor = Actor.user(row.user_id, request_id)
            details = {"family_id": str(row.family_id)}
            await write(actor, "refresh_token_reused", details=details)

    async def logout(self, refresh_token: str, request_id: str | None = None) -> None:
        """Revoke the token's family (``user_logout``); an unknown token changes nothing."""
        row = await RefreshToken.get_or_none(token_hash=token_hash(refresh_token))
        if row is not None:
            async with in_transaction():
                await self.revoke_family(row.family_id)
                actor = Actor.user(row.user_id, request_id)
                await write(actor, "user_logout", details={"family_id": str(row.family_id)})

    async def revoke_family(self, family_id: uuid.UUID) -> None:
        await RefreshToken.filter(family_id=family_id, revoked_at=None).update(revoked_at=utcnow())

    async def revoke_all(self, user: User) -> None:
        """Revoke every refresh token of a user (access tokens die with is_active)."""
        await RefreshToken.filter(user_id=user.id, revoked_at=None).update(revoked_at=utcnow())

    async def create_admin(self, email: str, password: str, by: Actor | None = None) -> User:
        """A platform admin, created by ``by`` (the hub itself unless told)."""
        return await self.create_user(email, password, role="admin", by=by or Actor.system())

    async def ensure_bootstrap_admin(self) -> User | None:
        """Create the admin named by HEXA_ADMIN_EMAIL/PASSWORD when no admin exists."""
        email, password = self.settings.admin_email, self.settings.admin_password
        if not email or not password:
            return None
        if await User.filter(role="admin").exists():
            return None
        existing = await User.get_or_none(email=normalize_email(email))
        if existing is not None:
            existing.role = "admin"
            async with in_transaction():
                await existing.save(update_fields=["role", "updated_at"])
                details = {"user_id": str(existing.id), "role": "admin"}
                await write(Actor.system(), "user_promoted", details=details)
            return existing
        return await self.create_admin(email, password)


async def _login_failed(
    reason: str, user: User | None, address: str | None, request_id: str | None
) -> None:
    details: dict[str, str | None] = {"reason": reason, "address": address}
    if user is not None:
        details["user_id"] = str(user.id)
    await write(Actor("anonymous", None, "api", request_id), "user_login_failed", details=details)
