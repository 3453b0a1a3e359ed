"""The embedded broker: amqtt's listeners and CONNECT handling, the hub's engine after it.

:class:`HexaBroker` is a subclass of amqtt's ``Broker``. amqtt accepts the connections
(TCP, TLS, WebSocket), parses and validates each CONNECT and runs the authentication
plugin; from there the broker's own code takes over: admission (one identity per client
id, session limits, takeover), keepalive, and everything after CONNACK in
:class:`~hexa.broker.engine.Engine` (packets, routing, delivery, sessions). No amqtt code
is copied; the amqtt methods this relies on are guarded by ``test_unit_amqtt_guard``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from amqtt.broker import Broker

from hexa.broker import codec, metrics
from hexa.broker.acl import Identity, Kind
from hexa.broker.connection import Connection
from hexa.broker.engine import Client, Engine, LocalSession, Will
from hexa.broker.plugins import IDENTITY
from hexa.hub import topics
from hexa.hub.logs import printable

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
KEEPALIVE_SWEEP_S = 1.0
#: after this many connections ended, free memory is handed back to the system, this
#: long after the last of them
TRIM_AFTER_LEAVING = 1000
TRIM_DELAY_S = 2.0
#: a client id that ends in a device uid (``hx-7f3a9c21``, ``sim-hx-7f3a9c21``) is that
#: device's alone
_RESERVED = re.compile(r"(?:^|-)(hx-[0-9a-f]{8})$")


@dataclass(eq=False)
class _Login:
    """What the authentication plugin is shown of a CONNECT (it sets ``attributes``)."""

    client_id: str
    username: str | None
    password: str | None
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class _Admission:
    """Serializes the CONNECTs of one client id."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class HexaBroker(Broker):  # type: ignore[misc]  # amqtt ships no types
    """amqtt's listeners and CONNECT parsing, with the hub's admission and engine.

    - nothing of a client is stored before its credentials are proven; a clean session
      is gone when its connection ends, a persistent one expires after
      ``session_expiry_interval`` and keeps at most its newest queued messages;
    - a client id belongs to one identity: a CONNECT with another identity's client id
      is refused without disturbing that session, and ids ending in a device uid are
      that device's; each identity has a session limit;
    - keepalive is enforced (1.5 x, MQTT-3.1.2-24), and a device whose last connection
      ends is published ``offline`` whether or not it set a will;
    - a client must CONNECT within 10 s, and every socket is closed when its client is
      done with it.
    """

    def __init__(self, config: dict[str, Any], *, engine: Engine) -> None:
        super().__init__(config)
        self.engine = engine
        self._expiry_s: float | None = config.get("session_expiry_interval")
        self._transports: set[Any] = set()
        #: client id → its live connection
        self._live: dict[str, Connection] = {}
        #: identity key → the client ids of its sessions (live or persisted)
        self._owned: dict[str, set[str]] = {}
        self._owned_total = 0
        #: client id → the CONNECTs being admitted for it
        self._admitting: dict[str, _Admission] = {}
        self._expiry: asyncio.Task[None] | None = None
        self._keepalive: asyncio.Task[None] | None = None
        #: whole second of the monotonic clock → the connections to look at then (when
        #: they would be silent too long if nothing arrived since they were put there)
        self._silence_due: dict[int, list[tuple[str, Connection]]] = {}
        self._swept = math.floor(time.monotonic())  # the last second looked at
        #: connections ended since memory was last handed back to the system
        self._left = 0
        self._trim: asyncio.TimerHandle | None = None
        self._count_sessions()

    async def start(self) -> None:
        await super().start()
        self._expiry = asyncio.create_task(self._expire_sessions())
        self._keepalive = asyncio.create_task(self._watch_keepalives())

    # --- connections
    async def stream_connected(self, reader: Any, writer: Any, listener_name: str) -> None:
        conn = Connection(writer.transport, self.engine.outgoing, stream=reader, writer=writer)
        peer = writer.get_extra_info("peername")
        await self._connection(listener_name, conn, peer)

    async def ws_connected(self, websocket: Any, listener_name: str) -> None:
        conn = Connection(websocket.transport, self.engine.outgoing, websocket=websocket)
        await self._connection(listener_name, conn, websocket.remote_address)

    async def _connection(self, listener_name: str, conn: Connection, peer: Any) -> None:
        server = self._servers[listener_name]
        await server.acquire_connection()
        self._transports.add(conn.transport)
        conn.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        try:
            await self._serve(listener_name, conn)
        except (codec.ProtocolError, TimeoutError, OSError) as exc:
            if isinstance(exc, codec.ProtocolError):
                metrics.PROTOCOL_ERRORS.inc()
            log.info("MQTT connection from %s closed: %s", conn.peer, printable(str(exc)))
        except Exception:  # a defect of ours: this connection ends, the broker serves on
            log.exception("MQTT connection from %s failed", conn.peer)
        finally:
            with anyio.CancelScope(shield=True):
                await conn.finish()
            self._transports.discard(conn.transport)
            server.release_connection()
            conn.end()

    async def _serve(self, listener_name: str, conn: Connection) -> None:
        reader = codec.PacketReader(self.engine.max_packet)
        admitted = await self._connect(listener_name, conn, reader)
        if admitted is None:
            return
        client, present = admitted
        clean_exit = False
        try:
            conn.send(codec.connack(present))
            # MQTT-3.1.2-24: silent for 1.5 x keepalive means gone (see _watch_keepalives)
            conn.silence_limit_s = client.keep_alive * 1.5
            self._watch_silence(client.client_id, conn)
            client.outbox.attach(conn.send)  # resends what was in flight (MQTT-4.4.0-1)
            clean_exit = await self.engine.serve(client, conn, reader)
        finally:
            with anyio.CancelScope(shield=True):
                await self._ended(client, conn, clean_exit=clean_exit)

    async def _read_connect(self, conn: Connection, reader: codec.PacketReader) -> codec.Connect:
        """The client's CONNECT, which must be its first packet and arrive in time."""
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            while (packet := reader.next_packet()) is None:
                data = await conn.read()
                if not data:
                    raise codec.ProtocolError("connection closed before CONNECT")
                reader.feed(data)
        kind, flags, body = packet
        if kind != codec.CONNECT or flags:
            raise codec.ProtocolError("the first packet is not a CONNECT (MQTT-3.1.0-1)")
        return codec.decode_connect(body)

    async def _connect(
        self, listener_name: str, conn: Connection, reader: codec.PacketReader
    ) -> tuple[Client, bool] | None:
        """Read, authenticate and admit a CONNECT: the session it gets and whether that
        was present, or None when it was refused (answered and logged here)."""
        try:
            connect = await self._read_connect(conn, reader)
        except TimeoutError:
            raise TimeoutError(f"no CONNECT within {CONNECT_TIMEOUT_S:.0f} s") from None
        except codec.Refused as exc:
            self._refuse(conn, None, exc.code, str(exc))
            return None
        # Nothing of this client is stored until its credentials are proven.
        login = _Login(connect.client_id, connect.username, connect.password)
        connect.password = None  # not kept in memory
        authenticated = await self._authenticate(login, self.listeners_config[listener_name])
        login.password = None
        if not authenticated:
            self._refuse(conn, connect, codec.NOT_AUTHORIZED, "not authorized")
            return None
        identity: Identity = login.attributes[IDENTITY]
        cid = connect.client_id
        async with self._admission(cid):  # one CONNECT per client id at a time
            client, present, refusal = await self._admit(identity, connect)
            if client is None:
                self._refuse(conn, connect, codec.IDENTIFIER_REJECTED, refusal)
                return None
            client.connection = conn
            self.engine.clients[cid] = client
            self._live[cid] = conn
            owned = self._owned.setdefault(identity.key, set())
            if cid not in owned:
                owned.add(cid)
                self._owned_total += 1
            self._count_sessions()
        return client, present

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

    async def _admit(
        self, identity: Identity, incoming: codec.Connect
    ) -> tuple[Client | None, bool, str]:
        """The session this CONNECT gets and whether it was present, or None and why
        it is refused.

        A client id belongs to one identity: the identity of its live or persisted
        session, and a client id that ends in a device uid is that device's alone."""
        cid: str = incoming.client_id
        reserved = _RESERVED.search(cid)
        if reserved and identity.key != f"{Kind.DEVICE.value}:{reserved.group(1)}":
            return None, False, "client id reserved for another device"
        will = None
        if incoming.will_topic is not None:
            will = Will(
                incoming.will_topic,
                incoming.will_payload,
                incoming.will_qos,
                incoming.will_retain,
            )
        old = self.engine.clients.get(cid)
        if old is not None:
            if old.local is not None or old.identity.key != identity.key:
                return None, False, "client id in use by another identity"
            live = self._live.get(cid)
            if live is not None:  # MQTT-3.1.4-2: the same client again takes the session over
                log.info("client %s reconnected; closing its previous connection", printable(cid))
                live.close()
                with anyio.move_on_after(5):
                    await live.wait_ended()
                if self._live.get(cid) is live:
                    return None, False, "its previous connection is still closing"
            if self.engine.clients.get(cid) is old:
                if incoming.clean_session or old.clean:
                    self._drop(old)
                else:  # resume the persistent session with this connection's will
                    old.will = will
                    old.keep_alive = incoming.keep_alive
                    return old, True, ""
        owned = self._owned.get(identity.key, set())
        if len(owned) >= self.engine.limits.sessions_per_identity:
            idle = sorted(
                (c for c in owned if c not in self._live),
                key=lambda c: self.engine.clients[c].disconnected_at or 0,
            )
            if not idle:
                metrics.SESSIONS_REFUSED.labels("limit").inc()
                return None, False, "too many sessions for this identity"
            self._drop(self.engine.clients[idle[0]])  # the oldest persisted one makes room
        client = self.engine.new_client(cid, identity, clean=incoming.clean_session)
        client.will = will
        client.keep_alive = incoming.keep_alive
        return client, False, ""

    def _refuse(self, conn: Connection, connect: codec.Connect | None, code: int, why: str) -> None:
        """Answer a CONNECT with a refusal (the connection is then closed), logged once."""
        log.log(
            logging.INFO
            if code in (codec.NOT_AUTHORIZED, codec.UNACCEPTABLE_PROTOCOL)
            else logging.WARNING,
            "refused MQTT CONNECT of client %s (user %s) from %s: %s",
            printable(connect.client_id if connect else "?"),
            printable(connect.username if connect else "?"),
            conn.peer,
            why,
        )
        if code == codec.IDENTIFIER_REJECTED and connect is not None:
            metrics.SESSIONS_REFUSED.labels("client_id").inc()
        conn.send(codec.connack(False, code))

    async def _ended(self, client: Client, conn: Connection, *, clean_exit: bool) -> None:
        """A connection is over: publish the will unless it ended with DISCONNECT, forget
        a clean session, keep a persistent one (without the connection)."""
        if clean_exit:
            client.will = None
            conn.transport.close()  # what was sent before DISCONNECT still leaves
        else:
            conn.close()
        if client.connection is conn:
            client.connection = None
            client.outbox.detach()
            client.disconnected_at = time.time()
        cid = client.client_id
        if self._live.get(cid) is conn:
            del self._live[cid]
        self._left += 1
        if self._left >= TRIM_AFTER_LEAVING and self._trim is None:
            # once the wave of departures is over, not in the middle of it
            self._trim = asyncio.get_running_loop().call_later(TRIM_DELAY_S, self._trim_now)
        will = client.will
        await self.engine.publish_will(client)  # MQTT-3.1.2-8
        if client.clean and self.engine.clients.get(cid) is client and cid not in self._live:
            self._drop(client)
        # Presence: a device whose last connection ended is offline, will or not. (Not
        # judged by the retained availability: a device may have said "online" without
        # retaining it, so only a will that just said "offline" makes this one redundant.)
        identity = client.identity
        if identity.kind is Kind.DEVICE and not any(
            c in self._live for c in self._owned.get(identity.key, ())
        ):
            topic = topics.AVAILABILITY.format(uid=identity.name)
            offline = topics.encode_availability(False)
            if will is None or will.topic != topic or will.payload != offline or not will.retain:
                await self.engine.route(None, topic, offline, 1, True)
        self._count_sessions()

    def _drop(self, client: Client) -> None:
        """Forget a session: its subscriptions, queue and ownership."""
        self.engine.forget(client)
        owned = self._owned.get(client.identity.key)
        if owned is not None and client.client_id in owned:
            owned.discard(client.client_id)
            self._owned_total -= 1
            if not owned:
                del self._owned[client.identity.key]
        self._count_sessions()

    async def _expire_sessions(self) -> None:
        """Drop persistent sessions whose client stayed away too long."""
        if self._expiry_s is None:
            return
        while True:
            # a sweep over every session: as often as the interval needs, at most 1/s
            await asyncio.sleep(min(60.0, max(1.0, self._expiry_s / 10)))
            limit = time.time() - self._expiry_s
            for client in list(self.engine.clients.values()):
                if (
                    client.connection is None
                    and client.local is None
                    and client.disconnected_at is not None
                    and client.disconnected_at < limit
                ):
                    self._drop(client)

    def _trim_now(self) -> None:
        self._trim, self._left = None, 0
        _return_memory()

    def _watch_silence(self, cid: str, conn: Connection, after: int | None = None) -> None:
        """Look at ``conn`` again in the second it would be silent too long (never with
        keepalive 0), later than second ``after``."""
        if conn.silence_limit_s:
            due = math.ceil(conn.last_read + conn.silence_limit_s)
            due = max(due, (self._swept if after is None else after) + 1)
            self._silence_due.setdefault(due, []).append((cid, conn))

    async def _watch_keepalives(self) -> None:
        """Close connections silent for longer than 1.5 x their keepalive. No timer per
        connection and no sweep over all of them: once a second, the connections due in
        that second are looked at (each once per keepalive period) and those that spoke
        meanwhile are put where their new limit falls."""
        while True:
            await asyncio.sleep(KEEPALIVE_SWEEP_S)
            now = time.monotonic()
            while self._swept + 1 <= now:
                second = self._swept = self._swept + 1
                for cid, conn in self._silence_due.pop(second, None) or []:
                    if self._live.get(cid) is not conn or conn.closing:
                        continue  # gone: it was looked after when it ended
                    if not conn.silent_too_long(now):
                        self._watch_silence(cid, conn, second)
                        continue
                    metrics.KEEPALIVE_TIMEOUTS.inc()
                    log.info(
                        "client %s silent for %.0f s: disconnected",
                        printable(cid),
                        now - conn.last_read,
                    )
                    conn.close()

    def _count_sessions(self) -> None:
        """Update the session gauge."""
        for state, n in self.session_counts().items():
            metrics.SESSIONS.labels(state).set(n)

    def session_counts(self) -> dict[str, int]:
        """Client sessions by state: ``connected`` and ``persisted`` (client away)."""
        connected = len(self._live)
        return {"connected": connected, "persisted": self._owned_total - connected}

    # --- the hub's own session, in process
    def attach_local(self, client_id: str, identity: Identity, local: LocalSession) -> Client:
        """Attach a session that receives through ``local`` instead of a connection."""
        client = self.engine.new_client(client_id, identity, clean=True)
        client.local = local
        self.engine.clients[client_id] = client
        return client

    def detach_local(self, client: Client) -> None:
        self.engine.forget(client)

    async def kick(self, *, key: str) -> int:
        """End every session of an identity (its credentials were revoked): live ones are
        disconnected (their will is published), persisted ones are dropped."""
        closed = 0
        for cid in list(self._owned.get(key, ())):
            conn = self._live.get(cid)
            if conn is not None:
                conn.close()
                with anyio.move_on_after(5):
                    await conn.wait_ended()
                closed += 1
            client = self.engine.clients.get(cid)
            if client is not None and client.local is None:
                self._drop(client)
        return closed

    async def shutdown(self) -> None:
        # Let what was routed leave (e.g. the hub's last "offline") before closing.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.0
        while loop.time() < deadline and any(  # noqa: ASYNC110  (polls the transports)
            c.unsent() and not c.closing for c in self._live.values()
        ):
            await asyncio.sleep(0.01)
        if self._trim is not None:
            self._trim.cancel()
        for task in (self._expiry, self._keepalive):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for transport in list(self._transports):
            transport.abort()
        await asyncio.sleep(0)
        await super().shutdown()

    def bound_port(self, listener: str) -> int | None:
        server = self._servers.get(listener)
        if server is None or server.instance is None:
            return None
        return int(server.instance.sockets[0].getsockname()[1])


def _trimmer() -> Callable[[], int] | None:
    """glibc's ``malloc_trim``, where there is one."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if trim is None:
        return None
    return lambda: int(trim(0))


_TRIM = _trimmer()


def _return_memory() -> None:
    """Hand memory freed by departed connections back to the system: Python frees its
    arenas only when wholly empty and the C heap keeps freed blocks, so after a wave of
    disconnects the process would otherwise keep its peak size."""
    gc.collect()
    if _TRIM is not None:
        _TRIM()
