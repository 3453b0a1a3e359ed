"""Real hubs for tests: served from a thread of the test process (``start_hub``) or as
``hexa serve`` in its own process (``spawn_hub``), each on free ports."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import ssl
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from hexa.hub.config import Settings, load_settings
from support.checks import wait_until
from support.databases import migrated_database_url

PROVISION_KEY = "test-provision-key-0123456789"
ADMIN_EMAIL = "admin@hexa.test"
ADMIN_PASSWORD = "Adm1n-password-for-tests"
JWT_SECRET = "test-jwt-secret-0123456789abcdef0123456789"
COMMAND_TIMEOUT_MS = 1500


#: an override that leaves the setting unset (e.g. ``mqtt_port=UNSET``: the default applies)
UNSET = "<unset>"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fake_ip() -> str:
    """A unique fake client address for X-Forwarded-For (the test hub trusts the proxy)."""
    n = uuid.uuid4().int
    return f"10.{(n >> 16) & 0xFF}.{(n >> 8) & 0xFF}.{n & 0xFF}"


@functools.cache
def _verify() -> ssl.SSLContext:
    """httpx's default certificate check, built once: building it (loading the CA bundle)
    costs about 65 ms of CPU, and the tests open an API client for nearly every request."""
    return httpx.create_ssl_context()


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
        return httpx.Client(base_url=self.api_base, headers=h, timeout=15, verify=_verify())

    @property
    def ws_base(self) -> str:
        return self.base.replace("https://", "wss://").replace("http://", "ws://")


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
        "HEXA_JWT_SECRET": JWT_SECRET,
        "HEXA_ADMIN_EMAIL": ADMIN_EMAIL,
        "HEXA_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "HEXA_COMMAND_TIMEOUT_MS": str(COMMAND_TIMEOUT_MS),
        "HEXA_TRUST_PROXY": "true",
        "HEXA_LOG_LEVEL": "WARNING",
        # OWASP's minimum argon2id cost: the suite signs up and logs in thousands of times
        # (the default's own test: tests/test_unit_passwords.py, and hubs the CLI tests start)
        "HEXA_PASSWORD_HASH": "light",
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
        "HEXA_JWT_SECRET": JWT_SECRET,
        "HEXA_COMMAND_TIMEOUT_MS": str(COMMAND_TIMEOUT_MS),
        "HEXA_LOG_LEVEL": "WARNING",
        "HEXA_PASSWORD_HASH": "light",  # as in start_hub
        **{f"HEXA_{k.upper()}": v for k, v in overrides.items()},
    }
    env = {k: v for k, v in env.items() if v != UNSET}
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
    listen = re.compile(
        r"HTTP on (https?)://[\d.]+:(\d+).*?(?:MQTT on [\d.]+:(\d+)|plain MQTT off)"
    )
    found = wait_until(lambda: proc.poll() is not None or listen.search(log.read_text()), 60)
    match = listen.search(log.read_text())
    if not found or match is None:
        proc.kill()
        raise RuntimeError(f"hexa serve did not start:\n{log.read_text()}")
    settings = load_settings(environ={k: v for k, v in env.items() if k.startswith("HEXA_")})
    scheme, http_port, mqtt_port = match.groups()
    hub = RunningHub(
        settings, f"{scheme}://127.0.0.1:{http_port}", int(mqtt_port or 0), db_url.split(":")[0]
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


@contextlib.contextmanager
def spawned_hub(db_kind: str, tmp: Path, **options: Any) -> Iterator[RunningHub]:
    """``spawn_hub`` on a fresh (already migrated) database of ``db_kind`` with its data in
    ``tmp``/data; the hub is stopped and the database dropped when the block ends."""
    url, drop = migrated_database_url(db_kind, tmp)
    try:
        hub = spawn_hub(url, tmp / "data", **options)
        try:
            yield hub
        finally:
            stop_hub(hub)
    finally:
        drop()
