"""The access log: one line per HTTP request, and per WebSocket its upgrade and its close.

Logger ``hexa.access`` at INFO. A line holds the method, the route *template* (never the
raw path, so no identifier or query string, and no secret in either, reaches the log),
the status, the duration, the request id, the user id when the request was
authenticated, and the client address (the proxy's client with ``HEXA_TRUST_PROXY``).
No header, query string or body is ever logged.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hexa.api.middleware import route_template

log = logging.getLogger("hexa.access")


def _user(scope: Scope) -> str | None:
    principal = scope.get("state", {}).get("principal")
    user = getattr(principal, "id", None)
    return None if user is None else str(user)


def _client(scope: Scope) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None


def _write(event: str, scope: Scope, status: int, begin: float, **more: Any) -> None:
    fields: dict[str, Any] = {
        "event": event,
        "method": scope.get("method", "GET"),
        "route": route_template(scope),
        "status": status,
        "duration_ms": round((time.perf_counter() - begin) * 1000, 2),
        "request_id": scope.get("state", {}).get("request_id"),
        "user_id": _user(scope),
        "client": _client(scope),
        **more,
    }
    text = " ".join(
        f"{key}={value}" for key, value in fields.items() if value is not None and key != "event"
    )
    log.info("%s %s", event, text, extra={"fields": fields})


class AccessLog:
    """Outermost middleware: times each request and writes its line when it is done,
    whatever the outcome (a crash is a 500 line)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        begin = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            _write("http", scope, status, begin)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        begin = time.perf_counter()
        accepted = False
        status: int | None = None
        close_code: int | None = None

        async def capture(message: Message) -> None:
            nonlocal accepted, status, close_code
            kind = message["type"]
            if kind == "websocket.accept":
                accepted, status = True, 101
                _write("ws_open", scope, 101, begin)
            elif kind == "websocket.close":
                close_code = message.get("code", 1000)
                if not accepted and status is None:
                    status = 403  # a close before the accept refuses the upgrade
            elif kind == "websocket.http.response.start":
                status = message["status"]
            await send(message)

        async def observe() -> Message:
            nonlocal close_code
            message: Message = await receive()
            if message["type"] == "websocket.disconnect" and close_code is None:
                close_code = message.get("code", 1005)
            return message

        try:
            await self.app(scope, observe, capture)
        finally:
            if accepted:
                _write("ws_close", scope, 101, begin, close_code=close_code)
            else:
                _write("ws_refused", scope, status or 500, begin)
