"""Prometheus metrics of the embedded broker."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

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
