"""``/ws/client``: live device state for people, and relay commands from them.

hub → client: ``device_state``, ``device_online``/``device_offline``,
``automation_fired``, ``command_result``; client → hub: ``set_relay``, ``set_all_relays``.
A client only receives devices of organizations it is a member of, and only while it may:
the socket closes at its access token's expiry (4401), when its user is disabled or deleted
(4401) and when its grants narrow (4403), also when the change is made through another hub
instance (every connected user is re-checked against the database every ``RECHECK_S``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError
from tortoise.exceptions import BaseORMException

from hexa.api.ws import messages
from hexa.hub import metrics, topics
from hexa.hub.access import Grants, Principal, load_grants, load_principal
from hexa.hub.commands import Origin, RelayAction
from hexa.hub.errors import Forbidden, HubError, Unauthorized, ValidationFailed
from hexa.hub.mqtt import inbox
from hexa.hub.mqtt.busapi import Message
from hexa.hub.security import decode_access_token

if TYPE_CHECKING:
    from hexa.hub.runtime import Hub

log = logging.getLogger(__name__)
router = APIRouter()

CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
MAX_MESSAGE_BYTES = 16 * 1024
QUEUE_SIZE = 256
#: how often connected users are re-checked against the database (one query per tick)
RECHECK_S = 0.5


class _SetRelay(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str
    request_id: str | None = Field(default=None, max_length=128)
    device_id: uuid.UUID
    relay_index: int = Field(ge=0, le=63)
    state: StrictBool | str


class _SetAll(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str
    request_id: str | None = Field(default=None, max_length=128)
    device_id: uuid.UUID
    state: StrictBool


class _Client:
    def __init__(self, ws: WebSocket, principal: Principal, expires_at: datetime) -> None:
        self.ws = ws
        #: who the socket acts for; replaced when the database shows wider grants
        self.principal = principal
        self.expires_at = expires_at
        self.queue: asyncio.Queue[str] = asyncio.Queue(QUEUE_SIZE)
        self.revoked = anyio.Event()
        self.close_code: int | None = None
        self.close_reason = ""

    @property
    def open(self) -> bool:
        return self.close_code is None

    def seconds_left(self) -> float:
        return (self.expires_at - datetime.now(UTC)).total_seconds()

    def revoke(self, code: int, reason: str) -> None:
        """End the session: nothing more is broadcast to it, and its socket closes."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
            self.revoked.set()

    def judge(self, grants: Grants | None) -> bool:
        """Revoke when the user is gone or disabled (``None``) or its grants no longer cover
        what the socket was authorized for; True when the grants widened instead."""
        if grants is None:
            self.revoke(CLOSE_UNAUTHORIZED, "user disabled or deleted")
            return False
        held = self.principal.grants
        if not grants.covers(held):
            self.revoke(CLOSE_FORBIDDEN, "access revoked")
            return False
        return grants != held

    def push(self, doc: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(json.dumps(doc))
        except asyncio.QueueFull:  # a slow client loses messages, the hub does not stall
            metrics.WS_DROPPED.inc()


class ClientSessions:
    """Fans device state from the bus out to the WebSocket clients allowed to see it."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._clients: set[_Client] = set()
        self._online: dict[str, bool] = {}
        self._db_down = False
        self._state_handler = inbox.on(topics.STATE, self._on_state)
        self._fired_handler = inbox.on(topics.AUTOMATION_FIRED, self._on_fired)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Re-check the connected clients' users against the database, every ``RECHECK_S``.

        The database, not this process, is the authority: a member removed or a user
        disabled through another hub instance is noticed too.
        """
        task_status.started()
        while True:
            await anyio.sleep(RECHECK_S)
            if self._clients:
                await self.recheck()

    async def recheck(self) -> None:
        """Close the sockets of users disabled or deleted (4401) or with narrower grants
        (4403); widen the principal of those with wider ones."""
        clients = [c for c in self._clients if c.open]
        try:
            grants = await load_grants({c.principal.id for c in clients})
            for client in clients:
                if client.judge(grants.get(client.principal.id)):
                    with contextlib.suppress(HubError):  # judged again inside
                        await _reauthorize(client)
        except (BaseORMException, OSError) as exc:  # a lost database: retried next tick
            if not self._db_down:
                log.warning("WebSocket clients not re-checked: database unavailable (%s)", exc)
            self._db_down = True
            return
        self._db_down = False

    async def add(self, client: _Client) -> None:
        # The hub listens to device state only while someone watches: every state
        # message delivered to the hub costs the broker and the bus client work.
        self._clients.add(client)
        if len(self._clients) == 1:
            await self.hub.bus.subscribe(topics.STATE.filter(), self._state_handler)
            await self.hub.bus.subscribe(topics.AUTOMATION_FIRED.format(), self._fired_handler)

    async def remove(self, client: _Client) -> None:
        self._clients.discard(client)
        if not self._clients:
            await self.hub.bus.unsubscribe(topics.STATE.filter(), self._state_handler)
            await self.hub.bus.unsubscribe(topics.AUTOMATION_FIRED.format(), self._fired_handler)
            self._online.clear()

    def broadcast(self, org_id: uuid.UUID | None, doc: dict[str, Any]) -> None:
        for client in list(self._clients):
            if client.open and client.principal.can_see(org_id):
                client.push(doc)

    async def _on_fired(
        self, params: dict[str, str], fired: topics.AutomationFired, msg: Message
    ) -> None:
        try:
            org_id = uuid.UUID(fired.org_id)
        except ValueError:
            metrics.BAD_PAYLOADS.labels("automation_fired").inc()
            return
        self.broadcast(
            org_id,
            {
                "type": "automation_fired",
                "automation_id": fired.automation_id,
                "device_id": fired.device_id,
                "at": fired.at,
            },
        )

    async def _on_state(
        self, params: dict[str, str], state: topics.DeviceState, msg: Message
    ) -> None:
        uid = params["uid"]
        device = await self.hub.cache.get(uid)
        if device is None or device.org_id is None:
            return
        relays, inputs, online = state.relays, state.inputs, state.online
        was = self._online.get(uid)
        self._online[uid] = online
        base = {"device_id": str(device.id), "device_uid": uid}
        if was is not None and was != online:
            self.broadcast(
                device.org_id, {"type": "device_online" if online else "device_offline", **base}
            )
        self.broadcast(
            device.org_id,
            {"type": "device_state", **base, "relays": relays, "inputs": inputs, "online": online},
        )


@router.websocket("/ws/client")
async def client_socket(ws: WebSocket, token: str = "") -> None:
    hub: Hub = ws.app.state.hub
    await ws.accept()
    try:
        assert hub.settings.jwt_secret is not None
        claims = decode_access_token(hub.settings.jwt_secret, token)
        principal = await load_principal(claims.user_id)
        ws.state.principal = principal  # the access log's user id
    except HubError:
        await ws.close(CLOSE_UNAUTHORIZED, "invalid or expired access token")
        return
    client = _Client(ws, principal, claims.expires_at)
    sessions: ClientSessions = ws.app.state.client_sessions
    await sessions.add(client)
    metrics.WS_SESSIONS.labels("client").inc()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_sender, client)
            tg.start_soon(_guard, client, tg.cancel_scope)
            await _receiver(client, hub, tg)
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await sessions.remove(client)
        metrics.WS_SESSIONS.labels("client").dec()
    if client.close_code is not None:
        with contextlib.suppress(RuntimeError, OSError):  # the peer may be gone already
            await ws.close(client.close_code, client.close_reason)


async def _guard(client: _Client, session: anyio.CancelScope) -> None:
    """End the session when it is revoked, or at the access token's expiry."""
    with anyio.move_on_after(max(client.seconds_left(), 0)):
        await client.revoked.wait()
    client.revoke(CLOSE_UNAUTHORIZED, "access token expired")  # no-op when already revoked
    session.cancel()


async def _sender(client: _Client) -> None:
    try:
        while True:
            await client.ws.send_text(await client.queue.get())
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass


async def _receiver(client: _Client, hub: Hub, tg: anyio.abc.TaskGroup) -> None:
    while True:
        try:
            raw = await client.ws.receive()
        except (WebSocketDisconnect, RuntimeError):
            return
        if raw["type"] == "websocket.disconnect":
            return
        if not client.open:
            return
        try:
            doc = messages.decode(
                raw.get("text") or raw.get("bytes") or b"", max_bytes=MAX_MESSAGE_BYTES
            )
        except messages.BadMessage as exc:
            metrics.BAD_PAYLOADS.labels("ws_client").inc()
            client.push({"type": "error", "error": exc.reason})
            continue
        kind = doc.get("type")
        request_id = doc.get("request_id") if isinstance(doc.get("request_id"), str) else None
        if kind == "ping":
            client.push({"type": "pong"})
            continue
        if kind not in ("set_relay", "set_all_relays"):
            client.push(
                {
                    "type": "error",
                    "request_id": request_id,
                    "error": f"unknown message type {kind!r}",
                }
            )
            continue
        try:
            cmd = (_SetRelay if kind == "set_relay" else _SetAll).model_validate(doc)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err.get("loc", ()))
            client.push(
                {
                    "type": "command_result",
                    "request_id": request_id,
                    "ok": False,
                    "error": f"{where}: {err['msg']}",
                }
            )
            continue
        tg.start_soon(_command, client, hub, cmd)


async def _command(client: _Client, hub: Hub, cmd: _SetRelay | _SetAll) -> None:
    request_id = cmd.request_id or uuid.uuid4().hex
    try:
        principal = await _reauthorize(client)
        device = await hub.registry.get_for(principal, cmd.device_id, "command_relays")
        if isinstance(cmd, _SetRelay):
            if cmd.relay_index >= device.relay_count:
                raise ValidationFailed(f"relay index {cmd.relay_index} out of range")
            try:
                action = RelayAction.of(cmd.relay_index, cmd.state)
            except ValueError as exc:
                raise ValidationFailed(str(exc)) from None
        else:
            action = RelayAction.of(None, cmd.state)
        result = await hub.commands.execute(
            device.device_uid,
            action,
            Origin(
                "ws_client", actor_type="user", actor_id=str(principal.id), request_id=request_id
            ),
        )
        client.push(
            {
                "type": "command_result",
                "request_id": request_id,
                "ok": True,
                "device_id": str(device.id),
                "relays": result.relays,
                "latency_ms": result.latency_ms,
                "command_id": result.command_id,
            }
        )
    except HubError as exc:
        client.push(
            {
                "type": "command_result",
                "request_id": request_id,
                "ok": False,
                "error": exc.message,
                "code": exc.code,
            }
        )


async def _reauthorize(client: _Client) -> Principal:
    """The client's user as the database has it now: a command is never authorized by what
    was true at connect time. Revokes the session (and raises) when access was lost."""
    if client.seconds_left() <= 0:
        client.revoke(CLOSE_UNAUTHORIZED, "access token expired")
        raise Unauthorized("access token expired")
    try:
        principal = await load_principal(client.principal.id)
    except Unauthorized:
        client.revoke(CLOSE_UNAUTHORIZED, "user disabled or deleted")
        raise
    client.judge(principal.grants)
    if not client.open:
        raise Forbidden("access revoked")
    client.principal = principal  # wider grants (a new membership) take effect at once
    return principal
