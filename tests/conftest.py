"""Shared fixtures: a real hub (embedded broker on a free port, real database) and
real clients (httpx, paho-mqtt, websockets). Database-backed tests run on SQLite and,
when a server answers, on PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import paho.mqtt.client as mqtt
import pytest

from hexa.hub.config import Settings, load_settings

PROVISION_KEY = "test-provision-key-0123456789"
ADMIN_EMAIL = "admin@hexa.test"
ADMIN_PASSWORD = "Adm1n-password-for-tests"
COMMAND_TIMEOUT_MS = 1500
PG_URL = os.environ.get("HEXA_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres")
REQUIRE_PG = os.environ.get("HEXA_REQUIRE_POSTGRES", "") not in ("", "0", "false")

_pg_skipped: list[str] = []


def _pg_reachable() -> str | None:
    """None when PostgreSQL answers, else why not."""
    import asyncpg

    async def probe() -> None:
        conn = await asyncpg.connect(PG_URL, timeout=3)
        await conn.close()

    try:
        asyncio.run(probe())
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _pg_admin(sql: str) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(PG_URL, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.fixture(scope="session")
def postgres_available() -> bool:
    reason = _pg_reachable()
    if reason is None:
        return True
    if REQUIRE_PG:
        pytest.fail(
            f"HEXA_REQUIRE_POSTGRES is set but PostgreSQL at {PG_URL} is unreachable: {reason}"
        )
    _pg_skipped.append(reason)
    return False


def new_database_url(kind: str, tmp: Path) -> tuple[str, Callable[[], None]]:
    """A fresh empty database of ``kind`` and a function that drops it."""
    if kind == "sqlite":
        path = tmp / f"hexa-{uuid.uuid4().hex[:8]}.db"
        return f"sqlite://{path}", lambda: None
    name = f"hexa_test_{uuid.uuid4().hex[:12]}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    base = PG_URL.rsplit("/", 1)[0]

    def drop() -> None:
        with contextlib.suppress(Exception):  # best-effort cleanup
            _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return f"{base}/{name}", drop


@pytest.fixture(
    scope="session", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def db_kind(request: pytest.FixtureRequest, postgres_available: bool) -> str:
    if request.param == "postgres" and not postgres_available:
        pytest.skip(f"PostgreSQL unreachable at {PG_URL}")
    return str(request.param)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningHub:
    """A hub served from a background thread with its own event loop."""

    settings: Settings
    base: str
    mqtt_port: int
    db_kind: str
    info: dict[str, Any] = field(default_factory=dict)
    thread: threading.Thread | None = None
    proc: Any = None

    @property
    def api_base(self) -> str:
        return self.base + "/api/v1"

    def api(self, token: str | None = None, **headers: str) -> httpx.Client:
        h = dict(headers)
        if token:
            h["Authorization"] = f"Bearer {token}"
        return httpx.Client(base_url=self.api_base, headers=h, timeout=15)

    @property
    def ws_base(self) -> str:
        return self.base.replace("http://", "ws://")


def start_hub(db_url: str, data_dir: Path, **overrides: str) -> RunningHub:
    from hexa.hub.cli import serve

    env = {
        "HEXA_DATA_DIR": str(data_dir),
        "HEXA_DATABASE_URL": db_url,
        "HEXA_HTTP_HOST": "127.0.0.1",
        "HEXA_HTTP_PORT": "0",
        "HEXA_MQTT_HOST": "127.0.0.1",
        "HEXA_MQTT_PORT": "0",
        "HEXA_MQTT_WS_PORT": "off",
        "HEXA_DEVICE_PROVISION_KEY": PROVISION_KEY,
        "HEXA_JWT_SECRET": "test-jwt-secret-0123456789abcdef0123456789",
        "HEXA_ADMIN_EMAIL": ADMIN_EMAIL,
        "HEXA_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "HEXA_COMMAND_TIMEOUT_MS": str(COMMAND_TIMEOUT_MS),
        "HEXA_TRUST_PROXY": "true",
        "HEXA_LOG_LEVEL": "WARNING",
        # the suite runs on the in-process bus; CI runs the bus-heavy files again over TCP
        "HEXA_EMBEDDED_BUS": os.environ.get("HEXA_TEST_EMBEDDED_BUS", "local"),
    }
    env.update({f"HEXA_{k.upper()}": v for k, v in overrides.items()})
    settings = load_settings(environ=env)
    ready = threading.Event()
    info: dict[str, Any] = {}
    errors: list[BaseException] = []

    def run() -> None:
        async def main() -> None:
            flag = asyncio.Event()

            async def relay_ready() -> None:
                await flag.wait()
                ready.set()

            waiter = asyncio.create_task(relay_ready())
            try:
                await serve(settings, ready=flag, info=info)
            finally:
                waiter.cancel()

        try:
            asyncio.run(main())
        except BaseException as exc:
            errors.append(exc)
            ready.set()

    thread = threading.Thread(target=run, name=f"hub-{db_url[:8]}", daemon=True)
    thread.start()
    if not ready.wait(60) or errors:
        import traceback

        detail = "".join(traceback.format_exception(errors[0])) if errors else "timeout"
        raise RuntimeError(f"hub did not start: {detail}")
    hub = RunningHub(
        settings,
        f"http://127.0.0.1:{info['http_port']}",
        info["mqtt_port"],
        db_url.split(":")[0],
        info,
        thread,
    )
    return hub


def spawn_hub(
    db_url: str,
    data_dir: Path,
    *,
    log: Path | None = None,
    open_files: int | None = None,
    **overrides: str,
) -> RunningHub:
    """A hub in its own process (`hexa serve`): for a second hub beside the shared one,
    since one process holds one hub's database context. ``open_files`` starts it with that
    soft RLIMIT_NOFILE, as a service manager might."""
    import re
    import subprocess
    import sys

    env = {
        **os.environ,
        "HEXA_DATA_DIR": str(data_dir),
        "HEXA_DATABASE_URL": db_url,
        "HEXA_HTTP_PORT": "0",
        "HEXA_MQTT_PORT": "0",
        "HEXA_MQTT_WS_PORT": "off",
        "HEXA_DEVICE_PROVISION_KEY": PROVISION_KEY,
        "HEXA_JWT_SECRET": "test-jwt-secret-0123456789abcdef0123456789",
        "HEXA_COMMAND_TIMEOUT_MS": str(COMMAND_TIMEOUT_MS),
        "HEXA_LOG_LEVEL": "WARNING",
        **{f"HEXA_{k.upper()}": v for k, v in overrides.items()},
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    log = log or data_dir / "hub.log"

    def limit_open_files() -> None:
        import resource

        if open_files is not None:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, hard))

    proc = subprocess.Popen(
        [sys.executable, "-m", "hexa.hub.cli", "serve"],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        preexec_fn=limit_open_files if open_files is not None else None,
    )
    listen = re.compile(r"HTTP on http://[\d.]+:(\d+).*MQTT on [\d.]+:(\d+)")
    found = wait_until(lambda: proc.poll() is not None or listen.search(log.read_text()), 60)
    match = listen.search(log.read_text())
    if not found or match is None:
        proc.kill()
        raise RuntimeError(f"hexa serve did not start:\n{log.read_text()}")
    settings = load_settings(environ={k: v for k, v in env.items() if k.startswith("HEXA_")})
    hub = RunningHub(
        settings, f"http://127.0.0.1:{match.group(1)}", int(match.group(2)), db_url.split(":")[0]
    )
    hub.proc = proc
    return hub


def stop_hub(hub: RunningHub) -> None:
    if hub.proc is not None:
        if hub.proc.poll() is None:
            hub.proc.terminate()
            try:
                hub.proc.wait(20)
            except Exception:
                hub.proc.kill()
                hub.proc.wait(5)
        return
    server = hub.info.get("server")
    if server is not None:
        server.request_exit()
    if hub.thread is not None:
        hub.thread.join(30)


@pytest.fixture(scope="session")
def hub(db_kind: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningHub]:
    """One hub per database kind, shared by the tests (each test makes its own users)."""
    tmp = tmp_path_factory.mktemp(f"hub-{db_kind}")
    url, drop = new_database_url(db_kind, tmp)
    h = start_hub(url, tmp / "data")
    yield h
    stop_hub(h)
    drop()


# --- REST helpers ------------------------------------------------------------------------
def unique_email() -> str:
    return f"u{uuid.uuid4().hex[:10]}@hexa.test"


@dataclass
class User:
    email: str
    password: str
    access_token: str
    refresh_token: str
    id: str
    org_id: str


def register(
    hub: RunningHub, email: str | None = None, password: str = "S3cure-pass-word!"
) -> User:
    email = email or unique_email()
    with hub.api() as c:
        r = c.post("/auth/register", json={"email": email, "password": password})
        assert r.status_code == 201, r.text
        body = r.json()
        me = c.get("/auth/me", headers={"Authorization": f"Bearer {body['access_token']}"}).json()
    return User(
        email,
        password,
        body["access_token"],
        body["refresh_token"],
        body["user"]["id"],
        me["memberships"][0]["org_id"],
    )


def admin_token(hub: RunningHub) -> str:
    with hub.api() as c:
        r = c.post("/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


def provision(hub: RunningHub, model: str = "hexa-mini-switch-v1") -> dict[str, Any]:
    with hub.api(**{"X-Provision-Key": PROVISION_KEY}) as c:
        r = c.post("/provision/register", json={"model": model, "serial": uuid.uuid4().hex[:8]})
    assert r.status_code == 201, r.text
    return dict(r.json())


def claim(hub: RunningHub, user: User, claim_code: str, **extra: Any) -> dict[str, Any]:
    with hub.api(user.access_token) as c:
        r = c.post("/devices/claim", json={"claim_code": claim_code, **extra})
    assert r.status_code == 200, r.text
    return dict(r.json())


def add_member(
    hub: RunningHub, by: User, who: User, role: str, org_id: str | None = None
) -> dict[str, Any]:
    """Make ``who`` a member of ``by``'s organization (or ``org_id``) with ``role``, the way
    users do: a member's role is changed at once, anyone else is invited and accepts.
    Returns the member as ``GET /orgs/{id}/members`` lists them."""
    org_id = org_id or by.org_id
    with hub.api(by.access_token) as c:
        r = c.post(f"/orgs/{org_id}/members", json={"email": who.email, "role": role})
    assert r.status_code in (200, 201), r.text
    if r.status_code == 201:
        with hub.api(who.access_token) as c:
            accepted = c.post(f"/invitations/{r.json()['id']}/accept")
        assert accepted.status_code == 200, accepted.text
    with hub.api(by.access_token) as c:
        page = c.get(f"/orgs/{org_id}/members", params={"limit": 100}).json()
    return next(dict(m) for m in page["items"] if m["user_id"] == who.id)


def claimed_device(hub: RunningHub, user: User) -> tuple[dict[str, Any], dict[str, Any]]:
    """(provisioning answer, device resource) for a new device claimed by ``user``."""
    p = provision(hub)
    return p, claim(hub, user, p["claim_code"])


def error_shape_ok(body: dict[str, Any]) -> bool:
    return {"code", "message", "details", "request_id"} <= set(body)


def wait_until(pred: Callable[[], Any], timeout: float = 5.0, step: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    return pred()


# --- MQTT helpers ------------------------------------------------------------------------
def _nodelay(client: mqtt.Client) -> None:
    def on_socket_open(c: Any, userdata: Any, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    client.on_socket_open = on_socket_open


class MqttClient:
    """A paho client collecting messages, for integrations and raw protocol tests."""

    def __init__(
        self,
        hub: RunningHub,
        username: str | None,
        password: str | None,
        *,
        client_id: str | None = None,
        will: tuple[str, bytes, bool] | None = None,
    ) -> None:
        self.msgs: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.subacks: dict[int, list[Any]] = {}
        self.rc: Any = None
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{uuid.uuid4().hex[:10]}"
        )
        _nodelay(self.c)
        if username is not None:
            self.c.username_pw_set(username, password)
        if will is not None:
            self.c.will_set(will[0], will[1], qos=1, retain=will[2])
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.on_disconnect = self._on_disconnect
        self.c.reconnect_delay_set(30, 60)  # a refused or kicked client stays out during a test
        self.c.connect("127.0.0.1", hub.mqtt_port, keepalive=30)
        self.c.loop_start()

    def _on_connect(self, c: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        self.rc = rc
        self.connected.set()

    def _on_disconnect(self, c: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        self.disconnected.set()

    def _on_subscribe(self, c: Any, userdata: Any, mid: int, rcs: Any, props: Any = None) -> None:
        self.subacks[mid] = list(rcs)

    def _on_message(self, c: Any, userdata: Any, msg: Any) -> None:
        with self.lock:
            self.msgs.append((msg.topic, msg.payload, bool(msg.retain)))

    def ok(self, t: float = 10) -> bool:
        return self.connected.wait(t) and self.rc is not None and not self.rc.is_failure

    def refused(self, t: float = 10) -> bool:
        self.connected.wait(t)
        return self.rc is None or self.rc.is_failure

    def subscribe(self, flt: str, t: float = 5) -> bool:
        """Subscribe and wait for the SUBACK; True when granted."""
        _, mid = self.c.subscribe(flt, qos=1)
        wait_until(lambda: mid in self.subacks, t)
        codes = self.subacks.get(mid, [])
        return bool(codes) and not codes[0].is_failure

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def wait_for(self, pred: Callable[[str, bytes, bool], bool], timeout: float = 5.0) -> Any:
        def find() -> Any:
            with self.lock:
                for m in self.msgs:
                    if pred(*m):
                        return m
            return None

        return wait_until(find, timeout)

    def messages(
        self, pred: Callable[[str, bytes, bool], bool] | None = None
    ) -> list[tuple[str, bytes, bool]]:
        with self.lock:
            return [m for m in self.msgs if pred is None or pred(*m)]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()

    def drop(self) -> None:
        """Lose the TCP connection without DISCONNECT (the will fires)."""
        self.c.loop_stop()
        sock = self.c.socket()
        if sock is not None:
            sock.close()


class MqttDevice(MqttClient):
    """A simulated hexa-mini-switch-v1 over MQTT (paho), speaking contract §3."""

    def __init__(
        self,
        hub: RunningHub,
        uid: str,
        token: str,
        *,
        auto_ack: bool = True,
        relays: int = 3,
        client_id: str | None = None,
    ) -> None:
        self.uid = uid
        self.relays = [False] * relays
        self.auto_ack = auto_ack
        self.commands: list[dict[str, Any]] = []
        super().__init__(
            hub,
            uid,
            token,
            client_id=client_id or f"dev-{uid}",
            will=(f"hexa/{uid}/availability", b"offline", True),
        )

    def _on_connect(self, c: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        if not rc.is_failure:
            c.subscribe(f"hexa/{self.uid}/cmd", qos=1)
            c.publish(f"hexa/{self.uid}/availability", "online", qos=1, retain=True)
            self.report()
        super()._on_connect(c, userdata, flags, rc, props)

    def report(self) -> None:
        self.c.publish(
            f"hexa/{self.uid}/report",
            json.dumps({"relays": self.relays, "inputs": [False] * 3, "fw_version": "1.0.0"}),
            qos=1,
        )

    def _on_message(self, c: Any, userdata: Any, msg: Any) -> None:
        super()._on_message(c, userdata, msg)
        if msg.topic != f"hexa/{self.uid}/cmd":
            return
        try:
            cmd = json.loads(msg.payload)
        except ValueError:
            return
        self.commands.append(cmd)
        if not self.auto_ack:
            return
        if cmd.get("type") == "set_relay":
            self.relays[cmd["relay_index"]] = bool(cmd["state"])
        elif cmd.get("type") == "set_all_relays":
            self.relays = [bool(cmd["state"])] * len(self.relays)
        else:
            return
        c.publish(
            f"hexa/{self.uid}/ack",
            json.dumps({"command_id": cmd["command_id"], "ok": True, "relays": self.relays}),
            qos=1,
        )

    def event(self, input_index: int, event: str, duration_ms: int | None = None) -> None:
        p: dict[str, Any] = {"input_index": input_index, "event": event}
        if duration_ms is not None:
            p["duration_ms"] = duration_ms
        self.publish(f"hexa/{self.uid}/event", json.dumps(p))


def online_device(hub: RunningHub, user: User, **kwargs: Any) -> tuple[dict[str, Any], MqttDevice]:
    """A claimed device connected over MQTT and seen online by the hub."""
    p, dev = claimed_device(hub, user)
    m = MqttDevice(hub, p["device_uid"], p["device_token"], **kwargs)
    assert m.ok()
    with hub.api(user.access_token) as c:
        assert wait_until(lambda: c.get(f"/devices/{dev['id']}").json().get("online"), 5)
    dev["device_token"] = p["device_token"]
    return dev, m


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _pg_skipped:
        terminalreporter.write_sep("!", "POSTGRESQL TESTS SKIPPED", red=True, bold=True)
        terminalreporter.write_line(
            f"No PostgreSQL at {PG_URL} ({_pg_skipped[0]}).\n"
            "Every database test ran on SQLite only. "
            "Start a server (or set HEXA_TEST_POSTGRES_URL) to run them on PostgreSQL too; "
            "CI sets HEXA_REQUIRE_POSTGRES=1 and fails instead of skipping.",
            red=True,
        )


T = TypeVar("T")


@pytest.fixture
def track() -> Iterator[Callable[[T], T]]:
    """Register clients (MQTT, WebSocket: anything with close()); all are closed after the
    test, whatever its outcome, newest first."""
    opened: list[Any] = []

    def add(client: T) -> T:
        opened.append(client)
        return client

    yield add
    for client in reversed(opened):
        with contextlib.suppress(Exception):  # best-effort cleanup
            client.close()


@pytest.fixture
def tmp_data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d
