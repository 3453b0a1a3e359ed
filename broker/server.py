"""The embedded broker: a subclass of amqtt's ``Broker``, configured for the hub.

:class:`HexaBroker` keeps amqtt's packet codec, protocol handler, sessions and plugin
hooks, and overrides three parts of it with its own code: connection handling (the
CONNECT deadline, admission only after authentication, one identity per client id,
session limits, keepalive, back-pressure on floods), routing (exact filters looked up,
only wildcard filters scanned) and delivery (bounded queues, slow consumers
disconnected, retained messages replayed per session and ACL). Overrides call
``super()`` where amqtt's own step still applies; none is a copy of amqtt's code.
:class:`EmbeddedBroker` builds its listeners, plugins and limits from the settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from amqtt.adapters import (
    ReaderAdapter,
    StreamReaderAdapter,
    StreamWriterAdapter,
    WebSocketsReader,
    WebSocketsWriter,
)
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, BrokerError, MQTTError, NoDataError, ProtocolHandlerError
from amqtt.mqtt.connack import IDENTIFIER_REJECTED, NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from hexa.broker import metrics
from hexa.broker.acl import Identity, Kind
from hexa.broker.gate import HUB_USERNAME, Gate
from hexa.broker.local import LocalBus
from hexa.broker.plugins import IDENTITY, HexaAclPlugin, HexaAuthPlugin
from hexa.hub import topics
from hexa.hub.config import Settings
from hexa.hub.events import DeviceCredentialsRevoked, DeviceEvent, Events, IntegrationRevoked
from hexa.hub.logs import printable

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
#: intents are commands: never retained (contract §3, Hygiene)
NO_RETAIN = tuple(t.filter() for t in topics.INTENT_TOPICS)
#: a client id that ends in a device uid (``hx-7f3a9c21``, ``sim-hx-7f3a9c21``) is that
#: device's alone
_RESERVED = re.compile(r"(?:^|-)(hx-[0-9a-f]{8})$")
#: bytes unsent to one client beyond which it counts as not keeping up
MAX_UNSENT_BYTES = 1024 * 1024
#: publishes accepted but not yet routed, all clients together: when full, publishers
#: wait their turn (first come, first served), so one flooding client cannot starve the
#: others nor grow memory without bound
BROADCAST_QUEUE = 1024
#: the QoS of the PUBLISH being routed, in the task of the client that sent it
_PUBLISH_QOS: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "hexa_publish_qos", default=None
)
#: a client backed up this long is disconnected even if only QoS 0 is dropped meanwhile
STALL_LIMIT_S = 10.0
#: a client's publishes waiting to be routed: beyond HIGH its socket is not read until
#: they are down to LOW (TCP back-pressure on a flooding client)
INBOUND_HIGH, INBOUND_LOW = 64, 16


@dataclass(frozen=True)
class Limits:
    """Per-client bounds of the embedded broker (settings ``HEXA_MQTT_*``)."""

    sessions_per_identity: int = 16
    queued_messages: int = 1000


class _Watched(ReaderAdapter):  # type: ignore[misc]
    """A connection's reader that notes when bytes last arrived (for keepalive)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.last = time.monotonic()

    async def read(self, n: int = -1) -> bytes:
        data: bytes = await self._inner.read(n)
        self.last = time.monotonic()
        return data

    def feed_eof(self) -> None:
        self._inner.feed_eof()


@dataclass(eq=False)
class _Link:
    """One client connection: its transport, keepalive watch and delivery backlog."""

    transport: Any
    reader: _Watched
    writer: Any
    peer: str = "?"
    outbound: int = 0
    warned: bool = False
    #: since when deliveries back up (None: they do not)
    stalled_since: float | None = None
    paused: bool = False
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    _timer: asyncio.TimerHandle | None = None

    @property
    def pausable(self) -> bool:
        """Whether reading may be paused (websockets flow-controls its own transport)."""
        return not isinstance(self.writer, WebSocketsWriter)

    def backlogged(self, limit: int) -> bool:
        """Whether deliveries to this client back up beyond ``limit`` (or 1 MB unsent)."""
        return self.outbound >= limit or self.transport.get_write_buffer_size() > MAX_UNSENT_BYTES

    def watch(self, limit_s: float, client_id: str) -> None:
        """Close the connection once nothing was received for ``limit_s``."""
        loop = asyncio.get_running_loop()

        def check() -> None:
            if self.paused:  # not read while paused: not silent
                self._timer = loop.call_later(limit_s, check)
                return
            idle = time.monotonic() - self.reader.last
            if idle < limit_s:
                self._timer = loop.call_later(limit_s - idle, check)
                return
            metrics.KEEPALIVE_TIMEOUTS.inc()
            log.info("client %s silent for %.0f s: disconnected", printable(client_id), idle)
            self.transport.abort()

        self._timer = loop.call_later(limit_s, check)

    def resume(self) -> None:
        """Read again after a pause (the pause does not count as silence)."""
        self.paused = False
        self.reader.last = time.monotonic()
        self.transport.resume_reading()

    def stop_watching(self) -> None:
        """Stop the keepalive watch."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


@dataclass(eq=False)
class _Admission:
    """Serializes the CONNECTs of one client id."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class _Handler(BrokerProtocolHandler):  # type: ignore[misc]
    """amqtt's broker-side protocol handler, tied to our connection record."""

    link: _Link | None = None

    async def handle_publish(self, publish_packet: Any) -> None:
        await super().handle_publish(publish_packet)
        link = self.link
        if link is None or link.paused or self.session is None:
            return
        waiting = self.session.delivered_message_queue.qsize()
        if waiting >= INBOUND_HIGH and link.pausable:
            link.paused = True
            link.transport.pause_reading()
        elif waiting >= INBOUND_HIGH * 4 and not link.transport.is_closing():
            # over WebSocket amqtt reads eagerly: a client this far ahead is cut off
            metrics.SLOW_CONSUMERS.inc()
            log.warning(
                "disconnecting client %s: %d publishes waiting to be routed",
                printable(self.session.client_id),
                waiting,
            )
            link.transport.abort()


class HexaBroker(Broker):  # type: ignore[misc]
    """amqtt with the fixes the hub relies on (each method extends, none copies, amqtt).

    - nothing of a client is stored before its credentials are proven; a clean session
      is gone when its connection ends, a persistent one expires and loses its oldest
      queued messages beyond a bound;
    - a client id belongs to one identity: a CONNECT with another identity's client id
      is refused without disturbing that session, and ids ending in a device uid are
      that device's; each identity has a session limit;
    - keepalive is enforced (1.5 x, MQTT-3.1.2-24), and a device whose last connection
      ends is published ``offline`` whether or not it set a will;
    - a client that does not keep up with its deliveries is disconnected (QoS 0 is
      dropped first), with one log line per incident;
    - every socket is closed when amqtt is done with it, and a client must CONNECT
      within 10 s (amqtt waits forever, and its shutdown hangs on such sockets);
    - retained intents and oversized payloads are dropped (acked, never delivered);
    - a last will goes through the same PUBLISH ACL as any publish;
    - retained messages are replayed only for the session's own subscriptions and only
      where delivery is allowed (amqtt replays every client's filters on CONNECT).
    """

    def __init__(
        self, config: dict[str, Any], *, max_payload: int, limits: Limits | None = None
    ) -> None:
        super().__init__(config)
        self._transports: set[Any] = set()
        self.max_payload = max_payload
        self.limits = limits or Limits()
        self._broadcast_queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(BROADCAST_QUEUE)
        #: client id → its live connection
        self._links: dict[str, _Link] = {}
        #: identity key → the client ids of its sessions (live or persisted)
        self._owned: dict[str, set[str]] = {}
        self._owned_total = 0
        #: client id → the CONNECTs being admitted for it
        self._admitting: dict[str, _Admission] = {}
        self._count_sessions()
        self._filters_version = 0
        self._wildcards: tuple[int, list[str]] = (-1, [])
        # amqtt logs repr(self._subscriptions) at DEBUG after every SUBSCRIBE, formatting
        # every session of every filter even with DEBUG off: O(devices) per subscribe.
        self._subscriptions = _Subscriptions(self.__dict__["_subscriptions"])
        # filters per client id: amqtt calls _publish_retained_messages_for_subscription
        # for every filter of every client on each CONNECT; most are not the client's.
        self._filters_of: dict[str, set[str]] = {}

    # --- routing: amqtt scans every filter for every message (and formats a debug line
    # per miss); with one exact filter per device that is O(devices) per message. We look
    # up exact filters in the dict and scan only the wildcard ones.
    async def add_subscription(self, subscription: tuple[str, int], session: Any) -> int:
        self._filters_version += 1
        granted = int(await super().add_subscription(subscription, session))
        if granted != 0x80:
            self._filters_of.setdefault(session.client_id, set()).add(subscription[0])
        return granted

    def _del_subscription(self, a_filter: str, session: Any) -> int:
        self._filters_version += 1
        self._filters_of.get(session.client_id, set()).discard(a_filter)
        return int(super()._del_subscription(a_filter, session))

    async def _del_all_subscriptions(self, session: Any) -> None:
        await super()._del_all_subscriptions(session)
        self._filters_of.pop(session.client_id, None)
        self._filters_version += 1

    def _matching_filters(self, topic: str) -> list[str]:
        version, wildcards = self._wildcards
        if version != self._filters_version:
            wildcards = [f for f in self._subscriptions if "+" in f or "#" in f]
            self._wildcards = (self._filters_version, wildcards)
        found = [f for f in wildcards if self._matches(topic, f)]
        if topic in self._subscriptions:
            found.append(topic)
        return found

    async def _run_broadcast(self, running_tasks: Any) -> None:
        broadcast = await self._broadcast_queue.get()
        topic = broadcast["topic"]
        for flt in self._matching_filters(topic):
            for target, sub_qos in list(self._subscriptions.get(flt, ())):
                qos = broadcast.get("qos")
                if qos is None:  # MQTT-3.8.4: the lower of the published and granted QoS
                    qos = min(sub_qos, broadcast.get("publish_qos", sub_qos))
                if not await self._topic_filtering(target, topic=topic, action=Action.RECEIVE):
                    continue
                cid = target.client_id
                if target.transitions.state != "connected":
                    # MQTT-3.1.2-4: a persistent session keeps QoS 1/2 messages while away,
                    # as many as the queue limit (the oldest go first)
                    if not target.clean_session and qos in (1, 2):
                        queue = target.retained_messages
                        if queue.qsize() >= self.limits.queued_messages:
                            queue.get_nowait()
                            metrics.QUEUE_DROPS.labels("offline").inc()
                        await self._retain_broadcast_message(broadcast, qos, target)
                    continue
                handler = self._get_handler(target)
                if handler is None:
                    continue
                # Deliveries are tasks in amqtt's own supervised list (running_tasks): its
                # routing loop reaps them and its shutdown cancels and awaits them.
                link = self._links.get(cid)
                if link is None:  # the hub's own in-process session: no connection
                    running_tasks.append(
                        asyncio.ensure_future(
                            handler.deliver(topic, broadcast["data"], qos, _sender(broadcast))
                        )
                    )
                    continue
                if link.backlogged(self.limits.queued_messages):
                    now = time.monotonic()
                    if link.stalled_since is None:
                        link.stalled_since = now
                    if qos == 0 and now - link.stalled_since < STALL_LIMIT_S:
                        metrics.QUEUE_DROPS.labels("qos0").inc()
                        continue
                    self._slow_consumer(link, cid)
                    continue
                link.stalled_since = None
                link.outbound += 1
                running_tasks.append(
                    asyncio.ensure_future(
                        self._deliver(handler, link, cid, topic, broadcast["data"], qos)
                    )
                )

    async def _deliver(
        self, handler: Any, link: _Link, cid: str, topic: str, data: bytes, qos: int
    ) -> None:
        """One delivery to a connected client; a failure is that client's, logged once."""
        try:
            await handler.mqtt_publish(topic, data, qos, retain=False)
        except TimeoutError:  # amqtt waited 5 s for the PUBACK, and drops the message
            metrics.QUEUE_DROPS.labels("unacknowledged").inc()
            self._slow_consumer(link, cid)
        except (AMQTTError, ProtocolHandlerError, OSError):
            metrics.QUEUE_DROPS.labels("closed").inc()
        finally:
            link.outbound -= 1

    def _slow_consumer(self, link: _Link, cid: str) -> None:
        """Disconnect a client that does not keep up (its will is published), logged once."""
        if link.warned or link.transport.is_closing():
            return
        link.warned = True
        metrics.SLOW_CONSUMERS.inc()
        log.warning(
            "disconnecting client %s: does not keep up with its deliveries "
            "(%d unacknowledged, %d bytes unsent)",
            printable(cid),
            link.outbound,
            link.transport.get_write_buffer_size(),
        )
        link.transport.abort()

    # --- connections: amqtt stores a session, marks it connected and only then checks the
    # credentials, never removes a refused or clean session, lets anybody take over any
    # client id and never enforces keepalive. We run the connection ourselves and call
    # amqtt's protocol handler and message loop for the rest.
    async def stream_connected(self, reader: Any, writer: Any, listener_name: str) -> None:
        await self._connection(
            listener_name,
            StreamReaderAdapter(reader),
            StreamWriterAdapter(writer),
            writer.transport,
        )

    async def ws_connected(self, websocket: Any, listener_name: str) -> None:
        await self._connection(
            listener_name,
            WebSocketsReader(websocket),
            WebSocketsWriter(websocket),
            websocket.transport,
        )

    async def _connection(
        self, listener_name: str, reader: Any, writer: Any, transport: Any
    ) -> None:
        server = self._servers[listener_name]
        await server.acquire_connection()
        self._transports.add(transport)
        link = _Link(transport, _Watched(reader), writer)
        try:
            await self._serve(listener_name, link)
        except (AMQTTError, MQTTError, NoDataError, ProtocolHandlerError, OSError) as exc:
            log.info("MQTT connection from %s closed: %s", link.peer, printable(str(exc)))
        finally:
            self._transports.discard(transport)
            transport.abort()
            server.release_connection()
            link.ended.set()

    async def _serve(self, listener_name: str, link: _Link) -> None:
        reader, writer = link.reader, link.writer
        peer = writer.get_peer_info()
        link.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        try:
            handler, incoming = await asyncio.wait_for(
                _Handler.init_from_connect(reader, writer, self.plugins_manager),
                CONNECT_TIMEOUT_S,
            )
        except TimeoutError as exc:
            raise NoDataError(f"no CONNECT within {CONNECT_TIMEOUT_S:.0f} s") from exc
        # Nothing of this client is stored until its credentials are proven.
        authenticated = await self._authenticate(incoming, self.listeners_config[listener_name])
        incoming.password = None  # not kept in memory
        if not authenticated:
            await self._refuse(link, incoming, NOT_AUTHORIZED, "not authorized")
            return
        identity: Identity = incoming.attributes[IDENTITY]
        cid = incoming.client_id
        async with self._admission(cid):  # one CONNECT per client id at a time
            session, refusal = await self._admit(identity, incoming)
            if session is None:
                await self._refuse(link, incoming, IDENTIFIER_REJECTED, refusal)
                return
            handler.link = link
            session.transitions.connect()
            handler.attach(session, reader, writer)
            self._sessions[cid] = (session, handler)
            self._links[cid] = link
            owned = self._owned.setdefault(identity.key, set())
            if cid not in owned:
                owned.add(cid)
                self._owned_total += 1
            self._count_sessions()
        try:
            await handler.mqtt_connack_authorize(True)
            # MQTT-3.1.2-24: silent for 1.5 x keepalive means gone (its will is published)
            if session.keep_alive > 0:
                link.watch(session.keep_alive * 1.5, cid)
            await handler.start()
            await self._publish_session_retained_messages(session)
            for flt, qos in self._session_filters(session):
                await self._publish_retained_messages_for_subscription((flt, qos), session)
            await self._client_message_loop(session, handler)
        finally:
            with anyio.CancelScope(shield=True):
                await self._ended(session, handler, link, identity)

    @contextlib.asynccontextmanager
    async def _admission(self, cid: str) -> AsyncIterator[None]:
        """Held while a CONNECT for ``cid`` is admitted: two CONNECTs for one client id
        would otherwise both take the old session over."""
        gate = self._admitting.get(cid)
        if gate is None:
            gate = self._admitting[cid] = _Admission()
        gate.users += 1
        try:
            async with gate.lock:
                yield
        finally:
            gate.users -= 1
            if not gate.users:
                del self._admitting[cid]

    async def _admit(self, identity: Identity, incoming: Session) -> tuple[Session | None, str]:
        """The session this CONNECT gets, or None and why it is refused.

        A client id belongs to one identity: the identity of its live or persisted
        session, and a client id that ends in a device uid is that device's alone."""
        cid = incoming.client_id
        reserved = _RESERVED.search(cid)
        if reserved and identity.key != f"{Kind.DEVICE.value}:{reserved.group(1)}":
            return None, "client id reserved for another device"
        entry = self._sessions.get(cid)
        if entry is not None:
            old: Session = entry[0]
            owner: Identity | None = old.attributes.get(IDENTITY)
            if owner is None or owner.key != identity.key:
                return None, "client id in use by another identity"
            link = self._links.get(cid)
            if link is not None:  # MQTT-3.1.4-2: the same client again takes the session over
                log.info("client %s reconnected; closing its previous connection", printable(cid))
                link.transport.abort()
                with anyio.move_on_after(5):
                    await link.ended.wait()
                if self._links.get(cid) is link:
                    return None, "its previous connection is still closing"
            if self._sessions.get(cid, (None,))[0] is old:
                if incoming.clean_session or old.clean_session:
                    await self._cleanup_session(cid)
                else:  # resume the persistent session with this connection's will and keepalive
                    for name in (
                        "will_flag",
                        "will_message",
                        "will_topic",
                        "will_qos",
                        "will_retain",
                        "keep_alive",
                        "username",
                        "remote_address",
                        "remote_port",
                        "ssl_object",
                    ):
                        setattr(old, name, getattr(incoming, name))
                    old.parent = 1
                    return old, ""
        owned = self._owned.get(identity.key, set())
        if len(owned) >= self.limits.sessions_per_identity:
            idle = sorted(
                (c for c in owned if c not in self._links),
                key=lambda c: self._sessions[c][0].last_disconnect_time or 0,
            )
            if not idle:
                metrics.SESSIONS_REFUSED.labels("limit").inc()
                return None, "too many sessions for this identity"
            await self._cleanup_session(idle[0])  # the oldest persisted session makes room
        incoming.parent = 0
        return incoming, ""

    async def _refuse(self, link: _Link, incoming: Session, code: int, why: str) -> None:
        log.log(
            logging.INFO if code == NOT_AUTHORIZED else logging.WARNING,
            "refused MQTT CONNECT of client %s (user %s) from %s: %s",
            printable(incoming.client_id),
            printable(incoming.username),
            link.peer,
            why,
        )
        if code != NOT_AUTHORIZED:
            metrics.SESSIONS_REFUSED.labels("client_id").inc()
        await ConnackPacket.build(0, code).to_stream(link.writer)
        await link.writer.drain()

    async def _ended(self, session: Session, handler: Any, link: _Link, identity: Identity) -> None:
        """A connection is over: forget a clean session, keep a persistent one (idle)."""
        link.stop_watching()
        cid = session.client_id
        if session.transitions.is_connected():  # the loop ended without its disconnect path
            link.transport.abort()
            await self._stop_handler(handler)
            session.transitions.disconnect()
        if self._links.get(cid) is link:
            del self._links[cid]
        entry = self._sessions.get(cid)
        if entry is not None and entry[0] is session:
            if session.clean_session:
                await self._cleanup_session(cid)
            else:  # keep the session, not the connection's buffers (amqtt keeps both)
                handler.detach()
                self._sessions[cid] = (session, None)
        # Presence: a device whose last connection ended is offline, will or not.
        if identity.kind is Kind.DEVICE and not any(
            c in self._links for c in self._owned.get(identity.key, ())
        ):
            topic = topics.AVAILABILITY.format(uid=identity.name)
            offline = topics.encode_availability(False)
            retained = self._retained_messages.get(topic)
            if retained is None or bytes(retained.data) != offline:
                await self.retain_message(None, topic, offline, 1)
                with anyio.move_on_after(2):  # the routing loop may be gone (shutdown)
                    await self._broadcast_message(None, topic, offline, 1)
        self._count_sessions()

    def _count_sessions(self) -> None:
        """Update the session gauge."""
        for state, n in self.session_counts().items():
            metrics.SESSIONS.labels(state).set(n)

    def _session_filters(self, session: Session) -> list[tuple[str, int]]:
        found = []
        for flt in self._filters_of.get(session.client_id, ()):
            for s, qos in self._subscriptions.get(flt, ()):
                if s is session:
                    found.append((flt, qos))
        return found

    async def _cleanup_session(self, client_id: str) -> None:
        entry = self._sessions.get(client_id)
        await super()._cleanup_session(client_id)
        self._filters_of.pop(client_id, None)
        if entry is not None:
            identity = entry[0].attributes.get(IDENTITY)
            if identity is not None:
                owned = self._owned.get(identity.key)
                if owned is not None and client_id in owned:
                    owned.discard(client_id)
                    self._owned_total -= 1
                    if not owned:
                        del self._owned[identity.key]
        self._count_sessions()

    def session_counts(self) -> dict[str, int]:
        """Client sessions by state: ``connected`` and ``persisted`` (client away)."""
        connected = len(self._links)
        return {"connected": connected, "persisted": self._owned_total - connected}

    def _refused(self, topic: str, data: bytes | bytearray | None, retain: bool) -> str | None:
        if data is not None and len(data) > self.max_payload:
            return "oversized"
        if retain and data and any(self._matches(topic, f) for f in NO_RETAIN):
            return "retained"
        return None

    async def _handle_message_delivery(
        self, client_session: Any, handler: Any, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        message = wait_deliver.result()
        # the QoS it was published with, for _broadcast_message (called by amqtt below, in
        # this task): a subscriber gets the lower of it and its own (MQTT-3.8.4)
        published = _PUBLISH_QOS.set(None if message is None else message.qos)
        try:
            if message is not None and message.topic:
                retain = bool(message.publish_packet and message.publish_packet.retain_flag)
                reason = self._refused(message.topic, message.data, retain)
                if reason is not None:
                    metrics.DROPPED.labels(reason).inc()
                    log.warning(
                        "dropped %s publish on %s from %s",
                        reason,
                        printable(message.topic),
                        printable(client_session.client_id),
                    )
                    return True
            return bool(
                await super()._handle_message_delivery(client_session, handler, wait_deliver)
            )
        finally:
            _PUBLISH_QOS.reset(published)
            link = self._links.get(client_session.client_id)
            if (
                link is not None
                and link.paused
                and client_session.delivered_message_queue.qsize() <= INBOUND_LOW
            ):
                link.resume()

    async def _broadcast_message(
        self,
        session: Any,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        broadcast: dict[str, Any] = {"session": session, "topic": topic, "data": data}
        if force_qos is not None:
            broadcast["qos"] = force_qos
        elif (published := _PUBLISH_QOS.get()) is not None:
            broadcast["publish_qos"] = published
        await self._broadcast_queue.put(broadcast)

    async def _handle_disconnect(
        self, client_session: Any, handler: Any, disconnect_waiter: asyncio.Future[Any]
    ) -> None:
        s = client_session
        if s.will_flag and s.will_topic:
            allowed = await self._topic_filtering(s, s.will_topic, Action.PUBLISH)
            if not allowed or self._refused(s.will_topic, s.will_message, bool(s.will_retain)):
                s.will_flag = False
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Any
    ) -> None:
        flt, _ = subscription
        if flt not in self._filters_of.get(session.client_id, ()):
            return
        mine = [q for s, q in self._subscriptions.get(flt, []) if s.client_id == session.client_id]
        handler = self._get_handler(session)
        if not mine or handler is None:
            return
        sub_qos = mine[0]
        sends = []
        if "+" in flt or "#" in flt:
            candidates = list(self._retained_messages.items())
        else:  # an exact filter (every device's own cmd topic): no scan of all retained
            exact = self._retained_messages.get(flt)
            candidates = [] if exact is None else [(flt, exact)]
        for topic, retained in candidates:
            if self._matches(topic, flt) and await self._topic_filtering(
                session, topic, Action.RECEIVE
            ):
                qos = min(sub_qos, retained.qos if retained.qos is not None else sub_qos)
                sends.append(handler.mqtt_publish(retained.topic, retained.data, qos, retain=True))
        if sends:
            await asyncio.gather(*sends, return_exceptions=True)

    async def kick(self, *, key: str) -> int:
        """End every session of an identity (its credentials were revoked): live ones are
        disconnected (their will is published), persisted ones are dropped."""
        closed = 0
        for cid in list(self._owned.get(key, ())):
            link = self._links.get(cid)
            if link is not None:
                link.transport.abort()
                with anyio.move_on_after(5):
                    await link.ended.wait()
                closed += 1
            if cid in self._sessions:
                await self._cleanup_session(cid)
        return closed

    async def shutdown(self) -> None:
        # Deliver what was accepted (e.g. the hub's last "offline") before closing.
        # Delivery crosses several amqtt queues and tasks, so wait for a quiet spell.
        loop = asyncio.get_running_loop()
        deadline, quiet = loop.time() + 2.0, 0
        while loop.time() < deadline and quiet < 5:
            quiet = 0 if self._undelivered() else quiet + 1
            await asyncio.sleep(0.01)
        for transport in list(self._transports):
            transport.abort()
        await asyncio.sleep(0)
        await super().shutdown()

    def _undelivered(self) -> bool:
        """Whether accepted publishes are still on their way to subscribers."""
        return (
            not self._broadcast_queue.empty()
            or any(not task.done() for task in self._tasks_queue)
            or any(not s.delivered_message_queue.empty() for s, _ in self._sessions.values())
        )

    def bound_port(self, listener: str) -> int | None:
        server = self._servers.get(listener)
        if server is None or server.instance is None:
            return None
        return int(server.instance.sockets[0].getsockname()[1])


def _sender(broadcast: dict[str, Any]) -> str:
    """Who published a message: an identity key, or ``broker`` for the broker's own."""
    session = broadcast.get("session")
    identity = None if session is None else session.attributes.get(IDENTITY)
    return "broker" if identity is None else str(identity.key)


class _Subscriptions(dict[str, Any]):
    """amqtt's filter → subscribers table, with a repr that does not walk it."""

    def __repr__(self) -> str:
        return f"<{len(self)} subscription filters>"


class EmbeddedBroker:
    """Starts and stops the embedded broker from the hub's settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.hub_password = secrets.token_urlsafe(32)
        self.gate = Gate(self.hub_password)
        self._broker: HexaBroker | None = None
        self.port: int | None = None
        self.tls_port: int | None = None
        self.ws_port: int | None = None

    def _config(self) -> dict[str, Any]:
        s = self.settings
        listeners: dict[str, Any] = {
            "default": {
                "type": "tcp",
                "bind": f"{s.mqtt_host}:{s.mqtt_port}",
                "max_connections": -1,
            }
        }
        if s.tls_enabled and s.mqtt_tls_port is not None:
            listeners["tls"] = {
                "type": "tcp",
                "bind": f"{s.mqtt_host}:{s.mqtt_tls_port}",
                "ssl": True,
                "certfile": str(s.mqtt_tls_cert),
                "keyfile": str(s.mqtt_tls_key),
            }
        if s.mqtt_ws_port is not None:
            listeners["ws"] = {"type": "ws", "bind": f"{s.mqtt_host}:{s.mqtt_ws_port}"}
        gate = {"gate": self.gate}
        return {
            "listeners": listeners,
            # amqtt's session monitor drops persistent sessions idle for this long
            "session_expiry_interval": s.mqtt_session_expiry_s,
            # Our own plugin set replaces amqtt's defaults (loggers that hook every
            # packet, anonymous auth, $SYS), which cost up to 2x throughput.
            "plugins": {
                f"{HexaAuthPlugin.__module__}.{HexaAuthPlugin.__name__}": gate,
                f"{HexaAclPlugin.__module__}.{HexaAclPlugin.__name__}": gate,
            },
        }

    async def start(self) -> None:
        s = self.settings
        limits = Limits(
            sessions_per_identity=s.mqtt_max_sessions_per_identity,
            queued_messages=s.mqtt_max_queued_messages,
        )
        broker = HexaBroker(self._config(), max_payload=s.max_mqtt_payload_bytes, limits=limits)
        names = {type(p).__name__ for p in broker.plugins_manager.plugins}
        if names != {HexaAuthPlugin.__name__, HexaAclPlugin.__name__}:
            raise RuntimeError(f"unexpected broker plugins: {sorted(names)}")
        try:
            await broker.start()
        except BrokerError as exc:
            # amqtt wraps bind failures; hand the OSError to the caller to report.
            if isinstance(exc.__cause__, OSError):
                raise exc.__cause__ from None
            raise
        self._broker = broker
        self.port = broker.bound_port("default")
        self.tls_port = broker.bound_port("tls")
        self.ws_port = broker.bound_port("ws")
        log.info("embedded broker listening on %s:%s", self.settings.mqtt_host, self.port)

    def hub_credentials(self) -> tuple[str, int, str, str]:
        """(host, port, username, password) for the hub's own bus connection."""
        host = self.settings.mqtt_host
        if host in ("0.0.0.0", "::", ""):  # noqa: S104
            host = "127.0.0.1"
        assert self.port is not None
        return host, self.port, HUB_USERNAME, self.hub_password

    def local_bus(self, client_id: str) -> LocalBus:
        """The hub's bus, attached in-process (no socket, no MQTT encoding)."""
        assert self._broker is not None
        return LocalBus(
            self._broker, client_id=client_id, presence_topic=topics.HUB_STATUS.format()
        )

    def attach(self, events: Events) -> None:
        """Close broker sessions when the hub revokes credentials; forget a changed
        device's organization."""
        events.subscribe(DeviceCredentialsRevoked, self._on_device_revoked)
        events.subscribe(DeviceEvent, self._on_device_change)
        events.subscribe(IntegrationRevoked, self._on_integration_revoked)

    async def _on_device_change(self, event: DeviceEvent) -> None:
        self.gate.forget(event.device.device_uid)

    async def _on_device_revoked(self, event: DeviceCredentialsRevoked) -> None:
        await self.close_device(event.uid)

    async def _on_integration_revoked(self, event: IntegrationRevoked) -> None:
        await self.close_integration(event.token_id)

    async def close_device(self, uid: str) -> None:
        self.gate.forget(uid)
        if self._broker is not None:
            await self._broker.kick(key=Identity(Kind.DEVICE, uid).key)

    async def close_integration(self, token_id: str) -> None:
        if self._broker is not None:
            await self._broker.kick(key=Identity(Kind.INTEGRATION, "", id=token_id).key)

    def session_counts(self) -> dict[str, int]:
        return {} if self._broker is None else self._broker.session_counts()

    async def shutdown(self) -> None:
        if self._broker is not None:
            broker, self._broker = self._broker, None
            await broker.shutdown()
