"""The floor of ``hexa bench --ota``: a bare ASGI application that answers every request
with the same small JSON (``{"update":false}``), served by uvicorn as the hub serves its API
(h11, uvloop when installed, no lifespan, no access log) on an ephemeral port of 127.0.0.1.
No framework, middleware, database or credentials: what one process of uvicorn costs per
request on this machine, which no route of the hub can beat.

Run as ``python -m hexa.hub.tools.asgi_floor``; prints its port on the first line of
standard output and serves until it is terminated.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any

import uvicorn

BODY = b'{"update":false}'
HEADERS = [(b"content-length", str(len(BODY)).encode()), (b"content-type", b"application/json")]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


def main() -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)  # as the hub
    sys.stdout.write(f"{sock.getsockname()[1]}\n")
    sys.stdout.flush()
    config = uvicorn.Config(app, lifespan="off", access_log=False, http="h11", log_level="warning")
    server = uvicorn.Server(config)
    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(server.serve(sockets=[sock]))


if __name__ == "__main__":
    main()
