"""``hexa backup …``, ``hexa export …`` and ``hexa import …``.

On a terminal, long runs show a progress bar (rich) on stderr and a human summary on
stdout; otherwise they print no progress and one JSON object on stdout, for scripts. Every
failure is one line on stderr (``hexa: …``) and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hexa.hub.config import Settings

Progress = Callable[[str, int, int | None], None]


def add_parsers(
    sub: Any,
    add_common: Callable[[argparse.ArgumentParser], None],
) -> None:
    backup = sub.add_parser("backup", help="encrypted backups: create, verify, restore, drill")
    bsub = backup.add_subparsers(dest="backup_command", required=True)
    create = bsub.add_parser("create", help="write one encrypted backup file")
    add_common(create)
    create.add_argument("--out", help="the file to write (default: a new file in HEXA_BACKUP_DIR)")
    verify = bsub.add_parser("verify", help="decrypt a backup and check every checksum")
    add_common(verify)
    verify.add_argument("file")
    restore = bsub.add_parser("restore", help="restore a backup into a database (all or nothing)")
    add_common(restore)
    restore.add_argument("file")
    restore.add_argument("--force", action="store_true", help="replace a non-empty database")
    drill = bsub.add_parser(
        "drill", help="restore the newest backup into a scratch database and time it"
    )
    add_common(drill)
    drill.add_argument("file", nargs="?", help="this backup instead of the newest")
    listing = bsub.add_parser("list", help="list the backups of HEXA_BACKUP_DIR")
    add_common(listing)

    export = sub.add_parser(
        "export", help="export one organization as JSON lines (hexa export verify FILE checks one)"
    )
    add_common(export)
    export.add_argument("action", nargs="*", metavar="verify FILE")
    export.add_argument("--org", help="the organization's id")
    export.add_argument("--out", help="the file to write")
    imp = sub.add_parser("import", help="import an organization export (idempotent)")
    add_common(imp)
    imp.add_argument("file")
    imp.add_argument("--org", required=True, help="the organization to import into")


def _interactive() -> bool:
    return sys.stderr.isatty() and sys.stdout.isatty()


@contextmanager
def _progress(label: str) -> Iterator[Progress]:
    """A progress bar on a terminal; nothing otherwise."""
    if not _interactive():
        yield lambda _what, _done, _total: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(_what: str, done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _report(data: dict[str, Any], human: list[str]) -> None:
    if _interactive():
        for line in human:
            print(line)  # noqa: T201 - the command's output
    else:
        print(json.dumps(data, default=str))  # noqa: T201 - the command's output


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run one of the commands; raises ``HubError`` (one line) on failure, a database that
    cannot be reached or refuses included."""
    from hexa.hub.errors import HubError

    try:
        return _dispatch(args, settings)
    except HubError:
        raise
    except Exception as exc:
        module = type(exc).__module__
        if isinstance(exc, OSError) or module.startswith(("asyncpg", "tortoise", "sqlite3")):
            raise HubError(f"database error (HEXA_DATABASE_URL): {exc}") from None
        raise


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "backup":
        command: Callable[[argparse.Namespace, Settings], int] = {
            "create": _create,
            "verify": _verify,
            "restore": _restore,
            "drill": _drill,
            "list": _list,
        }[args.backup_command]
        return command(args, settings)
    from hexa.hub import export

    if args.command == "export":
        if args.action[:1] == ["verify"] and len(args.action) == 2:
            with _progress("verifying") as progress:
                summary = export.verify_export(Path(args.action[1]), progress=progress)
            _report(
                {"ok": True, **summary},
                [f"export {args.action[1]} is intact: {summary['records']} records"],
            )
            return 0
        if args.action or not args.org or not args.out:
            from hexa.hub.errors import ValidationFailed

            raise ValidationFailed(
                "usage: hexa export --org ID --out FILE | hexa export verify FILE"
            )
        with _progress("exporting") as progress:
            summary = export.export_org(
                settings.resolved_database_url, args.org, Path(args.out), progress=progress
            )
        _report(
            {"ok": True, "file": args.out, **summary},
            [f"exported organization {args.org} to {args.out}: {summary['counts']}"],
        )
        return 0
    with _progress("importing") as progress:
        summary = asyncio.run(
            export.import_org(
                settings.resolved_database_url, Path(args.file), args.org, progress=progress
            )
        )
    _report(
        {"ok": True, **summary},
        [f"imported {args.file} into organization {args.org}: {summary}"],
    )
    return 0


def _key(settings: Settings, *, create: bool) -> Any:
    from hexa.hub.backup import load_key

    key, generated = load_key(settings, create=create)
    if generated is not None:
        print(  # noqa: T201 - the operator must see this
            f"hexa: generated a new backup key into {generated} (key {key.key_id}). Keep a copy "
            "of it somewhere else: without it no backup can be restored.",
            file=sys.stderr,
        )
    return key


def _backup_dir(settings: Settings) -> Path:
    return settings.backup_dir or settings.data_dir / "backups"


def _create(args: argparse.Namespace, settings: Settings) -> int:
    from hexa.hub import backup

    key = _key(settings, create=True)
    if args.out:
        out = Path(args.out)
    else:
        directory = _backup_dir(settings)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        out = directory / backup.backup_name()
    url = settings.resolved_database_url
    with _progress("backing up") as progress:
        info = backup.create_backup(url, settings.data_dir, key, out, progress=progress)
    _audit(url, "backup_created", {"file": info.path.name, "size": info.size})
    rows = sum(info.tables.values())
    _report(
        {
            "ok": True,
            "file": str(info.path),
            "size": info.size,
            "sha256": info.sha256,
            "key_id": info.key_id,
            "schema": info.schema,
            "rows": rows,
            "tables": info.tables,
            "files": info.files,
            "seconds": round(info.seconds, 3),
        },
        [
            f"backup written to {info.path} ({info.size} bytes, {rows} rows, "
            f"{len(info.files)} files, {info.seconds:.1f} s)",
            f"key {info.key_id}; sha256 {info.sha256}",
        ],
    )
    return 0


def _verify(args: argparse.Namespace, settings: Settings) -> int:
    from hexa.hub import backup
    from hexa.hub.backup_format import BackupError

    key = _key(settings, create=False)
    path = Path(args.file)
    try:
        with _progress("verifying") as progress:
            result = backup.verify_backup(path, key, progress=progress)
    except BackupError:
        backup.mark_verified(path, False)
        raise
    backup.mark_verified(path, True)
    _report(
        {
            "ok": True,
            "file": str(path),
            "created_at": result.header.get("created_at"),
            "schema": result.header.get("schema"),
            "rows": result.rows,
            "tables": {k: v["rows"] for k, v in result.manifest["tables"].items()},
            "files": sorted(result.manifest["files"]),
        },
        [
            f"backup {path} is intact: created {result.header.get('created_at')}, schema "
            f"{result.header.get('schema')}, {result.rows} rows, "
            f"{len(result.manifest['files'])} files, every checksum matches"
        ],
    )
    return 0


def _restore(args: argparse.Namespace, settings: Settings) -> int:
    from hexa.hub import backup_restore

    key = _key(settings, create=False)
    url = settings.resolved_database_url
    with _progress("restoring") as progress:
        result = backup_restore.restore_backup(
            Path(args.file), key, url, settings.data_dir, force=args.force, progress=progress
        )
    _audit(
        url,
        "backup_restored",
        {"file": Path(args.file).name, "schema": result.schema, "forced": bool(args.force)},
    )
    rows = sum(result.tables.values())
    _report(
        {
            "ok": True,
            "file": args.file,
            "schema": result.schema,
            "migrated_to": result.migrated_to,
            "rows": rows,
            "tables": result.tables,
            "files": result.files,
            "seconds": round(result.seconds, 3),
        },
        [
            f"restored {args.file}: {rows} rows, {len(result.files)} files, "
            f"schema {result.schema} then migrated to {result.migrated_to}, "
            f"{result.seconds:.1f} s",
        ],
    )
    return 0


def _drill(args: argparse.Namespace, settings: Settings) -> int:
    from hexa.hub import backup_restore

    key = _key(settings, create=False)
    with _progress("drill: restoring") as progress:
        result = backup_restore.drill(
            settings, key, backup=Path(args.file) if args.file else None, progress=progress
        )
    rows = sum(result.tables.values())
    _report(
        {
            "ok": True,
            "file": str(result.backup),
            "engine": result.engine,
            "restore_seconds": round(result.restore_seconds, 3),
            "verify_seconds": round(result.verify_seconds, 3),
            "rows": rows,
            "tables": result.tables,
        },
        [
            f"drill: restored {result.backup.name} into a scratch {result.engine} database "
            f"in {result.restore_seconds:.1f} s (RTO), counts verified in "
            f"{result.verify_seconds:.1f} s",
            *(f"  {name}: {n}" for name, n in result.tables.items()),
        ],
    )
    return 0


def _list(_args: argparse.Namespace, settings: Settings) -> int:
    from hexa.hub import backup

    items = [
        {"file": str(p), **(backup.read_sidecar(p) or {"size": p.stat().st_size})}
        for p in backup.list_backups(_backup_dir(settings))
    ]
    _report(
        {"ok": True, "items": items},
        [f"{i['file']}  {i.get('size')} bytes  verified={i.get('verified')}" for i in items]
        or ["no backups"],
    )
    return 0


def _audit(url: str, action: str, details: dict[str, Any]) -> None:
    """Record a backup or restore in the database's audit log (best effort)."""
    import logging

    from hexa.hub import db
    from hexa.models import AuditEntry

    async def write() -> None:
        async with db.database(url):
            await AuditEntry.create(
                action=action, source="system", actor_type="system", actor_id="cli", details=details
            )

    try:
        asyncio.run(write())
    except Exception:
        logging.getLogger(__name__).warning("audit entry %s not written", action, exc_info=True)
