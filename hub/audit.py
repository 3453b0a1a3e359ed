"""The audit log writer: entries are queued and written in batches."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import TaskStatus

from hexa.hub.security import utcnow
from hexa.hub.state import execute_rows
from hexa.models import AuditEntry, Automation, Schedule

log = logging.getLogger(__name__)

SOURCES = frozenset(
    {
        "api",
        "ws_client",
        "schedule",
        "automation",
        "mqtt",
        "home_assistant",
        "homekit",
        "alexa",
        "device",
        "system",
    }
)
#: keys a ``details`` never carries: what they would hold is a secret or stands for one
SECRET_KEYS = frozenset(
    {
        "password",
        "password_hash",
        "token",
        "token_hash",
        "access_token",
        "refresh_token",
        "device_token",
        "claim_code",
        "setup_code",
        "setup_uri",
        "secret",
        "private_key",
        "hap_state",
    }
)
BATCH = 500
FLUSH_EVERY_S = 0.1


def _uuid(value: object) -> uuid.UUID | None:
    if value is None or isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def _clean(details: dict[str, Any] | None) -> dict[str, Any]:
    """``details`` without any key of :data:`SECRET_KEYS` (a caller's mistake, logged)."""
    if not details:
        return {}
    dropped = SECRET_KEYS.intersection(details)
    if dropped:
        log.error("audit details must not carry %s; dropped", sorted(dropped))
        return {k: v for k, v in details.items() if k not in dropped}
    return details


@dataclass(frozen=True)
class Actor:
    """Who made a change (``type``: user, integration, system, ...; ``id``: theirs), through
    what (``source``, one of :data:`SOURCES`), and the request that carried it."""

    type: str
    id: str | None
    source: str
    request_id: str | None = None

    @classmethod
    def user(cls, user_id: object, request_id: str | None, source: str = "api") -> Actor:
        return cls("user", str(user_id), source, request_id)

    @classmethod
    def system(cls, source: str = "system") -> Actor:
        return cls("system", None, source)

    @classmethod
    def command(cls) -> Actor:
        """A ``hexa`` command run by the operator: actor ``system`` with id ``cli``, source
        ``system`` (the contract's sources name no command line)."""
        return cls("system", "cli", "system")


def change_action(kind: str, fields: set[str], enabled: bool) -> str:
    """The action of a change to a schedule or automation: ``<kind>_enabled`` or
    ``<kind>_disabled`` when it only turns it on or off, else ``<kind>_updated``."""
    if fields == {"enabled"}:
        return f"{kind}_enabled" if enabled else f"{kind}_disabled"
    return f"{kind}_updated"


async def write(
    actor: Actor,
    action: str,
    *,
    org_id: object = None,
    details: dict[str, Any] | None = None,
    device_id: object = None,
    automation_id: object = None,
    schedule_id: object = None,
) -> None:
    """Write one entry now, on the current connection: inside ``in_transaction()`` it
    commits or rolls back with the change it records. For changes made by people (few, and
    each must never lack its entry); the hot paths queue through :class:`AuditLog`."""
    await AuditEntry.create(
        action=action,
        source=actor.source if actor.source in SOURCES else "system",
        actor_type=actor.type,
        actor_id=actor.id,
        org_id=_uuid(org_id),
        device_id=_uuid(device_id),
        details=_clean(details),
        request_id=actor.request_id,
        automation_id=_uuid(automation_id),
        schedule_id=_uuid(schedule_id),
    )


async def write_rule(
    actor: Actor, action: str, rule: Schedule | Automation, fields: set[str] | None = None
) -> None:
    """:func:`write` an entry for a schedule or an automation: its name and whether it is
    enabled, with the fields a change touched, filed under its device and its own id."""
    details: dict[str, Any] = {"name": rule.name, "enabled": rule.enabled}
    if fields is not None:
        details["fields"] = sorted(fields)
    ids = {"schedule_id": rule.id} if isinstance(rule, Schedule) else {"automation_id": rule.id}
    await write(actor, action, org_id=rule.org_id, device_id=rule.device_id, details=details, **ids)


#: the columns an entry is written with, in the order :meth:`AuditLog.record` queues them
_COLUMNS = (
    "id",
    "at",
    "org_id",
    "actor_type",
    "actor_id",
    "source",
    "action",
    "device_id",
    "details",
    "automation_id",
    "schedule_id",
    "request_id",
)
#: built from the model's table and the columns above (constants, no input)
_INSERT = 'INSERT INTO "{}" ({}) VALUES ({})'.format(  # noqa: S608
    AuditEntry._meta.db_table,
    ",".join(f'"{column}"' for column in _COLUMNS),
    ",".join("?" * len(_COLUMNS)),
)
_DETAILS = _COLUMNS.index("details")
#: ``details`` as the ORM writes its JSON field
_encode_details = AuditEntry._meta.fields_map["details"].encoder  # type: ignore[attr-defined]


def _uuid_text(value: object) -> str | None:
    found = _uuid(value)
    return None if found is None else str(found)


class AuditLog:
    """Queues entries and writes them in batches, so a hot path never waits on a write.

    Entries reach the database within about 100 ms; ``flush()`` writes what is queued.
    An entry is queued as the row it becomes (no ORM object per entry: on the relay's
    path that cost more than the rest of the entry's work) and a batch is one
    ``executemany`` in one transaction. A failed batch is logged and retried once row by
    row; auditing never undoes an action.
    """

    def __init__(self, max_queued: int = 50_000) -> None:
        self._queue: asyncio.Queue[list[Any]] = asyncio.Queue(max_queued)

    async def record(
        self,
        *,
        action: str,
        source: str,
        actor_type: str,
        actor_id: str | None = None,
        device_id: object = None,
        org_id: object = None,
        details: dict[str, Any] | None = None,
        request_id: str | None = None,
        automation_id: object = None,
        schedule_id: object = None,
    ) -> None:
        row = [
            str(uuid.uuid4()),
            utcnow(),
            _uuid_text(org_id),
            actor_type,
            actor_id,
            source if source in SOURCES else "mqtt",
            action,
            _uuid_text(device_id),
            _clean(details),  # encoded when written, with its batch
            _uuid_text(automation_id),
            _uuid_text(schedule_id),
            request_id,
        ]
        await self._queue.put(row)  # back-pressure only if the database stalls for long

    async def by_user(
        self,
        user_id: object,
        action: str,
        *,
        org_id: object,
        request_id: str | None,
        device_id: object = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        """Record a change a user made through the API."""
        await self.record(
            action=action,
            source="api",
            actor_type="user",
            actor_id=str(user_id),
            device_id=device_id,
            org_id=org_id,
            details=details,
            request_id=request_id,
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                await asyncio.sleep(FLUSH_EVERY_S)
                await self.flush()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self.flush()

    async def flush(self) -> None:
        while not self._queue.empty():
            batch: list[list[Any]] = []
            while not self._queue.empty() and len(batch) < BATCH:
                row = self._queue.get_nowait()
                row[_DETAILS] = _encode_details(row[_DETAILS])
                batch.append(row)
            try:
                await execute_rows(_INSERT, batch)
            except Exception:
                log.exception("audit batch of %d failed; writing one by one", len(batch))
                for row in batch:
                    try:
                        await execute_rows(_INSERT, [row])
                    except Exception:
                        log.exception(
                            "could not write audit entry %s", row[_COLUMNS.index("action")]
                        )
