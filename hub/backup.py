"""Backups: create, verify, restore and drill.

A backup is one encrypted file (:mod:`hexa.hub.backup_format`) whose plaintext body is JSON
lines: a ``begin`` record listing the tables (columns, row counts), then each table's rows
(one JSON array a line, values normalised so that any engine reads them back: uuids and
datetimes as ISO text, booleans, JSON values, base64 bytes), then the data directory's files
(base64 lines), then a ``manifest`` of row counts and SHA-256 checksums. What goes in is
declared in :mod:`hexa.hub.backup_registry`.

Reading and writing go through the database drivers (sqlite3, asyncpg), in batches, so a
backup of a million rows keeps memory flat. The snapshot is one read transaction (SQLite:
one deferred transaction on its own connection, a WAL snapshot; PostgreSQL: REPEATABLE READ
READ ONLY), so a backup taken while the hub writes is consistent. A restore loads
everything in one transaction: all or nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import decimal
import hashlib
import json
import logging
import os
import pkgutil
import secrets
import shutil
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from hexa.hub import __version__, backup_registry
from hexa.hub.backup_format import BackupError, BackupKey, EncryptedReader, EncryptedWriter, lines
from hexa.hub.config import Settings

log = logging.getLogger(__name__)

#: backup file names: hexa-backup-<UTC time>-<random>.hexabak
SUFFIX = ".hexabak"
KEY_FILE = "backup.key"
ROWS_PER_BATCH = 2000
FILE_LINE_BYTES = 48 * 1024

#: called with (what, done, total) while a long run goes on; total may be None
Progress = Callable[[str, int, int | None], None]


def _no_progress(_what: str, _done: int, _total: int | None) -> None:
    return None


# --- keys ---------------------------------------------------------------------------------


def load_key(settings: Settings, *, create: bool) -> tuple[BackupKey, Path | None]:
    """The backup key: ``HEXA_BACKUP_KEY``, else ``<data dir>/backup.key`` (generated when
    ``create`` and missing). Returns the key and the file it was generated into, if it was
    generated just now (the operator must be told to keep a copy)."""
    if settings.backup_key:
        return BackupKey(settings.backup_key), None
    path = settings.data_dir / KEY_FILE
    if path.is_file():
        text = path.read_text().strip()
        if len(text) < 32:
            raise BackupError(f"{path} is damaged (a backup key has at least 32 characters)")
        return BackupKey(text), None
    if not create:
        raise BackupError(
            f"no backup key: set HEXA_BACKUP_KEY to the key the backup was made with "
            f"(or put it in {path})"
        )
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    text = secrets.token_urlsafe(32)
    with os.fdopen(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600), "w") as f:
        f.write(text + "\n")
    return BackupKey(text), path


# --- schema versions -----------------------------------------------------------------------


def known_migrations() -> list[str]:
    """This hub's migrations, oldest first."""
    import hexa.migrations

    return sorted(
        m.name for m in pkgutil.iter_modules(hexa.migrations.__path__) if m.name[:4].isdigit()
    )


# --- values -------------------------------------------------------------------------------


def _dt_out(value: Any) -> str:
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return str(value.astimezone(dt.UTC).isoformat())


def _json_out(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


_OUT: dict[str, Callable[[Any], Any]] = {
    "uuid": str,
    "datetime": _dt_out,
    "date": lambda v: v if isinstance(v, str) else v.isoformat(),
    "bool": bool,
    "json": _json_out,
    "decimal": str,
    "bytes": lambda v: base64.b64encode(bytes(v)).decode(),
}

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


def portable(kinds: list[str]) -> Callable[[Any], list[Any]]:
    """Turns a row read by a driver (values of these kinds) into its portable form: what a
    backup and an organization export hold."""
    return _converter(kinds, _OUT)


def _converter(kinds: list[str], table: dict[str, Callable[[Any], Any]]) -> Callable[[Any], Any]:
    funcs = [(i, table[k]) for i, k in enumerate(kinds) if k in table]

    def convert(row: Any) -> list[Any]:
        values = list(row)
        for i, func in funcs:
            if values[i] is not None:
                values[i] = func(values[i])
        return values

    return convert


# --- engines ------------------------------------------------------------------------------


def engine_of(url: str) -> str:
    return "sqlite" if url.startswith("sqlite://") else "postgres"


def sqlite_path(url: str) -> str:
    return url.removeprefix("sqlite://").split("?", 1)[0]


def pg_dsn(url: str) -> str:
    for prefix in ("asyncpg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgres://" + url.removeprefix(prefix).split("?", 1)[0]
    return url


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class _Loop:
    """A private event loop driving asyncpg from synchronous code (the CLI, a worker
    thread of the hub)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.loop.close()


class Snapshot:
    """One consistent read of the database: counts and rows in one read transaction."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = engine_of(url)
        self._sqlite: sqlite3.Connection | None = None
        self._pg: Any = None
        self._loop: _Loop | None = None

    def __enter__(self) -> Snapshot:
        try:
            if self.engine == "sqlite":
                path = sqlite_path(self.url)
                if not Path(path).is_file():
                    raise BackupError(f"no database at {path} (HEXA_DATABASE_URL)")
                self._sqlite = sqlite3.connect(path, isolation_level=None, timeout=30)
                self._sqlite.execute("BEGIN")  # deferred: the first read fixes the snapshot
                self._sqlite.execute("SELECT count(*) FROM sqlite_master").fetchone()
            else:
                import asyncpg

                self._loop = _Loop()
                self._pg = self._loop.run(asyncpg.connect(pg_dsn(self.url), timeout=10))
                self._loop.run(self._pg.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"))
        except BackupError:
            raise
        except Exception as exc:  # noqa: BLE001 - any driver's refusal, in one line
            self.__exit__(None, None, None)
            raise BackupError(f"cannot read the database (HEXA_DATABASE_URL): {exc}") from None
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._sqlite is not None:
            with contextlib.suppress(sqlite3.Error):
                self._sqlite.execute("ROLLBACK")
            self._sqlite.close()
            self._sqlite = None
        if self._pg is not None and self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.run(self._pg.close())
            self._pg = None
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def select(self, sql: str, param: uuid.UUID) -> Iterator[Any]:
        """The rows of a query with one parameter, written ``?``, in batches."""
        if self._sqlite is not None:
            cursor = self._sqlite.execute(sql, (str(param),))
            while batch := cursor.fetchmany(ROWS_PER_BATCH):
                yield from batch
            return
        assert self._loop is not None
        cursor = self._loop.run(self._pg.cursor(sql.replace("?", "$1"), param))
        while batch := self._loop.run(cursor.fetch(ROWS_PER_BATCH)):
            yield from batch

    def columns(self) -> dict[str, set[str]]:
        """The database's own tables and their columns."""
        found: dict[str, set[str]] = {}
        if self._sqlite is not None:
            names = [r[0] for r in self._sqlite.execute("SELECT name FROM sqlite_master")]
            for name in names:
                pragma = f"PRAGMA table_info({_quote(name)})"
                found[name] = {r[1] for r in self._sqlite.execute(pragma)}
            return found
        assert self._loop is not None
        rows = self._loop.run(
            self._pg.fetch(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema()"
            )
        )
        for table, column in rows:
            found.setdefault(table, set()).add(column)
        return found

    def schema_version(self) -> str:
        sql = "SELECT name FROM tortoise_migrations WHERE app = 'models'"
        try:
            if self._sqlite is not None:
                names = [r[0] for r in self._sqlite.execute(sql)]
            else:
                assert self._loop is not None
                names = [r[0] for r in self._loop.run(self._pg.fetch(sql))]
        except Exception:  # noqa: BLE001 - any driver error here: no migrations table
            raise BackupError("the database has no schema: run hexa migrate first") from None
        known = known_migrations()
        applied = [n for n in known if n in set(names)]
        if not applied:
            raise BackupError("the database has no schema: run hexa migrate first")
        return applied[-1]

    def count(self, table: str) -> int:
        sql = f"SELECT count(*) FROM {_quote(table)}"  # noqa: S608 (names from the ORM)
        if self._sqlite is not None:
            return int(self._sqlite.execute(sql).fetchone()[0])
        assert self._loop is not None
        return int(self._loop.run(self._pg.fetchval(sql)))

    def rows(self, table: str, columns: list[str]) -> Iterator[list[Any]]:
        cols = ", ".join(_quote(c) for c in columns)
        sql = f"SELECT {cols} FROM {_quote(table)}"  # noqa: S608 (names from the ORM)
        if self._sqlite is not None:
            cursor = self._sqlite.execute(sql)
            while batch := cursor.fetchmany(ROWS_PER_BATCH):
                yield from batch
            return
        assert self._loop is not None
        cursor = self._loop.run(self._pg.cursor(sql))
        while batch := self._loop.run(cursor.fetch(ROWS_PER_BATCH)):
            yield from batch


# --- create -------------------------------------------------------------------------------


@dataclass
class BackupInfo:
    path: Path
    size: int
    created_at: str
    schema: str
    key_id: str
    sha256: str
    seconds: float
    tables: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


def _data_files(data_dir: Path) -> list[str]:
    """The data directory's files a backup holds (relative paths, sorted)."""
    found = [name for name in backup_registry.FILES if (data_dir / name).is_file()]
    for tree in backup_registry.TREES:
        root = data_dir / tree
        if root.is_dir():
            found += sorted(str(p.relative_to(data_dir)) for p in root.rglob("*") if p.is_file())
    return found


class _HashingFile:
    """A binary file that also hashes what is written (the backup's checksum)."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return self.raw.write(data)


def backup_name(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.UTC)
    return f"hexa-backup-{now.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}{SUFFIX}"


def create_backup(
    database_url: str,
    data_dir: Path,
    key: BackupKey,
    out: Path,
    *,
    progress: Progress = _no_progress,
    stop: threading.Event | None = None,
) -> BackupInfo:
    """Write a backup of the database and the data directory's files to ``out``; a set
    ``stop`` ends it early (the hub is shutting down), like any failure.

    The file is written under a temporary name in the same directory, flushed to disk and
    renamed only when complete: a failed backup (a full disk, a lost database) leaves no
    partial file and never replaces an existing one."""
    started = time.perf_counter()
    out = out.resolve()
    if out.is_dir():
        raise BackupError(f"{out} is a directory: give a file name (--out)")
    if not out.parent.is_dir():
        raise BackupError(f"directory {out.parent} does not exist")
    tables = backup_registry.tables()
    created_at = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.partial")
    info = BackupInfo(out, 0, created_at, "", key.key_id, "", 0.0)
    try:
        with Snapshot(database_url) as snap:
            schema = snap.schema_version()
            # a database at an older schema than this hub's models (not migrated yet) is
            # backed up as it is: its own tables and columns
            present = snap.columns()
            tables = [
                backup_registry.Table(
                    t.name, t.model, tuple(c for c in t.columns if c.name in present[t.name])
                )
                for t in tables
                if t.name in present
            ]
            counts = {t.name: snap.count(t.name) for t in tables}
            files = _data_files(data_dir)
            header = {
                "created_at": created_at,
                "schema": schema,
                "hub_version": __version__,
                "engine": snap.engine,
            }
            with open(tmp, "xb") as raw:
                os.chmod(tmp, 0o600)
                hashing = _HashingFile(raw)
                writer = EncryptedWriter(hashing, key, header)  # type: ignore[arg-type]
                manifest: dict[str, Any] = {"schema": schema, "tables": {}, "files": {}}

                def emit(record: dict[str, Any]) -> None:
                    writer.write(orjson.dumps(record) + b"\n")

                emit(
                    {
                        "kind": "begin",
                        "schema": schema,
                        "tables": [
                            {
                                "name": t.name,
                                "model": t.model,
                                "columns": [[c.name, c.kind] for c in t.columns],
                                "rows": counts[t.name],
                            }
                            for t in tables
                        ],
                        "files": files,
                    }
                )
                total = sum(counts.values())
                done = 0
                for t in tables:
                    emit({"kind": "table", "name": t.name})
                    sha = hashlib.sha256()
                    n = 0
                    convert = _converter([c.kind for c in t.columns], _OUT)
                    for row in snap.rows(t.name, [c.name for c in t.columns]):
                        line = orjson.dumps(convert(row)) + b"\n"
                        sha.update(line)
                        writer.write(line)
                        n += 1
                        if n % 5000 == 0:
                            progress("rows", done + n, total)
                            if stop is not None and stop.is_set():
                                raise BackupError("the backup was stopped: the hub is stopping")
                    done += n
                    progress("rows", done, total)
                    entry = {"rows": n, "sha256": sha.hexdigest()}
                    manifest["tables"][t.name] = entry
                    emit({"kind": "end", "name": t.name, **entry})
                    info.tables[t.name] = n
                for name in files:
                    entry = _emit_file(data_dir / name, name, emit, writer)
                    manifest["files"][name] = entry
                    info.files.append(name)
                emit({"kind": "manifest", **manifest})
                writer.close()
                raw.flush()
                os.fsync(raw.fileno())
                info.size = writer.bytes_written
                info.sha256 = hashing.sha.hexdigest()
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        reason = exc.strerror or str(exc)
        raise BackupError(
            f"the backup could not be written to {out}: {reason} (no partial file was left, "
            "existing backups are untouched)"
        ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    info.schema = schema
    info.seconds = time.perf_counter() - started
    _write_sidecar(info, verified=None)
    return info


def _emit_file(
    path: Path, name: str, emit: Callable[[dict[str, Any]], None], writer: EncryptedWriter
) -> dict[str, Any]:
    sha = hashlib.sha256()
    size = 0
    mode = path.stat().st_mode & 0o777
    emit({"kind": "file", "path": name, "mode": mode})
    with open(path, "rb") as f:
        while block := f.read(FILE_LINE_BYTES):
            sha.update(block)
            size += len(block)
            writer.write(orjson.dumps(base64.b64encode(block).decode()) + b"\n")
    entry = {"size": size, "sha256": sha.hexdigest()}
    emit({"kind": "end_file", "path": name, **entry})
    return entry


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _write_sidecar(info: BackupInfo, *, verified: bool | None) -> None:
    """``<backup>.json`` beside the file: what the admin API lists without decrypting."""
    data = {
        "name": info.path.name,
        "size": info.size,
        "created_at": info.created_at,
        "schema": info.schema,
        "key_id": info.key_id,
        "sha256": info.sha256,
        "seconds": round(info.seconds, 3),
        "rows": sum(info.tables.values()),
        "verified": verified,
    }
    with contextlib.suppress(OSError):
        tmp = _sidecar(info.path).with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, _sidecar(info.path))


def read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(_sidecar(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def mark_verified(path: Path, ok: bool) -> None:
    data = read_sidecar(path)
    if data is None:
        return
    data["verified"] = ok
    data["verified_at"] = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
    with contextlib.suppress(OSError):
        _sidecar(path).write_text(json.dumps(data, indent=2))


# --- reading a backup ---------------------------------------------------------------------


def _record(line: bytes) -> dict[str, Any]:
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise BackupError("the backup's content is damaged (an unreadable record)") from None
    if not isinstance(record, dict) or "kind" not in record:
        raise BackupError("the backup's content is damaged (an unexpected record)")
    return record


@dataclass
class _TableStream:
    name: str
    columns: list[tuple[str, str]]
    rows: int
    end: dict[str, Any] | None = None


class BackupStream:
    """Reads a backup record by record, checking every checksum and count as it goes:
    :meth:`finish` raises unless everything matched the manifest."""

    def __init__(self, src: BinaryIO, key: BackupKey) -> None:
        self.reader = EncryptedReader(src, key)
        self.header = self.reader.header
        self._lines = lines(self.reader.chunks())
        begin = self._next()
        if begin.get("kind") != "begin":
            raise BackupError("the backup's content is damaged (no table list)")
        self.schema = str(begin.get("schema"))
        if self.schema != self.header.get("schema"):
            raise BackupError("the backup's content is damaged (schema versions disagree)")
        self.tables = [
            _TableStream(t["name"], [(c[0], c[1]) for c in t["columns"]], int(t["rows"]))
            for t in begin["tables"]
        ]
        self.file_names = list(begin.get("files", []))
        self.seen_tables: dict[str, dict[str, Any]] = {}
        self.seen_files: dict[str, dict[str, Any]] = {}
        self.rows_read = 0

    def _next(self) -> dict[str, Any]:
        try:
            return _record(next(self._lines))
        except StopIteration:
            raise BackupError("the backup's content is damaged (it ends early)") from None

    def table_rows(self, table: _TableStream) -> Iterator[list[Any]]:
        """The rows of ``table`` (the next one in the file), decoded; checks its count and
        checksum when its end is reached."""
        start = self._next()
        if start.get("kind") != "table" or start.get("name") != table.name:
            raise BackupError(f"the backup's content is damaged (table {table.name} missing)")
        sha = hashlib.sha256()
        n = 0
        for line in self._lines:
            if line[:1] == b"[":
                sha.update(line + b"\n")
                try:
                    row = orjson.loads(line)
                except orjson.JSONDecodeError:
                    raise BackupError(
                        f"the backup's content is damaged (a row of {table.name})"
                    ) from None
                if len(row) != len(table.columns):
                    raise BackupError(f"the backup's content is damaged (a row of {table.name})")
                n += 1
                self.rows_read += 1
                yield row
                continue
            end = _record(line)
            if end.get("kind") != "end" or end.get("name") != table.name:
                raise BackupError(f"the backup's content is damaged (table {table.name})")
            if end.get("rows") != n or end.get("sha256") != sha.hexdigest() or n != table.rows:
                raise BackupError(f"checksum mismatch in table {table.name}: the backup is damaged")
            self.seen_tables[table.name] = {"rows": n, "sha256": sha.hexdigest()}
            return
        raise BackupError("the backup's content is damaged (it ends early)")

    def files(self) -> Iterator[tuple[str, int, Iterator[bytes]]]:
        """(path, mode, its blocks) for each file, in order; checks each file's checksum."""
        for name in self.file_names:
            start = self._next()
            if start.get("kind") != "file" or start.get("path") != name:
                raise BackupError(f"the backup's content is damaged (file {name} missing)")
            yield name, int(start.get("mode", 0o600)), self._file_blocks(name)

    def _file_blocks(self, name: str) -> Iterator[bytes]:
        sha = hashlib.sha256()
        size = 0
        for line in self._lines:
            if line[:1] == b'"':
                try:
                    block = base64.b64decode(orjson.loads(line), validate=True)
                except (orjson.JSONDecodeError, ValueError):
                    raise BackupError(f"the backup's content is damaged (file {name})") from None
                sha.update(block)
                size += len(block)
                yield block
                continue
            end = _record(line)
            if end.get("kind") != "end_file" or end.get("path") != name:
                raise BackupError(f"the backup's content is damaged (file {name})")
            if end.get("sha256") != sha.hexdigest() or end.get("size") != size:
                raise BackupError(f"checksum mismatch in file {name}: the backup is damaged")
            self.seen_files[name] = {"size": size, "sha256": sha.hexdigest()}
            return
        raise BackupError("the backup's content is damaged (it ends early)")

    def finish(self) -> dict[str, Any]:
        """Read the manifest and the end of the file; everything must match."""
        manifest = self._next()
        if manifest.get("kind") != "manifest":
            raise BackupError("the backup's content is damaged (no manifest)")
        if (
            manifest.get("tables") != self.seen_tables
            or manifest.get("files") != self.seen_files
            or manifest.get("schema") != self.schema
        ):
            raise BackupError("the backup's manifest does not match its content: it is damaged")
        for _extra in self._lines:
            raise BackupError("the backup's content is damaged (records after the manifest)")
        return manifest


@dataclass
class VerifyResult:
    header: dict[str, Any]
    manifest: dict[str, Any]
    rows: int
    seconds: float


def verify_backup(path: Path, key: BackupKey, *, progress: Progress = _no_progress) -> VerifyResult:
    """Decrypt the whole file and check every checksum; raises :class:`BackupError`."""
    started = time.perf_counter()
    with _open_backup(path) as src:
        stream = BackupStream(src, key)
        total = sum(t.rows for t in stream.tables)
        for table in stream.tables:
            for _row in stream.table_rows(table):
                if stream.rows_read % 5000 == 0:
                    progress("rows", stream.rows_read, total)
        progress("rows", stream.rows_read, total)
        for _name, _mode, blocks in stream.files():
            for _block in blocks:
                pass
        manifest = stream.finish()
    return VerifyResult(stream.header, manifest, stream.rows_read, time.perf_counter() - started)


@contextlib.contextmanager
def _open_backup(path: Path) -> Iterator[BinaryIO]:
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        raise BackupError(f"no such backup file: {path}") from None
    except OSError as exc:
        raise BackupError(f"cannot read {path}: {exc.strerror or exc}") from None
    with f:
        yield f


# --- restore ------------------------------------------------------------------------------


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
        self._loop = _Loop() if self.engine == "postgres" else None
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
            return {r[1] for r in self.conn.execute(f"PRAGMA table_info({_quote(table)})")}
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
            sql = f"SELECT count(*) FROM {_quote(name)}"  # noqa: S608 (names from the ORM)
            if self.engine == "sqlite":
                n = int(self.conn.execute(sql).fetchone()[0])
            else:
                n = int(self.run(self.conn.fetchval(sql)))
            if n:
                found[name] = n
        return found

    def count(self, table: str) -> int:
        sql = f"SELECT count(*) FROM {_quote(table)}"  # noqa: S608 (names from the ORM)
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
    loop = _Loop()
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
    progress: Progress = _no_progress,
) -> RestoreResult:
    """Restore ``path`` into ``database_url`` and its files into ``data_dir``.

    Refuses a newer schema than this hub knows, and a database with rows unless ``force``
    (then its rows are replaced). The target is brought to the backup's schema version, the
    rows are loaded in one transaction (committed only once every checksum matched), the
    files are put back, then the later migrations are applied."""
    started = time.perf_counter()
    known = known_migrations()
    with _open_backup(path) as src:
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
                    conn.execute(f"DELETE FROM {_quote(name)}")  # noqa: S608
            for t in stream.tables:
                cols = [c for c, _k in t.columns]
                sql = (
                    f"INSERT INTO {_quote(t.name)} ({', '.join(_quote(c) for c in cols)}) "  # noqa: S608
                    f"VALUES ({', '.join('?' for _ in cols)})"
                )
                convert = _converter([k for _c, k in t.columns], _SQLITE_IN)
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
                await pg.execute("TRUNCATE " + ", ".join(_quote(n) for n in names) + " CASCADE")
            for t in stream.tables:
                convert = _converter([k for _c, k in t.columns], _PG_IN)
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


def list_backups(directory: Path) -> list[Path]:
    """The backup files of ``directory``, newest first."""
    if not directory.is_dir():
        return []
    return sorted(directory.glob(f"*{SUFFIX}"), key=lambda p: p.name, reverse=True)


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
    progress: Progress = _no_progress,
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


# --- retention ----------------------------------------------------------------------------


def prune(directory: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest backups (and their sidecars); returns the deleted."""
    removed = []
    for old in list_backups(directory)[keep:]:
        old.unlink(missing_ok=True)
        _sidecar(old).unlink(missing_ok=True)
        removed.append(old)
    return removed
