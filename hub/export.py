"""Export one organization as JSON lines, and import such a file into an organization.

The file: a header line, then one line per object (``{"type": …, "data": {…}}``) in the
order org, sites, areas, devices, schedules, automations, audit; then a manifest line with
each type's count and SHA-256 (over its lines) and the SHA-256 of everything before it.
Secrets are never exported: no token or claim-code hashes, no password hashes, no HomeKit
keys, no integration tokens, no users (members are people, not the organization's data).

Import is all or nothing (one transaction) and idempotent: an object already in the target
organization is skipped; an id that another organization already uses is remapped to a new
id derived from the target organization and the old id (the same on every run, so running
it twice changes nothing). Imported devices get no usable token: rotate it
(``POST /devices/{id}/token/rotate``) and give it to the device.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
from tortoise.exceptions import IntegrityError, OperationalError
from tortoise.models import Model
from tortoise.transactions import in_transaction

from hexa.hub import __version__, backup_registry
from hexa.hub.errors import HubError
from hexa.models import Area, AuditEntry, Automation, Device, Organization, Schedule, Site

FORMAT = "hexa-org-export"
VERSION = 1
BATCH = 1000
#: object types in file order, with their models
TYPES: dict[str, type[Model]] = {
    "org": Organization,
    "site": Site,
    "area": Area,
    "device": Device,
    "schedule": Schedule,
    "automation": Automation,
    "audit": AuditEntry,
}
#: columns never exported (secrets); on import they get fresh unusable values
SECRET_COLUMNS = frozenset(
    {"token_hash", "claim_code_hash", "password_hash", "hap_state", "setup_code"}
)

Progress = Callable[[str, int, int | None], None]


def _no_progress(_what: str, _done: int, _total: int | None) -> None:
    return None


class ExportError(HubError):
    """An export cannot be written, or a file cannot be imported; one line."""

    code = "export_error"


def _columns(model: type[Model]) -> dict[str, str]:
    """Exported column → kind."""
    table = next(t for t in backup_registry.tables() if t.model == model.__name__)
    return {c.name: c.kind for c in table.columns if c.name not in SECRET_COLUMNS}


def _in(kind: str, value: Any) -> Any:
    if value is None:
        return None
    if kind == "uuid":
        return uuid.UUID(str(value))
    if kind == "datetime":
        return dt.datetime.fromisoformat(str(value))
    return value


def _org_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise ExportError(f"--org {text!r} is not an organization id (a UUID)") from None


def _select(kind: str, columns: list[str], *, count: bool = False) -> str:
    """The query of one object type of an organization (its id is the one parameter)."""
    table = TYPES[kind]._meta.db_table
    what = "count(*)" if count else ", ".join(f't."{c}"' for c in columns)
    if kind == "area":
        return (
            f'SELECT {what} FROM "{table}" t JOIN "sites" s ON t.site_id = s.id '  # noqa: S608
            "WHERE s.org_id = ?"
        )
    where = "t.id = ?" if kind == "org" else "t.org_id = ?"
    return f'SELECT {what} FROM "{table}" t WHERE {where}'  # noqa: S608 (names from the ORM)


def export_org(
    database_url: str, org: str, out: Path, *, progress: Progress = _no_progress
) -> dict[str, Any]:
    """Write organization ``org`` to ``out`` (through a temporary file, renamed when done),
    read in one read transaction, like a backup: a consistent snapshot of a running hub."""
    from hexa.hub.backup import Snapshot, portable

    org_id = _org_id(org)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.partial")
    counts: dict[str, int] = {}
    try:
        with Snapshot(database_url) as snap:
            if not next(snap.select(_select("org", [], count=True), org_id))[0]:
                raise ExportError(f"no organization {org_id} in this hub's database")
            total = sum(
                int(next(snap.select(_select(kind, [], count=True), org_id))[0]) for kind in TYPES
            )
            whole = hashlib.sha256()
            sums: dict[str, str] = {}
            done = 0
            with open(tmp, "xb") as f:
                os.chmod(tmp, 0o600)  # the organization's data: readable by its owner only
                head = (
                    orjson.dumps(
                        {
                            "kind": FORMAT,
                            "format": VERSION,
                            "org_id": str(org_id),
                            "created_at": dt.datetime.now(dt.UTC).isoformat(),
                            "hub_version": __version__,
                        }
                    )
                    + b"\n"
                )
                whole.update(head)
                f.write(head)
                for kind in TYPES:
                    kinds = _columns(TYPES[kind])
                    names = list(kinds)
                    convert = portable(list(kinds.values()))
                    sha = hashlib.sha256()
                    n = 0
                    for row in snap.select(_select(kind, names), org_id):
                        data = dict(zip(names, convert(row), strict=True))
                        line = orjson.dumps({"type": kind, "data": data}) + b"\n"
                        sha.update(line)
                        whole.update(line)
                        f.write(line)
                        n += 1
                        done += 1
                        if done % 1000 == 0:
                            progress("objects", done, total)
                    counts[kind] = n
                    sums[kind] = sha.hexdigest()
                progress("objects", done, total)
                manifest = {
                    "kind": "manifest",
                    "counts": counts,
                    "sha256": sums,
                    "file_sha256": whole.hexdigest(),
                }
                f.write(orjson.dumps(manifest) + b"\n")
            tmp.replace(out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"cannot write {out}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"org_id": str(org_id), "counts": counts}


def _read(path: Path) -> Iterator[bytes]:
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise ExportError(f"cannot read {path}: {exc.strerror or exc}") from None
    with f:
        yield from f


def verify_export(path: Path, *, progress: Progress = _no_progress) -> dict[str, Any]:
    """Check an export's structure, counts and checksums; raises :class:`ExportError`."""
    whole = hashlib.sha256()
    sums = {kind: hashlib.sha256() for kind in TYPES}
    counts = dict.fromkeys(TYPES, 0)
    header: dict[str, Any] | None = None
    manifest: dict[str, Any] | None = None
    order = list(TYPES)
    at = 0
    for number, line in enumerate(_read(path), 1):
        if manifest is not None:
            raise ExportError(f"{path} is damaged: line {number} follows the manifest")
        if not line.endswith(b"\n"):
            raise ExportError(f"{path} is truncated (line {number} is incomplete)")
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise ExportError(f"{path} is damaged: line {number} is not JSON") from None
        if not isinstance(record, dict):
            raise ExportError(f"{path} is damaged: line {number} is not an object")
        if header is None:
            if record.get("kind") != FORMAT or record.get("format") != VERSION:
                raise ExportError(f"{path} is not a Hexa organization export (format {VERSION})")
            header = record
            whole.update(line)
            continue
        if record.get("kind") == "manifest":
            manifest = record
            continue
        kind = record.get("type")
        if kind not in TYPES or not isinstance(record.get("data"), dict):
            raise ExportError(f"{path} is damaged: line {number} is not an object record")
        if order.index(kind) < at:
            raise ExportError(f"{path} is damaged: line {number} is out of order")
        at = order.index(kind)
        sums[kind].update(line)
        whole.update(line)
        counts[kind] += 1
        if number % 1000 == 0:
            progress("lines", number, None)
    if header is None:
        raise ExportError(f"{path} is empty")
    if manifest is None:
        raise ExportError(f"{path} is truncated (no manifest)")
    if manifest.get("counts") != counts:
        raise ExportError(f"{path} was changed: its object counts do not match the manifest")
    for kind in TYPES:
        if manifest.get("sha256", {}).get(kind) != sums[kind].hexdigest():
            raise ExportError(f"{path} was changed: checksum mismatch in its {kind} objects")
    if manifest.get("file_sha256") != whole.hexdigest():
        raise ExportError(f"{path} was changed: its checksum does not match")
    return {"org_id": header.get("org_id"), "counts": counts, "records": sum(counts.values())}


def _records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for line in _read(path):
        record = json.loads(line)
        if "type" in record:
            yield record["type"], record["data"]


async def import_org(
    database_url: str, path: Path, org: str, *, progress: Progress = _no_progress
) -> dict[str, Any]:
    """Import an export into organization ``org`` (which must exist), all or nothing."""
    from hexa.hub import db

    target = _org_id(org)
    summary = verify_export(path)  # a changed or damaged file touches nothing
    created = dict.fromkeys(TYPES, 0)
    skipped = dict.fromkeys(TYPES, 0)
    async with db.database(database_url):
        if not await Organization.exists(id=target):
            raise ExportError(f"no organization {target}: create it first, then import into it")
        try:
            await _import_all(path, target, summary, created, skipped, progress)
        except (IntegrityError, OperationalError) as exc:
            raise ExportError(f"the import was rolled back, nothing changed: {exc}") from None
    return {"org_id": str(target), "created": created, "skipped": skipped}


async def _import_all(
    path: Path,
    target: uuid.UUID,
    summary: dict[str, Any],
    created: dict[str, int],
    skipped: dict[str, int],
    progress: Progress,
) -> None:
    ids: dict[str, str | None] = {}
    async with in_transaction():
        ids[str(summary["org_id"])] = str(target)
        batch: list[tuple[str, dict[str, Any]]] = []
        done = 0
        for kind, data in _records(path):
            if kind == "org":
                skipped[kind] += 1
                continue
            if batch and batch[0][0] != kind:
                await _import_batch(batch, target, ids, created, skipped)
                batch = []
            batch.append((kind, data))
            if len(batch) >= BATCH:
                await _import_batch(batch, target, ids, created, skipped)
                batch = []
            done += 1
            if done % 1000 == 0:
                progress("objects", done, summary["records"])
        if batch:
            await _import_batch(batch, target, ids, created, skipped)


def _new_id(target: uuid.UUID, old: str) -> str:
    """The id an object gets when its own is taken elsewhere: the same on every run."""
    return str(uuid.uuid5(target, old))


async def _owners(kind: str, obj_ids: list[str]) -> dict[str, uuid.UUID | None]:
    """The organization of each object of ``kind`` among ``obj_ids`` that exists (an
    object missing from the answer does not exist; None: in no organization)."""
    if kind == "area":
        rows = await Area.filter(id__in=obj_ids).values_list("id", "site__org_id")
    else:
        rows = await TYPES[kind].filter(id__in=obj_ids).values_list("id", "org_id")
    return {str(obj): None if owner is None else uuid.UUID(str(owner)) for obj, owner in rows}


async def _import_batch(
    batch: list[tuple[str, dict[str, Any]]],
    target: uuid.UUID,
    ids: dict[str, str | None],
    created: dict[str, int],
    skipped: dict[str, int],
) -> None:
    """Create the objects of ``batch`` (all of one type) that the target lacks; ``ids``
    maps exported ids to the ids used here (None: the object could not be imported, so
    objects that depend on it are skipped too)."""
    kind = batch[0][0]
    model = TYPES[kind]
    columns = _columns(model)
    fresh: list[Model] = []
    owners = await _owners(kind, [str(data["id"]) for _kind, data in batch])
    taken = [old for old, owner in owners.items() if owner != target]
    remapped = await _owners(kind, [_new_id(target, old) for old in taken])
    for _kind, data in batch:
        old = str(data["id"])
        new = old
        exists = old in owners
        if exists and owners[old] != target:
            new = _new_id(target, old)  # the id is another organization's: remap
            exists = new in remapped
        if kind != "audit":  # nothing refers to audit entries: keep the map small
            ids[old] = new
        if exists:
            skipped[kind] += 1  # already in the target organization
            continue
        values = {name: data.get(name) for name in columns}
        values["id"] = new
        if "org_id" in values:
            values["org_id"] = str(target)
        lost = False
        for ref in ("site_id", "area_id", "device_id", "automation_id", "schedule_id"):
            if values.get(ref) is not None and str(values[ref]) in ids:
                values[ref] = ids[str(values[ref])]
                lost = lost or values[ref] is None
        if lost and kind in ("schedule", "automation"):
            skipped[kind] += 1  # its device could not be imported
            continue
        if kind == "device":
            existing = await Device.filter(device_uid=values["device_uid"]).first()
            if existing is not None:
                # the physical device is registered here already: in this organization it
                # stands for the exported one; elsewhere it cannot be taken
                ids[old] = str(existing.id) if existing.org_id == target else None
                skipped[kind] += 1
                continue
            values["token_hash"] = hashlib.sha256(secrets.token_bytes(32)).hexdigest()
            values["online"] = False
        if kind == "automation":
            for name in ("trigger", "conditions", "actions"):
                text = json.dumps(values.get(name))
                for before, after in ids.items():
                    if after is not None and before != after and before in text:
                        text = text.replace(before, after)
                values[name] = json.loads(text)
        fresh.append(
            model(**{name: _in(columns.get(name, "text"), v) for name, v in values.items()})
        )
    if fresh:
        await model.bulk_create(fresh)
        created[kind] += len(fresh)
