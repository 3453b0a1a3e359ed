"""Fresh test databases: SQLite files, and PostgreSQL databases when a server answers."""

from __future__ import annotations

import asyncio
import contextlib
import os
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


def new_database_url(kind: str, tmp: Path) -> tuple[str, Callable[[], None]]:
    """A fresh empty database of ``kind`` and a function that drops it."""
    if kind == "sqlite":
        path = tmp / f"hexa-{uuid.uuid4().hex[:8]}.db"
        return f"sqlite://{path}", lambda: None
    name = f"hexa_test_{uuid.uuid4().hex[:12]}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    base = PG_URL.rsplit("/", 1)[0]

    def drop() -> None:
        with contextlib.suppress(Exception):  # best-effort cleanup
            _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return f"{base}/{name}", drop
