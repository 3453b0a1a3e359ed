"""Fresh test databases: SQLite files, and PostgreSQL databases when a server answers.

``new_database_url`` gives an empty database. ``migrated_database_url`` gives one with every
migration already applied: a copy of a template migrated once per test run (a file copy on
SQLite, ``CREATE DATABASE ... TEMPLATE`` on PostgreSQL), for tests that start a hub on a
database of their own, since applying the migrations takes seconds of CPU each time. The
migrations themselves stay covered on empty databases: the session's shared hubs and the
`hexa migrate` tests start from nothing."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

PG_URL = os.environ.get("HEXA_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres")
REQUIRE_PG = os.environ.get("HEXA_REQUIRE_POSTGRES", "") not in ("", "0", "false")


def pg_unreachable() -> str | None:
    """None when PostgreSQL answers, else why not."""
    import asyncpg

    async def probe() -> None:
        conn = await asyncpg.connect(PG_URL, timeout=3)
        await conn.close()

    try:
        asyncio.run(probe())
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _pg_admin(sql: str) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(PG_URL, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def _pg_database(template: str | None = None) -> tuple[str, Callable[[], None]]:
    name = f"hexa_test_{uuid.uuid4().hex[:12]}"
    _pg_admin(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    base = PG_URL.rsplit("/", 1)[0]

    def drop() -> None:
        with contextlib.suppress(Exception):  # best-effort cleanup
            _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return f"{base}/{name}", drop


def new_database_url(kind: str, tmp: Path) -> tuple[str, Callable[[], None]]:
    """A fresh empty database of ``kind`` and a function that drops it."""
    if kind == "sqlite":
        path = tmp / f"hexa-{uuid.uuid4().hex[:8]}.db"
        return f"sqlite://{path}", lambda: None
    return _pg_database()


_templates: dict[str, str] = {}
_templates_lock = threading.Lock()


def _migrate(url: str) -> None:
    """Apply every migration to ``url`` in a process of its own: the test process may be
    serving a hub, and the ORM's connections are process-wide."""
    code = "import asyncio, sys\nfrom hexa.hub import db\nasyncio.run(db.migrate_up(sys.argv[1]))"
    r = subprocess.run(
        [sys.executable, "-c", code, url], capture_output=True, text=True, timeout=120
    )
    if r.returncode != 0:
        raise RuntimeError(f"migrating the template database failed:\n{r.stdout}{r.stderr}")


def _template(kind: str) -> str:
    """The migrated template of ``kind`` (made on first use, removed when the run ends): a
    SQLite file's path, or a PostgreSQL database's name."""
    with _templates_lock:
        if kind not in _templates:
            if kind == "sqlite":
                folder = Path(tempfile.mkdtemp(prefix="hexa-template-"))
                atexit.register(shutil.rmtree, folder, True)
                url, _ = new_database_url("sqlite", folder)
                _migrate(url)
                _templates[kind] = url.removeprefix("sqlite://")
            else:
                url, drop = _pg_database()
                atexit.register(drop)
                _migrate(url)
                _templates[kind] = url.rsplit("/", 1)[1]
        return _templates[kind]


def migrated_database_url(kind: str, tmp: Path) -> tuple[str, Callable[[], None]]:
    """A fresh database of ``kind`` with every migration applied (a copy of the run's
    template), and a function that drops it."""
    template = _template(kind)
    if kind == "sqlite":
        path = tmp / f"hexa-{uuid.uuid4().hex[:8]}.db"
        shutil.copy(template, path)  # the template is closed: no -wal or -journal beside it
        return f"sqlite://{path}", lambda: None
    return _pg_database(template)
