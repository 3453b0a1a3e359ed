"""Health, readiness, version and metrics (outside ``/api/v1``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from hexa.api.deps import HubDep
from hexa.hub import __version__
from hexa.hub.db import ping

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(hub: HubDep) -> JSONResponse:
    """Liveness plus a database ping."""
    db_ok = await ping()
    body = {"status": "ok" if db_ok else "degraded", "database": db_ok, "version": __version__}
    return JSONResponse(body, status_code=200 if db_ok else 503)


@router.get("/healthz")
async def healthz() -> dict[str, Any]:
    """Liveness only: the process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(hub: HubDep) -> JSONResponse:
    """Ready when the database answers and the bus is connected."""
    db_ok = await ping()
    bus_ok = hub.bus_ready()
    ready = db_ok and bus_ok
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "database": db_ok, "bus": bus_ok},
        status_code=200 if ready else 503,
    )


@router.get("/version")
async def version() -> dict[str, Any]:
    return {"version": __version__, "api": "v1"}


@router.get("/metrics")
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
