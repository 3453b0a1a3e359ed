"""``/ws/client``: live device state for people, and relay commands from them.

hub → client: ``device_state``, ``device_online``/``device_offline``,
``automation_fired``, ``command_result``; client → hub: ``set_relay``, ``set_all_relays``.
A client only receives devices of organizations it is a member of.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from hexa.api.ws import messages
from hexa.hub import metrics, topics
from hexa.hub.access import Principal, load_principal
from hexa.hub.busapi import Message
from hexa.hub.errors import HubError, ValidationFailed
from hexa.hub.security import decode_access_token

if TYPE_CHECKING:
    from hexa.hub.runtime import Hub

log = logging.getLogger(__name__)
router = APIRouter()

CLOSE_UNAUTHORIZED = 4401
MAX_MESSAGE_BYTES = 16 * 1024
QUEUE_SIZE = 256


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
    def __init__(self, ws: WebSocket, principal: Principal) -> None:
        self.ws = ws
        self.principal = principal
        self.queue: asyncio.Queue[str] = asyncio.Queue(QUEUE_SIZE)

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

    async def start(self) -> None:
        """Nothing to do until a client connects (see add)."""

    async def add(self, client: _Client) -> None:
        # The hub listens to device state only while someone watches: every state
        # message delivered to the hub costs the broker and the bus client work.
        self._clients.add(client)
        if len(self._clients) == 1:
            await self.hub.bus.subscribe(topics.STATE.filter(), self._on_state)
            await self.hub.bus.subscribe(topics.AUTOMATION_FIRED.format(), self._on_fired)

    async def remove(self, client: _Client) -> None:
        self._clients.discard(client)
        if not self._clients:
            await self.hub.bus.unsubscribe(topics.STATE.filter(), self._on_state)
            await self.hub.bus.unsubscribe(topics.AUTOMATION_FIRED.format(), self._on_fired)
            self._online.clear()

    def broadcast(self, org_id: uuid.UUID | None, doc: dict[str, Any]) -> None:
        for client in list(self._clients):
            if client.principal.can_see(org_id):
                client.push(doc)

    async def _on_fired(self, msg: Message) -> None:
        try:
            fired = topics.decode_automation_fired(msg.payload)
            org_id = uuid.UUID(fired.org_id)
        except (topics.PayloadError, ValueError):
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

    async def _on_state(self, msg: Message) -> None:
        params = topics.STATE.parse(msg.topic)
        if params is None:
            return
        uid = params["uid"]
        device = await self.hub.cache.get(uid)
        if device is None or device.org_id is None:
            return
        try:
            state = json.loads(msg.payload)
            relays, inputs, online = state["relays"], state["inputs"], bool(state["online"])
        except (ValueError, KeyError, TypeError):
            metrics.BAD_PAYLOADS.labels("state").inc()
            return
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
    except HubError:
        await ws.close(CLOSE_UNAUTHORIZED, "invalid or expired access token")
        return
    client = _Client(ws, principal)
    sessions: ClientSessions = ws.app.state.client_sessions
    await sessions.add(client)
    metrics.WS_SESSIONS.labels("client").inc()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_sender, client)
            await _receiver(client, hub, tg)
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await sessions.remove(client)
        metrics.WS_SESSIONS.labels("client").dec()


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
        device = await hub.registry.get_for(client.principal, cmd.device_id, "command_relays")
        if isinstance(cmd, _SetRelay):
            if cmd.relay_index >= device.relay_count:
                raise ValidationFailed(f"relay index {cmd.relay_index} out of range")
            try:
                state = topics.intent_value(cmd.state)
            except ValueError as exc:
                raise ValidationFailed(str(exc)) from None
            index: int | None = cmd.relay_index
        else:
            state, index = topics.intent_value(cmd.state), None
        result = await hub.commands.execute(
            device.device_uid,
            index,
            state,
            source="ws_client",
            actor_type="user",
            actor_id=str(client.principal.id),
            request_id=request_id,
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
