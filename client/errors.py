"""What can go wrong for an integrator, as one exception tree rooted at ClientError.

Callers handle these:

- ``AuthenticationError`` (a ``ConnectError``): the hub refused the token; retrying the
  same credentials will not help.
- ``ConnectError``: the hub could not be reached (address, port, TLS) or refused the
  connection for another reason; worth retrying with back-off.
- ``ConnectionLost``: an established connection ended (network, hub restart, the token
  was deleted); reconnect by entering the client again.
- ``ResultTimeout``: no result for an intent arrived in time; the relay may or may not
  have switched (the hub's own ``timeout`` result is a ``RelayResult``, not this).

``PayloadError`` is what :func:`hexa.client.decode` raises for a malformed payload; the
client's own message iterator logs and skips such messages instead of raising.
"""

from __future__ import annotations


class ClientError(Exception):
    """The root of every error raised by :mod:`hexa.client`."""


class ConnectError(ClientError):
    """The connection to the hub's broker could not be established."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        #: the CONNACK return code when the broker answered with a refusal, else None
        self.code = code


class AuthenticationError(ConnectError):
    """The broker refused the credentials (CONNACK 4 or 5): a wrong token name or token,
    or a token that was deleted."""


class ConnectionLost(ClientError):
    """The connection ended while the client was in use; reconnecting is the caller's
    choice (enter the client again)."""


class ResultTimeout(ClientError):
    """No result for an intent within the time the caller allowed.

    The intent may still be carried out: the hub answers every intent it receives, but an
    intent for a device outside the token's organization is dropped by the broker
    unanswered, and a slow device can take longer than the caller waits.
    """

    def __init__(self, uid: str, intent_id: str, timeout_s: float) -> None:
        super().__init__(f"no result for intent {intent_id} on {uid} within {timeout_s:g} s")
        self.uid = uid
        self.intent_id = intent_id
        self.timeout_s = timeout_s


class PayloadError(ClientError, ValueError):
    """A payload on a Hexa topic that does not have that topic's shape."""

    def __init__(self, topic: str, reason: str, payload: bytes) -> None:
        preview = payload[:64]
        more = "…" if len(payload) > len(preview) else ""
        super().__init__(f"malformed payload on {topic}: {reason} (payload {preview!r}{more})")
        self.topic = topic
        self.reason = reason
        self.payload = payload
