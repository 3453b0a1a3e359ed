"""Authentication (an amqtt plugin) and the topic ACL, both backed by a :class:`Gate`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from amqtt.plugins.base import BaseAuthPlugin

from hexa.broker import acl, metrics
from hexa.broker.gate import Gate
from hexa.hub import topics
from hexa.hub.logs import printable

log = logging.getLogger(__name__)

IDENTITY = "hexa.identity"


class HexaAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt ships no types
    """Devices by uid/token, integrations by name/token, the hub by its own credential."""

    @dataclass
    class Config:
        gate: Any = None

    async def authenticate(self, *, session: Any) -> bool | None:
        gate: Gate = self.config.gate
        try:
            identity = await gate.identify(session.username, session.password)
        except Exception:
            log.exception("broker authentication failed for %s", printable(session.username))
            identity = None
        if identity is None:  # the broker logs the refusal, once
            metrics.AUTH.labels("unknown", "refused").inc()
            return False
        session.attributes[IDENTITY] = identity
        metrics.AUTH.labels(identity.kind.value, "ok").inc()
        return True


class Access:
    """contract.md §3 on publish, subscribe and delivery (see :mod:`hexa.broker.acl`),
    for one identity at a time; denials are counted and logged."""

    def __init__(self, gate: Gate, *, ha_prefix: str = topics.HA_PREFIX) -> None:
        self.gate = gate
        #: Home Assistant's discovery prefix (``HEXA_HA_DISCOVERY_PREFIX``)
        self.ha_prefix = ha_prefix

    async def may_publish(self, identity: acl.Identity, topic: str) -> bool:
        if identity.kind is acl.Kind.HUB:
            return True
        if identity.kind is acl.Kind.INTEGRATION:
            await self.gate.load_org(topics.device_of(topic))
        return self._decided(
            acl.may_publish(identity, topic, self.gate.org_of, ha_prefix=self.ha_prefix),
            "publish",
            identity,
            topic,
        )

    async def may_subscribe(self, identity: acl.Identity, flt: str) -> bool:
        if identity.kind is acl.Kind.HUB:
            return True
        if identity.kind is acl.Kind.INTEGRATION:
            parts = flt.split("/")
            await self.gate.load_org(
                parts[1] if len(parts) > 1 and topics.UID_RE.match(parts[1]) else None
            )
        return self._decided(
            acl.may_subscribe(identity, flt, self.gate.org_of, ha_prefix=self.ha_prefix),
            "subscribe",
            identity,
            flt,
        )

    async def prepare_receive(self, topic: str) -> None:
        """Load what :meth:`may_receive` needs to decide about ``topic``."""
        await self.gate.load_org(acl.topic_device(topic))

    def may_receive(self, identity: acl.Identity, topic: str) -> bool:
        """After :meth:`prepare_receive` for the topic: whether ``identity`` receives it."""
        if identity.kind is acl.Kind.HUB:
            return True
        return acl.may_receive(identity, topic, self.gate.org_of, ha_prefix=self.ha_prefix)

    def _decided(self, allowed: bool, action: str, identity: acl.Identity, topic: str) -> bool:
        if not allowed:
            metrics.DENIED.labels(action).inc()
            log.info(
                "denied %s %s for %s %s",
                action,
                printable(topic),
                identity.kind.value,
                printable(identity.name),
            )
        return allowed
