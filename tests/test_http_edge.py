"""The HTTP edge under attack: slow clients."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    PROVISION_KEY,
    MqttDevice,
    RunningHub,
    new_database_url,
    provision,
    spawn_hub,
    stop_hub,
    wait_until,
)

PARTIAL_HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"  # the blank line never comes
SLOW_CLIENTS = 2000


def _own_open_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard one; the soft limit after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@contextlib.contextmanager
def partial_heads(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections that each sent part of a request head and then nothing."""
    count = min(count, _own_open_file_limit() - 300)
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            opened.append(sock)
            sock.sendall(PARTIAL_HEAD)
        yield opened
    finally:
        for sock in opened:
            sock.close()


def _closed_by_hub(sock: socket.socket, seen: bytearray) -> bool:
    """True once the hub closed ``sock`` (what it sent before is added to ``seen``)."""
    sock.setblocking(False)
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return True
            seen += chunk
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


def _http_port(hub: RunningHub) -> int:
    return int(hub.base.rsplit(":", 1)[1])


@pytest.fixture
def spawned(tmp_path: Path) -> Iterator[list[RunningHub]]:
    """Hubs started by a test in their own process; all stopped afterwards."""
    hubs: list[RunningHub] = []
    yield hubs
    for h in hubs:
        stop_hub(h)


# --- slow HTTP clients -------------------------------------------------------------------
def test_partial_request_heads_do_not_stop_rest_or_mqtt(
    tmp_path: Path, spawned: list[RunningHub], track: Any
) -> None:
    """With 2 000 connections stuck in their request head, REST and MQTT CONNECT still work,
    even for a hub started with a soft limit of 512 open files."""
    url, _ = new_database_url("sqlite", tmp_path)
    log = tmp_path / "hub.log"
    hub = spawn_hub(
        url,
        tmp_path / "data",
        log=log,
        open_files=512,
        http_header_timeout_s="60",
        log_level="INFO",
    )
    spawned.append(hub)
    device = provision(hub)
    # paho waits with select(), which takes no descriptor above 1023: keep a few low ones free
    low = [os.open(os.devnull, os.O_RDONLY) for _ in range(8)]
    with partial_heads(_http_port(hub), SLOW_CLIENTS) as stuck:
        assert len(stuck) >= 1500, "the test process could not open enough sockets"
        r = httpx.get(hub.base + "/healthz", timeout=15)
        assert r.status_code == 200, r.text
        r = httpx.post(
            hub.api_base + "/provision/register",
            json={"model": "hexa-mini-switch-v1", "serial": uuid.uuid4().hex[:8]},
            headers={"X-Provision-Key": PROVISION_KEY},
            timeout=15,
        )
        assert r.status_code == 201, r.text
        for fd in low:
            os.close(fd)
        mqtt = track(MqttDevice(hub, device["device_uid"], device["device_token"]))
        assert mqtt.ok(), "MQTT CONNECT was not accepted"
        still_open = [s for s in stuck if not _closed_by_hub(s, bytearray())]
        assert len(still_open) == len(stuck), "the slow connections were not all held open"
    assert "open-file limit raised from 512" in log.read_text()


def test_slow_and_idle_connections_are_closed_by_the_hub(
    tmp_path: Path, spawned: list[RunningHub]
) -> None:
    """Connections whose request head is incomplete after the header timeout get a 408 and are
    closed, including one that trickles a byte at a time; an idle kept-alive one is closed too."""
    url, _ = new_database_url("sqlite", tmp_path)
    hub = spawn_hub(
        url,
        tmp_path / "data",
        log=tmp_path / "hub.log",
        http_header_timeout_s="1",
        http_keepalive_timeout_s="1",
    )
    spawned.append(hub)
    port = _http_port(hub)
    kept_alive = socket.create_connection(("127.0.0.1", port), timeout=10)
    trickle = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        kept_alive.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert kept_alive.recv(4096).startswith(b"HTTP/1.1 200")
        trickle.sendall(b"GET /healthz HTTP/1.1\r\n")
        with partial_heads(port, SLOW_CLIENTS) as stuck:
            answers = [bytearray() for _ in stuck]
            trickled = bytearray()

            def all_closed() -> bool:
                with contextlib.suppress(OSError):
                    trickle.send(b"x")  # a byte now and then never completes the head
                return _closed_by_hub(trickle, trickled) and all(
                    _closed_by_hub(s, seen) for s, seen in zip(stuck, answers, strict=True)
                )

            assert wait_until(all_closed, 60, step=0.2), "slow connections left open"
            assert all(seen.startswith(b"HTTP/1.1 408") for seen in answers)
        assert wait_until(lambda: _closed_by_hub(kept_alive, bytearray()), 30)
    finally:
        kept_alive.close()
        trickle.close()
    r = httpx.get(hub.base + "/healthz", timeout=15)
    assert r.status_code == 200, r.text
