"""The embedded broker's other listeners: MQTT over TLS and MQTT over WebSocket."""

from __future__ import annotations

import json
import ssl
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import paho.mqtt.client as mqtt
import pytest
from support.accounts import integration_token, register
from support.checks import wait_until
from support.devices import claim, online_device, provision
from support.hubs import RunningHub, free_port, spawned_hub
from support.tls import self_signed

from hexa.hub.mqtt import client as hexa_mqtt
from hexa.hub.mqtt.bus import BrokerAddress, Bus
from hexa.hub.mqtt.busapi import Message


@pytest.fixture
def tls_hub(db_kind: str, tmp_path: Path) -> Iterator[tuple[RunningHub, Path, int, int]]:
    cert, key = self_signed(tmp_path)
    tls_port, ws_port = free_port(), free_port()
    with spawned_hub(
        db_kind,
        tmp_path,
        mqtt_tls_cert=str(cert),
        mqtt_tls_key=str(key),
        mqtt_tls_port=str(tls_port),
        mqtt_ws_port=str(ws_port),
    ) as hub:
        yield hub, cert, tls_port, ws_port


def _connect(port: int, uid: str, token: str, **options: Any) -> tuple[mqtt.Client, Any]:
    """A paho device connection; returns it with the CONNACK reason code."""
    done = threading.Event()
    result: dict[str, Any] = {}
    transport = options.pop("transport", "tcp")
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=f"l-{uuid.uuid4().hex[:8]}", transport=transport
    )
    if "ca" in options:
        client.tls_set(ca_certs=str(options["ca"]), cert_reqs=ssl.CERT_REQUIRED)
    client.username_pw_set(uid, token)

    def on_connect(c: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        result["rc"] = rc
        if not rc.is_failure:
            c.publish(f"hexa/{uid}/availability", "online", qos=1, retain=True)
        done.set()

    client.on_connect = on_connect
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    assert done.wait(10), "no CONNACK"
    return client, result["rc"]


def test_device_over_tls_and_over_websocket(tls_hub: tuple[RunningHub, Path, int, int]) -> None:
    """A device comes online over MQTT/TLS (verified certificate) and over MQTT/WebSocket."""
    hub, cert, tls_port, ws_port = tls_hub
    user = register(hub)
    p = provision(hub)
    assert p["mqtt"]["tls_port"] == tls_port
    dev = claim(hub, user, p["claim_code"])
    tls_client, rc = _connect(tls_port, p["device_uid"], p["device_token"], ca=cert)
    assert not rc.is_failure
    with hub.api(user.access_token) as c:
        assert wait_until(lambda: c.get(f"/devices/{dev['id']}").json()["online"], 5)
    tls_client.disconnect()
    tls_client.loop_stop()

    q = provision(hub)
    claim(hub, user, q["claim_code"])
    ws_client, rc = _connect(ws_port, q["device_uid"], q["device_token"], transport="websockets")
    assert not rc.is_failure
    ws_client.disconnect()
    ws_client.loop_stop()


def test_bad_credentials_refused_on_every_listener(
    tls_hub: tuple[RunningHub, Path, int, int],
) -> None:
    """Wrong tokens are refused over TLS and WebSocket too."""
    hub, cert, tls_port, ws_port = tls_hub
    p = provision(hub)
    for port, options in ((tls_port, {"ca": cert}), (ws_port, {"transport": "websockets"})):
        client, rc = _connect(port, p["device_uid"], "wrong-token", **options)
        assert rc.is_failure
        client.loop_stop()


@pytest.mark.anyio
async def test_hub_bus_client_over_tls_with_a_private_ca(
    tls_hub: tuple[RunningHub, Path, int, int], track: Any
) -> None:
    """The hub's own MQTT client (what HEXA_BROKER_URL=mqtts://… uses) connects over TLS
    when told which CA to trust (HEXA_BROKER_CA_FILE), publishes an intent and gets its
    result; without that CA the certificate is refused."""
    hub, cert, tls_port, _ = tls_hub
    user = register(hub)
    _, m = online_device(hub, user, track)
    it = integration_token(hub, user)
    name, token = it["name"], it["token"]

    with pytest.raises(hexa_mqtt.MqttError, match="CERTIFICATE_VERIFY_FAILED"):
        await hexa_mqtt.connect(
            "127.0.0.1",
            tls_port,
            client_id=f"tls-{uuid.uuid4().hex[:8]}",
            username=name,
            password=token,
            ssl=ssl.create_default_context(),
        )

    results: list[Message] = []
    got = anyio.Event()

    async def on_result(msg: Message) -> None:
        results.append(msg)
        got.set()

    address = BrokerAddress("127.0.0.1", tls_port, name, token, tls=True, ca_file=str(cert))
    bus = Bus(
        address, client_id=f"tls-{uuid.uuid4().hex[:8]}", presence_topic="homeassistant/status"
    )
    await bus.subscribe(f"hexa/{m.uid}/result", on_result)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(10):
            await tg.start(bus.run)
            await bus.publish(f"hexa/{m.uid}/relay/2/set", '{"state":"ON","intent_id":"tls-1"}')
            await got.wait()
        tg.cancel_scope.cancel()
    result = json.loads(results[0].payload)
    assert result["intent_id"] == "tls-1" and result["status"] == "applied", result
    assert result["relays"] == [False, False, True]
