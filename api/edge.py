"""The hub's edge: who is asking and over what (trusted proxies), HTTPS enforcement,
security headers on every answer, opt-in CORS, and the API docs page with its own
Content-Security-Policy."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import re
from functools import lru_cache
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hexa.api.errors import error_body

if TYPE_CHECKING:
    from hexa.hub.config import Network

#: what a client on loopback may ask over plain HTTP under ``HEXA_ENFORCE_HTTPS``
PROBES = frozenset({"/health", "/healthz", "/readyz", "/metrics"})
HSTS = b"max-age=31536000"
#: every HTML page but the docs: nothing loads, nothing runs, nothing frames it
HTML_CSP = b"default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
_ALWAYS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]


class Edge:
    """Resolves the client and scheme of a request, refuses plain requests under
    enforcement, and adds the security headers to an answer's headers."""

    def __init__(self, *, trusted: tuple[Network, ...], enforce_https: bool) -> None:
        self.trusted = trusted
        self.enforce_https = enforce_https

    def _trusts(self, host: str) -> bool:
        return bool(self.trusted) and _is_in(host, self.trusted)

    def resolve(self, scope: Scope) -> None:
        """Believe ``X-Forwarded-Proto``/``X-Forwarded-For`` from a trusted peer only:
        ``scope['scheme']`` and ``scope['client']`` then say what the proxy saw. The
        client is the right-most ``X-Forwarded-For`` entry that is not a trusted proxy
        (entries left of it are the client's own say, and may be forged)."""
        client = scope.get("client")
        if not self.trusted or not client or not self._trusts(client[0]):
            return
        proto = forwarded = None
        for key, value in scope["headers"]:
            if key == b"x-forwarded-proto":
                proto = value.decode("latin-1").split(",")[-1].strip().lower()
            elif key == b"x-forwarded-for":
                forwarded = value.decode("latin-1")
        if proto in ("http", "https"):
            scope["scheme"] = proto if scope["type"] == "http" else proto.replace("http", "ws")
        if forwarded:
            hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
            for hop in reversed(hops):
                if not _is_address(hop):
                    break  # garbage from the left: stop at the last good hop
                scope["client"] = (hop, 0)
                if not self._trusts(hop):
                    break

    def refuses(self, scope: Scope) -> bool:
        """Whether a request must be answered 426 (plain HTTP/WS under enforcement)."""
        if not self.enforce_https or scope["scheme"] in ("https", "wss"):
            return False
        client = scope.get("client")
        return not (scope["path"] in PROBES and client and _is_loopback(client[0]))

    @staticmethod
    def headers(scope: Scope, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """``headers`` with the security headers every answer carries."""
        out = [*headers, *_ALWAYS]
        if scope["scheme"] in ("https", "wss"):
            out.append((b"strict-transport-security", HSTS))
        csp = any(k == b"content-security-policy" for k, _ in headers)
        if not csp and any(k == b"content-type" and v.startswith(b"text/html") for k, v in headers):
            out.append((b"content-security-policy", HTML_CSP))
        return out


async def refuse(scope: Scope, send: Send, request_id: str) -> None:
    """426 ``https_required`` with ``Upgrade: TLS/1.2, HTTP/1.1``; for a WebSocket upgrade
    as its HTTP answer where the server can send one (else the upgrade is refused)."""
    body = json.dumps(error_body("https_required", "use HTTPS (or WSS)", request_id, None)).encode()
    headers = Edge.headers(
        scope,
        [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"upgrade", b"TLS/1.2, HTTP/1.1"),
            (b"connection", b"Upgrade"),
            (b"x-request-id", request_id.encode()),
        ],
    )
    if scope["type"] == "websocket":
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1008})
            return
        prefix = "websocket."
    else:
        prefix = ""
    await send({"type": f"{prefix}http.response.start", "status": 426, "headers": headers})
    await send({"type": f"{prefix}http.response.body", "body": body})


@lru_cache(maxsize=4096)
def _is_in(host: str, networks: tuple[Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in networks)


@lru_cache(maxsize=4096)
def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# --- CORS ----------------------------------------------------------------------------------

CORS_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
CORS_HEADERS = ("authorization", "content-type", "idempotency-key", "x-request-id")
CORS_EXPOSE = b"X-Request-ID, Idempotency-Replayed, Retry-After, Location"
CORS_MAX_AGE = b"600"


class Cors:
    """Opt-in CORS for the origins of ``HEXA_CORS_ORIGINS`` (``*``: any origin).

    Credentials travel in the ``Authorization`` header, never in cookies, so no answer
    allows credentials. A preflight from an origin not listed, or asking for a method or
    header the API does not take, is refused (403) without any CORS header; an actual
    request from such an origin is served without CORS headers (the browser withholds
    the answer from the page)."""

    def __init__(self, app: ASGIApp, *, origins: tuple[str, ...]) -> None:
        self.app = app
        self.any = "*" in origins
        self.origins = frozenset(o.lower() for o in origins)

    def _allowed(self, origin: str) -> bool:
        return self.any or origin.lower() in self.origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origin = asked = None
        for key, value in scope["headers"]:
            if key == b"origin":
                origin = value.decode("latin-1")
            elif key == b"access-control-request-method":
                asked = value.decode("latin-1")
        if origin is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS" and asked is not None:
            await self._preflight(scope, send, origin, asked)
            return
        if not self._allowed(origin):
            await self.app(scope, receive, send)
            return
        allow = b"*" if self.any else origin.encode("latin-1")

        async def with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    *message.get("headers", []),
                    (b"access-control-allow-origin", allow),
                    (b"access-control-expose-headers", CORS_EXPOSE),
                    (b"vary", b"Origin"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_cors)

    async def _preflight(self, scope: Scope, send: Send, origin: str, method: str) -> None:
        requested = ""
        for key, value in scope["headers"]:
            if key == b"access-control-request-headers":
                requested = value.decode("latin-1")
        wanted = {h.strip().lower() for h in requested.split(",") if h.strip()}
        if self._allowed(origin) and method.upper() in CORS_METHODS and wanted <= set(CORS_HEADERS):
            headers = [
                (b"access-control-allow-origin", b"*" if self.any else origin.encode("latin-1")),
                (b"access-control-allow-methods", ", ".join(CORS_METHODS).encode()),
                (b"access-control-allow-headers", ", ".join(CORS_HEADERS).encode()),
                (b"access-control-max-age", CORS_MAX_AGE),
                (b"vary", b"Origin"),
                (b"content-length", b"0"),
            ]
            await send({"type": "http.response.start", "status": 204, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        request_id = scope.get("state", {}).get("request_id")
        body = json.dumps(
            error_body("forbidden", "cross-origin request not allowed", request_id, None)
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"vary", b"Origin"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


# --- the docs page -------------------------------------------------------------------------

#: where Swagger UI's script, style sheet and icon come from (FastAPI's defaults)
DOCS_CDN = "https://cdn.jsdelivr.net"
DOCS_ICON = "https://fastapi.tiangolo.com"
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


def docs_csp(page: bytes) -> str:
    """The docs page's policy: Swagger UI's files from its CDN, its one inline script by
    hash (no other inline script runs), inline styles (Swagger UI sets them), requests
    to this hub only, no framing."""
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(script).digest()).decode() + "'"
        for script in _INLINE_SCRIPT.findall(page)
    )
    return (
        f"default-src 'none'; script-src {DOCS_CDN} {hashes}; "
        f"style-src {DOCS_CDN} 'unsafe-inline'; img-src 'self' data: {DOCS_ICON}; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def install_docs(app: FastAPI, path: str = "/docs") -> None:
    """Serve Swagger UI at ``path`` with a policy that lets exactly it run (the app is
    created with ``docs_url=None``); no OAuth2 redirect page (the API takes bearer
    tokens)."""
    page = get_swagger_ui_html(
        openapi_url=app.openapi_url or "/openapi.json",
        title=f"{app.title} - Swagger UI",
        oauth2_redirect_url=None,
    ).body
    headers = {"Content-Security-Policy": docs_csp(bytes(page))}

    async def swagger_ui(_request: Request) -> HTMLResponse:
        return HTMLResponse(bytes(page), headers=headers)

    app.add_api_route(path, swagger_ui, methods=["GET"], include_in_schema=False)
