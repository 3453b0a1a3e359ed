"""The error contract: one table from error types to HTTP status, one JSON shape."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hexa.hub import errors

log = logging.getLogger(__name__)

#: domain error → HTTP status. Routes never catch domain errors to reformat them.
STATUS: dict[type[errors.HubError], int] = {
    errors.ValidationFailed: 400,
    errors.Unauthorized: 401,
    errors.Forbidden: 403,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.RateLimited: 429,
    errors.CommandRejected: 422,
    errors.DeviceOffline: 503,
    errors.BusUnavailable: 503,
    errors.DeviceTimeout: 504,
}

_HTTP_CODES = {
    400: "validation_error",  # FastAPI's own 400: a body it cannot parse (e.g. not UTF-8)
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None) or request.scope.get("state", {}).get(
        "request_id"
    )


def error_body(
    code: str, message: str, request_id: str | None, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"code": code, "message": message, "details": details, "request_id": request_id}


def error_response(
    request: Request,
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(code, message, request_id_of(request), details), status, headers=headers
    )


def status_for(exc: errors.HubError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


async def _hub_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.HubError)
    headers: dict[str, str] | None = None
    if isinstance(exc, errors.RateLimited):
        headers = {"Retry-After": str(exc.retry_after_s)}
    if isinstance(exc, errors.Unauthorized):
        headers = {"WWW-Authenticate": "Bearer"}
    return error_response(request, status_for(exc), exc.code, exc.message, exc.details, headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    if exc.status_code == 404:
        message = "no such route"
    headers = dict(exc.headers) if exc.headers else None
    return error_response(request, exc.status_code, code, message, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        problems.append(
            {"field": ".".join(loc[1:] or loc), "in": loc[0] if loc else "", "message": err["msg"]}
        )
    first = problems[0] if problems else {"field": "", "message": "invalid request"}
    message = f"{first['field']}: {first['message']}" if first["field"] else first["message"]
    return error_response(request, 400, "validation_error", message, {"errors": problems})


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(request, 500, "internal_error", "internal server error")


def install(app: FastAPI) -> None:
    app.add_exception_handler(errors.HubError, _hub_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
