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
import hashlib
import json
import logging
import os
import pkgutil
import secrets
import sqlite3
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


def no_progress(_what: str, _done: int, _total: int | None) -> None:
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


def portable(kinds: list[str]) -> Callable[[Any], list[Any]]:
    """Turns a row read by a driver (values of these kinds) into its portable form: what a
    backup and an organization export hold."""
    return converter(kinds, _OUT)


def converter(kinds: list[str], table: dict[str, Callable[[Any], Any]]) -> Callable[[Any], Any]:
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


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class DriverLoop:
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
        self._loop: DriverLoop | None = None

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

                self._loop = DriverLoop()
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
                pragma = f"PRAGMA table_info({quote_ident(name)})"
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
        sql = f"SELECT count(*) FROM {quote_ident(table)}"  # noqa: S608 (names from the ORM)
        if self._sqlite is not None:
            return int(self._sqlite.execute(sql).fetchone()[0])
        assert self._loop is not None
        return int(self._loop.run(self._pg.fetchval(sql)))

    def rows(self, table: str, columns: list[str]) -> Iterator[list[Any]]:
        cols = ", ".join(quote_ident(c) for c in columns)
        sql = f"SELECT {cols} FROM {quote_ident(table)}"  # noqa: S608 (names from the ORM)
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
    progress: Progress = no_progress,
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
                    convert = converter([c.kind for c in t.columns], _OUT)
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


def verify_backup(path: Path, key: BackupKey, *, progress: Progress = no_progress) -> VerifyResult:
    """Decrypt the whole file and check every checksum; raises :class:`BackupError`."""
    started = time.perf_counter()
    with open_backup(path) as src:
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
def open_backup(path: Path) -> Iterator[BinaryIO]:
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        raise BackupError(f"no such backup file: {path}") from None
    except OSError as exc:
        raise BackupError(f"cannot read {path}: {exc.strerror or exc}") from None
    with f:
        yield f


# --- retention ----------------------------------------------------------------------------


def prune(directory: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest backups (and their sidecars); returns the deleted."""
    removed = []
    for old in list_backups(directory)[keep:]:
        old.unlink(missing_ok=True)
        _sidecar(old).unlink(missing_ok=True)
        removed.append(old)
    return removed


def list_backups(directory: Path) -> list[Path]:
    """The backup files of ``directory``, newest first."""
    if not directory.is_dir():
        return []
    return sorted(directory.glob(f"*{SUFFIX}"), key=lambda p: p.name, reverse=True)
