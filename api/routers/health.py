"""Health, readiness, version and metrics (outside ``/api/v1``)."""

from __future__ import annotations

from typing import Literal

import anyio
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from hexa.api.deps import HubDep
from hexa.hub import __version__
from hexa.hub import metrics as hub_metrics
from hexa.hub.db import ping

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    database: bool
    version: str


class Liveness(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    database: bool
    bus: bool


class Version(BaseModel):
    version: str
    api: Literal["v1"]


@router.get(
    "/health",
    response_model=Health,
    responses={503: {"model": Health, "description": "the database does not answer"}},
)
async def health() -> JSONResponse:
    """Liveness plus a database ping."""
    db_ok = await ping()
    body = Health(status="ok" if db_ok else "degraded", database=db_ok, version=__version__)
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if db_ok else 503)


@router.get("/healthz")
async def healthz() -> Liveness:
    """Liveness only: the process answers."""
    return Liveness(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "the database or the bus is down"}},
)
async def readyz(hub: HubDep) -> JSONResponse:
    """Ready when the database answers and the bus is connected."""
    db_ok = await ping()
    bus_ok = hub.bus_ready()
    ready = db_ok and bus_ok
    body = Readiness(status="ready" if ready else "not_ready", database=db_ok, bus=bus_ok)
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ready else 503)


@router.get("/version")
async def version() -> Version:
    return Version(version=__version__, api="v1")


@router.get("/metrics")
async def metrics(hub: HubDep) -> Response:
    """Prometheus metrics in its text format (``/openapi.json`` says so: see api/app.py)."""
    if hub_metrics.hub_down_simulated():
        return Response("alert drill: HexaHubDown\n", status_code=503, media_type="text/plain")
    await hub_metrics.refresh_at_scrape(bus_connected=hub.bus_ready())
    # in a worker thread: with 10 000 devices connected, counting the process's open file
    # descriptors (/proc/self/fd) and the broker's sessions takes 25-35 ms, which held
    # every request and device of the event loop for each scrape
    body = await anyio.to_thread.run_sync(generate_latest)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
