"""Command correlation for requesters: publish an intent, await its result on the bus.

REST routes and WS clients use this; results come back on ``hexa/<uid>/result``, so a
requester on one hub instance is answered by a relay service on any instance.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hexa.hub import topics
from hexa.hub.errors import CommandRejected, DeviceOffline, DeviceTimeout, RateLimited
from hexa.hub.mqtt import inbox
from hexa.hub.mqtt.busapi import BusLike, Message

#: extra time granted beyond the relay service's own command timeout
MARGIN_S = 2.0


@dataclass(frozen=True)
class RelayAction:
    """What every source asks of a device: one relay (``relay_index``) or all of them
    (None) ON, OFF or TOGGLE. REST bodies, WebSocket commands and the stored actions of
    schedules and automations all become this before they become an intent."""

    relay_index: int | None
    state: topics.IntentValue

    @classmethod
    def of(cls, relay_index: int | None, state: bool | str) -> RelayAction:
        """From a ``state`` of true, false or ``"toggle"`` (any case); ValueError else."""
        return cls(relay_index, topics.intent_value(state))

    @classmethod
    def stored(cls, action: Mapping[str, Any]) -> RelayAction:
        """From a schedule's or automation's action: ``set_relay`` with a
        ``relay_index``, or ``set_all_relays``."""
        index = action.get("relay_index") if action.get("type") == "set_relay" else None
        return cls.of(index, action["state"])

    def decoded(self, uid: str, intent: topics.Intent) -> topics.Decoded[topics.Intent] | None:
        """The intent as the relay service's in-process handler takes it, or None where it
        must decode the payload: a TOGGLE of all relays is refused as malformed there."""
        if self.relay_index is None:
            if intent.state == "TOGGLE":
                return None
            return topics.Decoded(topics.RELAYS_SET, {"uid": uid}, intent)
        return topics.Decoded(
            topics.RELAY_SET, {"uid": uid, "index": str(self.relay_index)}, intent
        )

    def topic(self, uid: str) -> str:
        """The intent topic this action is published on."""
        if self.relay_index is None:
            return topics.RELAYS_SET.format(uid=uid)
        return topics.RELAY_SET.format(uid=uid, index=self.relay_index)


@dataclass(frozen=True)
class Origin:
    """Who asked and where: recorded with the intent's audit entry."""

    source: str
    actor_type: str | None = None
    actor_id: str | None = None
    request_id: str | None = None
    automation_id: str | None = None
    schedule_id: str | None = None


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

    async def submit(self, uid: str, action: RelayAction, origin: Origin) -> topics.Result:
        """Publish one intent and return its result (any status)."""
        intent = topics.Intent(
            state=action.state,
            source=origin.source,
            intent_id=uuid.uuid4().hex,
            request_id=origin.request_id,
            actor_type=origin.actor_type,
            actor_id=origin.actor_id,
            automation_id=origin.automation_id,
            schedule_id=origin.schedule_id,
        )
        topic = action.topic(uid)
        future: asyncio.Future[topics.Result] = asyncio.get_running_loop().create_future()
        self._waiting[intent.intent_id] = future
        try:
            sealed = topics.seal_intent(intent, topic, self.seal_key)
            await self.bus.publish(
                topic, topics.encode_intent(sealed), decoded=action.decoded(uid, sealed)
            )
            return await asyncio.wait_for(future, self.timeout_s + MARGIN_S)
        except TimeoutError:
            return topics.Result(intent_id=intent.intent_id, ok=False, status="timeout")
        finally:
            self._waiting.pop(intent.intent_id, None)

    async def execute(self, uid: str, action: RelayAction, origin: Origin) -> topics.Result:
        """Like :meth:`submit`, but a result other than ``applied`` raises its HubError."""
        result = await self.submit(uid, action, origin)
        if result.status == "applied":
            return result
        if result.status == "offline":
            raise DeviceOffline(uid)
        if result.status == "timeout":
            raise DeviceTimeout(uid, result.command_id, int(self.timeout_s * 1000))
        if result.error and result.error.startswith("device busy"):
            raise RateLimited(result.error, retry_after_s=1)
        raise CommandRejected(uid, result.error or "rejected")
