"""The database: Tortoise configuration, schema migrations, connection lifecycle."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from tortoise import Tortoise, connections
from tortoise.backends.base.executor import EXECUTOR_CACHE
from tortoise.migrations.api import migrate as tortoise_migrate
from tortoise.migrations.executor import MigrationExecutor
from tortoise.migrations.recorder import MigrationRecorder

log = logging.getLogger(__name__)

APP = "models"


def _tuned(database_url: str) -> str:
    # SQLite runs in WAL mode (Tortoise's default); there synchronous=NORMAL cannot corrupt
    # the database and saves an fsync per transaction (a crash may lose the last commits).
    if database_url.startswith("sqlite://") and "synchronous" not in database_url:
        return database_url + ("&" if "?" in database_url else "?") + "synchronous=NORMAL"
    return database_url


def restrict_sqlite_file(database_url: str) -> None:
    """Make a SQLite database file (and its journals) readable by the hub's user only.

    A missing file is created empty with mode 0600 before SQLite opens it; SQLite gives its
    ``-wal``/``-shm``/``-journal`` files the database file's mode. Files left looser by an
    older hub are tightened, and that is logged.
    """
    if not database_url.startswith("sqlite://") or ":memory:" in database_url:
        return
    path = database_url.removeprefix("sqlite://").split("?", 1)[0]
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    for name in (path, path + "-wal", path + "-shm", path + "-journal"):
        try:
            mode = stat.S_IMODE(os.stat(name).st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            os.chmod(name, 0o600)
            log.warning("database file %s was mode %04o: tightened to 0600", name, mode)


def tortoise_config(database_url: str) -> dict[str, Any]:
    """The Tortoise configuration for one database URL."""
    return {
        "connections": {"default": _tuned(database_url)},
        "apps": {
            APP: {
                "models": ["hexa.models"],
                "migrations": "hexa.migrations",
                "default_connection": "default",
            }
        },
        "use_tz": True,
        "timezone": "UTC",
    }


async def migrate_up(database_url: str) -> list[str]:
    """Apply every pending migration; returns the names applied."""
    applied: list[str] = []
    restrict_sqlite_file(database_url)

    def progress(event: str, _app: str, name: str) -> None:
        if event == "apply_done":
            applied.append(name)
            log.info("migration applied: %s", name)

    try:
        await tortoise_migrate(config=tortoise_config(database_url), progress=progress)
    finally:
        await Tortoise.close_connections()
    return applied


async def applied_migrations(database_url: str) -> list[str]:
    """Names of the applied migrations, oldest first."""
    restrict_sqlite_file(database_url)
    await Tortoise.init(config=tortoise_config(database_url), init_connections=False)
    try:
        connection = connections.get("default")
        executor = MigrationExecutor(connection, tortoise_config(database_url)["apps"])
        await executor.loader.build_graph()
        recorder = MigrationRecorder(connection)
        await recorder.ensure_schema(executor._schema_editor(atomic=False))
        applied = {key.name for key in await recorder.applied_migrations()}
        order = [
            key.name
            for leaf in executor.loader.graph.leaf_nodes(APP)
            for key in executor.loader.graph.forwards_plan(leaf)
        ]
        return [name for name in order if name in applied]
    finally:
        await Tortoise.close_connections()


async def migrate_down(database_url: str, steps: int) -> list[str]:
    """Revert the last ``steps`` applied migrations; returns the names reverted."""
    applied = await applied_migrations(database_url)
    if steps <= 0 or not applied:
        return []
    steps = min(steps, len(applied))
    reverted = applied[-steps:][::-1]
    target = f"{APP}.__first__" if steps == len(applied) else f"{APP}.{applied[-steps - 1]}"
    try:
        await tortoise_migrate(config=tortoise_config(database_url), target=target)
    finally:
        await Tortoise.close_connections()
    for name in reverted:
        log.info("migration reverted: %s", name)
    return reverted


@asynccontextmanager
async def database(database_url: str) -> AsyncIterator[None]:
    """Open the ORM for the hub's lifetime (migrations must already be applied)."""
    restrict_sqlite_file(database_url)
    await Tortoise.init(config=tortoise_config(database_url), _enable_global_fallback=True)
    try:
        yield
    finally:
        await Tortoise.close_connections()
        # Tortoise caches compiled INSERTs by connection *name*; a later database of
        # another dialect in the same process (tests, tools) would reuse them.
        EXECUTOR_CACHE.clear()


async def ping() -> bool:
    """True when the database answers a trivial query."""
    try:
        await connections.get("default").execute_query("SELECT 1")
    except Exception:
        log.warning("database ping failed", exc_info=True)
        return False
    return True
