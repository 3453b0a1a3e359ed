"""The ``hexa`` command, and the composition root that wires one hub process together.

This is the only module of ``hub`` that imports ``broker``, ``api`` and ``bridges``.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

import anyio

from hexa.hub import __version__
from hexa.hub.config import SettingError, Settings, load_settings, prepare_storage

log = logging.getLogger("hexa")


def _settings_from(args: argparse.Namespace, *, prepare: bool = True) -> Settings:
    overrides = {
        name: str(value)
        for name, value in vars(args).items()
        if name in _FLAG_SETTINGS and value is not None
    }
    settings = load_settings(overrides)
    if prepare:
        prepare_storage(settings)
    return settings


_FLAG_SETTINGS = (
    "data_dir",
    "database_url",
    "http_host",
    "http_port",
    "mqtt_host",
    "mqtt_port",
    "broker_url",
    "log_level",
    "command_timeout_ms",
)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", dest="data_dir", help="data directory (HEXA_DATA_DIR, ./data)")
    p.add_argument("--database-url", dest="database_url", help="HEXA_DATABASE_URL")
    p.add_argument("--log-level", dest="log_level", help="HEXA_LOG_LEVEL (INFO)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hexa", description="Hexa Hub: a self-hosted IoT hub.")
    parser.add_argument("--version", action="version", version=f"hexa {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the whole hub in one process")
    _add_common(serve)
    serve.add_argument("--http-host", dest="http_host")
    serve.add_argument("--http-port", dest="http_port")
    serve.add_argument("--mqtt-host", dest="mqtt_host")
    serve.add_argument("--mqtt-port", dest="mqtt_port", help="0 picks a free port")
    serve.add_argument(
        "--broker-url", dest="broker_url", help="external broker mqtt://user:pw@host:port"
    )
    serve.add_argument("--command-timeout-ms", dest="command_timeout_ms")

    migrate = sub.add_parser("migrate", help="apply (or revert) schema migrations")
    _add_common(migrate)
    migrate.add_argument("--down", type=int, metavar="N", help="revert the last N migrations")

    admin = sub.add_parser("admin", help="manage platform admins")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    create = admin_sub.add_parser("create", help="create a platform admin")
    _add_common(create)
    create.add_argument("--email", required=True)
    create.add_argument("--password", help="generated and printed when omitted")

    sim = sub.add_parser("sim", help="run simulated hexa-mini-switch-v1 devices")
    sim.add_argument("--devices", type=int, default=1)
    sim.add_argument("--url", default="http://127.0.0.1:8000", help="the hub's HTTP base URL")
    sim.add_argument("--mqtt-host", dest="sim_mqtt_host", help="defaults to what provisioning says")
    sim.add_argument("--mqtt-port", dest="sim_mqtt_port", type=int)
    sim.add_argument("--transport", choices=("mqtt", "ws"), default="mqtt")
    sim.add_argument("--provision-key", default=os.environ.get("HEXA_DEVICE_PROVISION_KEY"))
    sim.add_argument(
        "--state-file",
        help="JSON file to keep the devices' credentials, configuration and relays across runs "
        "(on start the relays follow each device's power-restore mode)",
    )
    sim.add_argument("--no-ack", action="store_true", help="never acknowledge commands")
    sim.add_argument("--report-every", type=float, default=60.0, help="seconds between reports")
    sim.add_argument("--duration", type=float, help="stop after this many seconds")
    sim.add_argument("--press-every", type=float, help="press a random input every S seconds")
    sim.add_argument("--hold-ms", type=int, help="with --press-every: hold for this long instead")
    sim.add_argument(
        "--ota-check-every",
        type=float,
        help="ask the hub for a firmware update every S seconds (devices always update when told)",
    )

    bench = sub.add_parser("bench", help="benchmark a hub with simulated devices (prints JSON)")
    bench.add_argument("--devices", type=int, default=100)
    bench.add_argument(
        "--broker",
        choices=("embedded", "mosquitto"),
        default="embedded",
        help="run the hub on its embedded broker or on a Mosquitto it starts",
    )
    bench.add_argument("--commands", type=int, default=200, help="REST commands to time")
    bench.add_argument("--rate", type=float, default=10.0, help="REST commands per second")
    bench.add_argument(
        "--warmup", type=int, default=10, help="REST commands sent before the timed ones"
    )
    bench.add_argument("--intent-rtt-samples", type=int, default=200)
    bench.add_argument("--intents", type=int, default=2000, help="MQTT intents for throughput")
    bench.add_argument("--window", type=int, default=64, help="intents in flight")
    bench.add_argument("--report-seconds", type=float, default=5.0)
    bench.add_argument("--reporters", type=int, default=100, help="devices sending reports")
    bench.add_argument(
        "--report-rate", type=float, default=5000.0, help="state reports offered per second"
    )
    bench.add_argument("--database-url", dest="bench_database_url")
    bench.add_argument(
        "--seed",
        action="store_true",
        help="write the claimed devices straight into the hub's database (fast) instead of "
        "provisioning and claiming each through the API",
    )
    bench.add_argument(
        "--connect-only",
        action="store_true",
        help="stop after timing the connect of the devices (connects/s, hub CPU and RSS)",
    )
    bench.add_argument(
        "--connect-concurrency",
        type=int,
        default=50,
        help="devices connecting at the same time during the connect phase",
    )
    bench.add_argument(
        "--profile", metavar="FILE", help="profile the hub process (cProfile stats to FILE)"
    )
    bench.add_argument(
        "--schedules", type=int, help="instead: time one scheduler tick of N due schedules"
    )
    bench.add_argument(
        "--ota",
        action="store_true",
        help="instead: N devices checking for updates at once, and concurrent downloads",
    )
    bench.add_argument("--ota-downloads", type=int, default=100, help="with --ota")
    bench.add_argument("--ota-artifact-mib", type=int, default=4, help="with --ota")
    bench.add_argument(
        "--ota-spreads",
        type=lambda raw: [float(x) for x in raw.split(",")],
        default=[0.0, 1.0, 5.0, 10.0],
        help="with --ota: over how many seconds the N checks start, one storm each (0,1,5,10)",
    )
    from hexa.hub.backup_cli import add_parsers

    add_parsers(sub, _add_common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "migrate":
            return _migrate(args)
        if args.command == "admin":
            return _admin_create(args)
        if args.command == "sim":
            from hexa.hub.tools.sim import run_sim

            return run_sim(args)
        if args.command == "bench":
            from hexa.hub.tools.bench import run_bench

            return run_bench(args)
        if args.command in ("backup", "export", "import"):
            return _data_safety(args)
    except SettingError as exc:
        print(f"hexa: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


def _logging(level: str, settings: Settings | None = None) -> None:
    from hexa.hub.logs import configure

    if settings is None:
        configure(level)
    else:
        configure(level, settings.log_format, settings.access_log)


def _fail(message: str) -> int:
    print(f"hexa: {message}", file=sys.stderr)
    return 2


def _migrate(args: argparse.Namespace) -> int:
    from hexa.hub import db

    settings = _settings_from(args)
    _logging(settings.log_level)
    url = settings.resolved_database_url
    try:
        if args.down:
            names = asyncio.run(db.migrate_down(url, args.down))
            print(f"reverted {len(names)} migration(s): {', '.join(names) or '-'}")
        else:
            names = asyncio.run(db.migrate_up(url))
            print(f"applied {len(names)} migration(s): {', '.join(names) or 'up to date'}")
    except OSError as exc:
        return _fail(f"cannot reach the database (HEXA_DATABASE_URL): {exc}")
    return 0


def _admin_create(args: argparse.Namespace) -> int:
    from hexa.hub import db
    from hexa.hub.accounts import Accounts
    from hexa.hub.audit import Actor
    from hexa.hub.errors import HubError

    settings = _settings_from(args)
    _logging("WARNING")
    password = args.password or secrets.token_urlsafe(12)

    async def create() -> None:
        await db.migrate_up(settings.resolved_database_url)
        async with db.database(settings.resolved_database_url):
            await Accounts(settings).create_admin(args.email, password, Actor.command())

    try:
        asyncio.run(create())
    except HubError as exc:
        return _fail(exc.message)
    print(f"created platform admin {args.email.strip().lower()}")
    if not args.password:
        print(f"password: {password}")
    return 0


def _data_safety(args: argparse.Namespace) -> int:
    from hexa.hub import backup_cli
    from hexa.hub.errors import HubError

    overrides = {n: str(v) for n, v in vars(args).items() if n in _FLAG_SETTINGS and v is not None}
    settings = load_settings(overrides, with_secrets=False)  # a restore brings its own
    prepare_storage(settings)
    _logging("WARNING" if settings.log_level == "INFO" else settings.log_level)
    try:
        return backup_cli.run(args, settings)
    except HubError as exc:
        return _fail(exc.message)


def _bind(host: str, port: int, setting: str) -> socket.socket:
    """Bind the HTTP socket ourselves, so a taken port is one clear line, not a traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets whose proto says
    # TCP, and accepted sockets inherit it. Without it every response waits ~40 ms (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise _StartupError(_port_taken(setting, host, port)) from None
        raise SettingError(setting, f"{host}:{port}", exc.strerror or str(exc)) from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _port_taken(setting: str, host: str, port: int) -> str:
    """One line for a port already in use: who likely holds it and what to set instead."""
    taken = f"port {port} on {host} is taken"
    free = f"set {setting} to a free port (0 picks one)"
    if setting == "HEXA_MQTT_PORT":
        # Mosquitto often runs on 1883 already: the hub can use it instead of its own broker.
        wildcard = host in ("", "0.0.0.0", "::")  # noqa: S104 (compared, not bound)
        there = "127.0.0.1" if wildcard else host
        there = f"[{there}]" if ":" in there else there
        return (
            f"{taken} (another MQTT broker such as Mosquitto?): {free}, "
            f"or set HEXA_BROKER_URL=mqtt://USER:PASSWORD@{there}:{port} to use that broker"
        )
    if setting == "HEXA_HTTP_PORT":
        return f"{taken} (another web server, or a hub already running?): {free}"
    return f"{taken}: {free}, or {setting}=off to run without that listener"


def _serve(args: argparse.Namespace) -> int:
    settings = _settings_from(args, prepare=False)  # serve() prepares it, logging set up
    _logging(settings.log_level, settings)
    _raise_open_file_limit()
    try:
        with asyncio.Runner(loop_factory=_loop_factory(settings)) as runner:
            return runner.run(serve(settings, tune_gc=True))
    except SettingError as exc:
        return _fail(str(exc))
    except _StartupError as exc:
        return _fail(str(exc))


def _loop_factory(settings: Settings) -> Any:
    """uvloop (Linux, macOS) where installed: less CPU per message for the broker, the
    bus and the HTTP server. ``HEXA_EVENT_LOOP=asyncio`` keeps the standard loop."""
    if settings.event_loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


#: the soft open-file limit asked for when the hard limit is unlimited
MAX_OPEN_FILES = 1 << 20


def _raise_open_file_limit() -> None:
    """Raise the soft open-file limit (RLIMIT_NOFILE) to the hard one.

    Every HTTP, WebSocket and MQTT connection is an open file, and service managers and
    shells often start processes with a soft limit of 1024 or less: at that limit the hub
    can accept no connection at all, REST and MQTT alike."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning(
                "open-file limit stays at %d (could not raise it to %d: %s)", soft, target, exc
            )
            return
        log.info("open-file limit raised from %d to %d", soft, target)
    else:
        log.info("open-file limit: %d", soft)


#: how often the hub runs a full garbage collection itself (see _tune_gc)
FULL_GC_EVERY_S = 600.0


def _tune_gc() -> None:
    """Keep garbage-collector pauses out of request latency.

    Everything built during start (modules, the app, ORM metadata) is frozen out of
    collections. Automatic full collections are switched off: with 1000 devices
    connected the heap holds ~400 000 tracked objects and a full pass took 200-300 ms,
    triggered whenever enough of them were new (devices connecting), i.e. during load.
    Young collections still run as usual, and :func:`_full_gc` does a full one every
    ten minutes, so cyclic garbage that outlived them is still reclaimed."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 1_000_000_000)


async def _full_gc() -> None:
    while True:
        await asyncio.sleep(FULL_GC_EVERY_S)
        started = time.perf_counter()
        found = gc.collect()
        log.debug("full gc: %d unreachable, %.0f ms", found, (time.perf_counter() - started) * 1e3)


class _StartupError(Exception):
    pass


async def serve(
    settings: Settings,
    *,
    ready: asyncio.Event | None = None,
    info: dict[str, Any] | None = None,
    tune_gc: bool = False,
) -> int:
    """Run one hub until SIGINT/SIGTERM (or until ``info['server'].should_exit``)."""
    import uvicorn

    import hexa.bridges as bridges
    from hexa.api.app import create_app
    from hexa.api.app import services as api_services
    from hexa.api.http_protocol import http_protocol
    from hexa.api.middleware import purge_idempotency_records
    from hexa.bridges.alexa import AlexaBridge
    from hexa.broker.embedded import EmbeddedBroker
    from hexa.hub import db
    from hexa.hub.backup_service import prepare_directory
    from hexa.hub.mqtt.bus import BrokerAddress
    from hexa.hub.runtime import Hub

    prepare_storage(settings)
    prepare_directory(settings)
    url = settings.resolved_database_url
    http_sock = _bind(settings.http_host, settings.http_port, "HEXA_HTTP_PORT")
    if not settings.broker_url:
        for port, setting in (
            (settings.mqtt_port if settings.mqtt_plain_listener else None, "HEXA_MQTT_PORT"),
            (settings.mqtt_tls_port if settings.tls_enabled else None, "HEXA_MQTT_TLS_PORT"),
            (settings.mqtt_ws_port, "HEXA_MQTT_WS_PORT"),
        ):
            if port:  # fail before any work, with one line, if a broker port is taken
                try:
                    _bind(settings.mqtt_host, port, setting).close()
                except (SettingError, _StartupError):
                    http_sock.close()
                    raise
    try:
        try:
            await db.migrate_up(url)
        except OSError as exc:
            raise _StartupError(f"cannot reach the database (HEXA_DATABASE_URL): {exc}") from None
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(db.database(url))
            await purge_idempotency_records()
            instance = secrets.token_hex(4)
            broker: EmbeddedBroker | None = None
            if settings.broker_url:
                ca = settings.broker_ca_file
                address = BrokerAddress.from_url(
                    settings.broker_url, ca_file=str(ca) if ca is not None else None
                )
            else:
                broker = EmbeddedBroker(settings)
                try:
                    await broker.start()
                except OSError as exc:
                    reason = exc.strerror or str(exc)
                    raise _StartupError(
                        f"invalid setting HEXA_MQTT_PORT={settings.mqtt_port}: {reason}"
                    ) from None
                stack.push_async_callback(broker.shutdown)
                host, port, username, password = broker.hub_credentials()
                address = BrokerAddress(host, port, username, password)
            bus = None
            if broker is not None and settings.embedded_bus == "local":
                bus = broker.local_bus(f"hexa-hub-{instance}")
            hub = Hub(settings, address, instance=instance, bus=bus)
            if broker is not None:
                broker.attach(hub.events)
                hub.mqtt_port, hub.mqtt_tls_port = broker.port, broker.tls_port
            hub.http_port = http_sock.getsockname()[1]
            await hub.prepare()
            app = create_app(hub, routers=[AlexaBridge(hub).router()])
            config = uvicorn.Config(
                app,
                lifespan="off",
                log_config=None,  # keep our handlers (and their secret redaction)
                access_log=False,  # the access log would print WS tokens from query strings
                log_level=settings.log_level.lower(),
                ws_ping_interval=settings.heartbeat_s,
                ws_ping_timeout=settings.heartbeat_s * 2,
                ws_max_size=1024 * 1024,
                timeout_graceful_shutdown=5,
                # h11 with a request-head deadline (slow clients); never httptools
                http=http_protocol(settings.http_header_timeout_s),
                timeout_keep_alive=settings.http_keepalive_timeout_s,
                # X-Forwarded-* are the edge middleware's (HEXA_TRUST_PROXY), never uvicorn's:
                # it would believe them from any 127.0.0.1 peer
                proxy_headers=False,
                # HTTPS and WSS on the same socket (the pair was checked by load_settings)
                ssl_certfile=str(settings.tls_cert_file) if settings.https else None,
                ssl_keyfile=str(settings.tls_key_file) if settings.https else None,
                # No limit_concurrency: uvicorn counts open connections, idle ones too, and
                # answers 503 beyond it, so slow clients would lock out everyone else.
            )
            server = _Server(config)
            if info is not None:
                info.update(
                    server=server, hub=hub, http_port=hub.http_port, mqtt_port=hub.mqtt_port
                )
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, server.request_exit)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass
            async with anyio.create_task_group() as tg:
                await hub.start(
                    tg,
                    extensions=[*api_services(app), *bridges.enabled(hub)],
                    wait_for_bus=broker is not None,
                )
                print(
                    f"hexa {__version__}: HTTP on {'https' if settings.https else 'http'}://"
                    f"{settings.http_host}:{hub.http_port} "
                    "(docs at /docs), "
                    + (
                        "plain MQTT off (HEXA_ENFORCE_HTTPS)"
                        if broker is not None and broker.port is None
                        else f"MQTT on {address.host}:{address.port}"
                    )
                    + ("" if broker is None else " (embedded broker)")
                    + (f", MQTT/TLS on {broker.tls_port}" if broker and broker.tls_port else "")
                    + (
                        f", MQTT/WebSocket on {broker.ws_port}" if broker and broker.ws_port else ""
                    ),
                    flush=True,
                )
                if tune_gc:
                    _tune_gc()
                    tg.start_soon(_full_gc)
                if ready is not None:
                    ready.set()
                await server.serve(sockets=[http_sock])
                log.info("shutting down")
                await hub.shutdown()
                tg.cancel_scope.cancel()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    finally:
        http_sock.close()
    return 0


class _Server:
    """uvicorn's Server without its own signal handling: the hub owns the signals."""

    def __init__(self, config: Any) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            def install_signal_handlers(self) -> None:  # uvicorn < 0.29
                return

            def capture_signals(self) -> Any:  # uvicorn >= 0.29
                import contextlib

                return contextlib.nullcontext()

        self._server = Server(config)

    @property
    def should_exit(self) -> bool:
        return bool(self._server.should_exit)

    def request_exit(self) -> None:
        self._server.should_exit = True

    @property
    def started(self) -> bool:
        return bool(self._server.started)

    async def serve(self, sockets: list[socket.socket]) -> None:
        await self._server.serve(sockets=sockets)


if __name__ == "__main__":
    raise SystemExit(main())
