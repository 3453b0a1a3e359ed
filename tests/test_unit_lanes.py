"""Per-device lanes of presence: order per device, concurrency across devices, bounded
queues, and newest-snapshot-wins when a device floods."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import pytest

from hexa.hub.presence import _Lanes


def recorder(
    log: list[str], gate: asyncio.Event | None = None
) -> Callable[[str], Callable[[], Awaitable[None]]]:
    def job(name: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            if gate is not None:
                await gate.wait()
            log.append(name)

        return run

    return job


@contextlib.asynccontextmanager
async def running(limit: int) -> AsyncIterator[_Lanes]:
    """Lanes of ``limit`` messages, running until the block ends."""
    lanes = _Lanes(limit=limit)
    async with anyio.create_task_group() as tg:
        await tg.start(lanes.run)
        try:
            yield lanes
        finally:
            tg.cancel_scope.cancel()


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.mark.anyio
async def test_one_device_in_order_devices_concurrently() -> None:
    done: list[str] = []
    gate = asyncio.Event()
    blocked = recorder(done, gate)
    free = recorder(done)
    async with running(10) as lanes:
        assert lanes.submit("a", "report", blocked("a1"))
        assert lanes.submit("a", "event", free("a2"))
        assert lanes.submit("b", "report", free("b1"))
        await settle()
        assert done == ["b1"], "device b must not wait for device a"
        gate.set()
        await settle()
        assert done == ["b1", "a1", "a2"]


@pytest.mark.anyio
async def test_full_lane_drops_new_messages_but_a_new_report_replaces_the_waiting_one() -> None:
    done: list[str] = []
    gate = asyncio.Event()
    blocked = recorder(done, gate)
    async with running(3) as lanes:
        assert lanes.submit("a", "report", blocked("r1"))  # running
        assert lanes.submit("a", "event", blocked("e1"))
        assert lanes.submit("a", "report", blocked("r2"))  # the lane is now full
        assert not lanes.submit("a", "event", blocked("e2"))  # dropped
        assert not lanes.submit("a", "report", blocked("r3"), supersedes=True)  # replaces r2
        assert not lanes.submit("a", "report", blocked("r4"), supersedes=True)  # replaces r3
        gate.set()
        await settle()
        assert done == ["r1", "e1", "r4"]


@pytest.mark.anyio
async def test_a_report_never_replaces_another_kind_or_the_running_job() -> None:
    done: list[str] = []
    gate = asyncio.Event()
    blocked = recorder(done, gate)
    async with running(2) as lanes:
        assert lanes.submit("a", "report", blocked("r1"))  # running
        assert lanes.submit("a", "event", blocked("e1"))  # waiting, full
        assert not lanes.submit("a", "report", blocked("r2"), supersedes=True)
        gate.set()
        await settle()
        assert done == ["r1", "e1"]
        # an idle lane is gone and starts afresh
        assert lanes.submit("a", "report", blocked("r3"))
        await settle()
        assert done == ["r1", "e1", "r3"]


@pytest.mark.anyio
async def test_a_failing_job_does_not_stop_its_lane() -> None:
    done: list[str] = []

    async def boom() -> None:
        raise RuntimeError("handler bug")

    async with running(5) as lanes:
        assert lanes.submit("a", "report", boom)
        assert lanes.submit("a", "report", recorder(done)("after"))
        await settle()
        assert done == ["after"]
