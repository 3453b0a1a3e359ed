"""Prometheus metrics of the hub, defined once for the process.

Every label takes its values from a small fixed set (statuses, sources, error codes, route
templates, kinds): never a device uid, a user id or a raw path, so the number of series stays
bounded however many devices and users the hub has. Gauges that describe stored state (the
fleet, the scheduler's backlog) are computed when ``/metrics`` is scraped by
:func:`refresh_at_scrape`, with one grouped query each, so they cannot drift from the database.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import Counter, Gauge, Histogram
from tortoise.functions import Count

from hexa.hub import __version__
from hexa.hub.alert_simulation import BURST, DRILL_LAG_S, SIMULATION
from hexa.hub.security import utcnow
from hexa.models import Device, Schedule

HTTP_REQUESTS = Counter(
    "hexa_http_requests_total",
    "HTTP requests by method, route template and status",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "hexa_http_request_seconds",
    "HTTP request latency by method, route template and status",
    ["method", "route", "status"],
    # 15 and 20 ms: a relay command's round trip lives between 2 and 25 ms, and a p95/p99
    # read from the histogram is only as fine as the buckets around it
    buckets=(0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
API_ERRORS = Counter(
    "hexa_api_errors_total",
    "Error answers of the HTTP API by the error code of their body",
    ["code"],
)
COMMANDS = Counter(
    "hexa_relay_commands_total",
    "Relay intents handled by the relay service, by result status and source",
    ["status", "source"],
)
COMMAND_LATENCY = Histogram(
    "hexa_relay_command_seconds",
    "From intent received to its result (device ack, timeout, offline, rejected, error)",
    ["status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
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
OTA_REPORTS = Counter(
    "hexa_ota_reports_total",
    "OTA reports from devices by status (downloading, verified, installing, applied, failed)",
    ["status"],
)
OTA_INTEGRITY_FAILURES = Counter(
    "hexa_ota_integrity_failures_total",
    "OTA releases refused by a fail-closed check, by check "
    "(host, algorithm, key, fields, signature, expired, artifact)",
    ["check"],
)
OTA_HALTS = Counter(
    "hexa_ota_releases_halted_total",
    "Published OTA releases that halted themselves on too many failed reports",
)
CONFIG_PUSHES = Counter(
    "hexa_device_config_pushes_total",
    "Configuration documents sent to devices, by what caused them (change, connect, report)",
    ["trigger"],
)
CONFIG_ACKS = Counter(
    "hexa_device_config_acks_total",
    "Configuration acks by outcome: applied, or why one was refused and not applied",
    ["result"],
)
DEVICES_ONLINE = Gauge("hexa_devices_online", "Devices currently online")
DEVICES = Gauge(
    "hexa_devices",
    "Known devices by state: claimed and online, claimed and offline, or not claimed yet",
    ["state"],
)
WS_SESSIONS = Gauge("hexa_ws_sessions", "Open WebSocket sessions", ["kind"])
WS_DROPPED = Counter("hexa_ws_dropped_messages_total", "Messages dropped for slow WS clients")
BUS_RECONNECTS = Counter("hexa_bus_reconnects_total", "Times the bus client reconnected")
BUS_CONNECTED = Gauge(
    "hexa_bus_connected", "1 while the hub's bus client is connected to the broker, else 0"
)
SCHEDULER_TICK = Histogram(
    "hexa_scheduler_tick_seconds",
    "Time to claim and start the due schedules of one tick",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30),
)
SCHEDULER_LAST_TICK = Gauge(
    "hexa_scheduler_last_tick_timestamp_seconds",
    "Unix time at which the scheduler last finished a tick",
)
SCHEDULER_LAG = Gauge(
    "hexa_scheduler_lag_seconds",
    "How long the oldest enabled schedule has been due without being run (0: none is late)",
)
SCHEDULE_RUNS = Counter("hexa_schedule_runs_total", "Schedule runs by outcome", ["status"])
AUTOMATION_RUNS = Counter(
    "hexa_automation_runs_total", "Automation evaluations by outcome", ["outcome"]
)
BACKUP_LAST_SUCCESS = Gauge(
    "hexa_backup_last_success_timestamp_seconds",
    "Unix time at which the last backup was written and verified (at start: the newest file's)",
)
BACKUP_DURATION = Gauge(
    "hexa_backup_duration_seconds",
    "How long the last successful backup took, verification included",
)
BACKUP_FAILURES = Counter("hexa_backup_failures_total", "Backups that failed")
BACKUP_SCHEDULED = Gauge(
    "hexa_backup_scheduled", "1 when HEXA_BACKUP_SCHEDULE runs backups, 0 when it is off"
)
#: what the two backup gauges show outside an alert drill (set by the backup service)
BACKUP_STATE: dict[str, float] = {"last_success": 0.0, "scheduled": 0.0}
BUILD_INFO = Gauge("hexa_build_info", "Always 1; the hub's version is the label", ["version"])
BUILD_INFO.labels(__version__).set(1)
START_TIME = Gauge("hexa_start_time_seconds", "Unix time at which the hub process started")
START_TIME.set(time.time())

#: device states of ``hexa_devices``, always all exported (a state with no device shows 0)
DEVICE_STATES = ("online", "offline", "unclaimed")

log = logging.getLogger(__name__)


#: the sources a relay command is counted under; any other (none today: the relay service
#: attributes intents itself) is counted as ``other``, so a label can never be minted
COMMAND_SOURCES = frozenset(
    {"api", "ws_client", "mqtt", "schedule", "automation", "home_assistant", "homekit", "alexa"}
)


#: the children of COMMANDS and COMMAND_LATENCY by (status, source), bound once: the
#: relay service counts every intent (the label values are the few above)
_command_series: dict[tuple[str, str], tuple[Counter, Histogram]] = {}


def observe_command(status: str, source: str, seconds: float) -> None:
    """Count one relay result and observe its latency, whatever its status: a timeout is
    observed too, so the histogram shows how long callers waited for nothing."""
    series = _command_series.get((status, source))
    if series is None:
        label = source if source in COMMAND_SOURCES else "other"
        series = (COMMANDS.labels(status, label), COMMAND_LATENCY.labels(status))
        if len(_command_series) < 1000:  # statuses x sources; any other source is "other"
            _command_series[(status, source)] = series
    series[0].inc()
    series[1].observe(seconds)


async def refresh_at_scrape(*, bus_connected: bool) -> None:
    """Update the gauges that mirror the hub's state, just before a scrape is rendered.

    A database that does not answer leaves the stored-state gauges at their last values
    and the scrape still succeeds: a failed scrape would read as "hub down", and the
    readiness probe already reports the database.
    """
    BUS_CONNECTED.set(1 if bus_connected and not SIMULATION.active("HexaBusDisconnected") else 0)
    if SIMULATION.active("HexaCommandTimeoutRatio"):
        COMMANDS.labels("timeout", "simulation").inc(BURST)
    if SIMULATION.active("HexaApi5xxRatio"):
        HTTP_REQUESTS.labels("GET", "simulation", "500").inc(BURST)
    if SIMULATION.active("HexaOtaIntegrityFailure"):
        OTA_INTEGRITY_FAILURES.labels("simulation").inc()
    stale = SIMULATION.active("HexaBackupStale")  # as if the last backup were in 1970
    BACKUP_LAST_SUCCESS.set(1.0 if stale else BACKUP_STATE["last_success"])
    BACKUP_SCHEDULED.set(1 if stale else BACKUP_STATE["scheduled"])
    try:
        await _refresh_stored_state()
    except Exception:  # any database failure: the rest of the scrape stands
        log.warning("fleet and scheduler gauges not refreshed", exc_info=True)


async def _refresh_stored_state() -> None:
    """One grouped count over the devices and one indexed lookup of the oldest due
    schedule: both stay in the low milliseconds with tens of thousands of devices, so a
    scrape stays cheap without a counter to keep in step with every change."""
    counts = dict.fromkeys(DEVICE_STATES, 0)
    rows = (
        await Device.filter(deleted_at__isnull=True)
        .annotate(n=Count("id"))
        .group_by("org_id", "online")
        .values_list("org_id", "online", "n")
    )
    for org_id, online, n in rows:
        state = "unclaimed" if org_id is None else ("online" if online else "offline")
        counts[state] += int(n)
    if SIMULATION.active("HexaFleetOffline"):
        counts["offline"] += counts["online"] + 1
        counts["online"] = 0
    for state, n in counts.items():
        DEVICES.labels(state).set(n)
    now = utcnow()
    oldest = (
        await Schedule.filter(enabled=True, next_execution__lte=now)
        .order_by("next_execution")
        .only("id", "next_execution")
        .first()
    )
    due = oldest.next_execution if oldest is not None else None
    lag = max(0.0, (now - due).total_seconds()) if due is not None else 0.0
    SCHEDULER_LAG.set(max(lag, DRILL_LAG_S) if SIMULATION.active("HexaSchedulerLag") else lag)


def hub_down_simulated() -> bool:
    """While HexaHubDown is drilled, ``/metrics`` answers 503 so Prometheus marks the
    target down (``up == 0``): the only signal that alert has."""
    return SIMULATION.active("HexaHubDown")
