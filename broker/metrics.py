"""Prometheus metrics of the embedded broker."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

AUTH = Counter("hexa_mqtt_auth_total", "Broker authentication attempts", ["kind", "result"])
DENIED = Counter("hexa_mqtt_acl_denied_total", "Broker ACL denials", ["action"])
DROPPED = Counter(
    "hexa_mqtt_dropped_publishes_total",
    "Publishes the broker acknowledged but dropped (retained intents, oversized payloads)",
    ["reason"],
)
SESSIONS_REFUSED = Counter(
    "hexa_mqtt_sessions_refused_total",
    "CONNECTs refused after authentication (client id of another identity, session limit)",
    ["reason"],
)
KEEPALIVE_TIMEOUTS = Counter(
    "hexa_mqtt_keepalive_timeouts_total",
    "Clients disconnected for silence beyond 1.5 x their keepalive",
)
SLOW_CONSUMERS = Counter(
    "hexa_mqtt_slow_consumers_total",
    "Clients disconnected because their deliveries backed up",
)
QUEUE_DROPS = Counter(
    "hexa_mqtt_delivery_drops_total",
    "Deliveries dropped: QoS 0 to a backed-up client, the oldest message of a full "
    "offline queue, an unacknowledged QoS 1/2 message, a connection that closed",
    ["reason"],
)
SESSIONS = Gauge(
    "hexa_mqtt_sessions",
    "Broker sessions: connected, or persisted while their client is away",
    ["state"],
)
PUBLISHER_WAITS = Counter(
    "hexa_mqtt_publisher_waits_total",
    "Publishes held until a congested subscriber caught up (a client whose queue is half "
    "full while it keeps acknowledging, or the hub itself)",
    ["subscriber"],
)
PUBLISHES_THROTTLED = Counter(
    "hexa_mqtt_publishes_throttled_total",
    "Publishes a device or integration made faster than its rate "
    "(HEXA_MQTT_*_PUBLISH_RATE): the client was read no further until it was due",
    ["kind"],
)
PROTOCOL_ERRORS = Counter(
    "hexa_mqtt_protocol_errors_total",
    "Connections closed because the client broke MQTT 3.1.1 (malformed or forbidden packets)",
)
MESSAGES_RECEIVED = Counter(
    "hexa_mqtt_messages_received_total",
    "PUBLISH packets the broker received from clients, by the kind of client",
    ["kind"],
)
MESSAGES_SENT = Counter(
    "hexa_mqtt_messages_sent_total",
    "Messages the broker delivered to subscribers (connections and the hub's own session)",
)

#: every kind of broker identity, always exported (a kind with no connection shows 0)
KINDS = ("device", "integration", "hub")
#: the received counter of each kind, bound once (the publish path only increments)
RECEIVED_BY_KIND = {kind: MESSAGES_RECEIVED.labels(kind) for kind in KINDS}


class _EngineLike(Protocol):
    clients: dict[str, Any]


class Connections(Collector):
    """``hexa_mqtt_connections{kind}``: sessions attached right now, counted at scrape time
    from the live engines (one pass over the sessions: no gauge to keep in step with every
    connect and disconnect path)."""

    def __init__(self) -> None:
        self._engines: weakref.WeakSet[Any] = weakref.WeakSet()

    def track(self, engine: _EngineLike) -> None:
        self._engines.add(engine)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = dict.fromkeys(KINDS, 0)
        for engine in list(self._engines):
            for client in list(engine.clients.values()):
                attached = client.local is not None or (
                    client.connection is not None and not client.connection.closing
                )
                if attached:
                    kind = client.identity.kind.value
                    counts[kind] = counts.get(kind, 0) + 1
        family = GaugeMetricFamily(
            "hexa_mqtt_connections",
            "Clients attached to the embedded broker right now, by kind",
            labels=["kind"],
        )
        for kind, n in counts.items():
            family.add_metric([kind], n)
        yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("hexa_mqtt_connections", "", labels=["kind"])


CONNECTIONS = Connections()
REGISTRY.register(CONNECTIONS)
