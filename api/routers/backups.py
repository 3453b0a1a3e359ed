"""``/admin/backups``: a platform admin starts a backup now or lists the backup directory.
To anyone else these routes do not exist (404)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel

from hexa.api.deps import HubDep
from hexa.api.errors import request_id_of
from hexa.api.routers.admin import AdminDep

router = APIRouter(prefix="/admin/backups", tags=["admin"])


class BackupStarted(BaseModel):
    name: str
    status: str


class BackupFile(BaseModel):
    name: str
    size: int
    created_at: str
    #: SHA-256 of the whole file, as written
    checksum: str | None
    #: True once read back with every checksum matching, False if that failed, None if
    #: never verified
    verified: bool | None
    rows: int | None
    seconds: float | None


class BackupList(BaseModel):
    items: list[BackupFile]
    total: int
    limit: int
    offset: int
    has_next: bool
    has_prev: bool
    #: the file being written now, if any
    running: str | None
    #: the cron expression of scheduled backups (UTC), None when off
    schedule: str | None
    keep: int


@router.post("", status_code=202)
async def start_backup(principal: AdminDep, hub: HubDep, request: Request) -> BackupStarted:
    """Start a backup now; it is written, verified and listed when done (409
    ``backup_running`` while one is being written)."""
    name = hub.backups.request(actor_id=str(principal.id), request_id=request_id_of(request))
    return BackupStarted(name=name, status="running")


@router.get("")
async def list_backups(
    _: AdminDep,
    hub: HubDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> BackupList:
    """The backup files, newest first."""
    items = hub.backups.listing()
    page = items[offset : offset + limit]
    return BackupList(
        items=[BackupFile(**item) for item in page],
        total=len(items),
        limit=limit,
        offset=offset,
        has_next=offset + limit < len(items),
        has_prev=offset > 0,
        running=hub.backups.running,
        schedule=hub.settings.backup_schedule,
        keep=hub.settings.backup_keep,
    )
