"""One client connection's bytes in and out, over TCP (TLS) or WebSocket.

Reads return whatever arrived (many packets at once); writes are collected and handed to
the transport once per event-loop turn, so a burst of deliveries or acknowledgements to
one client costs one system call. A keepalive watch closes a connection silent for too
long. Nothing here knows MQTT beyond that.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from websockets.exceptions import ConnectionClosed

from hexa.broker.waiters import Waiters

log = logging.getLogger(__name__)

READ_SIZE = 65536


class Outgoing:
    """The connections written to in this event-loop turn: what they got after their
    first packet is written together at its end, so a connection costs at most two
    writes per turn however many packets it got (one scheduled callback for all)."""

    def __init__(self) -> None:
        self._pending: list[Connection] = []
        self._scheduled = False

    def add(self, conn: Connection) -> None:
        self._pending.append(conn)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._at_end_of_turn)

    def _at_end_of_turn(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for conn in pending:
            conn.flush()


class Connection:
    """A client's transport: :meth:`read`, :meth:`send`, :meth:`close`."""

    def __init__(
        self,
        transport: Any,
        outgoing: Outgoing,
        *,
        stream: Any = None,
        writer: Any = None,
        websocket: Any = None,
    ) -> None:
        self.transport = transport
        self._outgoing = outgoing
        self._stream = stream
        self._writer = writer
        self._websocket = websocket
        self.peer = "?"
        self.last_read = time.monotonic()
        self._ended = False
        self._ended_waiters = Waiters()
        #: close after this long without a byte from the client (0: never)
        #: since when deliveries back up (None: they do not)
        self.stalled_since: float | None = None
        self.warned = False
        self._out: list[bytes] = []
        self._unsent = 0
        self._flushing = False
        self._flusher: asyncio.Task[None] | None = None
        self.silence_limit_s = 0.0
        self._loop = asyncio.get_running_loop()

    async def read(self) -> bytes:
        """The next bytes from the client; empty at the end of the connection."""
        if self._websocket is not None:
            try:
                data = await self._websocket.recv()
            except ConnectionClosed:
                return b""
            if isinstance(data, str):  # MQTT over WebSocket is binary (MQTT-6.0.0-1)
                return b""
        else:
            data = await self._stream.read(READ_SIZE)
        self.last_read = time.monotonic()
        return bytes(data)

    def send(self, data: bytes) -> None:
        """Send bytes to the client: the first packet of a loop turn at once (nothing
        waits on a lone reply), the ones after it together at the end of the turn."""
        if self.transport.is_closing():
            return
        if self._websocket is None:
            if not self._flushing:  # the first of this turn
                self._flushing = True
                self._outgoing.add(self)
                self.transport.write(data)
                return
            self._out.append(data)
            self._unsent += len(data)
            return
        self._out.append(data)
        self._unsent += len(data)
        if not self._flushing:
            self._flushing = True
            self._flusher = self._loop.create_task(self._flush_websocket())

    def flush(self) -> None:
        """Hand what is queued to the transport (stream connections)."""
        self._flush_stream()

    def _flush_stream(self) -> None:
        self._flushing = False
        out, self._out, self._unsent = self._out, [], 0
        if out and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    async def _flush_websocket(self) -> None:
        try:
            while self._out:
                out, self._out, self._unsent = self._out, [], 0
                await self._websocket.send(b"".join(out))
        except ConnectionClosed:
            self._out, self._unsent = [], 0
        finally:
            self._flushing = False

    def unsent(self) -> int:
        """Bytes written for this client and not yet taken by the network."""
        return self._unsent + int(self.transport.get_write_buffer_size())

    def close(self) -> None:
        """Close the connection now: what the socket takes at once still leaves (a
        CONNACK just queued, say), the rest is lost."""
        if self._websocket is None:
            self._flush_stream()
        self.transport.abort()

    async def finish(self, limit_s: float = 2.0) -> None:
        """Send what is queued and close; a peer that does not take it within
        ``limit_s`` is cut off."""
        try:
            async with asyncio.timeout(limit_s):
                if self._websocket is not None:
                    while self._flusher is not None and not self._flusher.done():
                        await asyncio.shield(self._flusher)
                    await self._websocket.close()
                elif not self.transport.is_closing():
                    self._flush_stream()
                    self._writer.close()
                    await self._writer.wait_closed()
        except (TimeoutError, OSError, ConnectionClosed):
            pass
        finally:
            self.transport.abort()

    @property
    def closing(self) -> bool:
        return bool(self.transport.is_closing())

    def silent_too_long(self, now: float) -> bool:
        """Whether the client sent nothing for longer than its keepalive allows."""
        return bool(self.silence_limit_s) and now - self.last_read > self.silence_limit_s

    def end(self) -> None:
        """Mark the connection over (after everything about it is done)."""
        self._ended = True
        self._ended_waiters.wake()

    async def wait_ended(self) -> None:
        """Return once :meth:`end` was called."""
        if not self._ended:
            await self._ended_waiters.wait()
