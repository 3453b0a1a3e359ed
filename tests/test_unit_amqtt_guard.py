"""The embedded broker uses a small, fixed part of amqtt (listeners, CONNECT parsing and
validation, the authentication plugin hook): this fails when an amqtt upgrade renames,
removes or re-signs any of it, before anything subtler breaks."""

from __future__ import annotations

import asyncio
import inspect

import amqtt
import pytest
from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter, WebSocketsReader
from amqtt.broker import Broker
from amqtt.mqtt.connack import IDENTIFIER_REJECTED, NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

#: methods of amqtt's Broker that broker/server.py overrides or calls, with the
#: parameters it relies on
BROKER_METHODS = {
    "__init__": ["config"],
    "start": [],
    "shutdown": [],
    "stream_connected": ["reader", "writer", "listener_name"],
    "ws_connected": ["websocket", "listener_name"],
    "_authenticate": ["session"],
}


def test_amqtt_is_the_tested_release() -> None:
    """The broker was written against amqtt 0.12 (pyproject pins <0.13)."""
    assert amqtt.__version__.startswith("0.12."), amqtt.__version__


@pytest.mark.parametrize("name", sorted(BROKER_METHODS))
def test_broker_methods_keep_their_shape(name: str) -> None:
    """Each Broker method we override or call still exists and takes what we pass."""
    method = getattr(Broker, name, None)
    assert method is not None, f"amqtt Broker.{name} is gone"
    params = list(inspect.signature(method).parameters)[1:]
    for wanted in BROKER_METHODS[name]:
        assert wanted in params, (name, params)


def test_broker_attributes_we_read() -> None:
    """The listener table, listener configs and plugin manager the broker reads."""

    async def build() -> Broker:
        return Broker(
            {
                "listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}},
                "plugins": {"hexa.broker.plugins.HexaAuthPlugin": {"gate": None}},
            }
        )

    broker = asyncio.run(build())
    for name in ("_servers", "listeners_config", "plugins_manager"):
        assert hasattr(broker, name), name
    assert "default" in broker.listeners_config


def test_connect_parsing_keeps_what_we_use() -> None:
    """CONNECT is parsed by amqtt's handler into a Session with these fields."""
    init = inspect.signature(BrokerProtocolHandler.init_from_connect).parameters
    assert list(init)[:3] == ["reader", "writer", "plugins_manager"], list(init)
    session = Session()
    for name in (
        "client_id",
        "clean_session",
        "keep_alive",
        "will_flag",
        "will_topic",
        "will_message",
        "will_qos",
        "will_retain",
        "username",
        "password",
        "attributes",
    ):
        assert hasattr(session, name), name
    assert ConnackPacket.build(0, NOT_AUTHORIZED).return_code == NOT_AUTHORIZED
    assert IDENTIFIER_REJECTED == 2


def test_adapters_keep_what_we_use() -> None:
    assert hasattr(StreamReaderAdapter, "read")
    assert hasattr(StreamWriterAdapter, "drain")
    assert "n" in inspect.signature(WebSocketsReader.read).parameters
