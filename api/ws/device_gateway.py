"""``/ws/device``: WebSocket devices bridged onto the same topics as MQTT devices.

device → hub: ``state_report``, ``ack``, ``input_event``, ``ping`` (→ ``pong``)
hub → device: ``set_relay``, ``set_all_relays``, ``config`` (from ``hexa/<uid>/cmd``)
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from hexa.api.ws import messages
from hexa.hub import metrics, topics
from hexa.hub.errors import BusUnavailable
from hexa.hub.events import DeviceCredentialsRevoked
from hexa.hub.mqtt.busapi import Message

if TYPE_CHECKING:
    from hexa.hub.runtime import Hub

log = logging.getLogger(__name__)
router = APIRouter()

CLOSE_UNAUTHORIZED = 4401
CLOSE_REPLACED = 4409
CLOSE_REVOKED = 4403
MAX_MESSAGE_BYTES = 64 * 1024

_DEVICE_TYPES: dict[str, topics.Topic[Any]] = {
    "state_report": topics.REPORT,
    "ack": topics.ACK,
    "input_event": topics.EVENT,
}


class DeviceSessions:
    """The WebSocket devices connected to this instance, by uid."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._sessions: dict[str, tuple[WebSocket, asyncio.Queue[bytes]]] = {}

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Route commands to the devices connected here; close those whose credentials
        are revoked."""
        await self.hub.bus.subscribe(topics.CMD.filter(), self._on_command)
        unsubscribe = self.hub.events.subscribe(DeviceCredentialsRevoked, self._on_revoked)
        try:
            task_status.started()
            await anyio.sleep_forever()
        finally:
            unsubscribe()
            with anyio.CancelScope(shield=True):
                await self.hub.bus.unsubscribe(topics.CMD.filter(), self._on_command)

    async def _on_revoked(self, event: DeviceCredentialsRevoked) -> None:
        await self.close(event.uid)

    async def _on_command(self, msg: Message) -> None:
        params = topics.CMD.parse(msg.topic)
        if params is None:
            return
        session = self._sessions.get(params["uid"])
        if session is None:
            return
        try:
            session[1].put_nowait(msg.payload)
        except asyncio.QueueFull:
            metrics.WS_DROPPED.inc()

    async def close(self, uid: str, code: int = CLOSE_REVOKED) -> None:
        session = self._sessions.pop(uid, None)
        if session is not None:
            try:
                await session[0].close(code)
            except (RuntimeError, OSError):
                pass

    def register(self, uid: str, ws: WebSocket) -> asyncio.Queue[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue(100)
        self._sessions[uid] = (ws, queue)
        return queue

    def unregister(self, uid: str, ws: WebSocket) -> bool:
        current = self._sessions.get(uid)
        if current is not None and current[0] is ws:
            del self._sessions[uid]
            return True
        return False

    def current(self, uid: str) -> WebSocket | None:
        session = self._sessions.get(uid)
        return session[0] if session else None


@router.websocket("/ws/device")
async def device_socket(ws: WebSocket, uid: str = "", token: str = "") -> None:
    hub: Hub = ws.app.state.hub
    device = await hub.registry.authenticate(uid, token)
    await ws.accept()
    if device is None:
        await ws.close(CLOSE_UNAUTHORIZED, "bad device credentials")
        return
    sessions: DeviceSessions = ws.app.state.device_sessions
    previous = sessions.current(uid)
    if previous is not None:
        await sessions.close(uid, CLOSE_REPLACED)
    queue = sessions.register(uid, ws)
    metrics.WS_SESSIONS.labels("device").inc()
    await hub.publish_availability(uid, True)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_send_commands, ws, queue)
            await _receive(ws, hub, uid)
            tg.cancel_scope.cancel()
    finally:
        metrics.WS_SESSIONS.labels("device").dec()
        sessions.unregister(uid, ws)
        if sessions.current(uid) is None:
            with anyio.CancelScope(shield=True):
                await hub.publish_availability(uid, False)


async def _send_commands(ws: WebSocket, queue: asyncio.Queue[bytes]) -> None:
    try:
        while True:
            payload = await queue.get()
            await ws.send_text(payload.decode())
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass


async def _send_error(ws: WebSocket, message: str) -> None:
    await ws.send_text(json.dumps({"type": "error", "error": message}))


async def _receive(ws: WebSocket, hub: Hub, uid: str) -> None:
    while True:
        try:
            raw = await ws.receive()
        except (WebSocketDisconnect, RuntimeError):
            return
        if raw["type"] == "websocket.disconnect":
            return
        try:
            doc = messages.decode(
                raw.get("text") or raw.get("bytes") or b"", max_bytes=MAX_MESSAGE_BYTES
            )
        except messages.BadMessage as exc:
            metrics.BAD_PAYLOADS.labels("ws_device").inc()
            await _send_error(ws, exc.reason)
            continue
        if not isinstance(doc.get("type"), str):
            metrics.BAD_PAYLOADS.labels("ws_device").inc()
            await _send_error(ws, "expected a JSON object with a type")
            continue
        kind = doc.pop("type")
        if kind == "ping":
            await ws.send_text(json.dumps({"type": "pong"}))
            await hub.touch_device(uid)
            continue
        topic = _DEVICE_TYPES.get(kind)
        if topic is None:
            await _send_error(ws, f"unknown message type {kind!r}")
            continue
        try:
            await hub.bus.publish(topic.format(uid=uid), json.dumps(doc).encode())
        except BusUnavailable:
            await _send_error(ws, "hub bus unavailable, retry")
