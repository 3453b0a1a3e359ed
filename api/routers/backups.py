"""``/admin/backups``: a platform admin starts a backup now or lists the backup directory.
To anyone else these routes do not exist (404)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel

from hexa.api.deps import HubDep
from hexa.api.errors import request_id_of
from hexa.api.routers.admin import AdminDep
from hexa.api.schemas import Page

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
) -> Page[BackupFile]:
    """The backup files of HEXA_BACKUP_DIR, newest first (a backup being written is
    listed once it is complete)."""
    items = hub.backups.listing()
    page = items[offset : offset + limit]
    return Page[BackupFile](
        items=[BackupFile(**item) for item in page],
        total=len(items),
        limit=limit,
        offset=offset,
        has_next=offset + limit < len(items),
        has_prev=offset > 0,
    )
