"""``hexa sim``: simulated hexa-mini-switch-v1 devices over MQTT or WebSocket.

Each device provisions itself with the provision key (or reuses credentials from a state
file), connects, answers commands with acks, reports its state on connect and
periodically, and can press and hold inputs, never ack, or drop its connection.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx

from hexa.hub import topics
from hexa.hub.mqtt.bus import BrokerAddress, Bus
from hexa.hub.mqtt.busapi import Message
from hexa.hub.tools.sim_config import SimConfig, SimStore
from hexa.hub.tools.sim_ota import SimOta

log = logging.getLogger(__name__)

MODEL = "hexa-mini-switch-v1"
RELAYS = INPUTS = 3


@dataclass
class Credentials:
    device_uid: str
    device_token: str
    claim_code: str
    mqtt_host: str
    mqtt_port: int
    ws_url: str


async def provision(
    client: httpx.AsyncClient, key: str, count: int, *, concurrency: int = 16
) -> list[Credentials]:
    """Provision ``count`` devices through ``POST /provision/register``."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Credentials:
        async with sem:
            r = await client.post(
                "/api/v1/provision/register",
                json={"model": MODEL, "serial": f"SIM{i:06d}", "fw_version": "1.0.0"},
                headers={"X-Provision-Key": key},
            )
        if r.status_code != 201:
            raise RuntimeError(f"provisioning failed: {r.status_code} {r.text}")
        b = r.json()
        return Credentials(
            b["device_uid"],
            b["device_token"],
            b["claim_code"],
            b["mqtt"]["host"],
            int(b["mqtt"]["port"]),
            b["ws_url"],
        )

    return list(await asyncio.gather(*(one(i) for i in range(count))))


@dataclass
class SimDevice:
    """One simulated switch. ``run()`` keeps it connected until cancelled."""

    creds: Credentials
    transport: str = "mqtt"
    auto_ack: bool = True
    report_every: float = 60.0
    mqtt_host: str | None = None
    mqtt_port: int | None = None
    relays: list[bool] = field(default_factory=lambda: [False] * RELAYS)
    inputs: list[bool] = field(default_factory=lambda: [False] * INPUTS)
    commands: int = 0
    on_command: Callable[[dict[str, Any]], Awaitable[None]] | None = None
    #: the IO configuration it runs, and where it keeps it and its relays across restarts
    config: SimConfig = field(default_factory=lambda: SimConfig.factory(INPUTS))
    store: SimStore | None = None
    #: its firmware and OTA updates (hub/tools/sim_ota.py)
    ota: SimOta = field(default_factory=SimOta)
    #: ask the hub for an update this often (seconds; None: only when told to)
    ota_check_every: float | None = None
    _send: Callable[[str, dict[str, Any]], Awaitable[None]] | None = None
    _bus: Bus | None = None
    _ws: Any = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def uid(self) -> str:
        return self.creds.device_uid

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.ota.run, self, self.ota_check_every)
            if self.transport == "ws":
                await self._run_ws()
            else:
                await self._run_mqtt()

    # --- protocol ---------------------------------------------------------------------
    async def _handle_command(self, cmd: dict[str, Any]) -> None:
        self.commands += 1
        if self.on_command is not None:
            await self.on_command(cmd)
        kind = cmd.get("type")
        if kind == "set_relay":
            index = cmd.get("relay_index")
            if not isinstance(index, int) or not 0 <= index < RELAYS:
                await self._ack(cmd, ok=False, error="relay index out of range")
                return
            self.relays[index] = bool(cmd.get("state"))
        elif kind == "set_all_relays":
            self.relays = [bool(cmd.get("state"))] * RELAYS
        elif kind == "config":
            await self._configure(cmd)
            return
        elif kind == "ota":
            self.ota.request(cmd)
            return
        else:
            return
        self._remember()
        await self._ack(cmd, ok=True)

    async def _configure(self, cmd: dict[str, Any]) -> None:
        error = self.config.apply(cmd)
        if error is not None:
            await self._ack(cmd, ok=False, error=error)
            return
        self._remember()
        if self.auto_ack and self._send is not None:
            doc = {"command_id": cmd.get("command_id"), "ok": True}
            await self._send("ack", {**doc, "config_version": self.config.version})

    def _remember(self) -> None:
        if self.store is not None:
            self.store.save(self.uid, self.config, self.relays)

    async def _ack(self, cmd: dict[str, Any], *, ok: bool, error: str | None = None) -> None:
        if not self.auto_ack:
            return
        doc: dict[str, Any] = {"command_id": cmd.get("command_id"), "ok": ok}
        if ok:
            doc["relays"] = self.relays
        else:
            doc["error"] = error
        assert self._send is not None
        await self._send("ack", doc)

    async def report(self) -> None:
        if self._send is not None:
            await self._send(
                "state_report",
                {
                    "relays": self.relays,
                    "inputs": self.inputs,
                    "fw_version": self.ota.fw_version,
                    "uptime_s": round(time.monotonic(), 1),
                    "config_version": self.config.version,
                },
            )

    async def local_switch(self, index: int, state: bool) -> None:
        """A change at the device (a wall switch): state changes, then a report."""
        self.relays[index] = state
        self._remember()
        await self.report()

    async def press(self, index: int) -> None:
        """A push of input ``index``: its events, and its relay toggled if it is linked."""
        await self._event(index, "press", 120)
        await self._event(index, "release", None)
        if self.config.press(self.relays, index):
            self._remember()
            await self.report()

    async def rocker(self, index: int, position: bool) -> None:
        """Rocker ``index`` moved to ``position`` (its input state): press when it
        closes, release when it opens, and its relay follows or flips if it is linked."""
        before, self.inputs[index] = self.inputs[index], position
        await self._event(index, "press" if position else "release", None)
        if self.config.rocker(self.relays, index, position, before):
            self._remember()
        await self.report()

    async def hold(self, index: int, duration_ms: int) -> None:
        await self._event(index, "hold", duration_ms)

    async def _event(self, index: int, event: str, duration_ms: int | None) -> None:
        doc: dict[str, Any] = {"input_index": index, "event": event}
        if duration_ms is not None:
            doc["duration_ms"] = duration_ms
        if self._send is not None:
            await self._send("input_event", doc)

    def drop(self) -> None:
        """Lose the connection abruptly (MQTT: the will says offline); it reconnects."""
        if self._bus is not None:
            self._bus.abort()
        if self._ws is not None:
            self._ws.transport.abort()

    # --- transports -------------------------------------------------------------------
    async def _run_mqtt(self) -> None:
        address = BrokerAddress(
            self.mqtt_host or self.creds.mqtt_host,
            self.mqtt_port or self.creds.mqtt_port,
            self.uid,
            self.creds.device_token,
        )
        bus = Bus(
            address,
            client_id=f"sim-{self.uid}",
            presence_topic=topics.AVAILABILITY.format(uid=self.uid),
        )
        self._bus = bus
        topic_of: dict[str, topics.Topic[Any]] = {
            "ack": topics.ACK,
            "state_report": topics.REPORT,
            "input_event": topics.EVENT,
        }

        async def send(kind: str, doc: dict[str, Any]) -> None:
            await bus.publish(topic_of[kind].format(uid=self.uid), json.dumps(doc))

        async def on_cmd(msg: Message) -> None:
            try:
                cmd = json.loads(msg.payload)
            except ValueError:
                return
            if isinstance(cmd, dict):
                await self._handle_command(cmd)

        self._send = send
        await bus.subscribe(topics.CMD.format(uid=self.uid), on_cmd)
        async with anyio.create_task_group() as tg:
            await tg.start(bus.run)
            self.connected.set()
            await self.report()
            while True:
                await asyncio.sleep(self.report_every * random.uniform(0.9, 1.1))
                if bus.connected:
                    await self.report()

    async def _run_ws(self) -> None:
        import websockets

        url = f"{self.creds.ws_url}?uid={self.uid}&token={self.creds.device_token}"
        backoff = 0.2
        while True:
            try:
                async with websockets.connect(url, open_timeout=10) as ws:
                    self._ws = ws

                    async def send(kind: str, doc: dict[str, Any]) -> None:
                        await ws.send(json.dumps({"type": kind, **doc}))

                    self._send = send
                    self.connected.set()
                    await self.report()
                    backoff = 0.2
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._ws_reports)
                        async for raw in ws:
                            try:
                                cmd = json.loads(raw)
                            except ValueError:
                                continue
                            if isinstance(cmd, dict):
                                await self._handle_command(cmd)
                        tg.cancel_scope.cancel()
            except (OSError, websockets.WebSocketException) as exc:
                log.debug("sim %s: websocket lost (%s)", self.uid, exc)
            self.connected.clear()
            self._send = None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5)

    async def _ws_reports(self) -> None:
        while True:
            await asyncio.sleep(self.report_every * random.uniform(0.9, 1.1))
            await self.report()


def _load_state(path: Path | None, base_url: str) -> list[Credentials]:
    if path is None or not path.exists():
        return []
    data = json.loads(path.read_text())
    if data.get("url") != base_url:
        return []
    return [Credentials(**c) for c in data["devices"]]


def _save_state(path: Path | None, base_url: str, creds: list[Credentials]) -> None:
    if path is not None:
        try:  # the devices' memory (sim_config.SimStore) is kept
            kept = {k: v for k, v in json.loads(path.read_text()).items() if k == "sims"}
        except (OSError, ValueError, AttributeError):
            kept = {}
        doc = {"url": base_url, "devices": [c.__dict__ for c in creds], **kept}
        path.write_text(json.dumps(doc, indent=1))
        path.chmod(0o600)


async def _sim(args: argparse.Namespace) -> int:
    state = Path(args.state_file) if args.state_file else None
    creds = _load_state(state, args.url)
    async with httpx.AsyncClient(base_url=args.url, timeout=30) as client:
        if len(creds) < args.devices:
            if not args.provision_key:
                print("hexa sim: --provision-key (or HEXA_DEVICE_PROVISION_KEY) is required")
                return 2
            creds += await provision(client, args.provision_key, args.devices - len(creds))
            _save_state(state, args.url, creds)
    store = SimStore(state)
    devices = []
    for c in creds[: args.devices]:
        config, relays = store.boot(c.device_uid, RELAYS, INPUTS)  # the power-restore mode
        devices.append(
            SimDevice(
                c,
                transport=args.transport,
                auto_ack=not args.no_ack,
                report_every=args.report_every,
                mqtt_host=args.sim_mqtt_host,
                mqtt_port=args.sim_mqtt_port,
                relays=relays,
                config=config,
                store=store,
                ota_check_every=getattr(args, "ota_check_every", None),
            )
        )
    for d in devices:
        print(f"{d.uid}  claim code {d.creds.claim_code}")
    with anyio.move_on_after(args.duration if args.duration else float("inf")):
        async with anyio.create_task_group() as tg:
            for d in devices:
                tg.start_soon(d.run)
            await asyncio.gather(*(d.connected.wait() for d in devices))
            print(
                f"{len(devices)} simulated device(s) connected over {args.transport}; Ctrl-C stops"
            )
            if args.press_every:
                tg.start_soon(_presses, devices, args.press_every, args.hold_ms)
    return 0


async def _presses(devices: list[SimDevice], every: float, hold_ms: int | None) -> None:
    while True:
        await asyncio.sleep(every)
        d = random.choice(devices)
        index = random.randrange(INPUTS)
        if hold_ms:
            await d.hold(index, hold_ms)
        elif d.config.inputs[index].type == "rocker":
            await d.rocker(index, not d.inputs[index])  # a rocker is moved, not pressed
        else:
            await d.press(index)


def run_sim(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    try:
        return asyncio.run(_sim(args))
    except KeyboardInterrupt:
        return 0
