"""The in-process event hub: typed subscriptions, base classes, order, unsubscribe, and a
failing handler that does not stop the others; and how bridges are chosen."""

from __future__ import annotations

import logging
import uuid
from types import SimpleNamespace
from typing import Any, ClassVar

import anyio
import pytest
from anyio.abc import TaskStatus

from hexa import bridges
from hexa.hub.events import (
    DeviceClaimed,
    DeviceCredentialsRevoked,
    DeviceDeleted,
    DeviceEvent,
    DeviceOffline,
    DeviceOnline,
    Event,
    Events,
    PresenceEvent,
)
from hexa.hub.state import DeviceInfo


def _info() -> DeviceInfo:
    return DeviceInfo(
        id=uuid.uuid4(),
        uid="hx-00000001",
        org_id=None,
        relay_count=3,
        input_count=3,
        relays=[False] * 3,
        inputs=[False] * 3,
        online=True,
        fw_version=None,
    )


def _run(events: Events, *published: Event) -> None:
    async def main() -> None:
        for e in published:
            await events.publish(e)

    anyio.run(main)


def test_handlers_hear_their_type_and_its_subclasses_only() -> None:
    """A DeviceEvent subscriber hears claims and deletions, not presence or revocations."""
    events, heard = Events(), []

    async def on_device(e: DeviceEvent) -> None:
        heard.append(type(e).__name__)

    events.subscribe(DeviceEvent, on_device)
    device: Any = SimpleNamespace(device_uid="hx-00000001")
    _run(
        events,
        DeviceClaimed(device),
        DeviceOnline(_info()),
        DeviceCredentialsRevoked("hx-00000001"),
        DeviceDeleted(device),
    )
    assert heard == ["DeviceClaimed", "DeviceDeleted"]


def test_order_and_unsubscribe() -> None:
    """Handlers run in subscription order (own class before bases); unsubscribed ones stop."""
    events, heard = Events(), []

    def recorder(tag: str) -> Any:
        async def handler(e: Event) -> None:
            heard.append(tag)

        return handler

    events.subscribe(PresenceEvent, recorder("base"))
    first = events.subscribe(DeviceOffline, recorder("first"))
    events.subscribe(DeviceOffline, recorder("second"))
    _run(events, DeviceOffline(_info()))
    assert heard == ["first", "second", "base"]
    heard.clear()
    first()
    first()  # unsubscribing twice is harmless
    _run(events, DeviceOffline(_info()))
    assert heard == ["second", "base"]


def test_a_failing_handler_is_logged_and_the_others_run(caplog: pytest.LogCaptureFixture) -> None:
    """One handler raising does not keep the event from the next one."""
    events, heard = Events(), []

    async def broken(e: DeviceCredentialsRevoked) -> None:
        raise RuntimeError("boom")

    async def fine(e: DeviceCredentialsRevoked) -> None:
        heard.append(e.uid)

    events.subscribe(DeviceCredentialsRevoked, broken)
    events.subscribe(DeviceCredentialsRevoked, fine)
    with caplog.at_level(logging.ERROR, logger="hexa.hub.events"):
        _run(events, DeviceCredentialsRevoked("hx-00000002"))
    assert heard == ["hx-00000002"]
    assert any("DeviceCredentialsRevoked" in r.getMessage() for r in caplog.records)


class _Recorder:
    """A bridge for the test: enabled by a setting, hears device claims."""

    name: ClassVar[str] = "recorder"

    def __init__(self, hub: Any) -> None:
        self.hub = hub

    @classmethod
    def enabled(cls, settings: Any) -> bool:
        return bool(settings.recorder)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()


def test_only_enabled_bridges_are_started() -> None:
    """bridges.enabled() returns the run of each bridge its settings turn on."""
    on: Any = SimpleNamespace(settings=SimpleNamespace(recorder=True))
    off: Any = SimpleNamespace(settings=SimpleNamespace(recorder=False))
    assert len(bridges.enabled(on, (_Recorder,))) == 1
    assert bridges.enabled(off, (_Recorder,)) == []
