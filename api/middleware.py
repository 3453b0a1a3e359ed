"""ASGI middleware: request ids, body limits, HTTPS enforcement, metrics, idempotency."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
import uuid
from datetime import timedelta
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from tortoise.exceptions import IntegrityError

from hexa.api.errors import error_body
from hexa.hub import metrics
from hexa.hub.security import decode_access_token, utcnow
from hexa.models import IdempotencyRecord

log = logging.getLogger(__name__)

_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


async def send_error(
    send: Send,
    status: int,
    code: str,
    message: str,
    request_id: str | None,
    details: dict[str, Any] | None = None,
) -> None:
    body = json.dumps(error_body(code, message, request_id, details)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if request_id:
        headers.append((b"x-request-id", request_id.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestContext:
    """Outermost: assigns ``X-Request-ID``, limits bodies, turns crashes into clean 500s."""

    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, enforce_https: bool, trust_proxy: bool
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.enforce_https = enforce_https
        self.trust_proxy = trust_proxy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        request_id = given if given and _SANE_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        if self.trust_proxy:
            forwarded = _header(scope, b"x-forwarded-proto")
            if forwarded in ("http", "https"):
                scope["scheme"] = (
                    forwarded if scope["type"] == "http" else forwarded.replace("http", "ws")
                )
        if self.enforce_https and scope["scheme"] not in ("https", "wss"):
            if scope["type"] == "http":
                await send_error(send, 403, "https_required", "use HTTPS", request_id)
            else:
                await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return

        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await send_error(
                send,
                413,
                "payload_too_large",
                f"request body exceeds {self.max_body_bytes} bytes",
                request_id,
            )
            return

        started = False
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge()
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [h for h in message.get("headers", []) if h[0] != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_id)
        except _BodyTooLarge:
            if not started:
                await send_error(
                    send, 413, "payload_too_large", "request body too large", request_id
                )
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await send_error(send, 500, "internal_error", "internal server error", request_id)


class _BodyTooLarge(HTTPException):
    """Raised from the body stream; an HTTPException so FastAPI's body parser re-raises it
    (it turns any other exception into a 400)."""

    def __init__(self) -> None:
        super().__init__(413, "request body too large")


class HttpMetrics:
    """Request latency by method, route template and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        begin = time.perf_counter()

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            metrics.HTTP_LATENCY.labels(scope["method"], path, str(status)).observe(
                time.perf_counter() - begin
            )


class Idempotency:
    """``Idempotency-Key`` on mutating requests: store the response, replay it on retry."""

    def __init__(self, app: ASGIApp, *, ttl_s: int, jwt_secret: str, wait_s: float) -> None:
        self.app = app
        self.ttl_s = ttl_s
        self.jwt_secret = jwt_secret
        self.wait_s = wait_s

    def _scope_of(self, scope: Scope) -> str:
        auth = _header(scope, b"authorization") or ""
        if auth.lower().startswith("bearer "):
            try:
                return f"user:{decode_access_token(self.jwt_secret, auth[7:].strip()).user_id}"
            except Exception:  # noqa: BLE001 - the route will answer 401 on its own
                return "anon"
        key = _header(scope, b"x-provision-key")
        if key:
            return "pk:" + hashlib.sha256(key.encode()).hexdigest()[:32]
        return "anon"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = _header(scope, b"idempotency-key") if scope["type"] == "http" else None
        if key is None or scope["method"] not in MUTATING:
            await self.app(scope, receive, send)
            return
        request_id = scope.get("state", {}).get("request_id")
        if not key or len(key) > 255 or not key.isprintable():
            await send_error(
                send,
                400,
                "validation_error",
                "Idempotency-Key must be 1-255 printable characters",
                request_id,
            )
            return

        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        digest = hashlib.sha256(
            b"\0".join(
                [scope["method"].encode(), scope["path"].encode(), scope["query_string"], body]
            )
        ).hexdigest()
        owner = self._scope_of(scope)

        record = await self._claim(owner, key, scope, digest)
        if record is None:  # we own the key: run the request and store its answer
            await self._run_and_store(scope, body, send, owner, key)
            return
        if record.request_hash != digest:
            await send_error(
                send,
                409,
                "idempotency_conflict",
                "this Idempotency-Key was used with a different request",
                request_id,
            )
            return
        stored = await self._wait_done(record)
        if stored is None:
            await send_error(
                send,
                409,
                "idempotency_conflict",
                "a request with this Idempotency-Key is still in progress",
                request_id,
            )
            return
        await self._replay(stored, send, request_id)

    async def _claim(
        self, owner: str, key: str, scope: Scope, digest: str
    ) -> IdempotencyRecord | None:
        """Insert a pending record (None: it is ours) or return the existing one."""
        for _ in range(3):
            now = utcnow()
            try:
                await IdempotencyRecord.create(
                    scope=owner,
                    key=key,
                    method=scope["method"],
                    path=scope["path"][:1000],
                    request_hash=digest,
                    expires_at=now + timedelta(seconds=self.ttl_s),
                )
                return None
            except IntegrityError:
                existing = await IdempotencyRecord.get_or_none(scope=owner, key=key)
                if existing is None:
                    continue
                if existing.expires_at <= now:
                    await IdempotencyRecord.filter(id=existing.id).delete()
                    continue
                return existing
        raise RuntimeError("could not claim idempotency key")

    async def _wait_done(self, record: IdempotencyRecord) -> IdempotencyRecord | None:
        deadline = time.monotonic() + self.wait_s
        while True:
            current = await IdempotencyRecord.get_or_none(id=record.id)
            if current is None:
                return None  # the first attempt failed with a 5xx and released the key
            if current.status_code is not None:
                return current
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.05)

    async def _run_and_store(
        self, scope: Scope, body: bytes, send: Send, owner: str, key: str
    ) -> None:
        status = 500
        headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []
        delivered = False

        async def replay_receive() -> Message:
            nonlocal delivered
            if delivered:
                await asyncio.Event().wait()  # nothing more will come: wait to be cancelled
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def capture(message: Message) -> None:
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, replay_receive, capture)
        except BaseException:
            await IdempotencyRecord.filter(scope=owner, key=key).delete()
            raise
        if status >= 500:
            # A failure of ours is not an answer: release the key so a retry can run.
            await IdempotencyRecord.filter(scope=owner, key=key).delete()
            return
        keep = {b"content-type", b"location", b"retry-after"}
        await IdempotencyRecord.filter(scope=owner, key=key).update(
            status_code=status,
            response_body=b"".join(chunks).decode("utf-8", errors="replace"),
            response_headers={k.decode(): v.decode() for k, v in headers if k in keep},
        )

    async def _replay(self, record: IdempotencyRecord, send: Send, request_id: str | None) -> None:
        body = (record.response_body or "").encode()
        headers = [(k.encode(), v.encode()) for k, v in (record.response_headers or {}).items()]
        headers += [
            (b"content-length", str(len(body)).encode()),
            (b"idempotency-replayed", b"true"),
        ]
        assert record.status_code is not None
        await send(
            {"type": "http.response.start", "status": record.status_code, "headers": headers}
        )
        await send({"type": "http.response.body", "body": body})
