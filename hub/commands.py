"""Command correlation for requesters: publish an intent, await its result on the bus.

REST routes and WS clients use this; results come back on ``hexa/<uid>/result``, so a
requester on one hub instance is answered by a relay service on any instance.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from hexa.hub import inbox, topics
from hexa.hub.busapi import BusLike, Message
from hexa.hub.errors import CommandRejected, DeviceOffline, DeviceTimeout, RateLimited

#: extra time granted beyond the relay service's own command timeout
MARGIN_S = 2.0


class Commands:
    """Publishes intents and waits for their results."""

    def __init__(self, bus: BusLike, *, timeout_s: float, seal_key: bytes) -> None:
        self.bus = bus
        self.timeout_s = timeout_s
        self.seal_key = seal_key
        self._waiting: dict[str, asyncio.Future[topics.Result]] = {}

    async def start(self) -> None:
        await self.bus.subscribe(topics.RESULT.filter(), inbox.on(topics.RESULT, self._on_result))

    async def _on_result(self, params: dict[str, str], result: topics.Result, msg: Message) -> None:
        future = self._waiting.get(result.intent_id)
        if future is not None and not future.done():
            future.set_result(result)

    async def submit(
        self,
        uid: str,
        relay_index: int | None,
        state: topics.IntentValue,
        *,
        source: str,
        actor_type: str | None = None,
        actor_id: str | None = None,
        request_id: str | None = None,
        automation_id: str | None = None,
        schedule_id: str | None = None,
    ) -> topics.Result:
        """Publish one intent and return its result (any status)."""
        intent = topics.Intent(
            state=state,
            source=source,
            intent_id=uuid.uuid4().hex,
            request_id=request_id,
            actor_type=actor_type,
            actor_id=actor_id,
            automation_id=automation_id,
            schedule_id=schedule_id,
        )
        topic = (
            topics.RELAYS_SET.format(uid=uid)
            if relay_index is None
            else topics.RELAY_SET.format(uid=uid, index=relay_index)
        )
        future: asyncio.Future[topics.Result] = asyncio.get_running_loop().create_future()
        self._waiting[intent.intent_id] = future
        try:
            sealed = topics.seal_intent(intent, topic, self.seal_key)
            await self.bus.publish(topic, topics.encode_intent(sealed))
            return await asyncio.wait_for(future, self.timeout_s + MARGIN_S)
        except TimeoutError:
            return topics.Result(intent_id=intent.intent_id, ok=False, status="timeout")
        finally:
            self._waiting.pop(intent.intent_id, None)

    async def submit_action(
        self, uid: str, action: dict[str, Any], **origin: str | None
    ) -> topics.Result:
        """Submit a stored action (of a schedule or an automation): ``set_relay`` with a
        ``relay_index``, or ``set_all_relays``; ``state`` true, false or ``"toggle"``."""
        index = action.get("relay_index") if action.get("type") == "set_relay" else None
        return await self.submit(uid, index, topics.intent_value(action["state"]), **origin)  # type: ignore[arg-type]

    async def execute(
        self, uid: str, relay_index: int | None, state: topics.IntentValue, **kwargs: str | None
    ) -> topics.Result:
        """Like :meth:`submit`, but a result other than ``applied`` raises its HubError."""
        result = await self.submit(uid, relay_index, state, **kwargs)  # type: ignore[arg-type]
        if result.status == "applied":
            return result
        if result.status == "offline":
            raise DeviceOffline(uid)
        if result.status == "timeout":
            raise DeviceTimeout(uid, result.command_id, int(self.timeout_s * 1000))
        if result.error and result.error.startswith("device busy"):
            raise RateLimited(result.error, retry_after_s=1)
        raise CommandRejected(uid, result.error or "rejected")
