"""The embedded broker with an open gate, for conformance suites and broker benchmarks.

TEST CODE ONLY, never a production switch: anybody may connect (any username and
password, or none) and may publish, subscribe to and receive every topic.

Everything else is the hub's own broker: :class:`hexa.broker.embedded.EmbeddedBroker`
builds the listeners, the authentication plugin, the ACL, the limits and the
:class:`~hexa.broker.server.HexaBroker` exactly as the hub does; only its
:class:`~hexa.broker.gate.Gate` is replaced by :class:`OpenGate`, which admits every
client as a hub identity (``Kind.HUB``: the ACL allows it everything) and never
touches the database. No database is configured or opened.

Each client id gets its own identity (``hub:open:<client id>``), so the per-identity
session limit (16) does not refuse the 10 000 connections of a benchmark, and a client
that reconnects with its client id is the same identity and resumes its session.

    python tests/support/open_broker.py --port 0 [--host 127.0.0.1] [--profile FILE]

prints ``READY <host> <port> <pid>`` once listening and stops on SIGTERM or SIGINT;
with ``--profile FILE`` the broker's process is profiled (cProfile) and the stats are
written to FILE at shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import cProfile
import os
import resource
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from hexa.broker.acl import Identity, Kind
from hexa.broker.embedded import EmbeddedBroker
from hexa.broker.gate import Gate
from hexa.hub.config import Settings

#: the client id of the CONNECT being authenticated, in its connection's task (amqtt
#: runs the auth plugins in tasks created from it, which inherit this context)
_CLIENT_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "open_broker_client_id", default=None
)


class OpenGate(Gate):
    """A gate that lets anybody in as an identity allowed everything (test code only)."""

    async def identify(self, username: str | None, password: str | None) -> Identity | None:
        who = _CLIENT_ID.get() or username or "anonymous"
        return Identity(Kind.HUB, f"open:{who}")

    async def load_org(self, uid: str | None) -> None:
        """Never asked for a hub identity; never touches the database."""

    def org_of(self, uid: str) -> None:
        return None


def _raise_open_file_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def _note_client_ids(broker: Any) -> None:
    """Make the CONNECT's client id visible to :meth:`OpenGate.identify` (the gate is
    given only the username and password)."""
    authenticate: Callable[..., Awaitable[bool]] = broker._authenticate

    async def with_client_id(session: Any, listener: Any) -> bool:
        _CLIENT_ID.set(session.client_id)
        return await authenticate(session, listener)

    broker._authenticate = with_client_id


async def serve(host: str, port: int) -> None:
    settings = Settings(mqtt_host=host, mqtt_port=port, mqtt_tls_port=None, mqtt_ws_port=None)
    embedded = EmbeddedBroker(settings)
    embedded.gate = OpenGate(embedded.hub_password)  # before start(): its config takes it
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await embedded.start()
    try:
        assert embedded._broker is not None
        _note_client_ids(embedded._broker)
        print(f"READY {host} {embedded.port} {os.getpid()}", flush=True)
        await stop.wait()
    finally:
        await embedded.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--profile", metavar="FILE", help="write cProfile stats to FILE at exit")
    p.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop (the hub's default is uvloop where installed)",
    )
    a = p.parse_args(argv)
    _raise_open_file_limit()
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if a.loop == "uvloop":
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            loop_factory = None
    profiler = cProfile.Profile() if a.profile else None
    if profiler is not None:
        profiler.enable()
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(a.host, a.port))
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(a.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
