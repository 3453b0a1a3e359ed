"""The platform admin's overview of the whole hub: fleet, recent outcomes, broker load.

Every number is an aggregate the database computes (``COUNT`` and ``GROUP BY``), so the
overview costs the same with ten devices or a hundred thousand; nothing loads rows.
Command and schedule outcomes come from the audit log (``relay_command`` and
``schedule_run`` entries carry ``details.status``), automation fires from the run history.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import REGISTRY
from tortoise import connections
from tortoise.expressions import Q, RawSQL
from tortoise.functions import Count

from hexa.hub.security import utcnow
from hexa.models import (
    AuditEntry,
    Automation,
    AutomationRun,
    Device,
    Organization,
    Schedule,
    User,
)

#: command outcomes the overview counts (``error`` is rare and reported by ``/metrics``)
COMMAND_STATUSES = ("applied", "timeout", "offline", "rejected")
#: automation run outcomes in which the rule's actions ran
FIRED = ("fired", "fired_with_failures")
WINDOW = timedelta(hours=24)


@dataclass(frozen=True)
class DeviceCounts:
    """``online`` + ``offline`` = ``total``; ``unclaimed`` counts devices in no organization,
    whether they are connected or not."""

    total: int
    online: int
    offline: int
    unclaimed: int


@dataclass(frozen=True)
class Overview:
    users: int
    orgs: int
    devices: DeviceCounts
    commands_24h: dict[str, int]
    schedules_enabled: int
    schedules_failed_24h: int
    automations_enabled: int
    automations_fired_24h: int
    broker_connections: int | None


def _status_expression() -> RawSQL:
    """``details.status`` as text, in the dialect of the database the hub runs on."""
    if connections.get("default").capabilities.dialect == "postgres":
        return RawSQL("\"details\"->>'status'")
    return RawSQL("json_extract(\"details\", '$.status')")


async def statuses_since(action: str, since: datetime) -> dict[str, int]:
    """How many audit entries of ``action`` since ``since`` had each ``details.status``."""
    rows: list[dict[str, Any]] = (
        await AuditEntry.filter(action=action, at__gte=since)
        .annotate(outcome=_status_expression())
        .annotate(n=Count("id"))
        .group_by("outcome")
        .values("outcome", "n")
    )
    return {str(r["outcome"]): int(r["n"]) for r in rows if r["outcome"] is not None}


async def device_counts() -> DeviceCounts:
    """The live fleet in one query. ``online`` is what presence last wrote: a device is
    online from its ``online`` availability until its will or a timeout says otherwise."""
    row: dict[str, Any] = (
        await Device.filter(deleted_at=None)
        .annotate(
            n_total=Count("id"),
            n_online=Count("id", _filter=Q(online=True)),
            n_unclaimed=Count("id", _filter=Q(org_id=None)),
        )
        .first()
        .values("n_total", "n_online", "n_unclaimed")
    ) or {}
    total, online = int(row.get("n_total") or 0), int(row.get("n_online") or 0)
    return DeviceCounts(total, online, total - online, int(row.get("n_unclaimed") or 0))


def broker_connections() -> int | None:
    """Clients connected to the embedded broker, as its session gauge in this process says;
    None with an external broker, whose connections the hub cannot see."""
    value = REGISTRY.get_sample_value("hexa_mqtt_sessions", {"state": "connected"})
    return None if value is None else int(value)


async def overview(*, embedded_broker: bool) -> Overview:
    """The numbers of ``GET /admin/overview`` (without the process's own version and uptime)."""
    since = utcnow() - WINDOW
    commands = await statuses_since("relay_command", since)
    schedule_runs = await statuses_since("schedule_run", since)
    return Overview(
        users=await User.all().count(),
        orgs=await Organization.filter(deleted_at=None).count(),
        devices=await device_counts(),
        commands_24h={s: commands.get(s, 0) for s in COMMAND_STATUSES},
        schedules_enabled=await Schedule.filter(enabled=True).count(),
        schedules_failed_24h=sum(n for s, n in schedule_runs.items() if s != "applied"),
        automations_enabled=await Automation.filter(enabled=True).count(),
        automations_fired_24h=await AutomationRun.filter(at__gte=since, outcome__in=FIRED).count(),
        broker_connections=broker_connections() if embedded_broker else None,
    )
