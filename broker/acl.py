"""Topic ACL decisions (contract.md §3), as pure functions of who and which topic.

- a device may publish only its own ack, report, event and availability, and subscribe
  only to its own cmd (and ``hexa/hub/status``);
- an integration may subscribe to ``hexa/#`` and ``homeassistant/#`` (or narrower
  filters; also under the configured discovery prefix), receives only its
  organization's devices (their discovery configs included) and ``hexa/hub/status``,
  and may publish only intents for its organization's devices and
  ``homeassistant/status``;
- the hub may do everything; anybody else nothing.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from hexa.hub import topics


class Kind(Enum):
    HUB = "hub"
    DEVICE = "device"
    INTEGRATION = "integration"


@dataclass(frozen=True)
class Identity:
    """Who a broker session belongs to, fixed at authentication."""

    kind: Kind
    name: str
    org_id: uuid.UUID | None = None
    #: what tells identities of one kind apart (an integration token's id; names are
    #: unique only within an organization); the name when None
    id: str | None = None

    @property
    def key(self) -> str:
        """Who owns a broker session: equal keys are the same identity."""
        return f"{self.kind.value}:{self.id or self.name}"


#: device uid → its organization (None: unclaimed), or raises KeyError if unknown
OrgOf = Callable[[str], uuid.UUID | None]

_HUB_STATUS = topics.HUB_STATUS.format()
_HA_STATUS = topics.HA_STATUS.format()
_HA_PREFIX = topics.HA_PREFIX


def _ha_status(topic: str, ha_prefix: str) -> bool:
    """Whether ``topic`` is Home Assistant's birth topic (its default, or under the
    discovery prefix the hub is configured with)."""
    return topic == _HA_STATUS or topic == topics.ha_topic(_HA_STATUS, ha_prefix)


@functools.lru_cache(maxsize=1 << 16)
def topic_device(topic: str) -> str | None:
    """The device a concrete topic is about: hexa/<uid>/…, or a Home Assistant discovery
    config (a relay's switch or an input event's device trigger), so that both are
    delivered to the device's organization only."""
    uid = topics.device_of(topic)
    if uid is not None:
        return uid
    object_id = topics.ha_config_object(topic)  # under any discovery prefix
    return None if object_id is None else topics.uid_of_ha_object(object_id)


@functools.lru_cache(maxsize=1 << 14)
def _device_publishes(uid: str) -> frozenset[str]:
    return frozenset(t.format(uid=uid) for t in topics.DEVICE_PUBLISH)


@functools.lru_cache(maxsize=1 << 14)
def _device_cmd(uid: str) -> str:
    return topics.CMD.format(uid=uid)


def _in_org(identity: Identity, uid: str | None, org_of: OrgOf) -> bool:
    if uid is None or identity.org_id is None:
        return False
    try:
        return org_of(uid) == identity.org_id
    except KeyError:
        return False


def may_publish(
    identity: Identity, topic: str, org_of: OrgOf, *, ha_prefix: str = _HA_PREFIX
) -> bool:
    if identity.kind is Kind.HUB:
        return True
    if identity.kind is Kind.DEVICE:
        return topic in _device_publishes(identity.name)
    if _ha_status(topic, ha_prefix):
        return True
    for t in topics.INTENT_TOPICS:
        params = t.parse(topic)
        if params is not None:
            return _in_org(identity, params["uid"], org_of)
    return False


def may_subscribe(
    identity: Identity, flt: str, org_of: OrgOf, *, ha_prefix: str = _HA_PREFIX
) -> bool:
    if identity.kind is Kind.HUB:
        return True
    if flt == _HUB_STATUS:
        return True
    if identity.kind is Kind.DEVICE:
        return flt == topics.CMD.format(uid=identity.name)
    parts = flt.split("/")
    if parts[0] in (_HA_PREFIX, ha_prefix):
        return True  # what is delivered is filtered per message (may_receive)
    if parts[0] != topics.ROOT or len(parts) < 2:
        return False
    second = parts[1]
    if second in ("+", "#", "hub"):
        return True  # what is delivered is filtered per message (may_receive)
    return _in_org(identity, second, org_of)


def may_receive(
    identity: Identity, topic: str, org_of: OrgOf, *, ha_prefix: str = _HA_PREFIX
) -> bool:
    if identity.kind is Kind.HUB:
        return True
    if topic == _HUB_STATUS:
        return True
    if identity.kind is Kind.DEVICE:
        return topic == _device_cmd(identity.name)
    if _ha_status(topic, ha_prefix):
        return True
    return _in_org(identity, topic_device(topic), org_of)
