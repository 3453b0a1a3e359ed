"""hexa.client: a small typed asyncio client for integrators of a Hexa hub.

Connect with an integration token, iterate the organization's device states, input
events and relay results as frozen dataclasses, and switch relays by publishing intents
and awaiting their results::

    async with HexaClient("hub.local", token_name="my-script", token=TOKEN) as hub:
        result = await hub.set_relay("hx-7f3a9c21", 0, True)
        async for message in hub.messages():
            print(message)

It depends on aiomqtt (>= 2.5, < 3: MQTT 3.1.1, which the hub's broker speaks) and the
standard library, and on nothing else of the hub: ``pip install 'hexa-hub[client]'``.
:func:`decode` turns a topic and payload into a message for those who bring their own
MQTT client. The topics and payloads are those of the hub's protocol reference.
"""

from hexa.client.codec import decode
from hexa.client.errors import (
    AuthenticationError,
    ClientError,
    ConnectError,
    ConnectionLost,
    PayloadError,
    ResultTimeout,
)
from hexa.client.messages import (
    Availability,
    DeviceState,
    HubStatus,
    InputEvent,
    InputEventName,
    Message,
    RelayResult,
    RelayState,
    ResultStatus,
)
from hexa.client.session import RESULT_TIMEOUT_S, HexaClient

__all__ = [
    "RESULT_TIMEOUT_S",
    "AuthenticationError",
    "Availability",
    "ClientError",
    "ConnectError",
    "ConnectionLost",
    "DeviceState",
    "HexaClient",
    "HubStatus",
    "InputEvent",
    "InputEventName",
    "Message",
    "PayloadError",
    "RelayResult",
    "RelayState",
    "ResultStatus",
    "ResultTimeout",
    "decode",
]
