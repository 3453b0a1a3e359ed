"""Hostile JSON on both WebSocket gateways: deeply nested, malformed or oversized messages
get an error (or the documented close code) without a traceback, and the hub keeps serving."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from support.accounts import register
from support.checks import wait_until
from support.devices import claimed_device, online_device
from support.hubs import RunningHub, spawned_hub, stop_hub
from support.ws import WsPeer, client_url, ws_client, ws_device

from hexa.hub.logs import PeerFaults

DEEP = "[" * 100_000 + "]" * 100_000  # 200 kB: over both gateways' message limits
DEEP_SMALL = "[" * 5_000 + "]" * 5_000  # 10 kB: stdlib json raises RecursionError on it
DEEP_OBJECT = '{"a":' * 2_000 + "1" + "}" * 2_000
TRANSPORT_LIMIT = 1024 * 1024  # uvicorn's ws_max_size in hexa serve


def nested(kind: str, depth: int, **fields: Any) -> str:
    """A message of ``kind`` with a field ``x`` nested ``depth`` arrays deep."""
    return json.dumps({"type": kind, **fields, "x": None}).replace(
        "null", "[" * depth + "]" * depth
    )


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The hub's log records (its thread logs through the root logger) with an exception."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.exc_info is not None or "Traceback" in r.getMessage()
    ]


def errors_of(peer: WsPeer) -> list[str]:
    return [str(d.get("error")) for d in peer.messages(lambda d: d.get("type") == "error")]


def test_client_hostile_json_gets_error(
    hub: RunningHub, track: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """/ws/client answers nested-thousands-deep, too deep, NaN and oversized JSON with an
    error, stays open, and another client keeps working; the log has no traceback."""
    caplog.set_level(logging.WARNING)
    user, other = register(hub), register(hub)
    dev, _device = online_device(hub, user, track)
    hostile = ws_client(hub, user, track)
    bad = [DEEP, DEEP_SMALL, DEEP_OBJECT, nested("set_relay", 40), "NaN", '{"type": 1e999}']
    for n, message in enumerate(bad, start=1):
        hostile.send(message)
        assert wait_until(lambda: len(errors_of(hostile)) >= n, 5), (n, hostile.messages())  # noqa: B023
    reasons = errors_of(hostile)
    assert "larger than" in reasons[0] and "depth" in reasons[1], reasons
    assert "nested deeper" in reasons[3], reasons
    assert not hostile.closed.is_set()
    hostile.send(
        {
            "type": "set_relay",
            "request_id": "ok",
            "device_id": dev["id"],
            "relay_index": 0,
            "state": True,
        }
    )
    answer = hostile.result("ok")
    assert answer is not None and answer["ok"] is True, hostile.messages()
    bystander = ws_client(hub, other, track)
    assert not bystander.closed.is_set()
    assert tracebacks(caplog) == []


@pytest.fixture
def served_hub(db_kind: str, tmp_path: Path) -> Iterator[RunningHub]:
    """``hexa serve`` in its own process: its log set-up and output are the real ones."""
    with spawned_hub(db_kind, tmp_path) as h:
        yield h


def test_frames_over_transport_limit_or_not_utf8_close(
    served_hub: RunningHub, tmp_path: Path, track: Any
) -> None:
    """On both gateways a message over 1 MiB closes the socket with 1009 and a text frame
    that is not UTF-8 with 1007; others keep working and the hub's log has no traceback."""
    user = register(served_hub)
    p, _ = claimed_device(served_hub, user)
    device_url = f"{served_hub.ws_base}/ws/device?" + urlencode(
        {"uid": p["device_uid"], "token": p["device_token"]}
    )
    for url in (client_url(served_hub, user.access_token), device_url):
        huge = track(WsPeer(url))
        huge.send("[" * (TRANSPORT_LIMIT + 1))
        assert wait_until(huge.closed.is_set, 5) and huge.close_code == 1009, (url, huge.close_code)
        garbled = track(WsPeer(url))
        garbled.ws.send(b'{"type": "ping", "x": "\xff"}', text=True)
        assert wait_until(garbled.closed.is_set, 5), url
        assert garbled.close_code == 1007, (url, garbled.close_code)
    fine = ws_client(served_hub, user, track)
    assert not fine.closed.is_set()
    stop_hub(served_hub)
    log = (tmp_path / "data" / "hub.log").read_text()
    assert "Traceback" not in log and "Invalid UTF-8" in log, log


def test_peer_faults_filter_drops_the_traceback() -> None:
    """The log filter turns uvicorn's exception record for a non-UTF-8 frame into a warning
    without traceback, and leaves other exception records alone."""
    logger = logging.getLogger("test.peer_faults")

    def record(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            return logger.makeRecord(
                logger.name, logging.ERROR, __file__, 1, "boom", (), sys.exc_info()
            )

    peer = record(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"))
    assert PeerFaults().filter(peer) and peer.exc_info is None
    assert peer.levelno == logging.WARNING and peer.levelname == "WARNING"
    ours = record(RuntimeError("a bug"))
    assert PeerFaults().filter(ours) and ours.exc_info is not None
    assert ours.levelno == logging.ERROR


def test_device_hostile_json_gets_error(
    hub: RunningHub, track: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """/ws/device answers deeply nested, too deep and oversized JSON with an error and
    publishes none of it; the device and the hub keep working, without a traceback."""
    caplog.set_level(logging.WARNING)
    user = register(hub)
    dev, device = ws_device(hub, user, track)
    _, bystander = ws_device(hub, user, track)
    deep_device = "[" * 30_000 + "]" * 30_000  # 60 kB: under the 64 KiB limit
    bad = [DEEP, deep_device, DEEP_OBJECT, nested("state_report", 40, relays=[True] * 3)]
    for n, message in enumerate(bad, start=1):
        device.send(message)
        assert wait_until(lambda: len(errors_of(device)) >= n, 5), (n, device.messages())  # noqa: B023
    assert "nested deeper" in errors_of(device)[3], errors_of(device)
    assert not device.closed.is_set()
    with hub.api(user.access_token) as api:
        assert api.get(f"/devices/{dev['id']}/state").json()["relays"] == [False] * 3
        r = api.post(f"/devices/{dev['id']}/relays/1", json={"state": True})
        assert r.status_code == 200 and r.json()["relays"] == [False, True, False], r.text
    bystander.send({"type": "ping"})
    assert bystander.wait_for(lambda d: d.get("type") == "pong", 5)
    assert tracebacks(caplog) == []
