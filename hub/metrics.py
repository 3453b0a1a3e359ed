"""Prometheus metrics of the hub, defined once for the process."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

HTTP_LATENCY = Histogram(
    "hexa_http_request_seconds",
    "HTTP request latency by method, route template and status",
    ["method", "route", "status"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
COMMANDS = Counter(
    "hexa_relay_commands_total",
    "Relay intents handled by the relay service, by result status and source",
    ["status", "source"],
)
COMMAND_LATENCY = Histogram(
    "hexa_relay_command_seconds",
    "From intent received to device ack (applied commands only)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
INTENTS_REFUSED = Counter(
    "hexa_intents_refused_total", "Intents refused before execution, by reason", ["reason"]
)
BAD_PAYLOADS = Counter(
    "hexa_bad_payloads_total",
    "Undecodable payloads dropped at the bus edge, by topic kind",
    ["kind"],
)
FLOOD_DROPS = Counter(
    "hexa_device_flood_drops_total",
    "Device messages dropped because that device's queue was full, by topic kind",
    ["kind"],
)
LATE_ACKS = Counter("hexa_late_acks_total", "Acks that arrived after their command timed out")
STATE_REPORTS = Counter("hexa_state_reports_total", "Device state reports ingested")
INPUT_EVENTS = Counter("hexa_input_events_total", "Device input events", ["event"])
DEVICES_ONLINE = Gauge("hexa_devices_online", "Devices currently online")
WS_SESSIONS = Gauge("hexa_ws_sessions", "Open WebSocket sessions", ["kind"])
WS_DROPPED = Counter("hexa_ws_dropped_messages_total", "Messages dropped for slow WS clients")
BUS_RECONNECTS = Counter("hexa_bus_reconnects_total", "Times the bus client reconnected")
SCHEDULER_TICK = Histogram(
    "hexa_scheduler_tick_seconds",
    "Time to claim and start the due schedules of one tick",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30),
)
SCHEDULE_RUNS = Counter("hexa_schedule_runs_total", "Schedule runs by outcome", ["status"])
AUTOMATION_RUNS = Counter(
    "hexa_automation_runs_total", "Automation evaluations by outcome", ["outcome"]
)
