"""Restoring a backup, and the drill that proves one restores.

A restore refuses a newer schema than this hub knows, brings the target database to the
backup's schema version, loads every row in one transaction (committed only once every
checksum matched), puts the data directory's files back, then applies the later migrations.
The drill restores the newest backup into a scratch database and checks every row count.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import decimal
import os
import secrets
import shutil
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from hexa.hub.backup import (
    BackupStream,
    DriverLoop,
    Progress,
    converter,
    engine_of,
    known_migrations,
    list_backups,
    no_progress,
    open_backup,
    pg_dsn,
    quote_ident,
    sqlite_path,
)
from hexa.hub.backup_format import BackupError, BackupKey
from hexa.hub.config import Settings

#: how portable values are written back, per engine (see :func:`hexa.hub.backup.portable`)
_SQLITE_IN: dict[str, Callable[[Any], Any]] = {
    "datetime": lambda v: v.replace("T", " ", 1),
    "bool": int,
    "json": lambda v: orjson.dumps(v).decode(),
    "bytes": base64.b64decode,
}

_PG_IN: dict[str, Callable[[Any], Any]] = {
    "uuid": uuid.UUID,
    "datetime": dt.datetime.fromisoformat,
    "date": dt.date.fromisoformat,
    "json": lambda v: orjson.dumps(v).decode(),
    "decimal": decimal.Decimal,
    "bytes": base64.b64decode,
}


@dataclass
class RestoreResult:
    schema: str
    migrated_to: str
    tables: dict[str, int]
    files: list[str]
    seconds: float


class _Target:
    """The database a backup is restored into, through its driver."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = engine_of(url)
        self._loop = DriverLoop() if self.engine == "postgres" else None
        self.conn: Any = None

    def __enter__(self) -> _Target:
        try:
            if self.engine == "sqlite":
                from hexa.hub.db import restrict_sqlite_file

                restrict_sqlite_file(self.url)
                self.conn = sqlite3.connect(sqlite_path(self.url), isolation_level=None, timeout=30)
            else:
                import asyncpg

                assert self._loop is not None
                self.conn = self._loop.run(asyncpg.connect(pg_dsn(self.url), timeout=10))
        except Exception as exc:  # noqa: BLE001 - any driver's refusal, in one line
            self.__exit__()
            raise BackupError(f"cannot reach the target database: {exc}") from None
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.conn is not None:
            if self.engine == "sqlite":
                self.conn.close()
            else:
                assert self._loop is not None
                with contextlib.suppress(Exception):
                    self._loop.run(self.conn.close())
            self.conn = None
        if self._loop is not None:
            self._loop.close()

    def run(self, coro: Any) -> Any:
        assert self._loop is not None
        return self._loop.run(coro)

    def existing_tables(self) -> set[str]:
        if self.engine == "sqlite":
            return {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master")}
        rows = self.run(
            self.conn.fetch(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = current_schema()"
            )
        )
        return {r[0] for r in rows}

    def columns(self, table: str) -> set[str]:
        if self.engine == "sqlite":
            return {r[1] for r in self.conn.execute(f"PRAGMA table_info({quote_ident(table)})")}
        rows = self.run(
            self.conn.fetch(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = $1",
                table,
            )
        )
        return {r[0] for r in rows}

    def non_empty(self, tables: list[str]) -> dict[str, int]:
        present = self.existing_tables()
        found: dict[str, int] = {}
        for name in tables:
            if name not in present:
                continue
            sql = f"SELECT count(*) FROM {quote_ident(name)}"  # noqa: S608 (names from the ORM)
            if self.engine == "sqlite":
                n = int(self.conn.execute(sql).fetchone()[0])
            else:
                n = int(self.run(self.conn.fetchval(sql)))
            if n:
                found[name] = n
        return found

    def count(self, table: str) -> int:
        sql = f"SELECT count(*) FROM {quote_ident(table)}"  # noqa: S608 (names from the ORM)
        if self.engine == "sqlite":
            return int(self.conn.execute(sql).fetchone()[0])
        return int(self.run(self.conn.fetchval(sql)))


def _migrate_to(url: str, target: str) -> None:
    from tortoise import Tortoise
    from tortoise.migrations.api import migrate

    from hexa.hub import db

    async def go() -> None:
        db.restrict_sqlite_file(url)
        try:
            await migrate(config=db.tortoise_config(url), target=f"{db.APP}.{target}")
        finally:
            await Tortoise.close_connections()

    _run_async(go())


def _applied(url: str) -> list[str]:
    from hexa.hub import db

    return list(_run_async(db.applied_migrations(url)))


def _migrate_up(url: str) -> list[str]:
    from hexa.hub import db

    return list(_run_async(db.migrate_up(url)))


def _run_async(coro: Any) -> Any:
    loop = DriverLoop()
    try:
        return loop.run(coro)
    finally:
        loop.close()


def restore_backup(
    path: Path,
    key: BackupKey,
    database_url: str,
    data_dir: Path,
    *,
    force: bool = False,
    progress: Progress = no_progress,
) -> RestoreResult:
    """Restore ``path`` into ``database_url`` and its files into ``data_dir``.

    Refuses a newer schema than this hub knows, and a database with rows unless ``force``
    (then its rows are replaced). The target is brought to the backup's schema version, the
    rows are loaded in one transaction (committed only once every checksum matched), the
    files are put back, then the later migrations are applied."""
    started = time.perf_counter()
    known = known_migrations()
    with open_backup(path) as src:
        stream = BackupStream(src, key)  # wrong key, damaged header: nothing touched yet
        schema = stream.schema
        if schema not in known:
            raise BackupError(
                f"the backup's schema {schema} is newer than this hub's ({known[-1]}): "
                f"restore it with hexa {stream.header.get('hub_version', 'newer')} or later"
            )
        names = [t.name for t in stream.tables]
        try:
            applied = _applied(database_url)
        except Exception as exc:  # noqa: BLE001 - any driver's refusal, in one line
            raise BackupError(f"cannot reach the target database: {exc}") from None
        with _Target(database_url) as target:
            rows = target.non_empty(names)
        if rows and not force:
            listed = ", ".join(f"{n} {t}" for t, n in sorted(rows.items())[:3])
            raise BackupError(
                f"the target database is not empty ({listed}...): restore into an empty "
                "database, or pass --force to replace its content"
            )
        current = applied[-1] if applied else None
        if current is not None and known.index(current) > known.index(schema):
            if rows:
                raise BackupError(
                    f"the target database is at schema {current}, newer than the backup's "
                    f"{schema}: restore into an empty database"
                )
            _migrate_to(database_url, schema)  # empty: going down loses nothing
        elif current != schema:
            _migrate_to(database_url, schema)
        staging = Path(tempfile.mkdtemp(prefix=".restore-", dir=_ensure_dir(data_dir)))
        try:
            with _Target(database_url) as target:
                _check_columns(target, stream)
                tables = _load(target, stream, force=force, staging=staging, progress=progress)
            files = _put_files_back(staging, data_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    later = _migrate_up(database_url)
    return RestoreResult(
        schema, later[-1] if later else schema, tables, files, time.perf_counter() - started
    )


def _ensure_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _check_columns(target: _Target, stream: BackupStream) -> None:
    for table in stream.tables:
        have = target.columns(table.name)
        want = {c for c, _k in table.columns}
        if not want <= have:
            missing = ", ".join(sorted(want - have))
            raise BackupError(
                f"table {table.name} of the target lacks column(s) {missing} of the backup: "
                "the backup does not match this hub's schema"
            )


def _load(
    target: _Target,
    stream: BackupStream,
    *,
    force: bool,
    staging: Path,
    progress: Progress,
) -> dict[str, int]:
    total = sum(t.rows for t in stream.tables)
    counts: dict[str, int] = {}

    def counted(rows: Iterator[list[Any]], convert: Callable[[Any], Any]) -> Iterator[Any]:
        for row in rows:
            if stream.rows_read % 5000 == 0:
                progress("rows", stream.rows_read, total)
            yield convert(row)

    def stage_files() -> None:
        for name, mode, blocks in stream.files():
            dest = staging / name
            if staging.resolve() not in dest.resolve().parents:
                raise BackupError(f"the backup's content is damaged (file path {name})")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "wb") as f:
                for block in blocks:
                    f.write(block)
            os.chmod(dest, mode & 0o777)
        stream.finish()

    names = [t.name for t in stream.tables]
    if target.engine == "sqlite":
        conn: sqlite3.Connection = target.conn
        conn.execute("PRAGMA foreign_keys = ON")
        # One big transaction loads faster through a rollback journal than through the WAL
        # (which would grow to the size of the data, then be copied again at checkpoint);
        # it is just as atomic. The hub's WAL mode is set back once the load is done.
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.execute("PRAGMA cache_size = -65536")  # 64 MiB
        conn.execute("BEGIN IMMEDIATE")
        try:
            if force:
                for name in reversed(names):
                    conn.execute(f"DELETE FROM {quote_ident(name)}")  # noqa: S608
            for t in stream.tables:
                cols = ", ".join(quote_ident(c) for c, _k in t.columns)
                marks = ", ".join("?" for _ in t.columns)
                sql = f"INSERT INTO {quote_ident(t.name)} ({cols}) VALUES ({marks})"  # noqa: S608
                convert = converter([k for _c, k in t.columns], _SQLITE_IN)
                conn.executemany(sql, counted(stream.table_rows(t), convert))
                counts[t.name] = stream.seen_tables[t.name]["rows"]
            progress("rows", stream.rows_read, total)
            stage_files()
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        finally:
            conn.execute(f"PRAGMA journal_mode = {mode}")
        return counts

    async def load_pg() -> None:
        pg = target.conn
        async with pg.transaction():
            if force:
                await pg.execute(
                    "TRUNCATE " + ", ".join(quote_ident(n) for n in names) + " CASCADE"
                )
            for t in stream.tables:
                convert = converter([k for _c, k in t.columns], _PG_IN)
                await pg.copy_records_to_table(
                    t.name,
                    records=counted(stream.table_rows(t), convert),
                    columns=[c for c, _k in t.columns],
                )
                counts[t.name] = stream.seen_tables[t.name]["rows"]
            progress("rows", stream.rows_read, total)
            stage_files()

    try:
        target.run(load_pg())
    except BackupError:
        raise
    except Exception as exc:
        if type(exc).__module__.startswith("asyncpg"):
            raise BackupError(f"the restore was rolled back: {exc}") from None
        raise
    return counts


def _put_files_back(staging: Path, data_dir: Path) -> list[str]:
    """Move the staged files into the data directory; a replaced ``secrets.json`` that
    differs is kept beside it as ``secrets.json.before-restore``."""
    placed: list[str] = []
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        name = str(path.relative_to(staging))
        dest = data_dir / name
        dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if name == "secrets.json" and dest.is_file() and dest.read_bytes() != path.read_bytes():
            shutil.copy2(dest, dest.with_name("secrets.json.before-restore"))
        os.replace(path, dest)
        placed.append(name)
    return placed


# --- the drill ----------------------------------------------------------------------------


@dataclass
class DrillResult:
    backup: Path
    engine: str
    restore_seconds: float
    verify_seconds: float
    tables: dict[str, int]


def drill(
    settings: Settings,
    key: BackupKey,
    *,
    backup: Path | None = None,
    progress: Progress = no_progress,
) -> DrillResult:
    """Restore the newest backup into a scratch database of the hub's engine (a temporary
    SQLite file, or a temporary PostgreSQL database on the hub's server), check every row
    count against the manifest, and drop the scratch database."""
    directory = settings.backup_dir or settings.data_dir / "backups"
    if backup is None:
        found = list_backups(directory)
        if not found:
            raise BackupError(f"no backup in {directory} to drill with: run hexa backup create")
        backup = found[0]
    url = settings.resolved_database_url
    with tempfile.TemporaryDirectory(prefix="hexa-drill-") as scratch:
        scratch_dir = Path(scratch)
        if engine_of(url) == "sqlite":
            scratch_url, drop = f"sqlite://{scratch_dir / 'drill.db'}", None
        else:
            scratch_url, drop = _scratch_pg(url)
        try:
            started = time.perf_counter()
            result = restore_backup(
                backup, key, scratch_url, scratch_dir / "data", progress=progress
            )
            restore_s = time.perf_counter() - started
            started = time.perf_counter()
            with _Target(scratch_url) as target:
                for name, n in result.tables.items():
                    if target.count(name) != n:
                        raise BackupError(
                            f"drill failed: table {name} holds {target.count(name)} rows "
                            f"after the restore, the backup has {n}"
                        )
            verify_s = time.perf_counter() - started
        finally:
            if drop is not None:
                drop()
    return DrillResult(backup, engine_of(url), restore_s, verify_s, result.tables)


def _scratch_pg(url: str) -> tuple[str, Callable[[], None]]:
    import asyncpg

    name = f"hexa_drill_{secrets.token_hex(6)}"
    dsn = pg_dsn(url)

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        _run_async(admin(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - told to the operator in one line
        raise BackupError(f"cannot create a scratch database for the drill: {exc}") from None

    def drop() -> None:
        with contextlib.suppress(Exception):
            _run_async(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    return dsn.rsplit("/", 1)[0] + "/" + name, drop
