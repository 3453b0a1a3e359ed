"""What the access log and audit writes cost a REST round trip (run by scripts/bench-edge).

Starts ``hexa serve`` three times on free ports, each on a fresh SQLite database (or a
fresh PostgreSQL database with --postgres URL):

- ``neither``: HEXA_ACCESS_LOG=false and audit entries not written (the model's create
  and bulk_create replaced in that process only: a measurement, never a setting);
- ``audit``: HEXA_ACCESS_LOG=false, audit entries written as always;
- ``both``: the access log on, at INFO, written to a file, and audit: production.

The three hubs run at once. Each gets one user and one claimed device, then sequential
keep-alive requests (after a warm-up): ``GET /api/v1/devices/{id}``, then
``PATCH /api/v1/devices/{id}`` (audited through the batching queue), then
``PATCH /api/v1/orgs/{id}`` (a rename, audited in its own transaction), interleaved
across the hubs one request at a time (in rotating order) so that load from elsewhere on
the machine slows every variant alike. ``--rounds`` repeats it with fresh hubs; the
medians of the per-round percentiles are printed as a Markdown table, plus one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

VARIANTS = ("neither", "audit", "both")
BOOT = """
import sys
if sys.argv[1] == "neither":
    from hexa.models import AuditEntry

    async def _nothing(cls, *args, **kwargs):
        return None

    AuditEntry.create = classmethod(_nothing)
    AuditEntry.bulk_create = classmethod(_nothing)
from hexa.hub.cli import main
sys.exit(main(["serve"]))
"""
PROVISION_KEY = "bench-provision-key-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: PostgreSQL databases made for this run, dropped at its end
CREATED: list[str] = []


def _pg(postgres: str, sql: str) -> None:
    import asyncio

    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(postgres)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def _database(postgres: str | None, tmp: Path) -> str:
    if postgres is None:
        return f"sqlite://{tmp / 'bench.db'}"
    name = f"hexa_edgebench_{uuid.uuid4().hex[:10]}"
    _pg(postgres, f'CREATE DATABASE "{name}"')
    CREATED.append(name)
    return postgres.rsplit("/", 1)[0] + "/" + name


def _start(variant: str, tmp: Path, postgres: str | None) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = {
        **os.environ,
        "HEXA_DATA_DIR": str(tmp / "data"),
        "HEXA_DATABASE_URL": _database(postgres, tmp),
        "HEXA_HTTP_PORT": str(port),
        "HEXA_MQTT_PORT": "0",
        "HEXA_MQTT_TLS_PORT": "off",
        "HEXA_DEVICE_PROVISION_KEY": PROVISION_KEY,
        "HEXA_JWT_SECRET": "bench-jwt-secret-0123456789abcdef",
        "HEXA_LOG_LEVEL": "INFO",
        "HEXA_ACCESS_LOG": "true" if variant == "both" else "false",
    }
    log = (tmp / "hub.log").open("wb")
    proc = subprocess.Popen(  # noqa: S603
        [sys.executable, "-c", BOOT, variant], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"hub did not start:\n{(tmp / 'hub.log').read_text()}")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def _setup(c: httpx.Client) -> tuple[str, str]:
    """A user and a claimed device on the hub ``c`` talks to: (device id, org id)."""
    email = f"bench-{uuid.uuid4().hex[:8]}@hexa.test"
    r = c.post("/auth/register", json={"email": email, "password": "Bench-pass-0123"})
    c.headers["Authorization"] = "Bearer " + r.json()["access_token"]
    p = c.post(
        "/provision/register",
        headers={"X-Provision-Key": PROVISION_KEY},
        json={"model": "hexa-mini-switch-v1", "serial": "bench"},
    ).json()
    device = c.post("/devices/claim", json={"claim_code": p["claim_code"]}).json()
    return str(device["id"]), str(device["org_id"])


#: a read; a write audited through the queue; a write audited in its own transaction
ROUTES = ("GET /devices/{id}", "PATCH /devices/{id}", "PATCH /orgs/{id}")


def _measure(bases: dict[str, str], requests: int, warmup: int) -> dict[str, Any]:
    """Requests to the variants' hubs interleaved one by one, so that whatever else the
    machine does slows every variant alike."""
    clients = {v: httpx.Client(base_url=b + "/api/v1", timeout=30) for v, b in bases.items()}
    devices = {v: _setup(c) for v, c in clients.items()}
    times: dict[str, dict[str, list[float]]] = {v: {r: [] for r in ROUTES} for v in bases}
    try:
        for route in ROUTES:
            for i in range(warmup + requests):
                order = list(clients)
                order = order[i % len(order) :] + order[: i % len(order)]  # no fixed position
                for variant in order:
                    c = clients[variant]
                    device, org = devices[variant]
                    began = time.perf_counter()
                    if route.startswith("GET"):
                        r = c.get(f"/devices/{device}")
                    elif "/orgs/" in route:
                        r = c.patch(f"/orgs/{org}", json={"name": f"org {i}"})
                    else:
                        r = c.patch(f"/devices/{device}", json={"name": f"d{i}"})
                    elapsed = time.perf_counter() - began
                    assert r.status_code == 200, r.text
                    if i >= warmup:
                        times[variant][route].append(elapsed)
    finally:
        for c in clients.values():
            c.close()
    return {
        v: {r: {"p50": _pct(t, 0.5), "p99": _pct(t, 0.99)} for r, t in routes.items()}
        for v, routes in times.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per route")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--postgres", metavar="URL", help="run on fresh PostgreSQL databases")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, dict[str, float]]]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="hexa-bench-edge-") as tmp:
            procs, bases = [], {}
            try:
                for variant in VARIANTS:
                    (Path(tmp) / variant).mkdir()
                    proc, bases[variant] = _start(variant, Path(tmp) / variant, args.postgres)
                    procs.append(proc)
                measured = _measure(bases, args.requests, args.warmup)
            finally:
                for proc in procs:
                    proc.terminate()
                    proc.wait(20)
            log = (Path(tmp) / "both" / "hub.log").read_text()
            assert len(re.findall("hexa.access", log)) >= 2 * args.requests
            for variant in VARIANTS:
                runs[variant].append(measured[variant])
            if args.postgres:
                while CREATED:
                    _pg(args.postgres, f'DROP DATABASE IF EXISTS "{CREATED.pop()}" WITH (FORCE)')
    result: dict[str, Any] = {}
    for variant, rounds in runs.items():
        result[variant] = {
            route: {
                q: round(statistics.median(r[route][q] for r in rounds), 3) for q in ("p50", "p99")
            }
            for route in rounds[0]
        }
    print("| route | variant | p50 ms | p99 ms | p50 vs neither |")  # noqa: T201
    print("|---|---|---|---|---|")  # noqa: T201
    for route in result["neither"]:
        bare = result["neither"][route]["p50"]
        for variant in VARIANTS:
            row = result[variant][route]
            delta = (row["p50"] - bare) / bare * 100
            print(f"| {route} | {variant} | {row['p50']:.2f} | {row['p99']:.2f} | {delta:+.1f} % |")  # noqa: T201
    print(json.dumps({"requests": args.requests, "rounds": args.rounds, **result}))  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
