"""The HTTP/1.1 connection protocol: uvicorn's h11 protocol with a deadline for the request head."""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

_TIMEOUT_ANSWER = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class HeadTimeoutProtocol(H11Protocol):
    """Closes a connection whose request head is not complete in time.

    uvicorn only times out a connection that is idle between requests
    (``timeout_keep_alive``): a client that sends part of a request line or headers and
    then nothing, or a byte now and then, was kept open forever, and a few hundred of
    them used up the process's open files. The head (request line and headers) must now
    arrive within ``head_timeout_s``: counted from the connection for its first request,
    from the first byte for the next ones on a kept-alive connection. The client gets a
    408 and the connection is closed. The body, and the app's work, are not limited here.
    """

    head_timeout_s: float = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        if self._head_timer is None and (cycle is None or cycle.response_complete):
            self._arm_head_timer()  # the first bytes of the next request on this connection
        super().data_received(data)
        if self.cycle is not cycle:  # the head is complete: h11 made it a request
            self._cancel_head_timer()

    def handle_websocket_upgrade(self, event: object) -> None:
        self._cancel_head_timer()  # the WebSocket protocol takes the connection over
        super().handle_websocket_upgrade(event)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.write(_TIMEOUT_ANSWER)
            self.transport.close()


def http_protocol(head_timeout_s: float) -> type[HeadTimeoutProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with this head timeout."""
    return type("HeadTimeoutProtocol", (HeadTimeoutProtocol,), {"head_timeout_s": head_timeout_s})
