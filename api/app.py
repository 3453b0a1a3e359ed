"""``create_app(hub)``: the FastAPI application over one running hub."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, FastAPI

from hexa.api import errors
from hexa.api.middleware import HttpMetrics, Idempotency, RequestContext
from hexa.api.routers import (
    admin,
    audit,
    auth,
    automations,
    devices,
    health,
    integrations,
    invitations,
    schedules,
    tenancy,
)
from hexa.api.schemas import refuse_nul_in_query
from hexa.api.ws import client_gateway, device_gateway
from hexa.hub import __version__

if TYPE_CHECKING:
    from hexa.hub.runtime import Hub


def create_app(hub: Hub) -> FastAPI:
    app = FastAPI(
        title="Hexa Hub",
        version=__version__,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.hub = hub
    app.state.device_sessions = device_gateway.DeviceSessions(hub)
    app.state.client_sessions = client_gateway.ClientSessions(hub)
    hub.starters.append(app.state.device_sessions.start)
    hub.starters.append(app.state.client_sessions.start)
    errors.install(app)
    v1 = APIRouter(prefix="/api/v1", dependencies=[Depends(refuse_nul_in_query)])
    for module in (auth, tenancy, devices, integrations, schedules, automations, audit, admin):
        v1.include_router(module.router)
    v1.include_router(invitations.router)
    app.include_router(v1)
    app.include_router(health.router)
    app.include_router(device_gateway.router)
    app.include_router(client_gateway.router)
    settings = hub.settings
    assert settings.jwt_secret is not None
    # Starlette applies middleware in reverse order: the last added is the outermost.
    app.add_middleware(
        Idempotency,
        ttl_s=settings.idempotency_ttl_s,
        jwt_secret=settings.jwt_secret,
        wait_s=settings.command_timeout_s + 5,
    )
    app.add_middleware(HttpMetrics)
    app.add_middleware(
        RequestContext,
        max_body_bytes=settings.max_body_bytes,
        enforce_https=settings.enforce_https,
        trust_proxy=settings.trust_proxy,
    )
    return app
