"""The embedded broker uses a small, fixed part of amqtt (its listeners, TLS and WebSocket
servers, connection limits and the authentication plugin hook): this fails when an amqtt
upgrade renames, removes or re-signs any of it, before anything subtler breaks."""

from __future__ import annotations

import asyncio
import inspect

import amqtt
import pytest
from amqtt.broker import Broker, Server
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.plugins.manager import PluginManager

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
    for name in ("acquire_connection", "release_connection", "instance"):
        assert hasattr(Server, name) or name in Server.__init__.__code__.co_names, name


def test_authentication_hook_keeps_its_shape() -> None:
    """The broker hands the authentication plugins an object with the CONNECT's client id,
    username, password and an ``attributes`` dict, through ``map_plugin_auth(session=)``."""
    params = inspect.signature(PluginManager.map_plugin_auth).parameters
    assert "session" in params, list(params)
    assert "authenticate" in dir(BaseAuthPlugin)
