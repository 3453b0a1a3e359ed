"""Paho MQTT clients for tests: ``MqttClient`` collects what it receives (integrations,
raw protocol checks), ``MqttDevice`` simulates a hexa-mini-switch-v1 (contract §3)."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import paho.mqtt.client as mqtt

from support.accounts import User, integration_token
from support.checks import wait_until
from support.hubs import RunningHub


def _nodelay(client: mqtt.Client) -> None:
    def on_socket_open(c: Any, userdata: Any, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    client.on_socket_open = on_socket_open


class MqttClient:
    """A paho client collecting messages, for integrations and raw protocol tests."""

    def __init__(
        self,
        hub: RunningHub,
        username: str | None,
        password: str | None,
        *,
        client_id: str | None = None,
        will: tuple[str, bytes, bool] | None = None,
    ) -> None:
        self.msgs: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.subacks: dict[int, list[Any]] = {}
        self.rc: Any = None
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{uuid.uuid4().hex[:10]}"
        )
        _nodelay(self.c)
        if username is not None:
            self.c.username_pw_set(username, password)
        if will is not None:
            self.c.will_set(will[0], will[1], qos=1, retain=will[2])
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.on_disconnect = self._on_disconnect
        self.c.reconnect_delay_set(30, 60)  # a refused or kicked client stays out during a test
        self.c.connect("127.0.0.1", hub.mqtt_port, keepalive=30)
        self.c.loop_start()

    def _on_connect(self, c: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        self.rc = rc
        self.connected.set()

    def _on_disconnect(self, c: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        self.disconnected.set()

    def _on_subscribe(self, c: Any, userdata: Any, mid: int, rcs: Any, props: Any = None) -> None:
        self.subacks[mid] = list(rcs)

    def _on_message(self, c: Any, userdata: Any, msg: Any) -> None:
        with self.lock:
            self.msgs.append((msg.topic, msg.payload, bool(msg.retain)))

    def ok(self, t: float = 10) -> bool:
        return self.connected.wait(t) and self.rc is not None and not self.rc.is_failure

    def refused(self, t: float = 10) -> bool:
        self.connected.wait(t)
        return self.rc is None or self.rc.is_failure

    def subscribe(self, flt: str, t: float = 5) -> bool:
        """Subscribe and wait for the SUBACK; True when granted."""
        _, mid = self.c.subscribe(flt, qos=1)
        wait_until(lambda: mid in self.subacks, t)
        codes = self.subacks.get(mid, [])
        return bool(codes) and not codes[0].is_failure

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def wait_for(self, pred: Callable[[str, bytes, bool], bool], timeout: float = 5.0) -> Any:
        def find() -> Any:
            with self.lock:
                for m in self.msgs:
                    if pred(*m):
                        return m
            return None

        return wait_until(find, timeout)

    def messages(
        self, pred: Callable[[str, bytes, bool], bool] | None = None
    ) -> list[tuple[str, bytes, bool]]:
        with self.lock:
            return [m for m in self.msgs if pred is None or pred(*m)]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()

    def drop(self) -> None:
        """Lose the TCP connection without DISCONNECT (the will fires)."""
        self.c.loop_stop()
        sock = self.c.socket()
        if sock is not None:
            sock.close()


class MqttDevice(MqttClient):
    """A simulated hexa-mini-switch-v1 over MQTT (paho), speaking contract §3."""

    def __init__(
        self,
        hub: RunningHub,
        uid: str,
        token: str,
        *,
        auto_ack: bool = True,
        relays: int = 3,
        client_id: str | None = None,
    ) -> None:
        self.uid = uid
        self.relays = [False] * relays
        self.auto_ack = auto_ack
        self.commands: list[dict[str, Any]] = []
        super().__init__(
            hub,
            uid,
            token,
            client_id=client_id or f"dev-{uid}",
            will=(f"hexa/{uid}/availability", b"offline", True),
        )

    def _on_connect(self, c: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        if not rc.is_failure:
            c.subscribe(f"hexa/{self.uid}/cmd", qos=1)
            c.publish(f"hexa/{self.uid}/availability", "online", qos=1, retain=True)
            self.report()
        super()._on_connect(c, userdata, flags, rc, props)

    def report(self) -> None:
        self.c.publish(
            f"hexa/{self.uid}/report",
            json.dumps({"relays": self.relays, "inputs": [False] * 3, "fw_version": "1.0.0"}),
            qos=1,
        )

    def _on_message(self, c: Any, userdata: Any, msg: Any) -> None:
        super()._on_message(c, userdata, msg)
        if msg.topic != f"hexa/{self.uid}/cmd":
            return
        try:
            cmd = json.loads(msg.payload)
        except ValueError:
            return
        self.commands.append(cmd)
        if not self.auto_ack:
            return
        if cmd.get("type") == "set_relay":
            self.relays[cmd["relay_index"]] = bool(cmd["state"])
        elif cmd.get("type") == "set_all_relays":
            self.relays = [bool(cmd["state"])] * len(self.relays)
        else:
            return
        c.publish(
            f"hexa/{self.uid}/ack",
            json.dumps({"command_id": cmd["command_id"], "ok": True, "relays": self.relays}),
            qos=1,
        )

    def event(self, input_index: int, event: str, duration_ms: int | None = None) -> None:
        p: dict[str, Any] = {"input_index": input_index, "event": event}
        if duration_ms is not None:
            p["duration_ms"] = duration_ms
        self.publish(f"hexa/{self.uid}/event", json.dumps(p))


def close_all(clients: Iterable[MqttClient]) -> None:
    """Close several clients together: every DISCONNECT first, so that clients waiting to
    reconnect to a hub that is gone (paho looks once a second) stop in the same second
    instead of one after the other."""
    clients = list(clients)
    for client in clients:
        client.c.disconnect()
    for client in clients:
        client.close()


def integration_client(
    hub: RunningHub, user: User, track: Callable[[MqttClient], MqttClient], *filters: str
) -> MqttClient:
    """A connected integration client of ``user``'s organization, subscribed to ``filters``
    (each SUBACK asserted granted) and closed after the test."""
    it = integration_token(hub, user)
    client = track(MqttClient(hub, it["name"], it["token"]))
    assert client.ok(), client.rc
    for flt in filters:
        assert client.subscribe(flt), flt
    return client


def sync_on(dev: MqttDevice, obs: MqttClient) -> None:
    """Barrier: ``dev`` publishes its own input event and ``obs`` sees the hub republish it,
    so the broker and the hub have handled everything ``dev`` published before (``obs``
    must cover hexa/<uid>/input/#)."""
    marker = int(uuid.uuid4().int % 1_000_000) + 1
    dev.event(2, "press", duration_ms=marker)
    topic = f"hexa/{dev.uid}/input/2/event"
    seen = obs.wait_for(
        lambda t, p, r: t == topic and json.loads(p).get("duration_ms") == marker, 5
    )
    assert seen, f"barrier event of {dev.uid} never republished"


def mentions(uid: str) -> Callable[[str, bytes, bool], bool]:
    """Matches a message whose topic or payload names ``uid``."""
    return lambda t, p, r: uid in t or uid.encode() in p
