"""Many devices connecting at once: their credentials are checked and their presence
loaded and written in batches (hub/batch.py), and each of them still ends up exactly
as if it had come alone: online in the database and on its retained availability,
offline the same way when it leaves; a wrong or rotated token in the same burst is
refused. Also the batching itself, as pure logic."""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

import pytest
from support.accounts import User, integration_token, register
from support.checks import wait_until
from support.devices import claimed_device
from support.hubs import RunningHub
from support.mqtt import MqttClient, MqttDevice

from hexa.hub.batch import Batched

BURST = 40


def _online_ids(hub: RunningHub, user: User) -> set[str]:
    with hub.api(user.access_token) as c:
        r = c.get("/devices", params={"online": "true", "limit": 100})
    assert r.status_code == 200, r.text
    return {d["id"] for d in r.json()["items"]}


def _availability(hub: RunningHub, user: User, uids: set[str]) -> dict[str, bytes]:
    """The retained availability of ``uids`` as an integration of their organization
    gets it on subscribing."""
    it = integration_token(hub, user)
    obs = MqttClient(hub, it["name"], it["token"])
    try:
        assert obs.ok()
        assert obs.subscribe("hexa/+/availability")
        wait_until(lambda: len(obs.messages(lambda t, p, r: r)) >= len(uids), 10)
        return {t.split("/")[1]: p for t, p, r in obs.messages(lambda t, p, r: r)}
    finally:
        obs.close()


def _connect_all(hub: RunningHub, creds: list[tuple[str, str]]) -> list[MqttDevice]:
    """Connect every device at the same time (one thread each)."""
    with concurrent.futures.ThreadPoolExecutor(len(creds)) as pool:
        return list(pool.map(lambda c: MqttDevice(hub, c[0], c[1]), creds))


def test_burst_of_devices_all_online_then_all_offline(hub: RunningHub) -> None:
    """A burst of devices connecting at once are all online in the database and on their
    retained availability; leaving at once, all offline the same way."""
    user = register(hub)
    devices = [claimed_device(hub, user) for _ in range(BURST)]
    ids = {dev["id"] for _, dev in devices}
    uids = {p["device_uid"] for p, _ in devices}
    clients = _connect_all(hub, [(p["device_uid"], p["device_token"]) for p, _ in devices])
    try:
        assert all(m.ok() for m in clients)
        assert wait_until(lambda: _online_ids(hub, user) == ids, 20), "not all online"
        retained = _availability(hub, user, uids)
        assert retained == dict.fromkeys(uids, b"online")
    finally:
        with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
            list(pool.map(lambda m: m.close(), clients))
    # a clean DISCONNECT sends no will: the hub says offline for them
    assert wait_until(lambda: not _online_ids(hub, user), 20), "some stayed online"
    assert _availability(hub, user, uids) == dict.fromkeys(uids, b"offline")
    with hub.api(user.access_token) as c:
        for device_id in ids:
            assert c.get(f"/devices/{device_id}").json()["online"] is False


def test_wrong_and_rotated_tokens_in_a_burst_are_refused(hub: RunningHub) -> None:
    """In one burst of CONNECTs, each is judged by its own token: right ones are let in,
    wrong ones and a token rotated a moment before are refused."""
    user = register(hub)
    devices = [claimed_device(hub, user) for _ in range(12)]
    rotated = devices[0]
    with hub.api(user.access_token) as c:
        r = c.post(f"/devices/{rotated[1]['id']}/token/rotate")
    assert r.status_code == 200, r.text
    creds = [(p["device_uid"], p["device_token"]) for p, _ in devices[1:]]
    wrong = [(uid, token[:-2] + "xy") for uid, token in creds[::2]]
    attempts = [*creds, *wrong, (rotated[0]["device_uid"], rotated[0]["device_token"])]
    with concurrent.futures.ThreadPoolExecutor(len(attempts)) as pool:
        clients = list(
            pool.map(
                lambda c: MqttClient(hub, c[0], c[1], client_id=f"b-{c[1][-6:]}-{c[0]}"),
                attempts,
            )
        )
    try:
        accepted = [m.ok() for m in clients]
        assert accepted == [True] * len(creds) + [False] * (len(wrong) + 1)
    finally:
        for m in clients:
            m.close()


# --- the batching, as pure logic ------------------------------------------------------------
@pytest.mark.anyio
async def test_batched_answers_a_burst_with_one_call() -> None:
    """Keys asked for in one loop turn are run together; each caller gets its own
    answer, a key run has no value for gets None, and later keys form the next batch."""
    calls: list[list[int]] = []

    async def run(keys: list[int]) -> dict[int, str]:
        calls.append(sorted(keys))
        await asyncio.sleep(0.01)
        return {k: f"v{k}" for k in keys if k % 5}

    batched: Batched[int, str] = Batched(run)
    answers = await asyncio.gather(*(batched.one(k) for k in range(1, 11)), batched.one(3))
    assert answers == [None if k % 5 == 0 else f"v{k}" for k in range(1, 11)] + ["v3"]
    assert calls == [list(range(1, 11))]
    # asked for while a call runs: the next call takes them all
    first = asyncio.ensure_future(batched.one(101))
    await asyncio.sleep(0.001)
    later = [asyncio.ensure_future(batched.one(k)) for k in (102, 103, 104)]
    assert await asyncio.gather(first, *later) == ["v101", "v102", "v103", "v104"]
    assert calls[1:] == [[101], [102, 103, 104]]


@pytest.mark.anyio
async def test_batched_failure_and_cancellation_reach_every_caller() -> None:
    """A failed call raises to every caller of its batch; the caller running a batch
    being cancelled leaves none of the others waiting, and the next batch works."""
    gate = asyncio.Event()

    async def run(keys: list[str]) -> dict[str, Any]:
        if "boom" in keys:
            raise RuntimeError("the database is gone")
        await gate.wait()
        return dict.fromkeys(keys, True)

    batched: Batched[str, Any] = Batched(run)
    results = await asyncio.gather(
        batched.one("boom"), batched.one("other"), return_exceptions=True
    )
    assert [type(r) for r in results] == [RuntimeError, RuntimeError]

    runner = asyncio.ensure_future(batched.one("a"))
    follower = asyncio.ensure_future(batched.one("b"))
    await asyncio.sleep(0.01)
    runner.cancel()
    with pytest.raises(LookupError):
        await asyncio.wait_for(follower, 5)
    with pytest.raises(asyncio.CancelledError):
        await runner
    gate.set()
    assert await asyncio.wait_for(batched.one("c"), 5) is True
