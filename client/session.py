"""``HexaClient``: one connection to a Hexa hub's broker as an integration.

A background task reads every message the broker delivers, decodes it (logging and
skipping what does not decode), resolves the intents this client is waiting on, and
queues the messages for :meth:`HexaClient.messages`. Reconnecting is left to the caller:
enter the client again (see ``docs/integrations.md``); retained states are replayed on
every subscribe, so a reconnected client catches up by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Self

try:
    import aiomqtt
except ModuleNotFoundError as exc:  # the hub's wheel makes it optional: say which extra
    raise ModuleNotFoundError(
        "hexa.client needs aiomqtt; install it with: pip install 'hexa-hub[client]'",
        name=exc.name,
    ) from exc

from hexa.client import codec
from hexa.client.errors import (
    AuthenticationError,
    ConnectError,
    ConnectionLost,
    PayloadError,
    ResultTimeout,
)
from hexa.client.messages import Message, RelayResult

log = logging.getLogger("hexa.client")

#: how long :meth:`HexaClient.set_relay` waits for a result unless told otherwise: above
#: the hub's default command timeout (5 s), so the hub's own ``timeout`` answer arrives
RESULT_TIMEOUT_S = 10.0

#: MQTT 3.1.1 CONNACK return codes, from the MQTT 5 reason codes paho reports them as
_CONNACK_311 = {132: 1, 133: 2, 136: 3, 134: 4, 135: 5}
_REFUSED_CREDENTIALS = (4, 5)

# Request and reply are small packets following each other: without TCP_NODELAY each
# waits for the peer's delayed ACK (40 ms or more); paho does not set it.
_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _again(lost: ConnectionLost) -> ConnectionLost:
    """A new ConnectionLost saying the same, for each place one loss is raised (every
    iterator, every waiting or later intent): an exception instance raised again and again
    collects every raiser's frames in its traceback."""
    fresh = ConnectionLost(*lost.args)
    fresh.__cause__ = lost.__cause__
    return fresh


@dataclass(frozen=True)
class _End:
    """Queued after the last message: the connection ended (``error``) or was closed."""

    error: ConnectionLost | None


@dataclass
class _Connection:
    """What one ``async with`` of the client owns."""

    mqtt: aiomqtt.Client
    stack: contextlib.AsyncExitStack
    queue: asyncio.Queue[Message | _End]
    pending: dict[str, asyncio.Future[RelayResult]] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None
    error: ConnectionLost | None = None
    ended: bool = False
    dropped: int = 0


class HexaClient:
    """A connection to a Hexa hub as an integration, for use as ``async with``.

    ``token_name`` and ``token`` are an integration token's name and secret (created with
    ``POST /api/v1/integrations/tokens``); the client sees and may switch only the devices
    of that token's organization. ``tls`` is True for TLS verified against the system's
    certificate authorities, or an :class:`ssl.SSLContext` (a private CA, client
    certificates); ``port`` defaults to 8883 with TLS and 1883 without. ``timeout`` bounds
    connecting, subscribing and publishing. Up to ``queue_size`` received messages wait for
    :meth:`messages`; beyond that the oldest are dropped (with a warning).

    The client is reusable (enter it again after a lost connection) but not reentrant.
    """

    def __init__(
        self,
        host: str,
        port: int | None = None,
        *,
        token_name: str,
        token: str,
        tls: ssl.SSLContext | bool = False,
        identifier: str | None = None,
        keepalive: int = 30,
        timeout: float = 10.0,
        queue_size: int = 1024,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.host = host
        self.port = port if port is not None else (8883 if tls else 1883)
        self.identifier = identifier or f"hexa-client-{uuid.uuid4().hex[:12]}"
        self._token_name = token_name
        self._token = token
        self._tls = ssl.create_default_context() if tls is True else tls or None
        self._keepalive = keepalive
        self._timeout = timeout
        self._queue_size = queue_size
        self._conn: _Connection | None = None

    # --- connecting -------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        if self._conn is not None:
            raise RuntimeError("this HexaClient is already connected (reusable, not reentrant)")
        mqtt = aiomqtt.Client(
            self.host,
            self.port,
            username=self._token_name,
            password=self._token,
            identifier=self.identifier,
            clean_session=True,
            keepalive=self._keepalive,
            timeout=self._timeout,
            tls_context=self._tls,
            socket_options=(_NODELAY,),
        )
        stack = contextlib.AsyncExitStack()
        try:
            await self._connect(stack, mqtt)
            await self._subscribe(mqtt)
        except BaseException:
            with contextlib.suppress(aiomqtt.MqttError):
                await stack.aclose()
            raise
        conn = _Connection(mqtt, stack, asyncio.Queue(self._queue_size))
        conn.reader = asyncio.create_task(self._read(conn), name=f"hexa-client {self.identifier}")
        self._conn = conn
        return self

    async def _connect(self, stack: contextlib.AsyncExitStack, mqtt: aiomqtt.Client) -> None:
        where = f"{self.host}:{self.port}"
        try:
            await stack.enter_async_context(mqtt)
        except aiomqtt.MqttCodeError as exc:
            value = getattr(exc.rc, "value", exc.rc)
            code = _CONNACK_311.get(value, value) if isinstance(value, int) else None
            if code in _REFUSED_CREDENTIALS:
                raise AuthenticationError(
                    f"{where} refused integration token {self._token_name!r}: {exc}", code=code
                ) from None
            raise ConnectError(f"{where} refused the connection: {exc}", code=code) from None
        except aiomqtt.MqttError as exc:
            raise ConnectError(f"cannot connect to {where}: {exc}") from None

    async def _subscribe(self, mqtt: aiomqtt.Client) -> None:
        filters = [codec.topic_filter(t) for t in codec.RECEIVED]
        try:
            codes = await mqtt.subscribe([(f, 1) for f in filters])
        except aiomqtt.MqttError as exc:
            raise ConnectError(f"subscribing at {self.host}:{self.port} failed: {exc}") from None
        for flt, code in zip(filters, codes, strict=False):
            value = getattr(code, "value", code)  # a paho ReasonCode, or a plain int
            if not isinstance(value, int) or value >= 0x80:
                raise ConnectError(
                    f"{self.host}:{self.port} refused the subscription to {flt}: "
                    "are these an integration token's credentials?"
                )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.reader is not None:
            conn.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await conn.reader
        self._end(conn, None)
        with contextlib.suppress(aiomqtt.MqttError):  # already gone: nothing to say goodbye to
            await conn.stack.aclose()

    # --- receiving --------------------------------------------------------------------
    async def messages(self) -> AsyncIterator[Message]:
        """Every message from the hub, in order of arrival: retained states first (on
        connect), then changes, input events and the results of every intent for the
        organization's devices. Ends when the client is closed; raises
        :class:`ConnectionLost` when the connection ends first. One consumer at a time.
        """
        queue = self._connected().queue
        while True:
            item = await queue.get()
            if isinstance(item, _End):
                queue.put_nowait(item)  # so that any other waiting iterator ends too
                if item.error is not None:
                    raise _again(item.error)
                return
            yield item

    async def _read(self, conn: _Connection) -> None:
        """Runs for as long as the connection does. However it stops, it ends the
        connection for the caller: a reader that died quietly would leave
        :meth:`messages` and every waiting intent hanging on a live-looking client."""
        where = f"{self.host}:{self.port}"
        try:
            async for raw in conn.mqtt.messages:
                payload = raw.payload
                if isinstance(payload, bytes | bytearray):
                    self._handle(conn, str(raw.topic), bytes(payload), bool(raw.retain))
        except aiomqtt.MqttError as exc:
            self._end(conn, ConnectionLost(f"connection to {where} lost: {exc}"))
        except Exception as exc:  # a bug of this client: say so, and end (no silent hang)
            log.exception("hexa.client stopped reading from %s", where)
            self._end(conn, ConnectionLost(f"stopped reading from {where}: {exc!r}"))
        else:
            self._end(conn, ConnectionLost(f"connection to {where} ended"))

    def _handle(self, conn: _Connection, topic: str, payload: bytes, retain: bool) -> None:
        try:
            message = codec.decode(topic, payload, retain)
        except PayloadError as exc:
            log.warning("skipped a message: %s", exc)
            return
        if message is None:
            return
        if isinstance(message, RelayResult):
            waiter = conn.pending.get(message.intent_id)
            if waiter is not None and not waiter.done():
                waiter.set_result(message)
        if conn.queue.full():
            conn.queue.get_nowait()
            conn.dropped += 1
            if conn.dropped == 1 or conn.dropped % 1000 == 0:
                log.warning(
                    "messages() is not keeping up: dropped the oldest waiting message "
                    "(%d so far; queue_size is %d)",
                    conn.dropped,
                    conn.queue.maxsize,
                )
        conn.queue.put_nowait(message)

    def _end(self, conn: _Connection, error: ConnectionLost | None) -> None:
        """The connection is over: fail the intents still waiting and end the iterators."""
        if conn.ended:
            return
        conn.ended, conn.error = True, error
        failure = error or ConnectionLost("the client was closed")
        for waiter in conn.pending.values():
            if not waiter.done():
                waiter.set_exception(_again(failure))
        if conn.queue.full():
            conn.queue.get_nowait()
        conn.queue.put_nowait(_End(error))

    # --- intents ----------------------------------------------------------------------
    async def set_relay(
        self,
        uid: str,
        index: int,
        state: bool | Literal["toggle"],
        *,
        within: float = RESULT_TIMEOUT_S,
    ) -> RelayResult:
        """Switch relay ``index`` (0-based) of device ``uid`` on (True), off (False) or
        over (``"toggle"``), and return the relay service's result, whatever its status.

        Raises :class:`ResultTimeout` when no result arrives within ``within`` seconds
        (also what an intent for another organization's device gets: the broker drops it),
        :class:`ConnectionLost` when the connection ends first, and ValueError for a
        ``uid`` or ``index`` that cannot be in a topic.
        """
        if isinstance(state, bool):
            value: codec.IntentValue = "ON" if state else "OFF"
        elif isinstance(state, str) and state.lower() == "toggle":
            value = "TOGGLE"
        else:
            raise ValueError(f"state must be True, False or 'toggle', not {state!r}")
        return await self._intent(uid, codec.intent_topic(uid, index), value, within)

    async def set_all_relays(
        self, uid: str, state: bool, *, within: float = RESULT_TIMEOUT_S
    ) -> RelayResult:
        """Switch every relay of device ``uid`` on or off (one command to the device);
        results and errors as for :meth:`set_relay`."""
        if not isinstance(state, bool):
            raise ValueError(f"state must be True or False, not {state!r}")
        return await self._intent(
            uid, codec.intent_topic(uid, None), "ON" if state else "OFF", within
        )

    async def _intent(
        self, uid: str, topic: str, value: codec.IntentValue, within: float
    ) -> RelayResult:
        conn = self._connected()
        if conn.error is not None:
            raise _again(conn.error)
        intent_id = uuid.uuid4().hex
        waiter: asyncio.Future[RelayResult] = asyncio.get_running_loop().create_future()
        conn.pending[intent_id] = waiter  # before publishing: the result can be quick
        try:
            try:
                await conn.mqtt.publish(topic, codec.encode_intent(value, intent_id), qos=1)
            except aiomqtt.MqttError as exc:
                raise ConnectionLost(f"intent for {uid} not sent: {exc}") from None
            try:
                return await asyncio.wait_for(waiter, within)
            except TimeoutError:
                raise ResultTimeout(uid, intent_id, within) from None
        finally:
            conn.pending.pop(intent_id, None)

    def _connected(self) -> _Connection:
        if self._conn is None:
            raise RuntimeError("connect first: async with HexaClient(...) as hub")
        return self._conn
