"""Backups inside ``hexa serve``: on a cron schedule and on an admin's request, with
retention of the newest ``HEXA_BACKUP_KEEP`` files, metrics and audit entries.

A backup runs in a worker thread (its own database connection and, for PostgreSQL, its own
event loop), so the hub keeps serving while it is written; it is verified (read back,
every checksum) before it counts as a success.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus

from hexa.hub import backup, metrics
from hexa.hub.audit import AuditLog
from hexa.hub.backup_format import BackupError
from hexa.hub.config import SettingError, Settings
from hexa.hub.errors import Conflict

log = logging.getLogger(__name__)


def prepare_directory(settings: Settings) -> None:
    """Create the backup directory (0700) at start-up, so that one the hub cannot write
    stops it in one line naming ``HEXA_BACKUP_DIR`` instead of failing the first backup,
    hours later."""
    directory = settings.backup_dir or settings.data_dir / "backups"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingError("HEXA_BACKUP_DIR", str(directory), exc.strerror or str(exc)) from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise SettingError("HEXA_BACKUP_DIR", str(directory), "directory is not writable")


class BackupRunning(Conflict):
    """A backup is being written already."""

    code = "backup_running"


class Backups:
    """The hub's backup directory and the task that fills it."""

    def __init__(self, settings: Settings, audit: AuditLog) -> None:
        self.settings = settings
        self.audit = audit
        self.directory: Path = settings.backup_dir or settings.data_dir / "backups"
        self.running: str | None = None
        self._requested = anyio.Event()
        self._pending: tuple[str, str | None] | None = None

    def request(self, *, actor_id: str | None, request_id: str | None) -> str:
        """Ask for a backup now; returns the file name it will have. Raises
        :class:`BackupRunning` while one is being written or waits to be."""
        if self.running is not None or self._pending is not None:
            raise BackupRunning("a backup is being written already", details={"name": self.running})
        name = backup.backup_name()
        self._pending = (name, actor_id)
        self._request_id = request_id
        self._requested.set()
        return name

    def listing(self) -> list[dict[str, Any]]:
        """The backup files, newest first, with what their sidecar says."""
        items = []
        for path in backup.list_backups(self.directory):
            side = backup.read_sidecar(path) or {}
            try:
                size = path.stat().st_size
            except OSError:
                continue
            items.append(
                {
                    "name": path.name,
                    "size": size,
                    "created_at": side.get("created_at")
                    or dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC).isoformat(),
                    "checksum": side.get("sha256"),
                    "verified": side.get("verified"),
                    "rows": side.get("rows"),
                    "seconds": side.get("seconds"),
                }
            )
        return items

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Wait for the next scheduled time or a request, back up, repeat."""
        self._remove_partials()
        newest = backup.list_backups(self.directory)
        if newest:
            metrics.BACKUP_STATE["last_success"] = newest[0].stat().st_mtime
        schedule = self.settings.backup_schedule
        metrics.BACKUP_STATE["scheduled"] = 1 if schedule else 0
        metrics.BACKUP_LAST_SUCCESS.set(metrics.BACKUP_STATE["last_success"])
        metrics.BACKUP_SCHEDULED.set(metrics.BACKUP_STATE["scheduled"])
        task_status.started()
        while True:
            wait = self._seconds_to_next(schedule)
            with anyio.move_on_after(wait):
                await self._requested.wait()
            pending, self._pending = self._pending, None
            self._requested = anyio.Event()
            if pending is None and wait == float("inf"):
                continue
            name, actor = pending if pending is not None else (backup.backup_name(), None)
            await self.backup_now(name, actor_id=actor)

    @staticmethod
    def _seconds_to_next(schedule: str | None) -> float:
        if schedule is None:
            return float("inf")
        from croniter import croniter

        now = dt.datetime.now(dt.UTC)
        following: dt.datetime = croniter(schedule, now).get_next(dt.datetime)
        return max(0.0, (following - now).total_seconds())

    async def backup_now(self, name: str, *, actor_id: str | None = None) -> None:
        """Write, verify and prune; failures are logged, counted and audited."""
        self.running = name
        started = time.perf_counter()
        details: dict[str, Any] = {"file": name}
        stop = threading.Event()
        try:
            # not waited for when the hub stops: the worker sees ``stop``, ends within a few
            # thousand rows and removes its partial file
            info = await anyio.to_thread.run_sync(self._create, name, stop, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            stop.set()
            self.running = None
            raise
        except (BackupError, OSError) as exc:
            metrics.BACKUP_FAILURES.inc()
            reason = exc.message if isinstance(exc, BackupError) else str(exc)
            log.error("backup %s failed: %s", name, reason)
            details["error"] = reason
            await self._audit("backup_failed", details, actor_id)
            return
        except Exception:
            metrics.BACKUP_FAILURES.inc()
            log.exception("backup %s failed", name)
            await self._audit("backup_failed", details, actor_id)
            return
        finally:
            self.running = None
        seconds = time.perf_counter() - started
        metrics.BACKUP_STATE["last_success"] = time.time()
        metrics.BACKUP_LAST_SUCCESS.set(metrics.BACKUP_STATE["last_success"])
        metrics.BACKUP_DURATION.set(seconds)
        removed = backup.prune(self.directory, self.settings.backup_keep)
        details.update(size=info.size, rows=sum(info.tables.values()), seconds=round(seconds, 3))
        if removed:
            details["pruned"] = [p.name for p in removed]
        log.info("backup %s written and verified in %.1f s", name, seconds)
        await self._audit("backup_created", details, actor_id)

    def _create(self, name: str, stop: threading.Event) -> backup.BackupInfo:
        key, generated = backup.load_key(self.settings, create=True)
        if generated is not None:
            log.warning(
                "generated a new backup key into %s (key %s): keep a copy of it somewhere "
                "else, without it no backup can be restored",
                generated,
                key.key_id,
            )
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.directory / name
        info = backup.create_backup(
            self.settings.resolved_database_url, self.settings.data_dir, key, path, stop=stop
        )
        try:
            backup.verify_backup(path, key)
        except BackupError:
            backup.mark_verified(path, False)
            raise
        backup.mark_verified(path, True)
        return info

    async def _audit(self, action: str, details: dict[str, Any], actor_id: str | None) -> None:
        await self.audit.record(
            action=action,
            source="api" if actor_id else "system",
            actor_type="user" if actor_id else "system",
            actor_id=actor_id,
            details=details,
            request_id=getattr(self, "_request_id", None) if actor_id else None,
        )

    def _remove_partials(self) -> None:
        """Partial files of a backup the process did not finish (it was stopped)."""
        if self.directory.is_dir():
            for path in self.directory.glob(".*.partial"):
                path.unlink(missing_ok=True)
