"""Backup benchmark: seed a hub database, then time `hexa backup create`, `verify`,
`restore` (into a fresh database) and `drill`, each a separate process whose peak
resident memory is sampled. Prints one JSON object; see scripts/bench-backup."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import secrets
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from hexa.hub import backup, backup_registry, db

PG = os.environ.get("HEXA_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres")
KEY = "bench-backup-key-" + "0" * 32


def _value(kind: str, column: str, i: int, now: str) -> Any:
    if kind == "uuid":
        return str(uuid.uuid4())
    if kind == "datetime":
        return now
    if kind == "bool":
        return False
    if kind == "json":
        return {"source": "bench", "n": i, "relays": [True, False, True]}
    if kind in ("int", "float"):
        return 1
    return f"x{i % 100}"  # fits every VARCHAR the models declare


def _rows(table: backup_registry.Table, n: int, fixed: dict[str, Any]) -> Iterator[list[Any]]:
    now = dt.datetime.now(dt.UTC).isoformat()
    for i in range(n):
        row = []
        for c in table.columns:
            if c.name in fixed:
                value = fixed[c.name](i) if callable(fixed[c.name]) else fixed[c.name]
            else:
                value = _value(c.kind, c.name, i, now)
            row.append(value)
        yield row


def seed(url: str, devices: int, schedules: int, audit: int) -> dict[str, int]:
    """Fill a migrated database with one organization, ``devices`` claimed devices,
    ``schedules`` schedules over them and ``audit`` audit entries."""
    asyncio.run(db.migrate_up(url))
    tables = {t.name: t for t in backup_registry.tables()}
    org = str(uuid.uuid4())
    device_ids = [str(uuid.uuid4()) for _ in range(devices)]
    plan: list[tuple[str, int, dict[str, Any]]] = [
        ("organizations", 1, {"id": org, "deleted_at": None}),
        (
            "devices",
            devices,
            {
                "id": lambda i: device_ids[i],
                "org_id": org,
                "site_id": None,
                "area_id": None,
                "deleted_at": None,
                "claim_code_hash": None,
                "device_uid": lambda i: f"hx-{i:08x}",
                "model": "hexa-mini-switch-v1",
                "relay_count": 3,
                "input_count": 3,
                "ota_release_id": None,
            },
        ),
        (
            "schedules",
            schedules,
            {
                "org_id": org,
                "device_id": lambda i: device_ids[i % devices],
                "cron": "0 7 * * *",
                "timezone": "UTC",
                "action": {"type": "set_relay", "relay_index": 0, "state": True},
            },
        ),
        (
            "audit_log",
            audit,
            {
                "org_id": org,
                "device_id": lambda i: device_ids[i % devices],
                "automation_id": None,
                "schedule_id": None,
                "action": "relay_set",
                "source": "api",
                "actor_type": "user",
            },
        ),
    ]
    engine = backup.engine_of(url)
    if engine == "sqlite":
        conn = sqlite3.connect(backup.sqlite_path(url))
        for name, n, fixed in plan:
            t = tables[name]
            kinds = [c.kind for c in t.columns]
            convert = backup._converter(kinds, backup._SQLITE_IN)
            cols = ", ".join(c.name for c in t.columns)
            marks = ", ".join("?" for _ in t.columns)
            sql = f'INSERT INTO "{name}" ({cols}) VALUES ({marks})'  # noqa: S608 (ORM names)
            conn.executemany(sql, (convert(r) for r in _rows(t, n, fixed)))
            conn.commit()
        conn.close()
    else:
        import asyncpg

        async def go() -> None:
            conn = await asyncpg.connect(backup.pg_dsn(url))
            for name, n, fixed in plan:
                t = tables[name]
                convert = backup._converter([c.kind for c in t.columns], backup._PG_IN)
                await conn.copy_records_to_table(
                    name,
                    records=(convert(r) for r in _rows(t, n, fixed)),
                    columns=[c.name for c in t.columns],
                )
            await conn.close()

        asyncio.run(go())
    return {name: n for name, n, _ in plan}


def timed(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``hexa ARGS``; wall time, peak RSS (sampled every 50 ms) and its JSON output."""
    started = time.perf_counter()
    proc = subprocess.Popen(  # noqa: S603 - our own command
        [sys.executable, "-m", "hexa.hub.cli", *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = 0
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"hexa {' '.join(args)} failed: {err.strip()}")
    return {
        "seconds": round(time.perf_counter() - started, 2),
        "peak_rss_mb": round(peak / 2**20, 1),
        "output": json.loads(out),
    }


def new_database(engine: str, tmp: Path) -> tuple[str, Any]:
    if engine == "sqlite":
        return f"sqlite://{tmp / f'bench-{secrets.token_hex(4)}.db'}", lambda: None
    import asyncpg

    name = f"hexa_bench_{secrets.token_hex(5)}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG)
        await conn.execute(sql)
        await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    return PG.rsplit("/", 1)[0] + "/" + name, lambda: asyncio.run(
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--schedules", type=int, default=20_000)
    parser.add_argument("--audit", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hexa-bench-backup-") as scratch:
        tmp = Path(scratch)
        source, drop_source = new_database(args.engine, tmp)
        target, drop_target = new_database(args.engine, tmp)
        try:
            started = time.perf_counter()
            seeded = seed(source, args.devices, args.schedules, args.audit)
            seed_s = time.perf_counter() - started
            out = tmp / "bench.hexabak"
            base = {"HEXA_BACKUP_KEY": KEY, "HEXA_LOG_LEVEL": "WARNING"}
            src_env = {**base, "HEXA_DATA_DIR": str(tmp / "src"), "HEXA_DATABASE_URL": source}
            create = timed(["backup", "create", "--out", str(out)], src_env)
            verify = timed(["backup", "verify", str(out)], src_env)
            dst_env = {**base, "HEXA_DATA_DIR": str(tmp / "dst"), "HEXA_DATABASE_URL": target}
            restore = timed(["backup", "restore", str(out)], dst_env)
            drill = timed(["backup", "drill", str(out)], src_env)
            result = {
                "engine": args.engine,
                "seeded": seeded,
                "seed_seconds": round(seed_s, 1),
                "backup_bytes": out.stat().st_size,
                "create": {k: v for k, v in create.items() if k != "output"},
                "verify": {k: v for k, v in verify.items() if k != "output"},
                "restore": {k: v for k, v in restore.items() if k != "output"},
                "drill": {
                    "seconds": drill["seconds"],
                    "peak_rss_mb": drill["peak_rss_mb"],
                    "rto_seconds": drill["output"]["restore_seconds"],
                },
            }
        finally:
            drop_source()
            drop_target()
    print(json.dumps(result, indent=2))  # noqa: T201 - the result
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
