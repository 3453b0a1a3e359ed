"""Prometheus metrics of the embedded broker."""

from __future__ import annotations

from prometheus_client import Counter

AUTH = Counter("hexa_mqtt_auth_total", "Broker authentication attempts", ["kind", "result"])
DENIED = Counter("hexa_mqtt_acl_denied_total", "Broker ACL denials", ["action"])
DROPPED = Counter(
    "hexa_mqtt_dropped_publishes_total",
    "Publishes the broker acknowledged but dropped (retained intents, oversized payloads)",
    ["reason"],
)
