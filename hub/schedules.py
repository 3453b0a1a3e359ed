"""Schedules: cron validation and DST-correct next runs, and the scheduler loop.

Wall-clock semantics in the schedule's timezone: when clocks spring forward, a run in
the skipped hour happens at the first valid time after it (never lost); when clocks fall
back, a wall-clock time that repeats fires once (never twice). A run missed while the
hub was down fires once if it is at most ``grace_s`` late, and is recorded as missed
otherwise. Several hub instances may share one database: each due run is claimed with a
compare-and-set on ``next_execution`` (inside ``SELECT … FOR UPDATE SKIP LOCKED`` on
PostgreSQL), so it fires exactly once.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio
from anyio.abc import TaskStatus
from croniter import croniter
from croniter.croniter import CroniterError
from tortoise.expressions import F
from tortoise.transactions import in_transaction

from hexa.hub import metrics
from hexa.hub.audit import AuditLog
from hexa.hub.commands import Commands, Origin, RelayAction
from hexa.hub.errors import ValidationFailed
from hexa.hub.security import utcnow
from hexa.models import Device, Schedule

log = logging.getLogger(__name__)

#: a schedule whose next run is further away than this never runs: refuse it
HORIZON = timedelta(days=366 * 5)
CLAIM_BATCH = 500
#: runs of one tick in flight at once (each waits for its device's ack)
MAX_CONCURRENT_RUNS = 64


def check_timezone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValidationFailed(
            f"unknown IANA timezone {name!r}", details={"field": "timezone"}
        ) from None


def check_cron(expr: str, tz_name: str) -> None:
    """Five-field cron that fires at least once within the horizon; raises ValidationFailed."""
    fields = expr.split()
    if len(fields) != 5 and not (len(fields) == 1 and expr.startswith("@")):
        raise ValidationFailed(
            "cron needs 5 fields: minute hour day-of-month month day-of-week",
            details={"field": "cron"},
        )
    try:
        valid = croniter.is_valid(expr, strict=True)
    except (CroniterError, ValueError, KeyError):
        valid = False
    if not valid:
        raise ValidationFailed(f"invalid cron expression {expr!r}", details={"field": "cron"})
    tz = check_timezone(tz_name)
    if next_run(expr, tz, utcnow(), None) is None:
        raise ValidationFailed(f"cron {expr!r} never fires", details={"field": "cron"})


def _local_key(moment: datetime) -> str:
    """The wall-clock reading of an aware local time (what people see on the clock)."""
    return moment.replace(tzinfo=None).isoformat(timespec="minutes")


def next_run(
    expr: str, tz: ZoneInfo, after: datetime, last_fired_local: str | None
) -> tuple[datetime, str] | None:
    """The next run strictly after ``after`` (UTC) as (UTC instant, local wall-clock key).

    Occurrences whose wall-clock reading is not later than the last fired one are the
    repeated hour of a fall-back: skipped, so a wall-clock time never fires twice.
    """
    local_after = after.astimezone(tz)
    try:
        it = croniter(expr, local_after)
    except (CroniterError, ValueError, KeyError):
        return None
    limit = after + HORIZON
    for _ in range(10_000):
        try:
            candidate = it.get_next(datetime)
        except (CroniterError, StopIteration):
            return None
        if candidate.tzinfo is None:
            candidate = candidate.replace(tzinfo=tz)
        instant = candidate.astimezone(UTC)
        if instant > limit:
            return None
        if instant <= after:
            continue
        key = _local_key(candidate.astimezone(tz))
        if last_fired_local is not None and key <= last_fired_local:
            continue
        return instant, key
    return None


class Scheduler:
    """Fires due schedules every tick by publishing relay intents (source ``schedule``)."""

    def __init__(
        self, commands: Commands, audit: AuditLog, *, tick_s: float, grace_s: float = 60.0
    ) -> None:
        self.commands = commands
        self.audit = audit
        self.tick_s = tick_s
        self.grace_s = grace_s
        self._slots = anyio.Semaphore(MAX_CONCURRENT_RUNS)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with anyio.create_task_group() as tg:
            while True:
                started = time.monotonic()
                try:
                    await self.tick(tg)
                except Exception:  # a failing tick (database down...) must not end the loop
                    log.exception("scheduler tick failed; retrying next tick")
                await anyio.sleep(max(0.0, self.tick_s - (time.monotonic() - started)))

    async def tick(self, tg: anyio.abc.TaskGroup | None = None) -> int:
        """Claim every due schedule, fire the ones in time, record the missed ones."""
        now = utcnow()
        began = time.perf_counter()
        fired = 0
        while True:
            claimed = await self._claim(now)
            for schedule, scheduled_for, missed in claimed:
                if missed:
                    await self._record(schedule, "missed", scheduled_for, executed=False)
                    continue
                fired += 1
                if tg is None:
                    await self.execute(schedule, scheduled_for)
                else:
                    await self._slots.acquire()
                    tg.start_soon(self._execute_in_slot, schedule, scheduled_for)
            if len(claimed) < CLAIM_BATCH:
                break
        metrics.SCHEDULER_TICK.observe(time.perf_counter() - began)
        metrics.SCHEDULER_LAST_TICK.set_to_current_time()
        return fired

    async def _claim(self, now: datetime) -> list[tuple[Schedule, datetime, bool]]:
        """Advance due rows to their next run; each row is claimed by exactly one caller."""
        out: list[tuple[Schedule, datetime, bool]] = []
        async with in_transaction() as conn:
            due = (
                await Schedule.filter(enabled=True, next_execution__lte=now)
                .order_by("next_execution")
                .limit(CLAIM_BATCH)
                .select_for_update(skip_locked=True)
                .using_db(conn)
            )
            for schedule in due:
                scheduled_for = schedule.next_execution
                assert scheduled_for is not None
                missed = (now - scheduled_for).total_seconds() > self.grace_s
                tz = ZoneInfo(schedule.timezone)
                local_key = _local_key(scheduled_for.astimezone(tz))
                # Skip every occurrence up to now: a hub that was down fires at most once.
                upcoming = next_run(schedule.cron, tz, max(now, scheduled_for), local_key)
                changes: dict[str, Any] = {
                    "next_execution": upcoming[0] if upcoming else None,
                    "last_fired_local": local_key,
                }
                if upcoming is None:
                    changes["enabled"] = False
                won = (
                    await Schedule.filter(id=schedule.id, next_execution=scheduled_for)
                    .using_db(conn)
                    .update(**changes)
                )
                if won:
                    out.append((schedule, scheduled_for, missed))
        return out

    async def _execute_in_slot(self, schedule: Schedule, scheduled_for: datetime) -> None:
        try:
            await self.execute(schedule, scheduled_for)
        finally:
            self._slots.release()

    async def execute(
        self,
        schedule: Schedule,
        scheduled_for: datetime | None = None,
        *,
        request_id: str | None = None,
    ) -> str:
        """Publish the schedule's intent and record the outcome (also used by run-now)."""
        device = await Device.get_or_none(id=schedule.device_id, deleted_at=None)
        if device is None or device.org_id != schedule.org_id:
            await Schedule.filter(id=schedule.id).update(enabled=False, next_execution=None)
            await self._record(
                schedule, "device_removed", scheduled_for, executed=False, request_id=request_id
            )
            return "device_removed"
        status: str
        try:
            result = await self.commands.submit(
                device.device_uid,
                RelayAction.stored(schedule.action),
                Origin(
                    "schedule",
                    actor_type="schedule",
                    actor_id=str(schedule.id),
                    schedule_id=str(schedule.id),
                    request_id=request_id,
                ),
            )
            status = result.status
        except Exception:
            log.exception("schedule %s could not publish its intent", schedule.id)
            status = "error"
        await self._record(schedule, status, scheduled_for, executed=True, request_id=request_id)
        return status

    async def _record(
        self,
        schedule: Schedule,
        status: str,
        scheduled_for: datetime | None,
        *,
        executed: bool,
        request_id: str | None = None,
    ) -> None:
        updates: dict[str, Any] = {"last_result": status}
        if executed:
            updates["last_execution"] = utcnow()
            updates["execution_count"] = F("execution_count") + 1
        if status != "applied":
            updates["failure_count"] = F("failure_count") + 1
        try:
            await Schedule.filter(id=schedule.id).update(**updates)
        except Exception:
            log.exception("could not record the run of schedule %s", schedule.id)
        metrics.SCHEDULE_RUNS.labels(status).inc()
        await self.audit.record(
            action="schedule_run",
            source="schedule",
            actor_type="schedule",
            actor_id=str(schedule.id),
            device_id=schedule.device_id,
            org_id=schedule.org_id,
            schedule_id=schedule.id,
            request_id=request_id,
            details={
                "status": status,
                "name": schedule.name,
                "action": schedule.action,
                "scheduled_for": scheduled_for.isoformat() if scheduled_for else None,
            },
        )
