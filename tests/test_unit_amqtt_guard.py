"""The embedded broker overrides and reads parts of amqtt's Broker: this fails when an
amqtt upgrade renames, removes or re-signs any of them, before anything subtler breaks."""

from __future__ import annotations

import inspect

import amqtt
import pytest
from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter, WebSocketsReader
from amqtt.broker import Broker
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

#: methods of amqtt's Broker that broker/server.py overrides or calls, with the
#: parameters it relies on
BROKER_METHODS = {
    "stream_connected": ["reader", "writer", "listener_name"],
    "ws_connected": ["websocket", "listener_name"],
    "add_subscription": ["subscription", "session"],
    "_del_subscription": ["a_filter", "session"],
    "_del_all_subscriptions": ["session"],
    "_cleanup_session": ["client_id"],
    "_run_broadcast": ["running_tasks"],
    "_handle_message_delivery": ["client_session", "handler", "wait_deliver"],
    "_handle_disconnect": ["client_session", "handler", "disconnect_waiter"],
    "_publish_retained_messages_for_subscription": ["subscription", "session"],
    "_publish_session_retained_messages": ["session"],
    "_retain_broadcast_message": ["broadcast", "qos", "target_session"],
    "_broadcast_message": ["session", "topic", "data", "force_qos"],
    "_client_message_loop": ["client_session", "handler"],
    "_authenticate": ["session"],
    "_topic_filtering": ["session", "topic", "action"],
    "_get_handler": ["session"],
    "_matches": ["topic", "a_filter"],
    "_stop_handler": ["handler"],
    "retain_message": ["source_session", "topic_name", "data", "qos"],
    "shutdown": [],
}


def test_amqtt_is_the_tested_release() -> None:
    """The overrides were written against amqtt 0.12 (pyproject pins <0.13)."""
    assert amqtt.__version__.startswith("0.12."), amqtt.__version__


@pytest.mark.parametrize("name", sorted(BROKER_METHODS))
def test_overridden_broker_methods_keep_their_shape(name: str) -> None:
    """Each Broker method we override or call still exists and takes what we pass."""
    method = getattr(Broker, name, None)
    assert method is not None, f"amqtt Broker.{name} is gone"
    params = list(inspect.signature(method).parameters)[1:]
    for wanted in BROKER_METHODS[name]:
        assert wanted in params, (name, params)


def test_handler_session_and_adapters_keep_what_we_use() -> None:
    """The protocol handler, session and adapters still have what the broker uses."""
    for name in (
        "init_from_connect",
        "attach",
        "detach",
        "start",
        "stop",
        "handle_publish",
        "mqtt_connack_authorize",
        "mqtt_publish",
        "handle_connection_closed",
    ):
        assert hasattr(BrokerProtocolHandler, name), name
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
        "retained_messages",
        "delivered_message_queue",
        "transitions",
        "last_disconnect_time",
    ):
        assert hasattr(session, name), name
    assert session.transitions.state == "new"
    for cls in (StreamReaderAdapter, StreamWriterAdapter, WebSocketsReader):
        assert hasattr(cls, "read") or hasattr(cls, "write"), cls
