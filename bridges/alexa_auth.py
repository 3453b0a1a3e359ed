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

from hexa.bridges.alexa_messages import (
    EXPIRED_AUTHORIZATION_CREDENTIAL,
    INVALID_AUTHORIZATION_CREDENTIAL,
    AlexaError,
)
from hexa.hub.access import Role, principal_for_token
from hexa.hub.errors import CredentialExpired, Unauthorized
from hexa.hub.security import token_hash
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
    """A Hexa access token, checked exactly as REST checks one."""
    try:
        principal = await principal_for_token(secret, token)
    except CredentialExpired:
        raise AlexaError(EXPIRED_AUTHORIZATION_CREDENTIAL, "the access token has expired") from None
    except Unauthorized as exc:
        raise AlexaError(INVALID_AUTHORIZATION_CREDENTIAL, exc.message) from None
    return Account(dict(principal.roles), "user", str(principal.id))


async def _integration(token: str) -> Account:
    row = await IntegrationToken.get_or_none(
        token_hash=token_hash(token), org__deleted_at__isnull=True
    )
    if row is None or row.kind != ALEXA_KIND:
        raise AlexaError(
            INVALID_AUTHORIZATION_CREDENTIAL, "not an access token or an alexa integration token"
        )
    return Account({row.org_id: Role.operator}, "integration", str(row.id))
