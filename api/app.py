"""``create_app(hub)``: the FastAPI application over one running hub."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.openapi.utils import get_openapi

from hexa.api import errors
from hexa.api.access_log import AccessLog
from hexa.api.edge import Cors, Edge, install_docs
from hexa.api.middleware import (
    HttpMetrics,
    Idempotency,
    RequestContext,
    purge_idempotency_forever,
)
from hexa.api.routers import (
    admin,
    alert_drills,
    audit,
    auth,
    automations,
    backups,
    devices,
    health,
    homekit,
    integrations,
    invitations,
    ota,
    schedules,
    tenancy,
)
from hexa.api.schemas import refuse_nul_in_query
from hexa.api.ws import client_gateway, device_gateway
from hexa.hub import __version__

if TYPE_CHECKING:
    from hexa.hub.runtime import Hub, Service


#: every error answer has this shape (api/errors.py)
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["code", "message", "details", "request_id"],
    "properties": {
        "code": {"type": "string"},
        "message": {"type": "string"},
        "details": {"anyOf": [{"type": "object"}, {"type": "null"}]},
        "request_id": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
}

#: error status → what it means; which operations answer which is in ``_error_statuses``
ERRORS: dict[str, str] = {
    "400": "validation_error: a parameter or the body is invalid",
    "401": "unauthorized: credentials are missing, expired or wrong",
    "403": "forbidden: the role is too low",
    "404": "not_found: no such route or object (another tenant's objects included)",
    "409": "conflict: a duplicate, or an Idempotency-Key reused with another request",
    "413": "payload_too_large: the body exceeds HEXA_MAX_BODY_BYTES",
    "422": "command_rejected: the device refused the command",
    "426": "https_required: plain HTTP while HEXA_ENFORCE_HTTPS is on (Upgrade: TLS/1.2)",
    "429": "rate_limited: wait for Retry-After seconds",
    "503": "device_offline or bus_unavailable (readyz: not ready)",
    "504": "device_timeout: the device did not acknowledge in time",
}


def _error_statuses(path: str, method: str) -> list[str]:
    if not path.startswith("/api/v1/"):
        return ["426", "503"] if path == "/readyz" else ["426"]
    statuses = ["400", "401", "403", "404", "426"]
    if method in ("post", "put", "patch", "delete"):
        statuses += ["409", "413"]
    if path.endswith("/auth/login") or "/relays" in path or path.endswith("/run"):
        statuses.append("429")
    if "/relays" in path or path.endswith("/run"):
        statuses += ["422", "503", "504"]
    return statuses


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's generated document, with the error answers this API really gives: 400
    ``validation_error`` instead of FastAPI's 422, and every error with the error schema."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas["Error"] = ERROR_SCHEMA
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path, item in doc.get("paths", {}).items():
        for method, operation in item.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for status in _error_statuses(path, method):
                answer: dict[str, Any] = {"description": ERRORS[status], "content": ref}
                if status == "429":
                    answer["headers"] = {
                        "Retry-After": {"schema": {"type": "integer", "minimum": 1}}
                    }
                responses.setdefault(status, answer)
    # Prometheus' text format, not JSON
    metrics = doc.get("paths", {}).get("/metrics", {}).get("get")
    if metrics is not None:
        text = {"text/plain": {"schema": {"type": "string"}}}
        metrics["responses"]["200"]["content"] = text
    app.openapi_schema = doc
    return doc


def create_app(hub: Hub, routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The API over ``hub``; ``routers`` are extra ``/api/v1`` routes the composition root
    hands in (the bridges' HTTP endpoints: the API does not import bridges)."""
    app = FastAPI(
        title="Hexa Hub",
        version=__version__,
        docs_url=None,  # install_docs: Swagger UI with its Content-Security-Policy
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.hub = hub
    # a firmware upload is streamed to disk: its limit is HEXA_OTA_MAX_BYTES (413 above it)
    # plus room for the form's other fields (api/middleware.py reads it)
    app.state.body_limits = {
        ("POST", "/api/v1/ota/releases"): hub.settings.ota_max_bytes + 256 * 1024
    }
    app.state.device_sessions = device_gateway.DeviceSessions(hub)
    app.state.client_sessions = client_gateway.ClientSessions(hub)
    errors.install(app)
    app.openapi = lambda: openapi_document(app)  # type: ignore[method-assign]
    v1 = APIRouter(prefix="/api/v1", dependencies=[Depends(refuse_nul_in_query)])
    # routes are matched in order, one by one (about 15 µs per route passed): the routes a
    # whole fleet calls (OTA check, manifest, artifact, report) first, then the devices'
    # (relay commands, state). No path of a router overlaps another router's.
    v1.include_router(ota.router)
    v1.include_router(devices.router)
    for module in (auth, tenancy, integrations, schedules, automations, audit, admin):
        v1.include_router(module.router)
    v1.include_router(alert_drills.router)
    v1.include_router(homekit.router)
    v1.include_router(invitations.router)
    v1.include_router(backups.router)
    for extra in routers:
        v1.include_router(extra)
    # health probes and /metrics first: matched before the /api/v1 routes' scan
    app.include_router(health.router)
    app.include_router(v1)
    app.include_router(device_gateway.router)
    app.include_router(client_gateway.router)
    install_docs(app)
    # the fleet's check and manifest requests, ahead of every route (api/routers/ota.py)
    ota.install_fast_routes(app)
    settings = hub.settings
    assert settings.jwt_secret is not None
    # Starlette applies middleware in reverse order: the last added is the outermost.
    app.add_middleware(
        Idempotency,
        ttl_s=settings.idempotency_ttl_s,
        jwt_secret=settings.jwt_secret,
        wait_s=settings.command_timeout_s + 5,
    )
    if settings.cors_origins:
        app.add_middleware(Cors, origins=settings.cors_origins)
    app.add_middleware(
        RequestContext,
        max_body_bytes=settings.max_body_bytes,
        edge=Edge(trusted=settings.trust_proxy, enforce_https=settings.enforce_https),
    )
    app.add_middleware(HttpMetrics)  # outside RequestContext: its 426 and 413 are counted
    if settings.access_log:
        app.add_middleware(AccessLog)
    return app


def services(app: FastAPI) -> list[Service]:
    """The API's long-running services, for the hub's task group: the WebSocket
    gateways and the idempotency store's purge."""
    return [
        app.state.device_sessions.run,
        app.state.client_sessions.run,
        purge_idempotency_forever,
    ]
