"""Broker benchmark: the embedded broker side by side with Mosquitto (run `scripts/bench-broker`).

Each test starts a fresh broker on a free 127.0.0.1 port, measures it from this machine
and stops it by process id; the order of the brokers alternates between repetitions and
the table shows the medians. Tests (``--tests``, default all):

rtt       QoS 1 request/reply round trip, one at a time: client A publishes on bench/req, a
          responder subscribed to bench/req republishes on bench/rep, client B (subscribed
          to bench/rep) receives it; p50/p95/p99 in ms over 2000 round trips (100 warm-up).
fanin_q1  100 publisher connections publish to bench/<i>/state (QoS 1, at most 10 unacked
fanin_q0  each) at an offered total rate; one subscriber on bench/+/state, in its own process,
          counts. The rate doubles from 1000/s until a step saturates; "sustained" is the best
          delivered rate of a step that did not, "peak" the best delivered rate of any step.
fanout    1000 subscribers (one process) each on its own topic bench/f/<i>, one publisher
          round-robin over the topics (QoS 0); the same ladder; deliveries/s.
conncap   idle connections (keepalive 60) opened up to 1000, 5000, 10000: connect time and
          rate, broker RSS per connection, and the broker's RSS after all of them left.
flood     the fan-in QoS 0 set-up publishing as fast as the sockets take for 5 s (overload):
          delivered/s during the flood and until the backlog drained (at most 20 s more),
          the broker's RSS at the end of the flood; the JSON also has the share delivered.

A ladder step is saturated when fewer than 90 % of the offered messages are delivered
within the step, the publishers could not send 90 % of them, the backlog takes more than
1 s to drain after the step, or more than 0.1 % of the messages never arrive. Each step
records the CPU% of the broker, the publishers and the subscriber process: on 2 cores the
load generator competes with a C broker, so read a Mosquitto figure as "at least".

The load client is a minimal MQTT 3.1.1 client over asyncio protocols (pre-encoded
packets, plain counters, TCP_NODELAY), so that it is not the bottleneck. Every loop is
bounded in count and time; every process started is stopped by its id on exit, Ctrl-C
included. The embedded broker runs under tests/support/open_broker.py (anybody may
connect and use any topic: test code only); Mosquitto (when installed) gets a minimal
configuration of its own in a temporary directory, never the system's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
OPEN_BROKER = ROOT / "tests" / "support" / "open_broker.py"

# ----------------------------------------------------------------------------- packets

PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(raw)) + raw


def connect_packet(
    client_id: str, keepalive: int = 60, username: str | None = None, password: str | None = None
) -> bytes:
    """CONNECT, MQTT 3.1.1, clean session."""
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = _field("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + _field(client_id)
    if username is not None:
        body += _field(username)
    if password is not None:
        body += _field(password)
    return b"\x10" + _varint(len(body)) + body


def subscribe_packet(packet_id: int, filters: list[tuple[str, int]]) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(_field(t) + bytes([q]) for t, q in filters)
    return b"\x82" + _varint(len(body)) + body


def publish_packet(topic: str | bytes, payload: bytes, qos: int = 0, packet_id: int = 0) -> bytes:
    body = _field(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return bytes([0x30 | qos << 1]) + _varint(len(body)) + body


class Publish1:
    """A pre-encoded QoS 1 PUBLISH whose packet id is patched in place."""

    __slots__ = ("_at", "_buf")

    def __init__(self, topic: str, payload: bytes) -> None:
        packet = publish_packet(topic, payload, 1, 1)
        self._buf = bytearray(packet)
        self._at = len(packet) - len(payload) - 2

    def packet(self, packet_id: int) -> bytes:
        struct.pack_into("!H", self._buf, self._at, packet_id)
        return bytes(self._buf)


# ----------------------------------------------------------------------------- client

OnPublish = Callable[["Client", bytes, bytes], None]


class Client(asyncio.Protocol):
    """One MQTT connection: counters and a few futures, no task or callback per packet
    unless ``on_publish`` is given. Received QoS 1 PUBLISHes are acknowledged at once."""

    def __init__(self, on_publish: OnPublish | None = None, count_topics: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.on_publish = on_publish
        self.by_topic: dict[bytes, int] | None = {} if count_topics else None
        self.received = 0  # PUBLISH packets received
        self.acked = 0  # PUBACKs received
        self.pongs = 0
        self.inflight: set[int] = set()  # our QoS 1 packet ids not yet acknowledged
        self.paused = False
        self._subacks: dict[int, asyncio.Future[bytes]] = {}
        self._buf = bytearray()
        self._pid = 0

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=256 * 1024, low=64 * 1024)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connack.done():
            self.connack.set_exception(ConnectionError(f"closed before CONNACK: {exc}"))
        if not self.lost.done():
            self.lost.set_result(None)
        for fut in self._subacks.values():
            if not fut.done():
                fut.set_exception(ConnectionError("closed before SUBACK"))
        self.paused = False

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        n = len(buf)
        i = 0
        acks: list[bytes] = []
        while n - i >= 2:
            head = buf[i]
            j = i + 1
            length = 0
            shift = 0
            while j < n:
                digit = buf[j]
                j += 1
                length |= (digit & 0x7F) << shift
                if not digit & 0x80:
                    break
                shift += 7
            else:
                break  # remaining length incomplete
            end = j + length
            if end > n:
                break
            kind = head >> 4
            if kind == 3:  # PUBLISH
                self.received += 1
                qos = (head >> 1) & 3
                if qos or self.on_publish is not None or self.by_topic is not None:
                    at = j + 2 + ((buf[j] << 8) | buf[j + 1])
                    if qos:
                        acks.append(b"\x40\x02" + buf[at : at + 2])
                    if self.by_topic is not None:
                        topic = bytes(buf[j + 2 : at])
                        self.by_topic[topic] = self.by_topic.get(topic, 0) + 1
                    if self.on_publish is not None:
                        body = at + 2 if qos else at
                        self.on_publish(self, bytes(buf[j + 2 : at]), bytes(buf[body:end]))
            elif kind == 4:  # PUBACK
                self.acked += 1
                self.inflight.discard((buf[j] << 8) | buf[j + 1])
            elif kind == 2:  # CONNACK
                if not self.connack.done():
                    if buf[j + 1] == 0:
                        self.connack.set_result(None)
                    else:
                        self.connack.set_exception(ConnectionError(f"CONNACK {buf[j + 1]}"))
            elif kind == 9:  # SUBACK
                fut = self._subacks.pop((buf[j] << 8) | buf[j + 1], None)
                if fut is not None and not fut.done():
                    fut.set_result(bytes(buf[j + 2 : end]))
            elif kind == 13:  # PINGRESP
                self.pongs += 1
            i = end
        if i:
            del buf[:i]
        if acks:
            self.write(b"".join(acks))

    # helpers
    def next_pid(self) -> int:
        pid = self._pid % 65535 + 1
        while pid in self.inflight:
            pid = pid % 65535 + 1
        self._pid = pid
        return pid

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def subscribe(self, filters: list[tuple[str, int]], timeout_s: float = 30.0) -> None:
        pid = self.next_pid()
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._subacks[pid] = fut
        self.write(subscribe_packet(pid, filters))
        try:
            granted = await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            raise TimeoutError(f"no SUBACK in {timeout_s} s") from None
        if 0x80 in granted:
            raise ConnectionError(f"SUBSCRIBE {filters[:3]} refused")

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(DISCONNECT)
            self.transport.close()


async def connect(
    host: str,
    port: int,
    client_id: str,
    *,
    username: str | None = None,
    password: str | None = None,
    keepalive: int = 60,
    timeout_s: float = 30.0,
    on_publish: OnPublish | None = None,
    count_topics: bool = False,
) -> Client:
    loop = asyncio.get_running_loop()

    async def attempt() -> Client:
        _, client = await loop.create_connection(
            lambda: Client(on_publish, count_topics), host, port
        )
        client.write(connect_packet(client_id, keepalive, username, password))
        try:
            await client.connack
        except BaseException:
            client.close()
            raise
        return client

    try:
        return await asyncio.wait_for(attempt(), timeout_s)
    except TimeoutError:
        raise TimeoutError(f"no CONNACK from {host}:{port} in {timeout_s} s") from None


async def connect_many(
    host: str,
    port: int,
    prefix: str,
    count: int,
    *,
    concurrency: int = 100,
    filters: Callable[[int], list[tuple[str, int]]] | None = None,
    deadline_s: float = 120.0,
) -> tuple[list[Client], list[str]]:
    """``count`` connections (subscribed to ``filters(i)`` when given), at most
    ``concurrency`` handshakes at a time; returns the clients and the errors."""
    gate = asyncio.Semaphore(concurrency)
    clients: list[Client] = []
    errors: list[str] = []

    async def one(i: int) -> None:
        async with gate:
            try:
                client = await connect(host, port, f"{prefix}-{i:05d}")
                clients.append(client)
                if filters is not None:
                    await client.subscribe(filters(i))
            except (OSError, TimeoutError, ConnectionError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:120])

    tasks = [asyncio.create_task(one(i)) for i in range(count)]
    _, pending = await asyncio.wait(tasks, timeout=deadline_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    errors += ["timed out"] * len(pending)
    return clients, errors


async def _close_all(clients: list[Client]) -> None:
    for client in clients:
        client.close()
    await asyncio.sleep(0.1)


# ----------------------------------------------------------------------------- sampling


def raise_open_files() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        return round(float(psutil.Process(pid).memory_info().rss) / 2**20, 1)
    except psutil.Error:
        return None


class CpuMeter:
    """CPU% of some processes between construction and :meth:`read`."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.t0 = time.monotonic()
        self.procs: dict[str, tuple[psutil.Process, float]] = {}
        for name, pid in pids.items():
            if pid is None:
                continue
            with suppress(psutil.Error):
                proc = psutil.Process(pid)
                self.procs[name] = (proc, self._cpu(proc))

    @staticmethod
    def _cpu(proc: psutil.Process) -> float:
        times = proc.cpu_times()
        return float(times.user + times.system)

    def read(self) -> dict[str, float | None]:
        wall = max(time.monotonic() - self.t0, 1e-6)
        out: dict[str, float | None] = {}
        for name, (proc, cpu0) in self.procs.items():
            try:
                out[f"{name}_cpu_pct"] = round(100 * (self._cpu(proc) - cpu0) / wall, 1)
            except psutil.Error:
                out[f"{name}_cpu_pct"] = None
        return out


def _percentile(ordered: list[float], q: float) -> float:
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# ----------------------------------------------------------------------------- rtt


def rtt(
    host: str,
    port: int,
    count: int = 2000,
    *,
    warmup: int = 100,
    timeout_s: float = 5.0,
    max_seconds: float = 60.0,
    broker_pid: int | None = None,
) -> dict[str, Any]:
    """QoS 1 request/reply round trip, one request at a time; p50/p95/p99 in ms."""
    tag = uuid.uuid4().hex[:6]
    waiting: list[tuple[bytes, asyncio.Future[None]]] = []

    def respond(client: Client, topic: bytes, payload: bytes) -> None:
        client.write(publish_packet(b"bench/rep", payload, 1, client.next_pid()))

    def receive(client: Client, topic: bytes, payload: bytes) -> None:
        if waiting and waiting[0][0] == payload and not waiting[0][1].done():
            waiting[0][1].set_result(None)

    async def run() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        responder = await connect(host, port, f"rtt-responder-{tag}", on_publish=respond)
        receiver = await connect(host, port, f"rtt-b-{tag}", on_publish=receive)
        sender = await connect(host, port, f"rtt-a-{tag}")
        samples: list[float] = []
        timeouts = 0
        try:
            await responder.subscribe([("bench/req", 1)])
            await receiver.subscribe([("bench/rep", 1)])
            cpu = CpuMeter({"broker": broker_pid, "client": os.getpid()})
            started = time.monotonic()
            for i in range(warmup + count):
                if time.monotonic() - started > max_seconds:
                    break
                payload = b"%010d" % i + b"x" * 54
                fut: asyncio.Future[None] = loop.create_future()
                waiting[:] = [(payload, fut)]
                t0 = time.perf_counter()
                sender.write(publish_packet(b"bench/req", payload, 1, sender.next_pid()))
                try:
                    await asyncio.wait_for(fut, timeout_s)
                except TimeoutError:
                    timeouts += 1
                    continue
                if i >= warmup:
                    samples.append(time.perf_counter() - t0)
            wall = time.monotonic() - started
            usage = cpu.read()
        finally:
            await _close_all([responder, receiver, sender])
        ordered = sorted(samples)
        out: dict[str, Any] = {"round_trips": len(ordered), "timeouts": timeouts}
        if ordered:
            for q in (50, 95, 99):
                out[f"p{q}_ms"] = round(_percentile(ordered, q / 100) * 1000, 3)
            out["max_ms"] = round(ordered[-1] * 1000, 3)
            out["round_trips_per_s"] = round(len(ordered) / wall, 1)
        return out | usage

    return asyncio.run(run())


# ----------------------------------------------------------------------------- sink process


def _sink_main(
    host: str, port: int, filters: list[str], qos: int, shared: Any, ready: Any, stop: Any
) -> None:
    raise_open_files()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    asyncio.run(_sink(host, port, filters, qos, shared, ready, stop))


async def _sink(
    host: str, port: int, filters: list[str], qos: int, shared: Any, ready: Any, stop: Any
) -> None:
    """Subscribe, then publish [received, failed, lost connections] in ``shared`` every
    10 ms until told to stop, the parent is gone, or an hour passed."""
    parent = os.getppid()
    tag = uuid.uuid4().hex[:6]
    clients, errors = await connect_many(
        host, port, f"sink-{tag}", len(filters), filters=lambda i: [(filters[i], qos)]
    )
    shared[1] = len(errors)
    ready.set()
    give_up = time.monotonic() + 3600
    while not stop.is_set() and os.getppid() == parent and time.monotonic() < give_up:
        await asyncio.sleep(0.01)
        shared[0] = sum(c.received for c in clients)
        shared[2] = sum(c.lost.done() for c in clients)
    await _close_all(clients)


class Sink:
    """Subscribers in a process of their own, counting what they receive."""

    def __init__(self, host: str, port: int, filters: list[str], qos: int) -> None:
        ctx = mp.get_context("spawn")
        self._shared = ctx.RawArray("q", 3)
        self._ready = ctx.Event()
        self._stop = ctx.Event()
        self.proc = ctx.Process(
            target=_sink_main,
            args=(host, port, filters, qos, self._shared, self._ready, self._stop),
            daemon=True,
        )
        self.proc.start()
        try:
            deadline = time.monotonic() + 180
            while not self._ready.wait(0.2):
                if not self.proc.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError("the subscriber process did not get ready")
            if self._shared[1]:
                raise RuntimeError(f"{self._shared[1]} of {len(filters)} subscribers failed")
        except BaseException:
            self.close()
            raise

    @property
    def count(self) -> int:
        """Messages received so far (at most 10 ms old)."""
        return int(self._shared[0])

    @property
    def lost(self) -> int:
        """Subscriber connections closed by the broker."""
        return int(self._shared[2])

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def close(self) -> None:
        self._stop.set()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


@contextmanager
def sink_process(host: str, port: int, filters: list[str], qos: int) -> Iterator[Sink]:
    sink = Sink(host, port, filters, qos)
    try:
        yield sink
    finally:
        sink.close()


# ----------------------------------------------------------------------------- ladders

PAYLOAD = b'{"on":true,"power":12.5,"temp":21.5,"rssi":-61,"ts":1700000000.123}'


class _Publisher:
    """One publishing connection cycling over its pre-encoded packets."""

    __slots__ = ("client", "next", "qos0", "qos1", "sent")

    def __init__(self, client: Client, topics: list[str], qos: int) -> None:
        self.client = client
        self.qos0 = [] if qos else [publish_packet(t, PAYLOAD) for t in topics]
        self.qos1 = [Publish1(t, PAYLOAD) for t in topics] if qos else []
        self.next = 0
        self.sent = 0

    def send(self, n: int) -> None:
        client = self.client
        k = self.next
        if self.qos1:
            templates = self.qos1
            chunks = []
            for _ in range(n):
                pid = client.next_pid()
                client.inflight.add(pid)
                chunks.append(templates[k].packet(pid))
                k = (k + 1) % len(templates)
            client.write(b"".join(chunks))
        elif len(self.qos0) == 1:
            client.write(self.qos0[0] * n)
        else:
            packets = self.qos0
            client.write(b"".join(packets[(k + m) % len(packets)] for m in range(n)))
            k = (k + n) % len(packets)
        self.next = k
        self.sent += n


async def _pace(
    pubs: list[_Publisher], rate: float | None, seconds: float, window: int
) -> tuple[int, float, float]:
    """Publish for ``seconds`` at ``rate`` messages/s in total (None: as fast as the
    sockets and the QoS 1 window allow); returns (sent, start, end)."""
    per_pub = rate / len(pubs) if rate else None
    for pub in pubs:
        pub.sent = 0
    total = 0
    t0 = time.monotonic()
    while (now := time.monotonic()) - t0 < seconds:
        for pub in pubs:
            client = pub.client
            if client.paused or client.lost.done():
                continue
            n = 64 if per_pub is None else min(int(per_pub * (now - t0)) + 1 - pub.sent, 1024)
            if pub.qos1:
                n = min(n, window - len(client.inflight))
            if n > 0:
                pub.send(n)
                total += n
        await asyncio.sleep(0.002)
    return total, t0, time.monotonic()


async def _drain(sink: Sink, target: int, since: float, limit: float) -> tuple[int, float]:
    """Wait until the sink has counted ``target`` messages, or its count stood still for
    0.5 s, or ``limit`` s passed; returns the count and when it last grew."""
    started = time.monotonic()
    last, last_t = sink.count, since
    while last < target and time.monotonic() - started < limit:
        await asyncio.sleep(0.01)
        now = time.monotonic()
        n = sink.count
        if n != last:
            last, last_t = n, now
        elif now - max(last_t, started) >= 0.5:
            break
    return last, last_t


async def _ladder(
    pubs: list[_Publisher],
    sink: Sink,
    rates: list[float],
    step_s: float,
    window: int,
    pids: dict[str, int | None],
    refine: bool,
    label: str,
) -> list[dict[str, Any]]:
    """Offered-load ladder: stop at the first saturated step (after one refinement step
    at rate/√2 when the step before it, at rate/2, was not saturated)."""
    steps: list[dict[str, Any]] = []
    queue = list(rates)
    refined = False
    while queue:
        rate = queue.pop(0)
        base = sink.count
        cpu = CpuMeter(pids)
        sent, t0, t1 = await _pace(pubs, rate, step_s, window)
        in_window = sink.count - base
        usage = cpu.read()
        rss = rss_mb(pids.get("broker"))
        count, last_t = await _drain(sink, base + sent, t1, limit=10.0)
        delivered = count - base
        span = t1 - t0
        offered = rate * span
        drain_s = round(max(0.0, last_t - t1), 2)
        lost_pct = round(100 * (sent - delivered) / sent, 3) if sent else 0.0
        step: dict[str, Any] = {
            "offered_per_s": rate,
            "sent_per_s": round(sent / span, 1),
            "delivered_per_s": round(in_window / span, 1),
            "drain_s": drain_s,
            "lost_pct": lost_pct,
            "broker_rss_mb": rss,
            **usage,
        }
        step["saturated"] = (
            in_window < 0.9 * offered or sent < 0.9 * offered or drain_s > 1.0 or lost_pct > 0.1
        )
        steps.append(step)
        _say(
            f"    {label} offered {rate:.0f}/s: delivered {step['delivered_per_s']:.0f}/s,"
            f" drain {drain_s} s, lost {lost_pct} %, broker CPU {usage.get('broker_cpu_pct')} %"
            + (" SATURATED" if step["saturated"] else "")
        )
        step["publishers_lost"] = sum(pub.client.lost.done() for pub in pubs)
        step["subscribers_lost"] = sink.lost
        if step["publishers_lost"] or step["subscribers_lost"]:
            _say(
                f"    connections lost: {step['publishers_lost']} publishers,"
                f" {step['subscribers_lost']} subscribers"
            )
            break
        if step["saturated"]:
            ok = [s for s in steps if not s["saturated"]]
            settled = time.monotonic() - t1 < 10.0  # its backlog is gone (or lost)
            if refine and settled and not refined and ok and ok[-1]["offered_per_s"] == rate / 2:
                refined = True
                queue = [round(rate / math.sqrt(2))]
                continue
            break
    return steps


def _summary(steps: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [s["delivered_per_s"] for s in steps if not s["saturated"]]
    return {
        "sustained_per_s": max(ok, default=0.0),
        "peak_per_s": max((s["delivered_per_s"] for s in steps), default=0.0),
        "steps": steps,
    }


async def _publishers(
    host: str, port: int, topics: list[list[str]], qos: int
) -> tuple[list[_Publisher], list[Client]]:
    clients, errors = await connect_many(host, port, f"pub-{uuid.uuid4().hex[:6]}", len(topics))
    if errors:
        await _close_all(clients)
        raise RuntimeError(f"{len(errors)} publishers failed to connect: {errors[:3]}")
    return [_Publisher(c, t, qos) for c, t in zip(clients, topics, strict=True)], clients


Body = Callable[[list[_Publisher], Sink, dict[str, int | None]], Awaitable[dict[str, Any]]]


def _with_load(
    host: str,
    port: int,
    filters: list[str],
    topics: list[list[str]],
    qos: int,
    broker_pid: int | None,
    body: Body,
) -> dict[str, Any]:
    """Subscribers on ``filters`` in a process of their own, one publisher connection per
    entry of ``topics`` in this one, then ``body``."""
    with sink_process(host, port, filters, qos) as sink:

        async def run() -> dict[str, Any]:
            pubs, clients = await _publishers(host, port, topics, qos)
            pids = {"broker": broker_pid, "publishers": os.getpid(), "subscribers": sink.pid}
            try:
                return await body(pubs, sink, pids)
            finally:
                await _close_all(clients)

        return asyncio.run(run())


# ----------------------------------------------------------------------------- fan-in, fan-out


def fanin(
    host: str,
    port: int,
    devices: int = 100,
    qos: int = 1,
    step_s: float = 3.0,
    *,
    flood: bool = False,
    start_rate: float = 1000.0,
    max_steps: int = 10,
    refine: bool = True,
    window: int = 10,
    drain_limit_s: float = 20.0,
    broker_pid: int | None = None,
) -> dict[str, Any]:
    """``devices`` publishers on bench/<i>/state, one subscriber on bench/+/state: the
    offered-load ladder, or with ``flood`` ``step_s`` seconds as fast as possible."""
    rates = [start_rate * 2**k for k in range(max_steps)]

    async def body(
        pubs: list[_Publisher], sink: Sink, pids: dict[str, int | None]
    ) -> dict[str, Any]:
        if flood:
            return await _flood(pubs, sink, step_s, window, pids, drain_limit_s)
        label = f"fan-in QoS {qos}"
        return _summary(await _ladder(pubs, sink, rates, step_s, window, pids, refine, label))

    topics = [[f"bench/{i}/state"] for i in range(devices)]
    return _with_load(host, port, ["bench/+/state"], topics, qos, broker_pid, body)


async def _flood(
    pubs: list[_Publisher],
    sink: Sink,
    seconds: float,
    window: int,
    pids: dict[str, int | None],
    drain_limit_s: float,
) -> dict[str, Any]:
    """Publish as fast as the sockets take for ``seconds``. "sent" counts what the
    kernel accepted, so most of it may still sit in socket buffers when the flood ends;
    the backlog is then waited for at most ``drain_limit_s``."""
    base = sink.count
    cpu = CpuMeter(pids)
    sent, t0, t1 = await _pace(pubs, None, seconds, window)
    in_window = sink.count - base
    usage = cpu.read()
    rss = rss_mb(pids.get("broker"))
    count, last_t = await _drain(sink, base + sent, t1, limit=drain_limit_s)
    span = t1 - t0
    out = {
        "sent_per_s": round(sent / span, 1),
        "delivered_per_s": round(in_window / span, 1),
        "delivered_per_s_with_drain": round((count - base) / max(span, last_t - t0), 1),
        "delivered_pct": round(100 * (count - base) / sent, 2) if sent else None,
        "drain_s": round(max(0.0, last_t - t1), 2),
        "drained": count - base >= sent,
        "broker_rss_mb": rss,
        "broker_rss_mb_after_drain": rss_mb(pids.get("broker")),
        "publishers_lost": sum(pub.client.lost.done() for pub in pubs),
        "subscribers_lost": sink.lost,
        **usage,
    }
    _say(f"    flood: {out}")
    return out


def _rtt_main(host: str, port: int, seconds: float, result: Any) -> None:
    result.put(rtt(host, port, 1_000_000, warmup=50, max_seconds=seconds))


def fairness(
    host: str,
    port: int,
    flooders: int = 100,
    seconds: float = 5.0,
    *,
    broker_pid: int | None = None,
) -> dict[str, Any]:
    """A QoS 1 request/reply round trip (three other clients, ``rtt``) measured while
    ``flooders`` connections publish QoS 0 as fast as their sockets take: what one client's
    flood does to everyone else's latency. The prober runs in a process of its own."""
    ctx = mp.get_context("spawn")
    result: Any = ctx.Queue()
    prober = ctx.Process(target=_rtt_main, args=(host, port, seconds, result), daemon=True)

    async def body(
        pubs: list[_Publisher], sink: Sink, pids: dict[str, int | None]
    ) -> dict[str, Any]:
        prober.start()
        await asyncio.sleep(0.5)  # the prober connects and warms up before the flood
        flood = await _flood(pubs, sink, seconds, 10, pids, 10.0)
        probe = await asyncio.get_running_loop().run_in_executor(None, result.get, True, 60)
        return {
            "others_p50_ms": probe.get("p50_ms"),
            "others_p99_ms": probe.get("p99_ms"),
            "others_max_ms": probe.get("max_ms"),
            "others_round_trips": probe.get("round_trips"),
            "others_timeouts": probe.get("timeouts"),
            "flood_delivered_per_s": flood["delivered_per_s"],
        }

    topics = [[f"bench/{i}/state"] for i in range(flooders)]
    try:
        return _with_load(host, port, ["bench/+/state"], topics, 0, broker_pid, body)
    finally:
        prober.join(10)
        if prober.is_alive():
            prober.kill()


def fanout(
    host: str,
    port: int,
    subscribers: int = 1000,
    *,
    qos: int = 0,
    step_s: float = 3.0,
    start_rate: float = 1000.0,
    max_steps: int = 10,
    refine: bool = True,
    window: int = 20,
    broker_pid: int | None = None,
) -> dict[str, Any]:
    """``subscribers`` subscribers each on bench/f/<i>, one publisher round-robin over them."""
    rates = [start_rate * 2**k for k in range(max_steps)]

    async def body(
        pubs: list[_Publisher], sink: Sink, pids: dict[str, int | None]
    ) -> dict[str, Any]:
        return _summary(await _ladder(pubs, sink, rates, step_s, window, pids, refine, "fan-out"))

    topics = [f"bench/f/{i}" for i in range(subscribers)]
    return _with_load(host, port, topics, [topics], qos, broker_pid, body)


# ----------------------------------------------------------------------------- conncap


def conncap(
    host: str,
    port: int,
    levels: tuple[int, ...] = (1000, 5000, 10000),
    *,
    concurrency: int = 100,
    level_timeout_s: float = 180.0,
    release_wait_s: float = 3.0,
    broker_pid: int | None = None,
) -> dict[str, Any]:
    """Idle connections (keepalive 60) up to each level: connect time and rate, broker RSS
    per connection; then all of them leave and the broker's RSS is read again."""
    tag = uuid.uuid4().hex[:6]
    clients: list[Client] = []
    done: list[dict[str, Any]] = []

    async def keep_alive(stop: asyncio.Event) -> None:  # a level may outlast the keepalive
        while not stop.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 25)
            for client in clients:
                client.write(PINGREQ)

    async def level(target: int) -> bool:
        need = target - len(clients)
        cpu = CpuMeter({"broker": broker_pid})
        t0 = time.monotonic()
        new, errors = await connect_many(
            host,
            port,
            f"cc-{tag}-{len(clients)}",
            need,
            concurrency=concurrency,
            deadline_s=level_timeout_s,
        )
        took = time.monotonic() - t0
        usage = cpu.read()
        clients.extend(new)
        await asyncio.sleep(1.0)
        still_open = sum(not c.lost.done() for c in clients)
        rss = rss_mb(broker_pid)
        step: dict[str, Any] = {
            "level": target,
            "connected": len(new),
            "errors": len(errors),
            "open": still_open,
            "connect_s": round(took, 2),
            "connects_per_s": round(len(new) / took, 1),
            "broker_rss_mb": rss,
            **usage,
        }
        if rss is not None and baseline is not None and still_open:
            step["kb_per_conn"] = round((rss - baseline) * 1024 / still_open, 2)
        if errors:
            step["error_sample"] = errors[:3]
        done.append(step)
        _say(f"    conncap {step}")
        return len(errors) <= 0.01 * need and still_open >= 0.99 * len(clients)

    async def run() -> None:
        stop = asyncio.Event()
        pinger = asyncio.create_task(keep_alive(stop))
        try:
            for target in levels:
                if target > len(clients) and not await level(target):
                    break
        finally:
            stop.set()
            await pinger
            await _close_all(clients)
        await asyncio.sleep(release_wait_s)

    baseline = rss_mb(broker_pid)
    asyncio.run(run())
    top = done[-1] if done else {}
    return {
        "baseline_rss_mb": baseline,
        "max_open": top.get("open", 0),
        "connects_per_s": top.get("connects_per_s"),
        "kb_per_conn": top.get("kb_per_conn"),
        "rss_at_max_mb": top.get("broker_rss_mb"),
        "rss_after_release_mb": rss_mb(broker_pid),
        "levels": done,
    }


# ----------------------------------------------------------------------------- brokers


def _say(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


@dataclass
class Broker:
    name: str
    proc: subprocess.Popen[bytes]
    host: str
    port: int
    log: Path
    files: list[IO[bytes]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, limit: int = 1500) -> str:
        with suppress(OSError):
            return self.log.read_text(errors="replace")[-limit:]
        return ""


def _free_port() -> int:
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port != 1883:  # never the system's MQTT port
            return port
    raise RuntimeError("no free port")


def _copy(src: IO[bytes], dst: IO[bytes]) -> None:
    with suppress(OSError, ValueError):
        while chunk := os.read(src.fileno(), 65536):
            dst.write(chunk)
            dst.flush()


def start_embedded(work: Path, profile: Path | None = None) -> Broker:
    """The embedded broker under the open-gate harness; waits for its READY line."""
    log_path = work / f"embedded-{time.monotonic_ns()}.log"
    log = log_path.open("wb")
    cmd = [sys.executable, str(OPEN_BROKER), "--port", "0"]
    if profile is not None:
        cmd += ["--profile", str(profile)]
    proc = subprocess.Popen(  # noqa: S603
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, start_new_session=True
    )
    broker = Broker("embedded", proc, "127.0.0.1", 0, log_path, [log])
    assert proc.stdout is not None
    line = b""
    deadline = time.monotonic() + 60
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in line:
            if time.monotonic() > deadline or proc.poll() is not None:
                stop_broker(broker)
                raise RuntimeError(f"the embedded broker did not start:\n{broker.log_tail()}")
            if sel.select(0.2):
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    time.sleep(0.1)
                line += chunk
    words = line.split(b"\n", 1)[0].decode().split()
    if len(words) != 4 or words[0] != "READY":
        stop_broker(broker)
        raise RuntimeError(f"unexpected first line from the embedded broker: {line!r}")
    broker.host, broker.port = words[1], int(words[2])
    threading.Thread(target=_copy, args=(proc.stdout, log), daemon=True).start()
    return broker


MOSQUITTO_CONF = """\
listener {port} 127.0.0.1
allow_anonymous true
set_tcp_nodelay true
persistence false
log_dest stderr
log_type error
log_type warning
"""


def _mqtt_probe(host: str, port: int) -> bool:
    """One CONNECT/CONNACK/DISCONNECT by a plain socket."""
    try:
        with socket.create_connection((host, port), timeout=2.0) as s:
            s.sendall(connect_packet(f"bench-probe-{uuid.uuid4().hex[:6]}"))
            ok = s.recv(4)[:1] == b"\x20"
            s.sendall(DISCONNECT)
            return ok
    except OSError:
        return False


def start_mosquitto(work: Path, binary: str) -> Broker:
    """Mosquitto on a free loopback port with a minimal configuration in ``work``."""
    port = _free_port()
    conf = work / f"mosquitto-{port}.conf"
    conf.write_text(MOSQUITTO_CONF.format(port=port))
    log_path = work / f"mosquitto-{port}.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(  # noqa: S603
        [binary, "-c", str(conf)],
        cwd=work,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    broker = Broker("mosquitto", proc, "127.0.0.1", port, log_path, [log])
    deadline = time.monotonic() + 15
    while not _mqtt_probe("127.0.0.1", port):
        if time.monotonic() > deadline or proc.poll() is not None:
            stop_broker(broker)
            raise RuntimeError(f"mosquitto did not start:\n{broker.log_tail()}")
        time.sleep(0.1)
    return broker


def stop_broker(broker: Broker) -> str:
    """SIGTERM by pid, SIGKILL after 15 s; says which one it took."""
    proc = broker.proc
    how = "exited before" if proc.poll() is not None else "SIGTERM"
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            how = "SIGKILL"
    for f in broker.files:
        f.close()
    if proc.stdout is not None:
        proc.stdout.close()
    return how


# ----------------------------------------------------------------------------- runner

Metric = tuple[str, str]
Runner = Callable[[Broker, bool], dict[str, Any]]


def _rtt_test(b: Broker, quick: bool) -> dict[str, Any]:
    count, warmup = (300, 50) if quick else (2000, 100)
    return rtt(b.host, b.port, count, warmup=warmup, broker_pid=b.pid)


def _ladder_kw(quick: bool) -> dict[str, Any]:
    if quick:
        return {"step_s": 1.5, "max_steps": 2, "refine": False}
    return {"step_s": 3.0, "max_steps": 10, "refine": True}


def _fanin_test(qos: int) -> Runner:
    def run(b: Broker, quick: bool) -> dict[str, Any]:
        return fanin(b.host, b.port, 100, qos, broker_pid=b.pid, **_ladder_kw(quick))

    return run


def _fanout_test(b: Broker, quick: bool) -> dict[str, Any]:
    return fanout(b.host, b.port, 1000, broker_pid=b.pid, **_ladder_kw(quick))


def _conncap_test(b: Broker, quick: bool) -> dict[str, Any]:
    levels = (200, 500) if quick else (1000, 5000, 10000)
    return conncap(b.host, b.port, levels, broker_pid=b.pid)


def _flood_test(b: Broker, quick: bool) -> dict[str, Any]:
    seconds, drain = (2.0, 5.0) if quick else (5.0, 20.0)
    return fanin(b.host, b.port, 100, 0, seconds, flood=True, drain_limit_s=drain, broker_pid=b.pid)


def _fairness_test(b: Broker, quick: bool) -> dict[str, Any]:
    return fairness(b.host, b.port, 100, 2.0 if quick else 5.0, broker_pid=b.pid)


TESTS: dict[str, tuple[Runner, list[Metric]]] = {
    "rtt": (
        _rtt_test,
        [
            ("QoS 1 request/reply RTT p50 (ms)", "p50_ms"),
            ("QoS 1 request/reply RTT p95 (ms)", "p95_ms"),
            ("QoS 1 request/reply RTT p99 (ms)", "p99_ms"),
        ],
    ),
    "fanin_q1": (
        _fanin_test(1),
        [
            ("fan-in QoS 1, 100 devices: sustained (msg/s)", "sustained_per_s"),
            ("fan-in QoS 1, 100 devices: peak (msg/s)", "peak_per_s"),
        ],
    ),
    "fanin_q0": (
        _fanin_test(0),
        [
            ("fan-in QoS 0, 100 devices: sustained (msg/s)", "sustained_per_s"),
            ("fan-in QoS 0, 100 devices: peak (msg/s)", "peak_per_s"),
        ],
    ),
    "fanout": (
        _fanout_test,
        [
            ("fan-out to 1000 topics: sustained (deliveries/s)", "sustained_per_s"),
            ("fan-out to 1000 topics: peak (deliveries/s)", "peak_per_s"),
        ],
    ),
    "conncap": (
        _conncap_test,
        [
            ("idle connections held", "max_open"),
            ("connects/s (last level)", "connects_per_s"),
            ("broker RSS per idle connection (KB)", "kb_per_conn"),
            ("broker RSS with all connected (MB)", "rss_at_max_mb"),
            ("broker RSS after they left (MB)", "rss_after_release_mb"),
        ],
    ),
    "flood": (
        _flood_test,
        [
            ("flood QoS 0, 100 devices: delivered (msg/s)", "delivered_per_s"),
            ("flood: delivered incl. backlog drain (msg/s)", "delivered_per_s_with_drain"),
            ("flood: broker RSS at its end (MB)", "broker_rss_mb"),
        ],
    ),
    "fairness": (
        _fairness_test,
        [
            ("during a flood from 100 clients: others' QoS 1 RTT p50 (ms)", "others_p50_ms"),
            ("during a flood from 100 clients: others' QoS 1 RTT p99 (ms)", "others_p99_ms"),
            ("during a flood from 100 clients: others' round trips", "others_round_trips"),
        ],
    ),
}
BROKERS = {"embedded": "embedded", "mosquitto": "Mosquitto"}


def _env(mosquitto: str | None) -> dict[str, Any]:
    env: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    if mosquitto:
        with suppress(OSError, subprocess.SubprocessError):
            head = subprocess.run(  # noqa: S603
                [mosquitto, "-h"], capture_output=True, text=True, timeout=5
            ).stdout
            env["mosquitto"] = head.splitlines()[0] if head else None
    return env


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def table(records: list[dict[str, Any]], tests: list[str], brokers: list[str]) -> str:
    """Markdown table of the medians per (measure, broker)."""
    brokers = [b for b in BROKERS if b in brokers]
    head = ["measure", *(BROKERS[b] for b in brokers)]
    both = brokers == ["embedded", "mosquitto"]
    if both:
        head.append("embedded ÷ Mosquitto")
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for test in tests:
        for label, key in TESTS[test][1]:
            medians: dict[str, float | None] = {}
            for b in brokers:
                values = [
                    float(r["result"][key])
                    for r in records
                    if r["test"] == test
                    and r["broker"] == b
                    and isinstance(r.get("result", {}).get(key), int | float)
                ]
                medians[b] = statistics.median(values) if values else None
            row = [label, *(_fmt(medians[b]) for b in brokers)]
            if both:
                e, m = medians["embedded"], medians["mosquitto"]
                row.append(f"{e / m:.2f}" if e is not None and m else "n/a")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="scripts/bench-broker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tests", default=",".join(TESTS), help="comma list (default: all)")
    p.add_argument("--brokers", default="embedded,mosquitto", help="comma list (default: both)")
    p.add_argument("--reps", type=int, default=3, help="repetitions, brokers alternating order")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: short ladders, conncap to 500, few RTTs"
    )
    p.add_argument("--out", type=Path, help="append one JSON line per run to this file")
    p.add_argument("--profile", type=Path, metavar="DIR", help="cProfile the embedded broker")
    a = p.parse_args(argv)
    tests = [t for t in a.tests.split(",") if t]
    brokers = [b for b in a.brokers.split(",") if b]
    for t in tests:
        if t not in TESTS:
            p.error(f"unknown test {t!r}; known: {', '.join(TESTS)}")
    for b in brokers:
        if b not in BROKERS:
            p.error(f"unknown broker {b!r}; known: {', '.join(BROKERS)}")
    if a.reps < 1:
        p.error("--reps must be at least 1")
    mosquitto = shutil.which("mosquitto")
    if "mosquitto" in brokers and mosquitto is None:
        _say("bench-broker: no mosquitto binary on PATH: skipping Mosquitto")
        brokers.remove("mosquitto")
    if not brokers:
        _say("bench-broker: no broker to measure")
        return 2
    if a.profile:
        a.profile = a.profile.resolve()  # the broker runs in the repository's root
        a.profile.mkdir(parents=True, exist_ok=True)
    nofile = raise_open_files()
    env = _env(mosquitto) | {"open_files": nofile, "quick": a.quick}
    _say(f"bench-broker: {env}")
    signal.signal(signal.SIGTERM, _interrupt)
    work = Path(tempfile.mkdtemp(prefix="bench-broker-"))
    out = a.out.open("a") if a.out else None
    records: list[dict[str, Any]] = []
    running: list[Broker] = []
    interrupted = False
    started = time.monotonic()
    try:
        for rep in range(a.reps):
            order = brokers if rep % 2 == 0 else brokers[::-1]
            for test in tests:
                for name in order:
                    _say(f"[{time.monotonic() - started:6.0f}s] rep {rep + 1}: {test} on {name}")
                    rec: dict[str, Any] = {"test": test, "broker": name, "rep": rep}
                    t0 = time.monotonic()
                    try:
                        if name == "embedded":
                            prof = a.profile / f"{test}-rep{rep + 1}.prof" if a.profile else None
                            broker = start_embedded(work, prof)
                        else:
                            assert mosquitto is not None
                            broker = start_mosquitto(work, mosquitto)
                    except RuntimeError as exc:
                        rec["error"] = str(exc)
                    else:
                        running.append(broker)
                        try:
                            rec["result"] = TESTS[test][0](broker, a.quick)
                        except (OSError, RuntimeError, TimeoutError, ConnectionError) as exc:
                            rec["error"] = f"{type(exc).__name__}: {exc}"
                        finally:
                            rec["broker_alive_at_end"] = broker.proc.poll() is None
                            rec["broker_stopped_by"] = stop_broker(broker)
                            running.remove(broker)
                        if "error" in rec:
                            rec["broker_log_tail"] = broker.log_tail()
                    rec["wall_s"] = round(time.monotonic() - t0, 1)
                    rec["env"] = env
                    if "error" in rec:
                        _say(f"    ERROR: {rec['error']}")
                    records.append(rec)
                    if out is not None:
                        out.write(json.dumps(rec) + "\n")
                        out.flush()
    except KeyboardInterrupt:
        interrupted = True
        _say("bench-broker: interrupted; stopping what it started")
    finally:
        for broker in running:
            stop_broker(broker)
        if out is not None:
            out.close()
        shutil.rmtree(work, ignore_errors=True)
    done = {r["rep"] for r in records}
    sys.stdout.write(
        f"\nMedians of {len(done)} repetition(s), {env['cpus']} CPUs, load average"
        f" {env['loadavg'][0]} at the start{', --quick' if a.quick else ''}"
        f"{' (interrupted)' if interrupted else ''}:\n\n" + table(records, tests, brokers) + "\n"
    )
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
