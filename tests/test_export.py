"""`hexa export` / `hexa export verify` / `hexa import`: one organization as JSON lines with
checksums, no secret in it, imported all or nothing and idempotently, ids remapped where
another organization has them."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

from support.accounts import register
from support.checks import ok
from support.cli import hexa_cli as hexa
from support.devices import claimed_device
from support.hubs import RunningHub


def one_line_failure(r: subprocess.CompletedProcess[str], needle: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr


def counts(db: Path, org_id: str) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(db)) as c:
        return {
            table: int(
                c.execute(
                    f'SELECT count(*) FROM "{table}" WHERE org_id = ?',  # noqa: S608
                    (org_id,),
                ).fetchone()[0]
            )
            for table in ("sites", "devices", "schedules", "automations", "audit_log")
        }


def new_target(tmp: Path, email: str) -> tuple[Path, str]:
    """A fresh SQLite hub database with one organization (the admin's own); its id."""
    r = hexa(
        ["admin", "create", "--email", email, "--password", "pw-0123456789"],
        {"HEXA_DATA_DIR": str(tmp)},
    )
    assert r.returncode == 0, r.stderr
    with contextlib.closing(sqlite3.connect(tmp / "hexa.db")) as c:
        (org,) = c.execute("SELECT id FROM organizations").fetchone()
    return tmp / "hexa.db", str(org)


def test_export_verify_and_idempotent_import(hub: RunningHub, tmp_path: Path) -> None:
    """An organization exported from a running hub verifies, holds no secret, imports into
    another hub's organization, and importing again changes nothing; a second organization
    there gets remapped ids; an object deleted in the target comes back alone."""
    user = register(hub)
    provisioned, device = claimed_device(hub, user)
    with hub.api(user.access_token) as c:
        site = ok(c.post(f"/orgs/{user.org_id}/sites", json={"name": "Home"}), 201)
        ok(
            c.post(
                "/schedules",
                json={
                    "device_id": device["id"],
                    "name": "Porch light",
                    "cron": "0 0 1 1 *",
                    "timezone": "UTC",
                    "action": {"type": "set_relay", "relay_index": 0, "state": True},
                },
            ),
            201,
        )
    source = {
        "HEXA_DATA_DIR": str(hub.settings.data_dir),
        "HEXA_DATABASE_URL": hub.settings.resolved_database_url,
    }
    out = tmp_path / "org.jsonl"
    r = hexa(["export", "--org", user.org_id, "--out", str(out)], source)
    assert r.returncode == 0, r.stderr
    exported: dict[str, Any] = json.loads(r.stdout)
    assert exported["counts"]["device"] == 1 and exported["counts"]["schedule"] == 1
    assert exported["counts"]["site"] == 1 and exported["counts"]["audit"] >= 1
    text = out.read_text()
    for secret in ("token_hash", "claim_code_hash", "password", provisioned["device_token"]):
        assert secret not in text
    assert site["id"] in text
    r = hexa(["export", "verify", str(out)], {})
    assert r.returncode == 0 and json.loads(r.stdout)["records"] >= 5, r.stderr

    db, org = new_target(tmp_path / "target", "ops@hexa.test")
    env = {"HEXA_DATA_DIR": str(tmp_path / "target")}
    r = hexa(["import", str(out), "--org", org], env)
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)
    assert first["created"]["device"] == 1 and first["created"]["schedule"] == 1
    after_first = counts(db, org)
    assert after_first["devices"] == 1 and after_first["schedules"] == 1
    r = hexa(["import", str(out), "--org", org], env)
    assert r.returncode == 0, r.stderr
    assert sum(json.loads(r.stdout)["created"].values()) == 0
    assert counts(db, org) == after_first
    # an organization that already has some of the objects gets only the missing ones
    with contextlib.closing(sqlite3.connect(db)) as c:
        c.execute("DELETE FROM schedules WHERE org_id = ?", (org,))
        c.commit()
    r = hexa(["import", str(out), "--org", org], env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["created"] == {
        **dict.fromkeys(first["created"], 0),
        "schedule": 1,
    }
    assert counts(db, org) == after_first
    # another organization in the same hub: the ids are taken, so they are remapped; the
    # device is the first organization's (one physical device), so it and its schedule stay
    with contextlib.closing(sqlite3.connect(db)) as c:
        c.execute(
            "INSERT INTO organizations (id, name, personal, created_at, updated_at) "
            "VALUES ('00000000-0000-4000-8000-000000000002', 'Other', 0, "
            "'2026-01-01 00:00:00+00:00', '2026-01-01 00:00:00+00:00')"
        )
        c.commit()
    other = "00000000-0000-4000-8000-000000000002"
    r = hexa(["import", str(out), "--org", other], env)
    assert r.returncode == 0, r.stderr
    remapped = json.loads(r.stdout)
    assert remapped["created"]["site"] == 1 and remapped["skipped"]["device"] == 1
    assert counts(db, other)["sites"] == 1 and counts(db, org) == after_first


def test_edited_export_and_bad_imports_are_refused(hub: RunningHub, tmp_path: Path) -> None:
    """An export edited by hand, a truncated one, an unknown organization: one line each,
    exit 2, and the target database is as it was."""
    user = register(hub)
    claimed_device(hub, user)
    out = tmp_path / "org.jsonl"
    source = {
        "HEXA_DATA_DIR": str(hub.settings.data_dir),
        "HEXA_DATABASE_URL": hub.settings.resolved_database_url,
    }
    assert hexa(["export", "--org", user.org_id, "--out", str(out)], source).returncode == 0
    db, org = new_target(tmp_path / "target", "ops@hexa.test")
    env = {"HEXA_DATA_DIR": str(tmp_path / "target")}
    before = counts(db, org)
    lines = out.read_text().splitlines(keepends=True)
    edited = tmp_path / "edited.jsonl"
    record = json.loads(lines[1])
    record["data"]["name"] = "Renamed by hand"
    edited.write_text("".join([lines[0], json.dumps(record) + "\n", *lines[2:]]))
    one_line_failure(hexa(["export", "verify", str(edited)], {}), "was changed")
    one_line_failure(hexa(["import", str(edited), "--org", org], env), "was changed")
    truncated = tmp_path / "truncated.jsonl"
    truncated.write_text("".join(lines[:-1]))
    one_line_failure(hexa(["export", "verify", str(truncated)], {}), "truncated")
    one_line_failure(
        hexa(["import", str(out), "--org", "00000000-0000-4000-8000-00000000dead"], env),
        "no organization",
    )
    one_line_failure(hexa(["import", str(out), "--org", "not-a-uuid"], env), "not an organization")
    one_line_failure(hexa(["export", "verify", str(tmp_path / "missing.jsonl")], {}), "cannot read")
    assert counts(db, org) == before
