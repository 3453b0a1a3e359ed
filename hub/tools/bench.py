"""``hexa bench``: N simulated devices against a hub; prints one JSON line.

Not a test: it measures and reports, and nothing fails on a number. It starts its own
hub (``hexa serve`` in a subprocess, on the embedded broker or on a Mosquitto it starts
with ``set_tcp_nodelay true``), provisions and claims N simulated switches, connects
them over MQTT, and measures:

- REST command round trip (POST /devices/{id}/relays/{n} → 200) at a fixed rate;
- MQTT intent → result round trip, one intent at a time, by an integration client;
- sustained acked intents/s with a bounded number in flight;
- state reports/s ingested (device-initiated changes, by the hub's own counter);
- hub (and broker) RSS and CPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from tortoise.transactions import in_transaction

from hexa.hub import topics
from hexa.hub.mqtt.bus import BrokerAddress, Bus
from hexa.hub.mqtt.busapi import Message
from hexa.hub.tools.sim import MODEL, Credentials, SimDevice, provision

KEY = "bench-provision-key-" + uuid.uuid4().hex
LISTEN_RE = re.compile(r"HTTP on http://[\d.]+:(\d+).*MQTT on [\d.]+:(\d+)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "n": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "n": len(ordered)}


class _Processes:
    """The hub (and Mosquitto) processes the bench started, stopped on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.work = Path(tempfile.mkdtemp(prefix="hexa-bench-"))

    def hub_env(self, database_url: str | None, **extra: str) -> dict[str, str]:
        """The settings of the bench's own hub: ephemeral ports, a data directory in the
        bench's work folder, a fresh JWT secret, ``extra`` on top; SQLite unless
        ``database_url`` names another database."""
        env = {
            "HEXA_DATA_DIR": str(self.work / "data"),
            "HEXA_HTTP_PORT": "0",
            "HEXA_MQTT_PORT": "0",
            "HEXA_DEVICE_PROVISION_KEY": KEY,
            "HEXA_JWT_SECRET": uuid.uuid4().hex * 2,
            "HEXA_LOG_LEVEL": "WARNING",
            **extra,
        }
        if database_url:
            env["HEXA_DATABASE_URL"] = database_url
        return env

    def start_mosquitto(self) -> int:
        binary = shutil.which("mosquitto")
        if binary is None:
            raise SystemExit("hexa bench: --broker mosquitto needs the mosquitto binary on PATH")
        port = _free_port()
        conf = self.work / "mosquitto.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "set_tcp_nodelay true\nmax_queued_messages 100000\nlog_type error\n"
        )
        proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.procs.append(proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return port
            time.sleep(0.05)
        raise SystemExit("hexa bench: mosquitto did not start")

    def start_hub(
        self, env: dict[str, str], profile: str | None = None
    ) -> tuple[subprocess.Popen[bytes], int, int]:
        log = (self.work / "hub.log").open("wb")
        python = [sys.executable]
        if profile:  # cProfile writes its stats when the hub exits (SIGTERM, at the end)
            python += ["-m", "cProfile", "-o", str(Path(profile).resolve())]
        proc = subprocess.Popen(
            [*python, "-m", "hexa.hub.cli", "serve"],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.work,
        )
        self.procs.append(proc)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            m = LISTEN_RE.search((self.work / "hub.log").read_text(errors="replace"))
            if m:
                return proc, int(m.group(1)), int(m.group(2))
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        raise SystemExit(f"hexa bench: hub did not start:\n{(self.work / 'hub.log').read_text()}")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(self.work, ignore_errors=True)


class _Usage:
    def __init__(self, pids: list[int]) -> None:
        self.procs = [psutil.Process(p) for p in pids]
        self.t0 = time.monotonic()
        self.cpu0 = [self._cpu(p) for p in self.procs]

    @staticmethod
    def _cpu(p: psutil.Process) -> float:
        t = p.cpu_times()
        return float(t.user + t.system)

    def sample(self) -> list[dict[str, float]]:
        elapsed = time.monotonic() - self.t0
        out = []
        for p, c0 in zip(self.procs, self.cpu0, strict=True):
            cpu = self._cpu(p) - c0
            out.append(
                {
                    "rss_mb": round(p.memory_info().rss / 2**20, 1),
                    "cpu_s": round(cpu, 2),
                    "cpu_pct": round(100 * cpu / elapsed, 1),
                }
            )
        return out


async def _samples(client: httpx.AsyncClient, name: str, **labels: str) -> list[Sample]:
    """The hub's samples named ``name`` (a counter's ``_total``, a histogram's ``_bucket``)
    whose labels include ``labels``, read from its ``/metrics``."""
    text = (await client.get("/metrics")).text
    return [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    ]


async def _metric(client: httpx.AsyncClient, name: str) -> float:
    return sum(sample.value for sample in await _samples(client, name))


async def _buckets(client: httpx.AsyncClient, name: str, **labels: str) -> dict[str, float]:
    """A histogram's cumulative bucket counts (``le`` → count) over the series whose labels
    include ``labels``."""
    counts: dict[str, float] = {}
    for sample in await _samples(client, name + "_bucket", **labels):
        le = sample.labels["le"]
        counts[le] = counts.get(le, 0.0) + sample.value
    return counts


def _within(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The share of the observations between two bucket snapshots at or under each bound
    (in ms)."""
    total = after.get("+Inf", 0.0) - before.get("+Inf", 0.0)
    if not total:
        return {}
    return {"n": int(total)} | {
        f"le_{float(le) * 1000:g}ms": round((after[le] - before.get(le, 0.0)) / total, 4)
        for le in after
        if le != "+Inf" and float(le) <= 0.1
    }


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    procs = _Processes()
    result: dict[str, Any] = {"devices": args.devices, "broker": args.broker}
    try:
        env = procs.hub_env(
            args.bench_database_url,
            HEXA_COMMAND_TIMEOUT_MS="5000",
            # one integration client offers all the intents: measure the hub, not the
            # per-client publish limit that protects it from a runaway integration
            HEXA_MQTT_INTEGRATION_PUBLISH_RATE="0",
        )
        pids = []
        mqtt_port = None
        if args.broker == "mosquitto":
            mqtt_port = procs.start_mosquitto()
            env["HEXA_BROKER_URL"] = f"mqtt://127.0.0.1:{mqtt_port}"
            pids.append(procs.procs[-1].pid)
        hub, http_port, hub_mqtt = procs.start_hub(env, args.profile)
        database_url = args.bench_database_url or f"sqlite://{procs.work / 'data' / 'hexa.db'}"
        mqtt_port = mqtt_port or hub_mqtt
        pids.insert(0, hub.pid)
        base = f"http://127.0.0.1:{http_port}"
        async with AsyncExitStack() as stack:
            http = await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=base, timeout=30, limits=httpx.Limits(max_connections=64)
                )
            )
            result.update(await _run(args, http, mqtt_port, pids, database_url))
    finally:
        procs.stop()
    return result


async def _seed(
    database_url: str, org_id: str, count: int, mqtt_port: int
) -> tuple[list[Credentials], dict[str, str]]:
    """``count`` claimed switches of ``org_id`` written straight into the hub's database
    (a bulk insert instead of a provision and a claim through the API each): their
    credentials and uid → id. What a claim does besides (its audit entry, the Home
    Assistant discovery configs) is left out; the hub loads these rows on first use."""
    from hexa.hub import catalog, db
    from hexa.hub.devices import new_device_uid
    from hexa.hub.security import new_token, token_hash, utcnow
    from hexa.models import Device, DeviceInput, RelayState

    spec = catalog.lookup(MODEL)
    assert spec is not None
    async with db.database(database_url):  # the models are usable once it is open
        creds: list[Credentials] = []
        devices: list[Device] = []
        uids: set[str] = set()
        now = utcnow()
        while len(devices) < count:
            uid = new_device_uid()
            if uid in uids:
                continue
            uids.add(uid)
            token = new_token("hxd_")
            creds.append(Credentials(uid, token, "", "127.0.0.1", mqtt_port, ""))
            devices.append(
                Device(
                    device_uid=uid,
                    model=spec.name,
                    device_class=spec.device_class,
                    name=uid,
                    serial=f"SEED{len(devices):06d}",
                    fw_version="1.0.0",
                    token_hash=token_hash(token),
                    relay_count=spec.relay_count,
                    input_count=spec.input_count,
                    org_id=uuid.UUID(org_id),
                    claimed_at=now,
                )
            )
        for i in range(0, count, 1000):
            chunk = devices[i : i + 1000]
            async with in_transaction():
                await Device.bulk_create(chunk)
                await RelayState.bulk_create(
                    [
                        RelayState(device_id=d.id, index=n)
                        for d in chunk
                        for n in range(d.relay_count)
                    ]
                )
                await DeviceInput.bulk_create(
                    [
                        DeviceInput(device_id=d.id, index=n, mode=spec.default_input_mode)
                        for d in chunk
                        for n in range(d.input_count)
                    ]
                )
    return creds, {d.device_uid: str(d.id) for d in devices}


async def _online(http: httpx.AsyncClient, auth: dict[str, str]) -> int:
    """How many devices the hub has marked online (in its database)."""
    r = await http.get("/api/v1/devices", params={"online": "true", "limit": 1}, headers=auth)
    return int(r.json()["total"])


async def _run(
    args: argparse.Namespace,
    http: httpx.AsyncClient,
    mqtt_port: int,
    pids: list[int],
    database_url: str,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    reg = await http.post(
        "/api/v1/auth/register",
        json={"email": f"bench-{uuid.uuid4().hex[:8]}@bench.local", "password": "bench-password-1"},
    )
    token = reg.json()["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    org = (await http.get("/api/v1/auth/me", headers=auth)).json()["memberships"][0]["org_id"]

    t = time.monotonic()
    if args.seed:
        creds, ids = await _seed(database_url, org, args.devices, mqtt_port)
        out["seed_s"] = round(time.monotonic() - t, 2)
    else:
        creds = await provision(http, KEY, args.devices)
        sem = asyncio.Semaphore(16)
        ids = {}

        async def claim(c: Credentials) -> None:
            async with sem:
                r = await http.post(
                    "/api/v1/devices/claim", json={"claim_code": c.claim_code}, headers=auth
                )
            ids[c.device_uid] = r.json()["id"]

        await asyncio.gather(*(claim(c) for c in creds))
        out["provision_and_claim_s"] = round(time.monotonic() - t, 2)

    devices = [
        SimDevice(c, report_every=3600, mqtt_host="127.0.0.1", mqtt_port=mqtt_port) for c in creds
    ]
    async with anyio.create_task_group() as tg:
        # The connect storm: every device connects (CONNACK, its SUBSCRIBE, its retained
        # "online"); done when the hub has marked all of them online in its database.
        me = psutil.Process()
        loadgen_cpu0 = _Usage._cpu(me)
        connecting = _Usage(pids)
        t = time.monotonic()
        connect_sem = asyncio.Semaphore(args.connect_concurrency)

        async def start(d: SimDevice) -> None:
            async with connect_sem:
                tg.start_soon(d.run)
                await d.connected.wait()

        await asyncio.gather(*(start(d) for d in devices))
        connected_s = time.monotonic() - t
        while await _online(http, auth) < len(devices):  # noqa: ASYNC110 - the measurement
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - t
        hub_connect = connecting.sample()[0]
        out["connect_all_s"] = round(elapsed, 2)
        out["connect"] = {
            "devices": len(devices),
            "concurrency": args.connect_concurrency,
            "connected_s": round(connected_s, 2),
            "all_online_s": round(elapsed, 2),
            "per_s": round(len(devices) / elapsed, 1),
            "hub_cpu_s": hub_connect["cpu_s"],
            "hub_cpu_ms_per_connect": round(1000 * hub_connect["cpu_s"] / len(devices), 3),
            "hub_rss_mb": hub_connect["rss_mb"],
            "loadgen_cpu_s": round(_Usage._cpu(me) - loadgen_cpu0, 2),
        }
        if args.connect_only:
            out["hub"] = connecting.sample()[0]
            tg.cancel_scope.cancel()
            return out
        # The load generator's own full collections (1000 devices: ~100 ms) would show up
        # as hub latency: freeze what is built and leave full collections until the end.
        gc.collect()
        gc.freeze()
        thresholds = gc.get_threshold()
        gc.set_threshold(thresholds[0], thresholds[1], 1_000_000_000)
        usage = _Usage(pids)
        out["idle_rss_mb"] = [u["rss_mb"] for u in usage.sample()]

        # 1. REST command round trip at a fixed rate
        latencies, failures = [], 0

        async def command(i: int) -> httpx.Response:
            d = random.choice(devices)
            return await http.post(
                f"/api/v1/devices/{ids[d.uid]}/relays/{i % 3}",
                json={"state": bool(i % 2)},
                headers=auth,
            )

        # untimed first: the first command after start builds what the hub builds once
        # (the API's route state, the claimed-device table: ~90 ms with 10 000 devices)
        for i in range(args.warmup):
            await command(i)
        route = {"method": "POST", "route": "/api/v1/devices/{device_id}/relays/{relay_index}"}
        served_before = await _buckets(http, "hexa_http_request_seconds", **route)
        interval = 1 / args.rate
        start_at = time.monotonic()
        for i in range(args.commands):
            await asyncio.sleep(max(0.0, start_at + i * interval - time.monotonic()))
            t0 = time.perf_counter()
            r = await command(i)
            if r.status_code == 200:
                latencies.append((time.perf_counter() - t0) * 1000)
            else:
                failures += 1
        out["rest_rtt_ms"] = {**_pct(latencies), "failed": failures, "rate_per_s": args.rate}
        # the same requests as the hub timed them (its histogram): a tail seen by the client
        # only is the load generator's (it also runs every simulated device)
        served = await _buckets(http, "hexa_http_request_seconds", **route)
        out["rest_hub_side_share"] = _within(served_before, served)

        # 2. MQTT intent → result round trip, one at a time, as an integration
        it = (
            await http.post(
                "/api/v1/integrations/tokens",
                json={"name": f"bench-{uuid.uuid4().hex[:6]}", "org_id": org},
                headers=auth,
            )
        ).json()
        waiting: dict[str, asyncio.Future[topics.Result]] = {}

        async def on_result(msg: Message) -> None:
            try:
                res = topics.decode_result(msg.payload)
            except topics.PayloadError:
                return
            fut = waiting.pop(res.intent_id, None)
            if fut is not None and not fut.done():
                fut.set_result(res)

        integration = Bus(
            BrokerAddress("127.0.0.1", mqtt_port, it["name"], it["token"]),
            client_id=f"bench-{uuid.uuid4().hex[:6]}",
            presence_topic="homeassistant/status",
            announce=False,  # not Home Assistant: no discovery republish mid-measurement
        )
        await integration.subscribe(topics.RESULT.filter(), on_result)
        await tg.start(integration.run)

        async def intent(d: SimDevice, index: int, state: str) -> topics.Result:
            iid = uuid.uuid4().hex
            fut: asyncio.Future[topics.Result] = asyncio.get_running_loop().create_future()
            waiting[iid] = fut
            body = json.dumps({"state": state, "intent_id": iid, "source": "mqtt"})
            await integration.publish(topics.RELAY_SET.format(uid=d.uid, index=index), body)
            return await asyncio.wait_for(fut, 15)

        rtts = []
        for i in range(args.intent_rtt_samples):
            d = random.choice(devices)
            t0 = time.perf_counter()
            res = await intent(d, i % 3, "TOGGLE")
            if res.status == "applied":
                rtts.append((time.perf_counter() - t0) * 1000)
        out["mqtt_intent_rtt_ms"] = _pct(rtts)

        # 3. sustained acked intents/s, bounded in flight
        window = asyncio.Semaphore(args.window)
        applied = other = 0

        async def one(i: int) -> None:
            nonlocal applied, other
            async with window:
                try:
                    res = await intent(devices[i % len(devices)], i % 3, "TOGGLE")
                except TimeoutError:
                    other += 1
                    return
            if res.status == "applied":
                applied += 1
            else:
                other += 1

        before = usage.sample()
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(args.intents)))
        elapsed = time.perf_counter() - t0
        after = usage.sample()
        out["acked_intents_per_s"] = round(applied / elapsed, 1)
        out["intents"] = {
            "applied": applied,
            "not_applied": other,
            "window": args.window,
            "seconds": round(elapsed, 2),
            "cpu_s": [
                round(a["cpu_s"] - b["cpu_s"], 2) for a, b in zip(after, before, strict=True)
            ],
        }

        # 4. state reports ingested: local changes from many devices at an offered rate
        before_reports = await _metric(http, "hexa_state_reports_total")
        before_drops = await _metric(http, "hexa_device_flood_drops_total")
        reporters = devices[: args.reporters]
        every = len(reporters) / args.report_rate
        stop_at = time.monotonic() + args.report_seconds
        sent = 0

        async def reporter(d: SimDevice) -> None:
            nonlocal sent
            next_at = time.monotonic() + random.uniform(0, every)
            while next_at < stop_at:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                await d.local_switch(random.randrange(3), random.random() < 0.5)
                sent += 1
                next_at += every

        t0 = time.perf_counter()
        await asyncio.gather(*(reporter(d) for d in reporters))
        offered_s = time.perf_counter() - t0
        # let the hub drain what the broker accepted
        last, stable = -1.0, 0
        while stable < 3:
            await asyncio.sleep(0.5)
            now = await _metric(http, "hexa_state_reports_total")
            stable = stable + 1 if now == last else 0
            last = now
        ingest_s = time.perf_counter() - t0 - 1.5
        ingested = last - before_reports
        out["state_reports"] = {
            "offered_per_s": round(sent / max(offered_s, 0.001), 1),
            "sent": sent,
            "ingested": int(ingested),
            "per_s": round(ingested / max(ingest_s, 0.001), 1),
            "flood_dropped": int(
                await _metric(http, "hexa_device_flood_drops_total") - before_drops
            ),
            "reporters": len(reporters),
        }
        gc.set_threshold(*thresholds)
        gc.unfreeze()
        final = usage.sample()
        out["hub"] = final[0]
        out["loadgen_cpu_s"] = round(me.cpu_times().user + me.cpu_times().system, 1)
        if len(final) > 1:
            out["broker_process"] = final[1]
        tg.cancel_scope.cancel()
    return out


def _loop_factory() -> Any:
    """The load generator on uvloop when installed: more load per core of the machine."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_bench(args: argparse.Namespace) -> int:
    if args.schedules:
        result = asyncio.run(_bench_schedules(args.schedules, args.bench_database_url))
    elif getattr(args, "ota", False):
        from hexa.hub.tools.bench_ota import run_ota_bench

        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            result = runner.run(run_ota_bench(args))
    else:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            result = runner.run(_bench(args))
    print(json.dumps(result))
    return 0


class _AppliedCommands:
    """Stands in for the bus in the scheduler benchmark: every intent is applied at once."""

    async def submit(self, uid: str, action: Any, origin: Any) -> topics.Result:
        return topics.Result(intent_id=uuid.uuid4().hex, ok=True, status="applied")


async def _bench_schedules(count: int, database_url: str | None) -> dict[str, Any]:
    """How long one scheduler tick takes for ``count`` due schedules (database-bound)."""
    from datetime import timedelta

    from hexa.hub import db
    from hexa.hub.audit import AuditLog
    from hexa.hub.schedules import Scheduler
    from hexa.hub.security import utcnow
    from hexa.models import Device, Organization, Schedule

    work = Path(tempfile.mkdtemp(prefix="hexa-bench-sched-"))
    url = database_url or f"sqlite://{work / 'bench.db'}"
    try:
        await db.migrate_up(url)
        async with db.database(url):
            org = await Organization.create(name="bench")
            device = await Device.create(
                device_uid=f"hx-{uuid.uuid4().hex[:8]}",
                model="hexa-mini-switch-v1",
                device_class="relay_controller",
                token_hash="x" * 64,
                relay_count=3,
                input_count=3,
                org=org,
            )
            due = utcnow() - timedelta(seconds=1)
            t0 = time.perf_counter()
            await Schedule.bulk_create(
                [
                    Schedule(
                        org=org,
                        device=device,
                        name=f"s{i}",
                        cron="0 12 1 1 *",
                        timezone="Europe/Berlin",
                        next_execution=due,
                        action={"type": "set_relay", "relay_index": i % 3, "state": True},
                    )
                    for i in range(count)
                ],
                batch_size=1000,
            )
            created = time.perf_counter() - t0
            audit = AuditLog()
            scheduler = Scheduler(_AppliedCommands(), audit, tick_s=10)  # type: ignore[arg-type]
            t0 = time.perf_counter()
            fired = await scheduler.tick()
            tick = time.perf_counter() - t0
            t0 = time.perf_counter()
            await audit.flush()
            flushed = time.perf_counter() - t0
            runs = await Schedule.filter(execution_count=1).count()
            idle_t0 = time.perf_counter()
            await scheduler.tick()
            idle = time.perf_counter() - idle_t0
        return {
            "schedules": count,
            "database": url.split(":", 1)[0],
            "fired": fired,
            "recorded_runs": runs,
            "insert_s": round(created, 2),
            "tick_s": round(tick, 2),
            "per_schedule_ms": round(1000 * tick / max(fired, 1), 3),
            "audit_flush_s": round(flushed, 2),
            "idle_tick_ms": round(idle * 1000, 2),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
