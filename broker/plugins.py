"""amqtt plugins: authentication and the topic ACL, both backed by a :class:`Gate`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

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


class HexaAclPlugin(BaseTopicPlugin):  # type: ignore[misc]  # amqtt ships no types
    """contract.md §3 on publish, subscribe and delivery (see :mod:`hexa.broker.acl`)."""

    @dataclass
    class Config:
        gate: Any = None

    async def topic_filtering(
        self, *, session: Any = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        if session is None or topic is None:
            return False
        identity: acl.Identity | None = session.attributes.get(IDENTITY)
        if identity is None:
            return False
        if identity.kind is acl.Kind.HUB:
            return True
        gate: Gate = self.config.gate
        if action == Action.RECEIVE:
            if identity.kind is acl.Kind.INTEGRATION:
                await gate.load_org(acl.topic_device(topic))
            return acl.may_receive(identity, topic, gate.org_of)
        if action == Action.PUBLISH:
            if identity.kind is acl.Kind.INTEGRATION:
                await gate.load_org(topics.device_of(topic))
            allowed = acl.may_publish(identity, topic, gate.org_of)
        else:
            if identity.kind is acl.Kind.INTEGRATION:
                parts = topic.split("/")
                await gate.load_org(
                    parts[1] if len(parts) > 1 and topics.UID_RE.match(parts[1]) else None
                )
            allowed = acl.may_subscribe(identity, topic, gate.org_of)
        if not allowed:
            metrics.DENIED.labels(action.value if action else "unknown").inc()
            log.info(
                "denied %s %s for %s %s",
                action,
                printable(topic),
                identity.kind.value,
                printable(identity.name),
            )
        return allowed
