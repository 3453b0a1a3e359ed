"""``hexa bench --ota``: OTA under load, against a hub of its own (``hexa serve`` in a
subprocess). Not a test: it measures and prints, nothing fails on a number.

- **check storm**: N provisioned devices each ask ``GET /ota/check`` (HTTP Basic) once,
  each over its own connection. All at once: the connections are open before the clock
  starts (devices keep theirs alive), every request is written in one go, and a device's
  latency runs from the write of its request to the last byte of its answer. Then spread
  over ``--ota-spreads`` seconds, as a fleet polling on a timer does, each device opening
  its connection when its turn comes (its latency includes the connection), and all at
  once again with every device connecting at once.
- **the fast route's share**: the same burst through the FastAPI route of ``/ota/check``
  (an unknown query parameter sends it there).
- **what is reachable**: the same burst on the hub's ``/healthz`` (the API layer without
  the database or credentials) and on a bare ASGI app served by uvicorn as the hub serves
  its API (``hexa.hub.tools.asgi_floor``): the floor of one process on this machine.
- Every storm reports the server's and the load generator's CPU per request next to the
  percentiles (they share the machine) and the load average: the generator reads answers
  in its transports' callbacks, without a stream reader, so as to add little of its own.
- **downloads**: D devices download a published artifact (default 4 MiB) at the same
  time; the hub's RSS before, at its peak while they run (sampled every 10 ms), and after,
  and whether every byte matched the signed SHA-256.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import hashlib
import os
import sys
import time
import uuid
from typing import Any

import httpx
import psutil

from hexa.hub.tools.bench import KEY, _pct, _Processes
from hexa.hub.tools.sim import provision

CHECK = "/api/v1/ota/check?current_version=1.0.0"
ADMIN_EMAIL = "bench-admin@bench.local"
ADMIN_PASSWORD = "bench-admin-password-" + uuid.uuid4().hex[:8]


async def run_ota_bench(args: argparse.Namespace) -> dict[str, Any]:
    procs = _Processes()
    result: dict[str, Any] = {"mode": "ota", "devices": args.devices}
    try:
        env = procs.hub_env(
            args.bench_database_url,
            HEXA_ADMIN_EMAIL=ADMIN_EMAIL,
            HEXA_ADMIN_PASSWORD=ADMIN_PASSWORD,
        )
        result["database"] = (args.bench_database_url or "sqlite").split(":", 1)[0]
        hub, http_port, _ = procs.start_hub(env, args.profile)
        base = f"http://127.0.0.1:{http_port}"
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            result.update(await _measure(args, http, base, psutil.Process(hub.pid)))
    finally:
        procs.stop()
    return result


async def _measure(
    args: argparse.Namespace, http: httpx.AsyncClient, base: str, hub: psutil.Process
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    login = await http.post(
        "/api/v1/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}
    )
    admin = {"Authorization": f"Bearer {login.json()['access_token']}"}
    (await http.post("/api/v1/ota/keys", headers=admin)).raise_for_status()
    image = os.urandom(args.ota_artifact_mib * 1024 * 1024)
    t0 = time.perf_counter()
    r = await http.post(
        "/api/v1/ota/releases",
        headers=admin,
        files={"file": ("fw.bin", image, "application/octet-stream")},
        data={
            "model": "hexa-mini-switch-v1",
            "version": "2.0.0",
            "channel": "stable",
            "security_version": "1",
        },
    )
    r.raise_for_status()
    out["upload_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    release = r.json()
    await http.patch(
        f"/api/v1/ota/releases/{release['id']}",
        headers=admin,
        json={"status": "published", "rollout_percent": 100},
    )
    t0 = time.perf_counter()
    creds = await provision(http, KEY, args.devices)
    out["provision_s"] = round(time.perf_counter() - t0, 2)

    port = int(base.rsplit(":", 1)[1])
    requests = [_request(port, CHECK, c.device_uid, c.device_token) for c in creds]
    healthz = [_request(port, "/healthz", c.device_uid, c.device_token) for c in creds]
    has_update = b'"update":true'

    await _storm(port, requests, 1.0, hub, has_update)  # warm-up: caches, the database's pages
    gc.collect()
    gc.freeze()  # the load generator's own full collections would show as hub latency
    out["checks_ms"] = [await _storm(port, requests, s, hub, has_update) for s in args.ota_spreads]
    # the same burst through the FastAPI route (an unknown parameter sends it there): what
    # the route ahead of FastAPI's dependency machinery saves
    also = [_request(port, CHECK + "&also=1", c.device_uid, c.device_token) for c in creds]
    out["checks_fastapi_route_ms"] = await _storm(port, also, 0.0, hub, has_update)
    # all at once again, each device opening its connection with the others (no keep-alive)
    out["checks_connecting_ms"] = await _storm(port, requests, 0.0, hub, has_update, connect=True)
    # the same burst on /healthz (no database, no auth): what the API layer alone costs
    out["healthz_burst_ms"] = await _storm(port, healthz, 0.0, hub, b"")
    # and on a bare ASGI app under uvicorn, alone on the machine's hub side: the floor
    out["asgi_floor_burst_ms"] = await _floor(creds)

    # concurrent downloads: the hub's memory while they run
    downloaders = creds[: args.ota_downloads]
    expected = release["sha256"]
    peak = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, hub.memory_info().rss)
            await asyncio.sleep(0.01)

    async def download(c: Any) -> bool:
        digest = hashlib.sha256()
        async with (
            httpx.AsyncClient(base_url=base, timeout=120) as client,
            client.stream(
                "GET",
                f"/api/v1/ota/artifacts/{release['id']}",
                auth=(c.device_uid, c.device_token),
            ) as resp,
        ):
            async for chunk in resp.aiter_bytes():
                digest.update(chunk)
                await asyncio.sleep(0)
        return resp.status_code == 200 and digest.hexdigest() == expected

    mib = 2**20
    rounds = []
    for _ in range(2):  # the first round also shows the hub's one-time warm-up
        done.clear()
        rss_before = hub.memory_info().rss
        peak = rss_before
        sampler = asyncio.create_task(sample())
        cpu0 = hub.cpu_times()
        t0 = time.perf_counter()
        oks = await asyncio.gather(*(download(c) for c in downloaders))
        elapsed = time.perf_counter() - t0
        cpu = _cpu(hub.cpu_times(), cpu0)
        done.set()
        await sampler
        rounds.append(
            {
                "verified": sum(oks),
                "seconds": round(elapsed, 2),
                "throughput_mib_s": round(len(downloaders) * len(image) / mib / elapsed, 1),
                "hub_cpu_ms_per_mib": round(
                    1000 * cpu / max(1, len(downloaders) * len(image) / mib), 2
                ),
                "hub_rss_before_mib": round(rss_before / mib, 1),
                "hub_rss_peak_mib": round(peak / mib, 1),
                "hub_rss_growth_mib": round((peak - rss_before) / mib, 1),
                "hub_rss_after_mib": round(hub.memory_info().rss / mib, 1),
            }
        )
    out["downloads"] = {
        "concurrent": len(downloaders),
        "artifact_mib": args.ota_artifact_mib,
        "rounds": rounds,
    }
    return out


def _request(port: int, path: str, uid: str, token: str) -> bytes:
    pair = base64.b64encode(f"{uid}:{token}".encode()).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Basic {pair}\r\n\r\n"
    ).encode()


class _Device(asyncio.Protocol):
    """One device's connection: sends its request and timestamps the end of the answer as
    it arrives, in the transport's callback (no stream reader, no task switch per answer:
    the load generator shares the machine, its own latency would count as the hub's)."""

    def __init__(self, expect: bytes) -> None:
        self.expect = expect
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport
        self.answered: asyncio.Future[float | None] = asyncio.get_running_loop().create_future()
        self.buffer = bytearray()
        self.sent = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def send(self, request: bytes) -> None:
        assert self.transport is not None
        self.sent = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.answered.done():
            return
        length = 0
        for line in bytes(self.buffer[:end]).split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        if len(self.buffer) < end + 4 + length:
            return
        arrived = time.perf_counter()
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        good = self.buffer.startswith(b"HTTP/1.1 200") and self.expect in body
        self.answered.set_result(arrived if good else None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answered.done():
            self.answered.set_result(None)


async def _storm(
    port: int,
    requests: list[bytes],
    spread_s: float,
    server: psutil.Process,
    expect: bytes,
    *,
    connect: bool = False,
) -> dict[str, Any]:
    """Every request once, each device on its own connection; latency percentiles.

    All at once (``spread_s`` 0): the connections are open before the clock starts (a
    fleet's devices keep theirs alive) and the requests are written in one go; a device's
    latency runs from the write of its request to the last byte of its answer. With
    ``connect`` (or spread out over ``spread_s`` seconds, as a fleet polling on a timer),
    each device opens its connection when its turn comes and its latency includes the
    connection. The CPU of the server and of this load generator per request is reported
    alongside (they share the machine).
    """
    loop = asyncio.get_running_loop()
    count = len(requests)
    devices = [_Device(expect) for _ in requests]
    at_once = spread_s == 0 and not connect
    if at_once:
        await asyncio.gather(*(_connect(loop, d, port) for d in devices))
    me = psutil.Process()
    cpu0, mine0 = server.cpu_times(), me.cpu_times()
    start = time.perf_counter()

    async def one(i: int) -> float | None:
        device = devices[i]
        if at_once:
            device.send(requests[i])
            began = device.sent
        else:
            await asyncio.sleep(max(0.0, start + spread_s * i / count - time.perf_counter()))
            began = time.perf_counter()
            await _connect(loop, device, port)
            device.send(requests[i])
        arrived = await device.answered
        return None if arrived is None else (arrived - began) * 1000

    try:
        times = await asyncio.gather(*(one(i) for i in range(count)))
        wall = time.perf_counter() - start
    finally:
        for device in devices:
            if device.transport is not None:
                device.transport.close()
    cpu1, mine1 = server.cpu_times(), me.cpu_times()
    ok = [x for x in times if x is not None]
    return {
        **_pct(ok),
        "failed": count - len(ok),
        "spread_s": spread_s,
        "connections": "kept alive" if at_once else "opened with the request",
        "wall_s": round(wall, 2),
        "server_cpu_ms_per_request": round(1000 * _cpu(cpu1, cpu0) / count, 3),
        "bench_cpu_ms_per_request": round(1000 * _cpu(mine1, mine0) / count, 3),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


async def _connect(loop: asyncio.AbstractEventLoop, device: _Device, port: int) -> None:
    transport, _ = await loop.create_connection(lambda: device, "127.0.0.1", port)
    device.transport = transport  # connection_made may come a loop turn later (uvloop)


def _cpu(after: Any, before: Any) -> float:
    return float((after.user + after.system) - (before.user + before.system))


async def _floor(creds: list[Any]) -> dict[str, Any]:
    """The same burst against ``hexa.hub.tools.asgi_floor`` (a bare ASGI app under uvicorn
    in a process of its own, started and stopped here)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hexa.hub.tools.asgi_floor",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        port = int(await proc.stdout.readline())
        requests = [_request(port, CHECK, c.device_uid, c.device_token) for c in creds]
        server = psutil.Process(proc.pid)
        await _storm(port, requests, 0.0, server, b"")  # warm-up
        return await _storm(port, requests, 0.0, server, b'"update":false')
    finally:
        proc.terminate()
        await proc.wait()
