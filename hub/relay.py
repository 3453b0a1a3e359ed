"""RelayService: the one subscriber of relay intents and the only writer of relay state.

intent → validate → (offline? answer at once) → command on ``hexa/<uid>/cmd`` →
wait for the matching ack or the timeout → persist → cache → retained state →
result → audit → metrics. Commands to one device run in order; devices run
concurrently; an ack that arrives after its timeout is still recorded.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus
from tortoise.exceptions import OperationalError

from hexa.hub import metrics, topics
from hexa.hub.audit import AuditLog
from hexa.hub.errors import BusUnavailable
from hexa.hub.logs import printable
from hexa.hub.mqtt import inbox
from hexa.hub.mqtt.busapi import BusLike, Message
from hexa.hub.state import DeviceCache, DeviceInfo, StateWriter
from hexa.models import IntegrationToken

log = logging.getLogger(__name__)

MAX_QUEUED_PER_DEVICE = 32
#: a device's worker ends after this long without intents
IDLE_WORKER_S = 30.0
LATE_ACK_MEMORY = 1024
#: sealed intent ids remembered, so that a replayed copy is not attributed again
SEALS_REMEMBERED = 10_000
#: integration tokens whose source is remembered
SOURCES_REMEMBERED = 4096
#: the audit source of intents from an integration token, by the token's kind (§6);
#: other kinds publish as plain MQTT clients
INTEGRATION_SOURCES = {"home_assistant": "home_assistant"}

#: takes an ack of a command the relay service did not send: (uid, ack) → True if its own
AckRoute = Callable[[str, topics.Ack], Awaitable[bool]]


@dataclass
class _Job:
    uid: str
    index: int | None
    intent: topics.Intent
    received: float = field(default_factory=time.perf_counter)


@dataclass
class _Pending:
    uid: str
    future: asyncio.Future[topics.Ack]
    expected: list[bool]
    intent: topics.Intent


def _changes(old: list[bool], new: list[bool] | None) -> dict[int, bool]:
    """index → new value, for the entries of ``new`` that differ from ``old``."""
    if new is None:
        return {}
    return {i: n for i, (o, n) in enumerate(zip(old, new, strict=False)) if o != n}


def state_messages(device: DeviceInfo, only: list[int] | None = None) -> list[tuple[str, bytes]]:
    """The retained state of a device as (topic, payload): each relay's (``only``: those
    that changed) and the aggregate. One place builds them for every broker they go to
    (the hub's bus, and Home Assistant's own broker)."""
    return [(topic, payload) for topic, payload, _ in _state_messages(device, only)]


def _state_messages(
    device: DeviceInfo, only: list[int] | None
) -> list[tuple[str, bytes, topics.Decoded[Any]]]:
    """:func:`state_messages`, each with what it was built from (for the hub's own
    subscribers in process)."""
    indexes = range(device.relay_count) if only is None else only
    uid = device.uid
    out: list[tuple[str, bytes, topics.Decoded[Any]]] = []
    for i in indexes:
        value = device.relays[i]
        out.append(
            (
                topics.RELAY_STATE.format(uid=uid, index=i),
                topics.encode_onoff(value),
                topics.Decoded(topics.RELAY_STATE, {"uid": uid, "index": str(i)}, value),
            )
        )
    state = topics.DeviceState(
        relays=device.relays,
        inputs=device.inputs,
        online=device.online,
        updated_at=topics.iso_now(),
    )
    out.append(
        (
            topics.STATE.format(uid=uid),
            topics.encode(state),
            topics.Decoded(topics.STATE, {"uid": uid}, state),
        )
    )
    return out


class RelayService:
    """Consumes intents and acks; publishes commands, states and results."""

    def __init__(
        self,
        bus: BusLike,
        cache: DeviceCache,
        audit: AuditLog,
        *,
        timeout_s: float,
        seal_key: bytes,
    ) -> None:
        self.bus = bus
        self.audit = audit
        self.cache = cache
        self.timeout_s = timeout_s
        self._queues: dict[str, asyncio.Queue[_Job]] = {}
        self._pending: dict[str, _Pending] = {}
        self._timed_out: OrderedDict[str, _Pending] = OrderedDict()
        self._tg: TaskGroup | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._writer = StateWriter()
        self._seal_key = seal_key
        self._seen_seals: OrderedDict[str, None] = OrderedDict()
        #: integration token id → the source its intents are audited with
        self._sources: OrderedDict[str, str] = OrderedDict()
        self._executing = 0
        self._intake = {
            topic: inbox.on(topic, self._on_intent, kind="intent", malformed=self._on_bad_intent)
            for topic in topics.INTENT_TOPICS
        }
        #: set whenever a job ends (drain() re-checks whether everything is done)
        self._settled = asyncio.Event()
        self._ack_routes: list[AckRoute] = []
        #: command ids: this service's random prefix and a sequence number (unique, and
        #: without a call for random bytes per command)
        self._command_prefix = uuid.uuid4().hex[:16]
        self._command_seq = itertools.count(1)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await tg.start(self._writer.run)
            for topic, handler in self._intake.items():
                await self.bus.subscribe(topic.filter(), handler)
            await self.bus.subscribe(topics.ACK.filter(), inbox.on(topics.ACK, self._on_ack))
            task_status.started()
            await anyio.sleep_forever()

    async def drain(self) -> None:
        """Take no more intents, and return once the queued and running ones are done
        (each answered with its result); the caller bounds how long that may take."""
        for topic, handler in self._intake.items():
            await self.bus.unsubscribe(topic.filter(), handler)
        while not self._idle():
            self._settled.clear()
            await self._settled.wait()

    def _idle(self) -> bool:
        return not self._executing and all(q.empty() for q in self._queues.values())

    def route_acks(self, route: AckRoute) -> Callable[[], None]:
        """Acks on ``hexa/<uid>/ack`` of commands other than relay commands (``config``)
        are offered to ``route``; returns the callable that removes it."""
        self._ack_routes.append(route)
        return lambda: self._ack_routes.remove(route) if route in self._ack_routes else None

    def device_lock(self, uid: str) -> asyncio.Lock:
        """Held while relay state of ``uid`` is written (shared with state reports)."""
        return self._locks.setdefault(uid, asyncio.Lock())

    # --- intake -------------------------------------------------------------------------
    async def _on_intent(self, params: dict[str, str], intent: topics.Intent, msg: Message) -> None:
        uid = params["uid"]
        if self._retained(msg):
            return
        intent = await self._attributed(intent, msg)
        index = int(params["index"]) if "index" in params else None
        queue = self._queues.get(uid)
        if queue is None:
            queue = self._queues[uid] = asyncio.Queue(MAX_QUEUED_PER_DEVICE)
            assert self._tg is not None
            self._tg.start_soon(self._worker, uid, queue, name=f"relay-worker-{uid}")
        try:
            queue.put_nowait(_Job(uid, index, intent))
        except asyncio.QueueFull:
            metrics.INTENTS_REFUSED.labels("busy").inc()
            await self._result(
                uid, intent.intent_id, "rejected", error="device busy: too many queued intents"
            )

    async def _on_bad_intent(
        self, params: dict[str, str], exc: topics.PayloadError, msg: Message
    ) -> None:
        if self._retained(msg):
            return
        metrics.INTENTS_REFUSED.labels("malformed").inc()
        await self._result(params["uid"], "", "rejected", error=f"malformed intent: {exc}")

    @staticmethod
    def _retained(msg: Message) -> bool:
        """A retained intent would replay on every reconnect ("ghost switching"): refused."""
        if msg.retain:
            metrics.INTENTS_REFUSED.labels("retained").inc()
            log.warning("refused retained intent on %s", printable(msg.topic))
        return msg.retain

    async def _attributed(self, intent: topics.Intent, msg: Message) -> topics.Intent:
        """Who asked and where come from the publisher, never from what it claims: only
        the hub's own intents (its session in-process, else its seal) keep them. An
        integration's intents carry the source of its token's kind (``home_assistant``
        for a Home Assistant token, else ``mqtt``)."""
        sender = msg.sender
        if sender is not None:
            trusted = sender.startswith("hub:")
        else:
            sealed = topics.sealed_by(intent, msg.topic, self._seal_key)
            trusted = sealed and self._first_seen(intent)
        if trusted:
            return intent
        kind, _, ident = (sender or "").partition(":")
        if kind == "integration":
            source = await self._integration_source(ident)
            return topics.unattributed(
                intent, actor_type="integration", actor_id=ident, source=source
            )
        return topics.unattributed(intent, actor_type="mqtt_client", actor_id=None)

    async def _integration_source(self, token_id: str) -> str:
        """The audit source of an integration token's intents, by its kind (a token's kind
        never changes, so it is looked up once)."""
        source = self._sources.get(token_id)
        if source is None:
            try:
                kinds = await IntegrationToken.filter(id=token_id).values_list("kind", flat=True)
            except (ValueError, OperationalError):  # not a token id, or the database is away
                return "mqtt"
            source = INTEGRATION_SOURCES.get(str(kinds[0]) if kinds else "", "mqtt")
            self._sources[token_id] = source
            if len(self._sources) > SOURCES_REMEMBERED:
                self._sources.popitem(last=False)
        return source

    def _first_seen(self, intent: topics.Intent) -> bool:
        if intent.intent_id in self._seen_seals:
            return False
        self._seen_seals[intent.intent_id] = None
        if len(self._seen_seals) > SEALS_REMEMBERED:
            self._seen_seals.popitem(last=False)
        return True

    async def _worker(self, uid: str, queue: asyncio.Queue[_Job]) -> None:
        """Runs one device's intents in order; exits when idle."""
        try:
            while True:
                if queue.empty():
                    try:
                        async with asyncio.timeout(IDLE_WORKER_S):
                            job = await queue.get()
                    except TimeoutError:
                        if queue.empty():
                            return
                        continue
                else:  # no timer and no suspension while intents are queued
                    job = queue.get_nowait()
                self._executing += 1
                try:
                    await self._execute(job)
                except Exception:
                    log.exception("intent %s for %s failed", job.intent.intent_id, uid)
                    await self._result(
                        uid, job.intent.intent_id, "rejected", error="internal error"
                    )
                finally:
                    self._executing -= 1
                    self._settled.set()
        finally:
            if self._queues.get(uid) is queue:
                del self._queues[uid]
                # anything put after the last get is answered, not lost
                while not queue.empty():
                    job = queue.get_nowait()
                    await self._result(uid, job.intent.intent_id, "rejected", error="retry")

    # --- execution ----------------------------------------------------------------------
    async def _execute(self, job: _Job) -> None:
        intent, uid = job.intent, job.uid
        device = await self.cache.get(uid)
        if device is None or device.org_id is None:
            metrics.INTENTS_REFUSED.labels("unknown_device").inc()
            await self._result(uid, intent.intent_id, "rejected", error="unknown device")
            return
        if job.index is not None and job.index >= device.relay_count:
            metrics.INTENTS_REFUSED.labels("bad_index").inc()
            await self._result(
                uid,
                intent.intent_id,
                "rejected",
                error=f"relay index {job.index} out of range (0-{device.relay_count - 1})",
            )
            return
        if not device.online:
            await self._finish(job, device, "offline", None, None)
            return

        command_id = f"{self._command_prefix}{next(self._command_seq):x}"
        expected = list(device.relays)
        command: topics.SetRelay | topics.SetAllRelays
        if job.index is None:
            value = intent.state == "ON"
            command = topics.SetAllRelays(command_id=command_id, state=value)
            expected = [value] * device.relay_count
        else:
            value = (
                (not device.relays[job.index]) if intent.state == "TOGGLE" else intent.state == "ON"
            )
            command = topics.SetRelay(command_id=command_id, relay_index=job.index, state=value)
            expected[job.index] = value
        future: asyncio.Future[topics.Ack] = asyncio.get_running_loop().create_future()
        pending = _Pending(uid, future, expected, intent)
        self._pending[command_id] = pending
        try:
            await self.bus.publish(topics.CMD.format(uid=uid), topics.encode_command(command))
            remaining = self.timeout_s - (time.perf_counter() - job.received)
            async with asyncio.timeout(max(remaining, 0.001)):  # no task, unlike wait_for
                ack = await future
        except TimeoutError:
            self._remember_timeout(command_id, pending)
            await self._finish(job, device, "timeout", command_id, None)
            return
        except BusUnavailable as exc:
            await self._finish(job, device, "rejected", command_id, None, error=str(exc))
            return
        finally:
            self._pending.pop(command_id, None)
        if not ack.ok:
            await self._finish(
                job,
                device,
                "rejected",
                command_id,
                None,
                error=ack.error or "device refused the command",
            )
            return
        relays = self._relays_from_ack(ack, expected, device)
        await self._finish(job, device, "applied", command_id, relays)

    @staticmethod
    def _relays_from_ack(ack: topics.Ack, expected: list[bool], device: DeviceInfo) -> list[bool]:
        if ack.relays is not None and len(ack.relays) == device.relay_count:
            return list(ack.relays)
        return expected

    def _remember_timeout(self, command_id: str, pending: _Pending) -> None:
        self._timed_out[command_id] = pending
        while len(self._timed_out) > LATE_ACK_MEMORY:
            self._timed_out.popitem(last=False)

    async def _finish(
        self,
        job: _Job,
        device: DeviceInfo,
        status: str,
        command_id: str | None,
        relays: list[bool] | None,
        *,
        error: str | None = None,
    ) -> None:
        latency_ms = round((time.perf_counter() - job.received) * 1000, 3)
        intent = job.intent
        if relays is not None:
            await self.apply_state(device, relays)
        await self._result(
            device.uid,
            intent.intent_id,
            status,
            relays=relays if relays is not None else list(device.relays),
            latency_ms=latency_ms,
            command_id=command_id,
            error=error,
        )
        metrics.observe_command(status, intent.source, latency_ms / 1000)
        await self.audit.record(
            action="relay_command",
            source=intent.source,
            actor_type=intent.actor_type
            or ("system" if intent.source in ("schedule", "automation") else "mqtt_client"),
            actor_id=intent.actor_id,
            device_id=device.id,
            org_id=device.org_id,
            request_id=intent.request_id,
            automation_id=intent.automation_id,
            schedule_id=intent.schedule_id,
            details={
                "status": status,
                "relay_index": job.index,
                "requested": intent.state,
                "relays": relays,
                "command_id": command_id,
                "intent_id": intent.intent_id,
                "latency_ms": latency_ms,
                **({"error": error} if error else {}),
            },
        )

    async def apply_state(
        self, device: DeviceInfo, relays: list[bool], inputs: list[bool] | None = None
    ) -> None:
        """Persist, cache and publish a new relay (and input) state of one device."""
        async with self.device_lock(device.uid):
            if inputs is not None and len(inputs) != device.input_count:
                inputs = None  # a report with the wrong number of inputs leaves them alone
            changed = _changes(device.relays, relays)
            changed_inputs = _changes(device.inputs, inputs)
            if changed or changed_inputs:
                await self._writer.write(device.id, changed, changed_inputs)
            if inputs is not None:
                device.inputs = list(inputs)
            await self.cache.touch(device)
            device.relays = list(relays)
        await self.publish_state(device, only=list(changed))

    async def publish_state(self, device: DeviceInfo, only: list[int] | None = None) -> None:
        """Retained per-relay and aggregate state (``only``: the relays that changed)."""
        try:
            for topic, payload, decoded in _state_messages(device, only):
                await self.bus.publish(topic, payload, retain=True, decoded=decoded)
        except BusUnavailable:
            log.warning(
                "state of %s not published: bus down (republished on reconnect)", device.uid
            )

    async def _result(
        self,
        uid: str,
        intent_id: str,
        status: str,
        *,
        relays: list[bool] | None = None,
        latency_ms: float | None = None,
        command_id: str | None = None,
        error: str | None = None,
    ) -> None:
        result = topics.Result(
            intent_id=intent_id,
            ok=status == "applied",
            status=status,  # type: ignore[arg-type]
            relays=relays,
            latency_ms=latency_ms,
            command_id=command_id,
            error=error,
        )
        try:
            await self.bus.publish(
                topics.RESULT.format(uid=uid),
                topics.encode(result),
                decoded=topics.Decoded(topics.RESULT, {"uid": uid}, result),
            )
        except (BusUnavailable, ValueError):
            log.warning("result of intent %s for %s not published", intent_id, uid)

    # --- acks ---------------------------------------------------------------------------
    async def _on_ack(self, params: dict[str, str], ack: topics.Ack, msg: Message) -> None:
        uid = params["uid"]
        pending = self._pending.get(ack.command_id)
        if pending is not None:
            if pending.uid != uid:
                log.warning("dropped ack for %s's command from %s", pending.uid, uid)
                metrics.BAD_PAYLOADS.labels("ack_wrong_device").inc()
                return
            if not pending.future.done():
                pending.future.set_result(ack)
            return
        late = self._timed_out.pop(ack.command_id, None)
        if late is None or late.uid != uid:
            for route in list(self._ack_routes):
                if await route(uid, ack):
                    return
            metrics.BAD_PAYLOADS.labels("ack_unknown_command").inc()
            log.info("dropped ack for unknown command %s from %s", ack.command_id, uid)
            return
        metrics.LATE_ACKS.inc()
        device = await self.cache.get(uid)
        if device is None or not ack.ok:
            return
        relays = self._relays_from_ack(ack, late.expected, device)
        await self.apply_state(device, relays)
        await self.audit.record(
            action="late_ack",
            source="device",
            actor_type="device",
            actor_id=uid,
            device_id=device.id,
            org_id=device.org_id,
            request_id=late.intent.request_id,
            details={
                "command_id": ack.command_id,
                "intent_id": late.intent.intent_id,
                "relays": relays,
            },
        )
