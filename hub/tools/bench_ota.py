"""``hexa bench --ota``: OTA under load, against a hub of its own (``hexa serve`` in a
subprocess). Not a test: it measures and prints, nothing fails on a number.

- **check storm**: N provisioned devices each ask ``GET /ota/check`` (HTTP Basic) once,
  all started together, each over its own connection; latency percentiles of the answers.
  Run again with the offers spread over one second, as a fleet polling on a timer does.
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

    async def storm(spread_s: float, path: str = CHECK) -> dict[str, Any]:
        # one kept-alive connection per device, opened before the clock starts (devices keep
        # theirs); requests written and read raw, so that the load generator's own CPU (it
        # shares the machine) does not show up as the hub's latency
        conns: list[Any] = [None] * len(creds)
        if spread_s == 0:  # all at once: every connection open before the clock starts
            conns = await asyncio.gather(
                *(asyncio.open_connection("127.0.0.1", port) for _ in creds)
            )
        requests = [
            (
                f"GET {path} HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{port}\r\nAuthorization: Basic "
                + base64.b64encode(f"{c.device_uid}:{c.device_token}".encode()).decode()
                + "\r\n\r\n"
            ).encode()
            for c in creds
        ]
        cpu0 = hub.cpu_times()
        start = time.perf_counter()

        async def one(i: int) -> float | None:
            await asyncio.sleep(max(0.0, start + spread_s * i / len(creds) - time.perf_counter()))
            if conns[i] is None:  # spread: each device connects when its turn comes
                conns[i] = await asyncio.open_connection("127.0.0.1", port)
            reader, writer = conns[i]
            t = time.perf_counter()
            writer.write(requests[i])
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = await reader.readexactly(length)
            ms = (time.perf_counter() - t) * 1000
            good = head.startswith(b"HTTP/1.1 200") and (path != CHECK or b'"update":true' in body)
            return ms if good else None

        try:
            times = await asyncio.gather(*(one(i) for i in range(len(creds))))
            wall = time.perf_counter() - start
        finally:
            for conn in conns:
                if conn is not None:
                    conn[1].close()
        cpu1 = hub.cpu_times()
        cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        ok = [x for x in times if x is not None]
        return {
            **_pct(ok),
            "failed": len(times) - len(ok),
            "spread_s": spread_s,
            "wall_s": round(wall, 2),
            "hub_cpu_ms_per_check": round(1000 * cpu / len(creds), 2),
        }

    await storm(1.0)  # warm-up: caches, connections, the database's pages
    gc.collect()
    gc.freeze()  # the load generator's own full collections would show as hub latency
    out["checks_ms"] = [await storm(spread) for spread in args.ota_spreads]
    # the same burst on /healthz (no database, no auth): what the API layer alone costs
    out["healthz_burst_ms"] = await storm(0.0, "/healthz")

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
        t0 = time.perf_counter()
        oks = await asyncio.gather(*(download(c) for c in downloaders))
        elapsed = time.perf_counter() - t0
        done.set()
        await sampler
        rounds.append(
            {
                "verified": sum(oks),
                "seconds": round(elapsed, 2),
                "throughput_mib_s": round(len(downloaders) * len(image) / mib / elapsed, 1),
                "hub_rss_before_mib": round(rss_before / mib, 1),
                "hub_rss_peak_mib": round(peak / mib, 1),
                "hub_rss_growth_mib": round((peak - rss_before) / mib, 1),
            }
        )
    out["downloads"] = {
        "concurrent": len(downloaders),
        "artifact_mib": args.ota_artifact_mib,
        "rounds": rounds,
    }
    return out
