"""ASGI middleware: request ids, body limits, HTTPS enforcement and security headers (with
``api/edge.py``), metrics, idempotency."""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any, BinaryIO, cast

import anyio
from anyio.abc import TaskStatus
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from tortoise.exceptions import IntegrityError
from tortoise.expressions import Q

from hexa.api.edge import Edge, refuse
from hexa.api.errors import error_body
from hexa.hub import metrics
from hexa.hub.security import decode_access_token, utcnow
from hexa.models import IdempotencyRecord, User

log = logging.getLogger(__name__)

_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: how often expired idempotency records are deleted while the hub runs
PURGE_INTERVAL_S = 600.0


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


def _body_limit(scope: Scope, default: int) -> int:
    """This request's body limit: its route's own (``app.state.body_limits``, by method and
    path: firmware uploads stream to disk) or ``HEXA_MAX_BODY_BYTES``."""
    limits = getattr(getattr(scope.get("app"), "state", None), "body_limits", None) or {}
    return int(limits.get((scope.get("method"), scope.get("path")), default))


class RequestContext:
    """Assigns ``X-Request-ID``, resolves the client behind trusted proxies, refuses plain
    requests under ``HEXA_ENFORCE_HTTPS`` (426), adds the security headers, limits bodies,
    turns crashes into clean 500s."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, edge: Edge) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.edge = edge

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        request_id = given if given and _SANE_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        self.edge.resolve(scope)
        if self.edge.refuses(scope):
            await refuse(scope, send, request_id)
            return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        edge_headers = self.edge.headers
        answer = send

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": edge_headers(scope, message.get("headers", []))}
            await answer(message)

        send = send_secured

        limit = _body_limit(scope, self.max_body_bytes)
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await send_error(
                send,
                413,
                "payload_too_large",
                f"request body exceeds {limit} bytes",
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
                if received > limit:
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
    """Requests and their latency by method, route template and status; error answers by
    the ``code`` of their body.

    The route label is the matched route's template (``/api/v1/devices/{device_id}``), or
    ``unmatched`` for a path no route serves, so scanners cannot mint new series. An error
    code is read from the first body chunk of a JSON error answer (they are small) and kept
    only when it looks like one of ours.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        code: str | None = None
        begin = time.perf_counter()

        async def capture(message: Message) -> None:
            nonlocal status, code
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status >= 400 and code is None:
                code = _error_code(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, capture)
        except _BodyTooLarge:
            status, code = 413, "payload_too_large"
            raise
        except Exception:
            status, code = 500, "internal_error"
            raise
        finally:
            route = route_template(scope)
            labels = (
                scope["method"] if scope["method"] in _METHODS else "other",
                route,
                str(status),
            )
            metrics.HTTP_REQUESTS.labels(*labels).inc()
            metrics.HTTP_LATENCY.labels(*labels).observe(time.perf_counter() - begin)
            if status >= 400:
                metrics.API_ERRORS.labels(code or "other").inc()


#: the route label of requests no route matched
UNMATCHED_ROUTE = "unmatched"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_ERROR_CODE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")


def route_template(scope: Scope) -> str:
    """The full template of the route that served the request.

    A route of an included router knows its path below the routers' prefixes only; the
    prefixes are fixed strings, so they are the leading segments of the request path that
    the template does not cover.
    """
    path = getattr(scope.get("route"), "path", None)
    if not isinstance(path, str):
        return UNMATCHED_ROUTE
    if ":path}" in path:
        return path
    depth = path.count("/")
    segments = scope["path"].split("/")
    prefix = "/".join(segments[: len(segments) - depth])
    return prefix + path


def _error_code(body: bytes) -> str | None:
    """The ``code`` of an error body of the API, or None for anything else."""
    if not body.startswith(b"{") or len(body) > 65536:
        return None
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    code = parsed.get("code") if isinstance(parsed, dict) else None
    return code if isinstance(code, str) and _ERROR_CODE.match(code) else None


#: Routes that hand out fresh credentials in exchange for credentials: their answers are
#: never stored, so a replay can never hand out a token pair from storage (a retried login
#: logs in again; a retried refresh presents a spent refresh token and is refused).
NEVER_STORED = frozenset({"/api/v1/auth/login", "/api/v1/auth/refresh"})
_SEALED = "v1:"


class ResponseSealer:
    """Encrypts stored answers (AES-256-GCM) and hashes keys and callers (HMAC-SHA256).

    Both keys are derived with HKDF from the hub's JWT secret, which is kept outside the
    database (``secrets.json`` in the data directory, or the environment): a copy of the
    database alone reveals no stored token, claim code or Idempotency-Key.
    """

    def __init__(self, secret: str) -> None:
        material = HKDF(
            algorithm=hashes.SHA256(), length=64, salt=None, info=b"hexa idempotency store v1"
        ).derive(secret.encode())
        self._aead = AESGCM(material[:32])
        self._mac_key = material[32:]

    def digest(self, *parts: bytes) -> str:
        """A keyed hash of ``parts`` (length-prefixed, so no two lists collide)."""
        mac = hmac.new(self._mac_key, digestmod=hashlib.sha256)
        for part in parts:
            mac.update(len(part).to_bytes(8, "big"))
            mac.update(part)
        return mac.hexdigest()

    def seal(self, payload: dict[str, Any], aad: bytes) -> str:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, json.dumps(payload).encode(), aad)
        return _SEALED + base64.b64encode(nonce + sealed).decode()

    def open(self, text: str | None, aad: bytes) -> dict[str, Any] | None:
        """The payload, or None when it was not sealed by this key for this record."""
        if not text or not text.startswith(_SEALED):
            return None
        try:
            raw = base64.b64decode(text.removeprefix(_SEALED), validate=True)
            payload = json.loads(self._aead.decrypt(raw[:12], raw[12:], aad))
        except (ValueError, InvalidTag):
            return None
        return payload if isinstance(payload, dict) else None


async def purge_idempotency_records() -> int:
    """Delete expired records and answers stored unencrypted by an older hub."""
    return await IdempotencyRecord.filter(
        Q(expires_at__lte=utcnow())
        | Q(status_code__isnull=False) & ~Q(response_body__startswith=_SEALED)
    ).delete()


async def purge_idempotency_forever(
    interval_s: float = PURGE_INTERVAL_S,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Delete expired records every ``interval_s`` (their answers hold secrets, sealed)."""
    task_status.started()
    while True:
        await anyio.sleep(interval_s)
        try:
            await purge_idempotency_records()
        except Exception:  # a lost database is retried at the next round
            log.warning("expired idempotency records not purged", exc_info=True)


def _replaying(body: bytes) -> Receive:
    """A receive() that hands the already-read body to the app once."""
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if delivered:
            await asyncio.Event().wait()  # nothing more will come: wait to be cancelled
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


_SPOOL_CHUNK = 1024 * 1024
_BOUNDARY = re.compile(r'boundary="?([^";,]{1,200})"?', re.IGNORECASE)


class _BodyDigest:
    """SHA-256 of a body in which a multipart boundary (random per request in most clients)
    is replaced by a fixed marker, so a retried upload with a fresh boundary hashes alike."""

    def __init__(self, boundary: bytes | None) -> None:
        self.boundary = boundary
        self.hash = hashlib.sha256()
        self.pending = b""

    def update(self, chunk: bytes) -> None:
        if not self.boundary:
            self.hash.update(chunk)
            return
        data, keep = self.pending + chunk, len(self.boundary) - 1
        while (at := data.find(self.boundary)) >= 0:
            self.hash.update(data[:at] + b"\0boundary\0")
            data = data[at + len(self.boundary) :]
        cut = max(len(data) - keep, 0)
        self.hash.update(data[:cut])
        self.pending = data[cut:]

    def digest(self) -> bytes:
        self.hash.update(self.pending)
        self.pending = b""
        return self.hash.digest()


async def _spool(scope: Scope, receive: Receive) -> tuple[BinaryIO, bytes]:
    """Read the whole body into a temporary file (in memory up to one chunk) and return it
    with its digest (see :class:`_BodyDigest`)."""
    found = _BOUNDARY.search(_header(scope, b"content-type") or "")
    digest = _BodyDigest(found.group(1).encode() if found else None)
    spool = cast(BinaryIO, tempfile.SpooledTemporaryFile(max_size=_SPOOL_CHUNK))  # noqa: SIM115
    try:
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            if chunk:
                digest.update(chunk)
                await anyio.to_thread.run_sync(spool.write, chunk)
            if not message.get("more_body"):
                break
    except BaseException:
        spool.close()
        raise
    return spool, digest.digest()


def _replaying_file(spool: BinaryIO) -> Receive:
    """A receive() that hands a spooled body to the app chunk by chunk."""
    spool.seek(0, os.SEEK_END)
    remaining = spool.tell()
    spool.seek(0)
    done = False

    async def receive() -> Message:
        nonlocal remaining, done
        if done:
            await asyncio.Event().wait()  # nothing more will come: wait to be cancelled
        chunk = await anyio.to_thread.run_sync(spool.read, _SPOOL_CHUNK)
        remaining -= len(chunk)
        done = remaining <= 0 or not chunk
        return {"type": "http.request", "body": chunk, "more_body": not done}

    return receive


def _issued_to(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> str | None:
    """The user a successful token-issuing answer (``{"user": {"id": ...}, ...}``) belongs to."""
    if status >= 300 or (b"content-type", b"application/json") not in headers:
        return None
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    user = parsed.get("user") if isinstance(parsed, dict) else None
    uid = user.get("id") if isinstance(user, dict) else None
    return uid if isinstance(uid, str) else None


class Idempotency:
    """``Idempotency-Key`` on mutating requests: store the response, replay it on retry.

    Records are scoped to the caller: the user of a valid access token, or for anonymous
    requests a keyed hash of everything presented (credential headers, method, path and
    body), so only a caller who can send the very same request gets its answer. Answers are
    stored encrypted, keys and request hashes as HMACs; a replay of an answer that belongs
    to a user is refused once that user is disabled.
    """

    def __init__(self, app: ASGIApp, *, ttl_s: int, jwt_secret: str, wait_s: float) -> None:
        self.app = app
        self.ttl_s = ttl_s
        self.jwt_secret = jwt_secret
        self.wait_s = wait_s
        self.sealer = ResponseSealer(jwt_secret)

    def _caller(self, scope: Scope, body: bytes) -> tuple[str, str | None] | None:
        """(record scope, user id) of the caller; None for a bearer token that does not
        verify (the route answers 401 itself, and nothing is stored)."""
        auth = _header(scope, b"authorization")
        if auth is not None and auth.lower().startswith("bearer "):
            try:
                user_id = str(decode_access_token(self.jwt_secret, auth[7:].strip()).user_id)
            except Exception:  # noqa: BLE001 - any undecodable token: the route refuses it
                return None
            return f"user:{user_id}", user_id
        presented = [
            (_header(scope, b"x-provision-key") or "").encode(),
            (auth or "").encode(),
            scope["method"].encode(),
            scope["path"].encode(),
            scope["query_string"],
            body,
        ]
        return "anon:" + self.sealer.digest(b"anon", *presented), None

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
        if scope["path"].rstrip("/") in NEVER_STORED:
            await self.app(scope, receive, send)
            return

        # A route with a body limit of its own (a firmware upload) has its body spooled to a
        # temporary file, never held in memory; its SHA-256 stands for it in the request hash.
        spool: BinaryIO | None = None
        if _body_limit(scope, -1) >= 0:
            spool, body = await _spool(scope, receive)
            replay = functools.partial(_replaying_file, spool)
        else:
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            replay = functools.partial(_replaying, body)
        try:
            await self._answer(scope, send, key, body, replay, request_id)
        finally:
            if spool is not None:
                spool.close()

    async def _answer(
        self,
        scope: Scope,
        send: Send,
        key: str,
        body: bytes,
        replay: Callable[[], Receive],
        request_id: str | None,
    ) -> None:
        caller = self._caller(scope, body)
        if caller is None:
            await self.app(scope, replay(), send)
            return
        owner, user_id = caller
        key_hash = self.sealer.digest(b"key", key.encode())
        digest = self.sealer.digest(
            b"request",
            scope["method"].encode(),
            scope["path"].encode(),
            scope["query_string"],
            body,
        )

        for _ in range(2):
            record = await self._claim(owner, key_hash, scope, digest)
            if record is None:  # we own the key: run the request and store its answer
                await self._run_and_store(scope, replay(), send, owner, key_hash, user_id)
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
            assert stored.status_code is not None
            payload = self.sealer.open(stored.response_body, _aad(stored, stored.status_code))
            if payload is not None:
                await self._replay(stored.status_code, payload, send, request_id)
                return
            # Sealed under another secret (HEXA_JWT_SECRET changed): unusable, so forget it.
            log.warning("dropping a stored idempotent answer that cannot be decrypted")
            await IdempotencyRecord.filter(id=stored.id).delete()
        await send_error(
            send,
            409,
            "idempotency_conflict",
            "a request with this Idempotency-Key is still in progress",
            request_id,
        )

    async def _claim(
        self, owner: str, key_hash: str, scope: Scope, digest: str
    ) -> IdempotencyRecord | None:
        """Insert a pending record (None: it is ours) or return the existing one."""
        for _ in range(3):
            now = utcnow()
            try:
                await IdempotencyRecord.create(
                    scope=owner,
                    key=key_hash,
                    method=scope["method"],
                    path=scope["path"][:1000],
                    request_hash=digest,
                    expires_at=now + timedelta(seconds=self.ttl_s),
                )
                return None
            except IntegrityError:
                existing = await IdempotencyRecord.get_or_none(scope=owner, key=key_hash)
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
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        owner: str,
        key_hash: str,
        user_id: str | None,
    ) -> None:
        status = 500
        headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
            await send(message)

        mine = IdempotencyRecord.filter(scope=owner, key=key_hash)
        try:
            await self.app(scope, receive, capture)
        except BaseException:
            await mine.delete()
            raise
        if status >= 500:
            # A failure of ours is not an answer: release the key so a retry can run.
            await mine.delete()
            return
        answer = b"".join(chunks)
        keep = {b"content-type", b"location", b"retry-after"}
        payload = {
            "body": base64.b64encode(answer).decode(),
            "headers": [
                [k.decode("latin-1"), v.decode("latin-1")] for k, v in headers if k in keep
            ],
            "user": user_id or _issued_to(status, headers, answer),
        }
        record = await mine.first()
        if record is None:
            return
        await mine.update(
            status_code=status,
            response_body=self.sealer.seal(payload, _aad(record, status)),
            response_headers={},
        )

    async def _replay(
        self, status: int, payload: dict[str, Any], send: Send, request_id: str | None
    ) -> None:
        user = payload.get("user")
        if user is not None and not await User.filter(id=user, is_active=True).exists():
            # The answer belongs to an account disabled (or deleted) since: not replayed.
            await send_error(send, 401, "unauthorized", "user is unknown or disabled", request_id)
            return
        body = base64.b64decode(payload["body"])
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in payload["headers"]]
        headers += [
            (b"content-length", str(len(body)).encode()),
            (b"idempotency-replayed", b"true"),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _aad(record: IdempotencyRecord, status: int) -> bytes:
    """What a sealed answer is bound to: a copied ciphertext fails under another record."""
    return "\0".join([record.scope, record.key, record.method, record.path, str(status)]).encode()
