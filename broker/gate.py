"""Who may connect and what they may touch: the state behind the auth and ACL plugins."""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
import uuid

from hexa.broker.acl import Identity, Kind
from hexa.hub import topics
from hexa.hub.batch import Batched
from hexa.models import Device, IntegrationToken

log = logging.getLogger(__name__)

HUB_USERNAME = "$hub"  # "$" is valid in no device uid or integration name
#: how long a device's organization is trusted when other hubs may change it (PostgreSQL)
ORG_CACHE_TTL_S = 30.0
#: device credentials looked up in one query at most (SQL parameters per statement)
LOOKUP_BATCH = 500

#: a live device's token hash and organization (None: unclaimed)
Credential = tuple[str, uuid.UUID | None]


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Gate:
    """Authenticates broker sessions and caches device → organization for the ACL.

    A device changes organization only when it is claimed, released or deleted, and this
    hub tells the gate (:meth:`forget`) when it does. ``org_ttl`` bounds how long an entry
    is trusted beyond that: changes made by another hub sharing the database (PostgreSQL)
    reach this one only by expiry. None keeps entries until forgotten, for a database this
    hub is the only server of (SQLite).
    """

    def __init__(self, hub_password: str, org_ttl: float | None = ORG_CACHE_TTL_S) -> None:
        self.hub_password = hub_password
        self.org_ttl = math.inf if org_ttl is None else org_ttl
        self._orgs: dict[str, tuple[uuid.UUID | None, float]] = {}
        #: a live device's credential and organization as the database has them now:
        #: the CONNECTs of a storm (and the ACL's organization look-ups) share queries,
        #: and nothing is cached (a token rotated or revoked a moment ago is refused)
        self._credentials = Batched(_credentials)

    async def identify(self, username: str | None, password: str | None) -> Identity | None:
        """The identity these credentials prove, or None (anonymous is never allowed)."""
        if not username or not password:
            return None
        if username == HUB_USERNAME:
            if hmac.compare_digest(password.encode(), self.hub_password.encode()):
                return Identity(Kind.HUB, username)
            return None
        digest = _hash(password)
        if topics.UID_RE.match(username):
            device = await self._credentials.one(username)
            if device is not None:
                token_hash, org_id = device
                if hmac.compare_digest(token_hash, digest):
                    self._orgs[username] = (org_id, time.monotonic() + self.org_ttl)
                    return Identity(Kind.DEVICE, username)
                return None
        # Integration names are unique only within an organization: the token itself
        # (its hash, indexed) says which integration this is; the name must match it.
        token = await IntegrationToken.get_or_none(token_hash=digest)
        if token is not None and hmac.compare_digest(token.name.encode(), username.encode()):
            return Identity(Kind.INTEGRATION, username, org_id=token.org_id, id=str(token.id))
        return None

    async def load_org(self, uid: str | None) -> None:
        """Make :meth:`org_of` answer for ``uid`` (a cached database lookup)."""
        if uid is None:
            return
        cached = self._orgs.get(uid)
        if cached is not None and cached[1] > time.monotonic():
            return
        device = await self._credentials.one(uid)  # shares the query with others
        if device is None:
            self._orgs.pop(uid, None)
            return
        self._orgs[uid] = (device[1], time.monotonic() + self.org_ttl)
        if len(self._orgs) > 200_000:
            self._orgs.clear()

    def org_of(self, uid: str) -> uuid.UUID | None:
        """The organization of a live device; KeyError if unknown."""
        return self._orgs[uid][0]

    def forget(self, uid: str) -> None:
        self._orgs.pop(uid, None)


async def _credentials(uids: list[str]) -> dict[str, Credential]:
    """uid → (token hash, organization) of the live devices among ``uids``."""
    found: dict[str, Credential] = {}
    for i in range(0, len(uids), LOOKUP_BATCH):
        rows = await Device.filter(
            device_uid__in=uids[i : i + LOOKUP_BATCH], deleted_at=None
        ).values_list("device_uid", "token_hash", "org_id")
        for uid, token_hash, org_id in rows:
            if org_id is not None and not isinstance(org_id, uuid.UUID):
                org_id = uuid.UUID(str(org_id))
            found[uid] = (token_hash, org_id)
    return found
