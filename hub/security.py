"""Secrets: password hashing, opaque tokens, access JWTs."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from hexa.hub.errors import CredentialExpired, Unauthorized

#: argon2id parameters (time cost, memory in KiB, parallelism), chosen by HEXA_PASSWORD_HASH
PASSWORD_PROFILES: dict[str, tuple[int, int, int]] = {
    # RFC 9106's second recommended option (argon2-cffi's default): about 0.2 s of CPU
    "strong": (3, 64 * 1024, 4),
    # OWASP's minimum for argon2id, for small hardware: about 0.03 s of CPU, 19 MiB
    "light": (2, 19 * 1024, 1),
}
JWT_ALGORITHM = "HS256"
JWT_AUDIENCE = "hexa-api"


class Passwords:
    """Hashes and verifies passwords with argon2id (a stored hash keeps its own parameters,
    so hashes made under another profile still verify). The work runs in a worker thread:
    argon2 releases the GIL, and the event loop keeps serving meanwhile."""

    def __init__(self, profile: str = "strong") -> None:
        time_cost, memory_cost, parallelism = PASSWORD_PROFILES[profile]
        self._hasher = PasswordHasher(
            time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism
        )
        self._dummy: str | None = None

    async def hash(self, password: str) -> str:
        return await anyio.to_thread.run_sync(self._hasher.hash, password)

    async def verify(self, stored: str | None, password: str) -> bool:
        """``stored`` None (no such account) is verified against a hash of the same cost,
        so the answer takes as long as for an account that exists."""
        if stored is None:
            if self._dummy is None:
                self._dummy = await self.hash(secrets.token_urlsafe(16))
            stored = self._dummy
        return await anyio.to_thread.run_sync(self._verify, stored, password)

    def _verify(self, stored: str, password: str) -> bool:
        try:
            return self._hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return False


def new_token(prefix: str = "", nbytes: int = 32) -> str:
    """A random opaque token (URL-safe)."""
    return prefix + secrets.token_urlsafe(nbytes)


def token_hash(token: str) -> str:
    """SHA-256 of a high-entropy token: how tokens are stored and looked up."""
    return hashlib.sha256(token.encode()).hexdigest()


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison of two secrets."""
    return hmac.compare_digest(given.encode(), expected.encode())


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class AccessClaims:
    user_id: uuid.UUID
    expires_at: datetime


def issue_access_token(secret: str, user_id: uuid.UUID, ttl_s: int) -> str:
    now = utcnow()
    claims = {
        "sub": str(user_id),
        "iat": int(now.timestamp()),
        "exp": int((now + timedelta(seconds=ttl_s)).timestamp()),
        "aud": JWT_AUDIENCE,
        "typ": "access",
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, secret, algorithm=JWT_ALGORITHM)


def _access_claims(secret: str, token: str, *, verify_exp: bool) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(
        token,
        secret,
        algorithms=[JWT_ALGORITHM],  # never accept "none" or another algorithm
        audience=JWT_AUDIENCE,
        options={"require": ["exp", "sub", "iat", "aud"], "verify_exp": verify_exp},
    )
    if claims.get("typ") != "access":
        raise Unauthorized("not an access token")
    return claims


def decode_access_token(secret: str, token: str) -> AccessClaims:
    """Verify an access JWT; raises :class:`CredentialExpired` for an access token of this
    hub past its expiry and :class:`Unauthorized` for anything else wrong with it."""
    try:
        claims = _access_claims(secret, token, verify_exp=True)
        return AccessClaims(
            user_id=uuid.UUID(claims["sub"]),
            expires_at=datetime.fromtimestamp(claims["exp"], UTC),
        )
    except jwt.ExpiredSignatureError:
        pass
    except (jwt.InvalidTokenError, ValueError, TypeError):
        raise Unauthorized("invalid access token") from None
    # PyJWT checks the expiry before the audience: only a token that is an access token of
    # this hub in every other respect is "expired"; a forged or foreign one stays invalid
    try:
        _access_claims(secret, token, verify_exp=False)
    except (jwt.InvalidTokenError, ValueError, TypeError):
        raise Unauthorized("invalid access token") from None
    raise CredentialExpired("access token expired")
