"""The broker's core: sessions, the packets of a connected client, routing and delivery.

Everything after a client's CONNECT is handled here, inline in the connection's reader:
a PUBLISH is checked (topic, size, ACL), matched against the subscriptions, written to
each allowed subscriber (or queued for it) and acknowledged, with no task, queue or
plugin event per message. The hub's own session is attached in process: it publishes
through :meth:`Engine.route` and receives through a plain function, never as MQTT bytes,
while the same messages still reach outside subscribers over their connections.

Limits and what happens when one bites (each counted in a metric):

- a QoS 1/2 delivery goes into the subscriber's outbox (``max_inflight`` unacknowledged,
  then a queue of ``max_queued``); a connected subscriber whose queue is full, or whose
  unsent bytes stay above 1 MB for 10 s, is disconnected as a slow consumer;
- QoS 0 deliveries to a subscriber with over 1 MB unsent are dropped;
- a persistent session away keeps its newest ``max_queued`` QoS 1/2 messages;
- payloads above ``max_payload`` and retained intents are acknowledged and dropped;
- a client's packets are handled a bounded batch at a time, so one flooding client
  takes its turn with the others;
- a device or integration publishing faster than its rate waits before its next packet
  is read (``broker.ratelimit``): its socket fills, nothing is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from hexa.broker import codec, metrics
from hexa.broker.acl import Identity, Kind
from hexa.broker.connection import Connection, Outgoing
from hexa.broker.outbox import Outbox
from hexa.broker.plugins import Access
from hexa.broker.ratelimit import TokenBucket
from hexa.broker.routing import RetainedStore, Subscriptions, matches
from hexa.hub import topics
from hexa.hub.logs import printable
from hexa.hub.topics import Decoded

log = logging.getLogger(__name__)

#: intents are commands: never retained (contract §3, Hygiene)
NO_RETAIN = tuple(t.filter() for t in topics.INTENT_TOPICS)
#: bytes unsent to one client beyond which it counts as not keeping up
MAX_UNSENT_BYTES = 1024 * 1024
#: a client backed up this long is disconnected even if only QoS 0 is dropped meanwhile
STALL_LIMIT_S = 10.0
#: publishes of one client handled before the others get a turn (acknowledgements and
#: pings are cheap and do not count): the longer, the less switching; the shorter, the
#: less one flooding client delays everyone else
BATCH = 8
#: how long a publisher waits for a congested subscriber per message; one that stays
#: congested fills its queue and is disconnected as a slow consumer
PACE_LIMIT_S = 1.0


class Drains(Protocol):
    """Something a publisher can wait on until it has room again."""

    async def drained(self) -> None: ...


class LocalSession(Drains, Protocol):
    """A session attached in process (the hub's own): deliveries are calls."""

    def deliver(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        sender: str,
        decoded: Decoded[Any] | None = None,
    ) -> bool:
        """Take one message (``decoded``: what it was built from, when the hub published
        it); True when the session is congested (publishers should wait for
        :meth:`drained`)."""
        ...


@dataclass(frozen=True)
class Limits:
    """Per-client bounds of the embedded broker (settings ``HEXA_MQTT_*``)."""

    sessions_per_identity: int = 16
    queued_messages: int = 1000
    inflight_messages: int = 32
    #: publishes a second one session may make, by kind of identity (0: unlimited);
    #: the hub's own sessions are never limited
    device_publish_rate: float = 100.0
    integration_publish_rate: float = 1000.0

    def publish_rate(self, kind: Kind) -> float:
        if kind is Kind.DEVICE:
            return self.device_publish_rate
        if kind is Kind.INTEGRATION:
            return self.integration_publish_rate
        return 0.0


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(eq=False)
class Client:
    """One MQTT session: what survives its connections when it is persistent."""

    client_id: str
    identity: Identity
    clean: bool
    outbox: Outbox
    #: topic filter → granted QoS
    filters: dict[str, int] = field(default_factory=dict)
    connection: Connection | None = None
    will: Will | None = None
    keep_alive: int = 0
    disconnected_at: float | None = None
    #: a session attached in process (the hub's own) takes its deliveries here
    local: LocalSession | None = None
    #: its publish rate, when limited
    bucket: TokenBucket | None = None

    @property
    def sender(self) -> str:
        return self.identity.key


class Engine:
    """Sessions by client id, subscriptions, retained messages and the packet loop."""

    def __init__(self, access: Access, *, max_payload: int, limits: Limits) -> None:
        self.access = access
        self.max_payload = max_payload
        self.limits = limits
        #: the largest packet read: a payload at the limit plus the longest topic; larger
        #: packets close the connection (smaller oversized ones are acked and dropped)
        self.max_packet = max_payload + 65535 + 4
        self.clients: dict[str, Client] = {}
        self.subscriptions: Subscriptions[Client] = Subscriptions()
        self.retained = RetainedStore()
        self.outgoing = Outgoing()
        metrics.CONNECTIONS.track(self)

    def new_client(self, client_id: str, identity: Identity, *, clean: bool) -> Client:
        outbox = Outbox(
            max_inflight=self.limits.inflight_messages, max_queued=self.limits.queued_messages
        )
        client = Client(client_id, identity, clean, outbox)
        rate = self.limits.publish_rate(identity.kind)
        if rate > 0:
            client.bucket = TokenBucket(rate, time.monotonic())
        return client

    # --- subscriptions
    async def subscribe(self, client: Client, flt: str, qos: int) -> int:
        """Subscribe ``client`` (ACL checked); the granted QoS or 0x80."""
        if not codec.valid_filter(flt) or not await self.access.may_subscribe(client.identity, flt):
            return codec.SUBACK_FAILURE
        self.subscriptions.add(flt, client.client_id, client, qos)
        client.filters[flt] = qos
        return qos

    def unsubscribe(self, client: Client, flt: str) -> None:
        if client.filters.pop(flt, None) is not None:
            self.subscriptions.remove(flt, client.client_id)

    async def replay_retained(self, client: Client, flt: str, qos: int) -> None:
        """The retained messages a new subscription receives (MQTT-3.3.1-6)."""
        for message in self.retained.matching(flt):
            await self.access.prepare_receive(message.topic)
            if not self.access.may_receive(client.identity, message.topic):
                continue
            granted = min(qos, message.qos)
            if client.local is not None:
                client.local.deliver(message.topic, message.payload, granted, True, "broker")
            else:  # a snapshot: the queue bound does not apply
                client.outbox.push(
                    codec.encode_topic(message.topic),
                    message.payload,
                    granted,
                    retain=True,
                    force=True,
                )

    def forget(self, client: Client) -> None:
        """Remove a session's subscriptions and undelivered messages."""
        for flt in client.filters:
            self.subscriptions.remove(flt, client.client_id)
        client.filters.clear()
        client.outbox.clear()
        if self.clients.get(client.client_id) is client:
            del self.clients[client.client_id]

    # --- routing
    def refused(self, topic: str, payload: bytes, retain: bool) -> str | None:
        """Why a publish is acknowledged but dropped, or None."""
        if len(payload) > self.max_payload:
            return "oversized"
        if retain and payload and any(matches(topic, f) for f in NO_RETAIN):
            return "retained"
        return None

    async def route(
        self,
        sender: Client | None,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        decoded: Decoded[Any] | None = None,
    ) -> list[Drains]:
        """Deliver a publish to every subscriber allowed to receive it (and retain it);
        the subscribers it left congested (a client publisher waits for them to drain).
        Sessions attached in process also get ``decoded``, the hub's own message as it
        built it, when the hub passes it."""
        congested: list[Drains] = []
        if retain:
            self.retained.put(topic, payload, qos)
        found = self.subscriptions.match(topic)
        if not found:
            return congested
        if any(t.identity.kind is Kind.INTEGRATION for t, _ in found.values()):
            await self.access.prepare_receive(topic)  # their organization decides
        may_receive = self.access.may_receive
        sender_key = "broker" if sender is None else sender.sender
        wire_topic = codec.encode_topic(topic)
        qos0: bytes | None = None  # one encoding for every QoS 0 delivery
        sent = 0
        for target, granted in found.values():
            if not may_receive(target.identity, topic):
                continue
            q = granted if granted < qos else qos  # MQTT-3.8.4: the lower of the two
            if target.local is not None:
                sent += 1
                if target.local.deliver(topic, payload, q, False, sender_key, decoded):
                    congested.append(target.local)
                continue
            conn = target.connection
            if conn is None:  # a persistent session away keeps QoS 1/2 (MQTT-3.1.2-4)
                if q and not target.clean and not target.outbox.push(wire_topic, payload, q):
                    target.outbox.drop_oldest()
                    metrics.QUEUE_DROPS.labels("offline").inc()
                    target.outbox.push(wire_topic, payload, q)
                continue
            if conn.closing:
                continue
            if conn.unsent() > MAX_UNSENT_BYTES:
                now = time.monotonic()
                if conn.stalled_since is None:
                    conn.stalled_since = now
                elif now - conn.stalled_since > STALL_LIMIT_S:
                    self.slow_consumer(target, conn)
                    continue
                if not q:
                    metrics.QUEUE_DROPS.labels("qos0").inc()
                    continue
            else:
                conn.stalled_since = None
            if not q:
                if qos0 is None:
                    qos0 = codec.publish(wire_topic, payload, 0, None, False)
                conn.send(qos0)
                sent += 1
            elif not target.outbox.push(wire_topic, payload, q):
                self.slow_consumer(target, conn)
                continue
            else:
                sent += 1
                if target.outbox.congested:
                    congested.append(target.outbox)
        if sent:
            metrics.MESSAGES_SENT.inc(sent)
        return congested

    def slow_consumer(self, client: Client, conn: Connection) -> None:
        """Disconnect a client that does not keep up (its will is published), logged once."""
        if conn.warned or conn.closing:
            return
        conn.warned = True
        metrics.SLOW_CONSUMERS.inc()
        log.warning(
            "disconnecting client %s: does not keep up with its deliveries "
            "(%d unacknowledged, %d bytes unsent)",
            printable(client.client_id),
            client.outbox.backlog,
            conn.unsent(),
        )
        conn.close()

    async def publish_will(self, client: Client) -> None:
        """Publish a client's will (it went away without DISCONNECT), if it may."""
        will, client.will = client.will, None
        if will is None:
            return
        if not await self.access.may_publish(client.identity, will.topic):
            return
        if self.refused(will.topic, will.payload, will.retain) is not None:
            return
        await self.route(client, will.topic, will.payload, will.qos, will.retain)

    # --- a connected client's packets
    async def serve(self, client: Client, conn: Connection, reader: codec.PacketReader) -> bool:
        """Handle the client's packets (``reader`` may hold some already) until its
        connection ends; True if it ended with DISCONNECT (its will is then discarded,
        MQTT-3.14.4-3)."""
        outbox = client.outbox
        send = conn.send
        budget = BATCH
        try:
            while True:
                for kind, flags, body in reader.packets():
                    if kind == codec.PUBLISH:
                        await self._publish(client, flags, body, send)
                        budget -= 1
                        if not budget:
                            budget = BATCH
                            await asyncio.sleep(0)  # the other clients' turn
                    elif kind == codec.PUBACK:
                        codec.check_flags(kind, flags)
                        outbox.puback(codec.packet_id(body))
                    elif kind == codec.PUBREC:
                        codec.check_flags(kind, flags)
                        outbox.pubrec(codec.packet_id(body))
                    elif kind == codec.PUBCOMP:
                        codec.check_flags(kind, flags)
                        outbox.pubcomp(codec.packet_id(body))
                    elif kind == codec.PUBREL:
                        codec.check_flags(kind, flags)
                        pid = codec.packet_id(body)
                        outbox.released(pid)
                        send(codec.ack(codec.PUBCOMP, pid))
                    elif kind == codec.PINGREQ:
                        codec.check_flags(kind, flags)
                        send(codec.PINGRESP)
                    elif kind == codec.SUBSCRIBE:
                        codec.check_flags(kind, flags)
                        await self._subscribe(client, body, send)
                    elif kind == codec.UNSUBSCRIBE:
                        codec.check_flags(kind, flags)
                        pid, filters = codec.decode_unsubscribe(body)
                        for flt in filters:
                            self.unsubscribe(client, flt)
                        send(codec.ack(codec.UNSUBSCRIBE, pid))
                    elif kind == codec.DISCONNECT:
                        codec.check_flags(kind, flags)
                        return True
                    elif kind == codec.CONNECT:
                        raise codec.ProtocolError("a second CONNECT (MQTT-3.1.0-2)")
                    else:  # a server-to-client or reserved packet type
                        codec.check_flags(kind, flags)
                data = await conn.read()
                if not data:
                    return False
                reader.feed(data)
        except codec.ProtocolError as exc:
            metrics.PROTOCOL_ERRORS.inc()
            log.info(
                "closing MQTT connection of client %s from %s: %s",
                printable(client.client_id),
                conn.peer,
                exc,
            )
            return False

    async def _publish(
        self, client: Client, flags: int, body: bytes, send: Callable[[bytes], None]
    ) -> None:
        topic, qos, pid, retain, _dup, payload = codec.decode_publish(flags, body)
        metrics.RECEIVED_BY_KIND[client.identity.kind.value].inc()
        bucket = client.bucket
        if bucket is not None:
            wait = bucket.take(time.monotonic())
            if wait:  # over its rate: its next packets stay in its socket meanwhile
                metrics.PUBLISHES_THROTTLED.labels(client.identity.kind.value).inc()
                await asyncio.sleep(wait)
        if qos == 2:
            assert pid is not None
            if not client.outbox.first_receipt(pid):  # a resend: routed once (MQTT-4.3.3)
                send(codec.ack(codec.PUBREC, pid))
                return
        reason = self.refused(topic, payload, retain)
        if reason is not None:
            metrics.DROPPED.labels(reason).inc()
            log.warning(
                "dropped %s publish on %s from %s",
                reason,
                printable(topic),
                printable(client.client_id),
            )
        elif await self.access.may_publish(client.identity, topic):
            congested = await self.route(client, topic, payload, qos, retain)
            if congested:  # wait for slow subscribers rather than fill their queues
                for subscriber in congested:
                    kind = "client" if isinstance(subscriber, Outbox) else "hub"
                    metrics.PUBLISHER_WAITS.labels(kind).inc()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PACE_LIMIT_S):
                        for subscriber in congested:
                            await subscriber.drained()
        if qos == 1:
            assert pid is not None
            send(codec.ack(codec.PUBACK, pid))
        elif qos == 2:
            assert pid is not None
            send(codec.ack(codec.PUBREC, pid))

    async def _subscribe(self, client: Client, body: bytes, send: Callable[[bytes], None]) -> None:
        pid, wanted = codec.decode_subscribe(body)
        codes = [await self.subscribe(client, flt, qos) for flt, qos in wanted]
        send(codec.suback(pid, codes))
        for (flt, _), code in zip(wanted, codes, strict=True):
            if code != codec.SUBACK_FAILURE:
                await self.replay_retained(client, flt, code)
