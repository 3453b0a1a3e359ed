"""Whom an Alexa directive speaks for: the bearer token in its scope, as account linking
handed it to Alexa.

Two kinds of token are accepted, so that a skill can link accounts either way:

- a Hexa access token (the JWT ``POST /auth/login`` and ``/auth/refresh`` give): the
  user's memberships decide which devices are endpoints and what the user may do, exactly
  as for REST;
- an integration token of kind ``alexa`` (``POST /integrations/tokens``): every device of
  its organization, with the operator role, as the MQTT side grants integrations.

A token signed by the hub but past its expiry is told apart from a forged or unknown one,
because Alexa reacts differently: ``EXPIRED_AUTHORIZATION_CREDENTIAL`` makes it refresh the
token through account linking, ``INVALID_AUTHORIZATION_CREDENTIAL`` asks the customer to
link again. Platform admins get no endpoints beyond their memberships: an Alexa account
lists one household's switches, not every tenant's.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import jwt

from hexa.bridges.alexa_messages import (
    EXPIRED_AUTHORIZATION_CREDENTIAL,
    INVALID_AUTHORIZATION_CREDENTIAL,
    AlexaError,
)
from hexa.hub.access import Role, load_principal
from hexa.hub.errors import Unauthorized
from hexa.hub.security import JWT_ALGORITHM, JWT_AUDIENCE, decode_access_token, token_hash
from hexa.models import IntegrationToken

#: the integration-token kind Alexa may use (contract §6)
ALEXA_KIND = "alexa"


@dataclass(frozen=True)
class Account:
    """The caller behind a directive: its role in each organization it reaches, and how
    its commands are attributed in the audit log."""

    roles: Mapping[uuid.UUID, Role]
    actor_type: str
    actor_id: str

    def role_in(self, org_id: uuid.UUID | None) -> Role | None:
        return None if org_id is None else self.roles.get(org_id)


async def authenticate(token: object, jwt_secret: str) -> Account:
    """The account a bearer token stands for; AlexaError when it stands for none."""
    if not isinstance(token, str) or not token:
        raise AlexaError(INVALID_AUTHORIZATION_CREDENTIAL, "no bearer token in the directive")
    if token.count(".") == 2:
        return await _user(token, jwt_secret)
    return await _integration(token)


async def _user(token: str, secret: str) -> Account:
    try:
        claims = decode_access_token(secret, token)
    except Unauthorized:
        if _expired_but_ours(token, secret):
            raise AlexaError(
                EXPIRED_AUTHORIZATION_CREDENTIAL, "the access token has expired"
            ) from None
        raise AlexaError(INVALID_AUTHORIZATION_CREDENTIAL, "invalid access token") from None
    try:
        principal = await load_principal(claims.user_id)
    except Unauthorized:
        raise AlexaError(
            INVALID_AUTHORIZATION_CREDENTIAL, "the account is unknown or disabled"
        ) from None
    return Account(dict(principal.roles), "user", str(principal.id))


def _expired_but_ours(token: str, secret: str) -> bool:
    """True for an access token this hub signed whose only fault is its age."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[JWT_ALGORITHM],
            audience=JWT_AUDIENCE,
            options={"verify_exp": False, "require": ["exp", "sub", "iat", "aud"]},
        )
    except jwt.InvalidTokenError:
        return False
    return claims.get("typ") == "access"


async def _integration(token: str) -> Account:
    row = await IntegrationToken.get_or_none(
        token_hash=token_hash(token), org__deleted_at__isnull=True
    )
    if row is None or row.kind != ALEXA_KIND:
        raise AlexaError(
            INVALID_AUTHORIZATION_CREDENTIAL, "not an access token or an alexa integration token"
        )
    return Account({row.org_id: Role.operator}, "integration", str(row.id))
