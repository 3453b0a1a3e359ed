"""Backups end to end through the `hexa` command: what a backup holds, verify catching every
corruption, restore refusing what it must and loading all or nothing, and a full disk."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.cli import HEXA, hexa_cli

from hexa.hub import backup, backup_registry
from hexa.hub.backup_format import BackupError, BackupKey, EncryptedReader, EncryptedWriter

KEY = "backup-key-for-tests-0123456789abcdefghijkl"
JWT = "jwt-secret-for-backup-tests-0123456789abcdef"


def run(args: list[str], env: dict[str, str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return hexa_cli(args, {"HEXA_BACKUP_KEY": KEY, **env}, **kwargs)


def one_line_failure(r: subprocess.CompletedProcess[str], needle: str) -> None:
    """Exit status 2 and one line on stderr saying ``needle``; no traceback."""
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("hexa: ") and needle in lines[0], lines[0]
    assert "Traceback" not in r.stderr


def rows(db: Path, table: str) -> int:
    with contextlib.closing(sqlite3.connect(db)) as c:
        return int(c.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0])  # noqa: S608


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """A SQLite hub database with an admin, an OTA artifact and secrets, and a backup of it."""
    tmp = tmp_path_factory.mktemp("backup-source")
    data = tmp / "data"
    env = {"HEXA_DATA_DIR": str(data), "HEXA_JWT_SECRET": JWT}
    r = run(["admin", "create", "--email", "ops@hexa.test", "--password", "pw-0123456789"], env)
    assert r.returncode == 0, r.stderr
    (data / "secrets.json").write_text(json.dumps({"device_provision_key": "p" * 32}))
    artifact = data / "ota" / "artifacts" / "fw-1.bin"
    artifact.parent.mkdir(parents=True)
    artifact.write_bytes(os.urandom(1_600_000))  # the body spans several chunks
    out = tmp / "good.hexabak"
    r = run(["backup", "create", "--out", str(out)], env)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["rows"] >= 3 and "ota/artifacts/fw-1.bin" in summary["files"]
    yield {"data": data, "db": data / "hexa.db", "backup": out, "tmp": tmp}


def test_registry_lists_every_model_in_foreign_key_order() -> None:
    """Every model the ORM knows is in a backup (a table added later joins by itself), each
    after the tables it references."""
    tables = backup_registry.tables()
    models = backup_registry.models()
    assert {t.model for t in tables} == set(models)
    assert {"ota_releases", "homekit_bridges", "audit_log"} <= {t.name for t in tables}
    position = {t.name: i for i, t in enumerate(tables)}
    for model in models.values():
        for field in model._meta.fk_fields:
            target = model._meta.fields_map[field].related_model._meta.db_table  # type: ignore[attr-defined]
            assert position[target] < position[model._meta.db_table], (model, target)
    assert "secrets.json" in backup_registry.FILES and "ota" in backup_registry.TREES


def test_verify_and_restore_into_an_empty_database(source: dict[str, Path], tmp_path: Path) -> None:
    """verify passes; restore fills an empty database and puts secrets and OTA files back."""
    r = run(["backup", "verify", str(source["backup"])], {"HEXA_DATA_DIR": str(source["data"])})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ok"] is True
    target = tmp_path / "restored"
    r = run(["backup", "restore", str(source["backup"])], {"HEXA_DATA_DIR": str(target)})
    assert r.returncode == 0, r.stderr
    for table in ("users", "organizations", "memberships"):
        assert rows(target / "hexa.db", table) == rows(source["db"], table)
    assert (target / "secrets.json").read_bytes() == (source["data"] / "secrets.json").read_bytes()
    artifact = "ota/artifacts/fw-1.bin"
    assert (target / artifact).read_bytes() == (source["data"] / artifact).read_bytes()
    assert rows(target / "hexa.db", "audit_log") >= 1  # the restore itself is audited
    with contextlib.closing(sqlite3.connect(target / "hexa.db")) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # as the hub runs it
        # one of the contract's audit sources: a hexa command is the system, id "cli"
        restored = "SELECT actor_type, actor_id, source FROM audit_log WHERE action = ?"
        assert c.execute(restored, ("backup_restored",)).fetchall() == [("system", "cli", "system")]


def test_wrong_key_is_one_line(source: dict[str, Path]) -> None:
    """A backup opened with another key: one line naming both key ids, exit 2."""
    r = run(
        ["backup", "verify", str(source["backup"])],
        {"HEXA_DATA_DIR": str(source["data"]), "HEXA_BACKUP_KEY": "another-key-" + "x" * 30},
    )
    one_line_failure(r, "wrong key")


def test_every_flipped_byte_and_truncation_is_caught(source: dict[str, Path]) -> None:
    """One flipped bit anywhere in the file, or the file cut anywhere, fails verification."""
    good = source["backup"].read_bytes()
    key = BackupKey(KEY)
    damaged = source["tmp"] / "damaged.hexabak"
    size = len(good)
    positions = sorted({*range(0, 600), *range(600, size, size // 250), size - 1, size - 17})
    for pos in positions:
        data = bytearray(good)
        data[pos] ^= 0x01
        damaged.write_bytes(data)
        with pytest.raises(BackupError):
            backup.verify_backup(damaged, key)
    for cut in sorted({1, 9, 40, 300, 70_000, (1 << 20) + 300, size // 2, size - 16, size - 1}):
        damaged.write_bytes(good[:cut])
        with pytest.raises(BackupError):
            backup.verify_backup(damaged, key)
    damaged.write_bytes(good + b"\x00")
    with pytest.raises(BackupError):
        backup.verify_backup(damaged, key)
    # and through the command: one line each
    data = bytearray(good)
    data[size // 2] ^= 0x80
    damaged.write_bytes(data)
    env = {"HEXA_DATA_DIR": str(source["data"])}
    one_line_failure(run(["backup", "verify", str(damaged)], env), "damaged")
    damaged.write_bytes(good[: size - 100])
    one_line_failure(run(["backup", "verify", str(damaged)], env), "truncated")
    damaged.write_bytes(b"not a backup at all\n")
    one_line_failure(run(["backup", "verify", str(damaged)], env), "not a Hexa backup")


def _rewrite(src: Path, dst: Path, schema: str) -> None:
    """``src`` re-encrypted with the test key, claiming ``schema`` (a future hub's backup)."""
    key = BackupKey(KEY)
    with open(src, "rb") as f:
        reader = EncryptedReader(f, key)
        plain = b"".join(reader.chunks())
        header = {k: reader.header[k] for k in ("created_at", "hub_version", "engine")}
    old = reader.header["schema"]
    plain = plain.replace(f'"schema":"{old}"'.encode(), f'"schema":"{schema}"'.encode())
    with open(dst, "wb") as out:
        writer = EncryptedWriter(out, key, {**header, "schema": schema})
        writer.write(plain)
        writer.close()


def test_a_newer_schema_is_refused(source: dict[str, Path], tmp_path: Path) -> None:
    """A backup from a hub with a later migration: refused in one line, nothing created."""
    future = tmp_path / "future.hexabak"
    _rewrite(source["backup"], future, "9999_from_the_future")
    target = tmp_path / "target"
    r = run(["backup", "restore", str(future)], {"HEXA_DATA_DIR": str(target)})
    one_line_failure(r, "newer than this hub")
    assert not (target / "hexa.db").exists() or (target / "hexa.db").stat().st_size == 0


def test_a_non_empty_database_is_refused_and_force_is_all_or_nothing(
    source: dict[str, Path], tmp_path: Path
) -> None:
    """Without --force a database with rows is refused; with --force a damaged backup loads
    nothing (the rows stay as they were), and a good one replaces the content."""
    target = tmp_path / "busy"
    env = {"HEXA_DATA_DIR": str(target)}
    r = run(["admin", "create", "--email", "other@hexa.test", "--password", "pw-0123456789"], env)
    assert r.returncode == 0, r.stderr
    before = {t: rows(target / "hexa.db", t) for t in ("users", "organizations", "audit_log")}
    one_line_failure(run(["backup", "restore", str(source["backup"])], env), "not empty")
    # damaged in its last chunk: every table is loaded before the damage is found
    data = bytearray(source["backup"].read_bytes())
    data[-5] ^= 0x01
    damaged = tmp_path / "damaged.hexabak"
    damaged.write_bytes(data)
    one_line_failure(run(["backup", "restore", str(damaged), "--force"], env), "damaged")
    after = {t: rows(target / "hexa.db", t) for t in before}
    assert after == before
    with contextlib.closing(sqlite3.connect(target / "hexa.db")) as c:
        assert c.execute("SELECT email FROM users").fetchall() == [("other@hexa.test",)]
    r = run(["backup", "restore", str(source["backup"]), "--force"], env)
    assert r.returncode == 0, r.stderr
    with contextlib.closing(sqlite3.connect(target / "hexa.db")) as c:
        assert c.execute("SELECT email FROM users").fetchall() == [("ops@hexa.test",)]


def _limit_file_size() -> None:
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_a_full_disk_never_replaces_a_good_backup(source: dict[str, Path], tmp_path: Path) -> None:
    """The disk fills during the backup (RLIMIT_FSIZE in the child: writes past 64 KiB fail
    as on a full disk, on any system, without root): one line, exit 2, the existing backup
    at that path is untouched and no partial file is left."""
    out = tmp_path / "nightly.hexabak"
    out.write_bytes(source["backup"].read_bytes())
    good = out.read_bytes()
    r = run(
        ["backup", "create", "--out", str(out)],
        {"HEXA_DATA_DIR": str(source["data"])},
        preexec_fn=_limit_file_size,
    )
    one_line_failure(r, "could not be written")
    assert out.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nightly.hexabak"]
    backup.verify_backup(out, BackupKey(KEY))


def test_drill_restores_the_newest_backup_and_prints_the_rto(
    source: dict[str, Path], tmp_path: Path
) -> None:
    """The drill restores the newest backup of the backup directory into a scratch database
    and reports the restore time and every table's rows."""
    directory = tmp_path / "backups"
    directory.mkdir()
    (directory / "hexa-backup-20260101T000000Z-aaaaaa.hexabak").write_bytes(b"old and broken")
    (directory / "hexa-backup-20261201T000000Z-bbbbbb.hexabak").write_bytes(
        source["backup"].read_bytes()
    )
    env = {"HEXA_DATA_DIR": str(source["data"]), "HEXA_BACKUP_DIR": str(directory)}
    r = run(["backup", "drill"], env)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["file"].endswith("bbbbbb.hexabak") and result["restore_seconds"] > 0
    assert result["tables"]["users"] == rows(source["db"], "users")
    from support.databases import PG_URL, pg_unreachable

    if not pg_unreachable():  # a PostgreSQL hub drills in a scratch database on its server
        r = run(["backup", "drill"], {**env, "HEXA_DATABASE_URL": PG_URL})
        assert r.returncode == 0, r.stderr
        result = json.loads(r.stdout)
        assert result["engine"] == "postgres"
        assert result["tables"]["users"] == rows(source["db"], "users")
    r = run(["backup", "drill"], {**env, "HEXA_BACKUP_DIR": str(tmp_path / "none")})
    one_line_failure(r, "no backup")


def test_a_terminal_gets_a_human_summary_and_scripts_get_json(source: dict[str, Path]) -> None:
    """On a terminal (a pty) the command speaks to a person (and may draw a progress bar);
    piped, it prints one JSON object and no progress."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [*HEXA, "backup", "verify", str(source["backup"])],
        env={**os.environ, "HEXA_BACKUP_KEY": KEY, "HEXA_DATA_DIR": str(source["data"])},
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    output = b""
    while True:
        try:
            block = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not block:
            break
        output += block
    os.close(master)
    assert proc.wait(60) == 0
    text = output.decode(errors="replace")
    assert "is intact" in text and "every checksum matches" in text
    assert '"ok": true' not in text
    piped = run(["backup", "verify", str(source["backup"])], {"HEXA_DATA_DIR": str(source["data"])})
    assert json.loads(piped.stdout)["ok"] is True and piped.stderr == ""


def test_an_older_schema_is_restored_then_migrated(tmp_path: Path) -> None:
    """A backup of a database one migration behind this hub restores into an empty database
    brought to that schema first; the later migration is applied after the rows are in."""
    known = backup.known_migrations()
    old = tmp_path / "old"
    env = {"HEXA_DATA_DIR": str(old)}
    assert run(["migrate"], env).returncode == 0
    assert run(["migrate", "--down", "1"], env).returncode == 0
    with contextlib.closing(sqlite3.connect(old / "hexa.db")) as c:
        c.execute(
            "INSERT INTO organizations (id, name, personal, created_at, updated_at) VALUES "
            "('00000000-0000-4000-8000-0000000000aa', 'Old', 0, "
            "'2026-01-01 00:00:00+00:00', '2026-01-01 00:00:00+00:00')"
        )
        c.commit()
    out = tmp_path / "old.hexabak"
    r = run(["backup", "create", "--out", str(out)], env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["schema"] == known[-2]
    new = tmp_path / "new"
    r = run(["backup", "restore", str(out)], {"HEXA_DATA_DIR": str(new)})
    assert r.returncode == 0, r.stderr
    restored = json.loads(r.stdout)
    assert restored["schema"] == known[-2] and restored["migrated_to"] == known[-1]
    assert rows(new / "hexa.db", "organizations") == 1


def test_an_unreachable_database_is_one_line(source: dict[str, Path], tmp_path: Path) -> None:
    """A target database that does not exist (or refuses) is one line, not a traceback."""
    from support.databases import PG_URL, pg_unreachable

    if pg_unreachable():
        pytest.skip("PostgreSQL unreachable")
    missing = PG_URL.rsplit("/", 1)[0] + "/hexa_no_such_database_here"
    env = {"HEXA_DATA_DIR": str(tmp_path), "HEXA_DATABASE_URL": missing}
    one_line_failure(run(["backup", "restore", str(source["backup"])], env), "database")
    one_line_failure(run(["backup", "create", "--out", str(tmp_path / "x")], env), "database")
