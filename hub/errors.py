"""The hub's error root. Subclasses carry data; ``api/errors.py`` maps them to HTTP."""

from __future__ import annotations

from typing import Any

# --- errors callers must handle -------------------------------------------------------


class HubError(Exception):
    """Root of every error the hub raises on purpose."""

    code = "hub_error"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class ValidationFailed(HubError):
    """The request is well-formed but a value is not acceptable."""

    code = "validation_error"


class Unauthorized(HubError):
    """Missing, expired or invalid credentials."""

    code = "unauthorized"


class CredentialExpired(Unauthorized):
    """Credentials the hub issued, valid in every way but their age (an access token past
    its expiry). Told apart because a client refreshes these instead of asking the person
    to log in again: Alexa, for one, reacts to the two differently."""


class Forbidden(HubError):
    """Authenticated, but the role does not allow this."""

    code = "forbidden"


class NotFound(HubError):
    """No such object, or not one the caller may see (another tenant's object)."""

    code = "not_found"

    def __init__(self, kind: str, ident: object = None) -> None:
        super().__init__(f"{kind} not found", details={"kind": kind})
        self.kind, self.ident = kind, ident


class Conflict(HubError):
    """The object's current state does not allow this (already claimed, duplicate...)."""

    code = "conflict"


class RateLimited(HubError):
    """Too many attempts; retry after ``retry_after_s``."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, details={"retry_after_s": retry_after_s})
        self.retry_after_s = retry_after_s


class DeviceOffline(HubError):
    """The device is known to be offline; no command was sent."""

    code = "device_offline"

    def __init__(self, device_uid: str) -> None:
        super().__init__(f"device {device_uid} is offline", details={"device_uid": device_uid})
        self.device_uid = device_uid


class DeviceTimeout(HubError):
    """The device did not acknowledge the command within the command timeout."""

    code = "device_timeout"

    def __init__(self, device_uid: str, command_id: str | None, timeout_ms: int) -> None:
        super().__init__(
            f"device {device_uid} did not acknowledge within {timeout_ms} ms",
            details={"device_uid": device_uid, "command_id": command_id, "timeout_ms": timeout_ms},
        )
        self.device_uid, self.command_id = device_uid, command_id


class CommandRejected(HubError):
    """The device (or the relay service) refused the command."""

    code = "command_rejected"

    def __init__(self, device_uid: str, reason: str) -> None:
        super().__init__(f"command rejected: {reason}", details={"device_uid": device_uid})
        self.device_uid, self.reason = device_uid, reason


class BusUnavailable(HubError):
    """The message bus is not connected."""

    code = "bus_unavailable"
