"""The messages of the Alexa Smart Home Skill API (v3) that the hub sends back: event
headers, state properties, discovery endpoints and error responses.

Only the shapes live here (no database, no bus), so that each one can be checked field by
field against Amazon's published message schema. Rules that schema sets and that are easy
to miss: ``timeOfSample`` is UTC with at most three fractional digits and a ``Z``;
``messageId`` is letters, digits and dashes; an ``ErrorResponse`` carries no ``context``;
a ``Discover.Response`` carries no ``endpoint``; names are at most 128 characters; one
discovery answer lists at most 300 endpoints.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from hexa.hub import topics

PAYLOAD_VERSION: Final = "3"
#: what Alexa accepts in one Discover.Response
MAX_ENDPOINTS: Final = 300
#: friendlyName, description and manufacturerName are at most this long
MAX_NAME: Final = 128
MANUFACTURER: Final = "Hexa"

#: the error types the hub answers with (Alexa.ErrorResponse ``payload.type``)
ENDPOINT_UNREACHABLE: Final = "ENDPOINT_UNREACHABLE"
ENDPOINT_BUSY: Final = "ENDPOINT_BUSY"
NO_SUCH_ENDPOINT: Final = "NO_SUCH_ENDPOINT"
INVALID_AUTHORIZATION_CREDENTIAL: Final = "INVALID_AUTHORIZATION_CREDENTIAL"
EXPIRED_AUTHORIZATION_CREDENTIAL: Final = "EXPIRED_AUTHORIZATION_CREDENTIAL"
INSUFFICIENT_PERMISSIONS: Final = "INSUFFICIENT_PERMISSIONS"
INVALID_DIRECTIVE: Final = "INVALID_DIRECTIVE"
INTERNAL_ERROR: Final = "INTERNAL_ERROR"
#: the one error of Alexa.Authorization (AcceptGrant)
ACCEPT_GRANT_FAILED: Final = "ACCEPT_GRANT_FAILED"

_ENDPOINT_ID_RE = re.compile(r"^[a-zA-Z0-9_\-=#;:?@&]{1,256}$")
_PREFIX = "hexa_"


class AlexaError(Exception):
    """A directive the hub answers with an ErrorResponse (HTTP 200, as Alexa expects).

    ``namespace`` is ``Alexa`` for the generic errors and ``Alexa.Authorization`` for a
    failed AcceptGrant, whose error has a namespace of its own."""

    def __init__(self, type_: str, message: str, namespace: str = "Alexa") -> None:
        super().__init__(message)
        self.type = type_
        self.message = message
        self.namespace = namespace


def time_of_sample(at: datetime | None = None) -> str:
    """ISO-8601 in UTC with milliseconds and a ``Z``: the only form Amazon's schema takes
    (``datetime.isoformat`` would give ``+00:00`` and microseconds)."""
    at = (at or datetime.now(UTC)).astimezone(UTC)
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def endpoint_id(uid: str, index: int) -> str:
    """``hexa_<uid>_<n>``: one Alexa endpoint per relay, as in Home Assistant's unique_id."""
    return f"{_PREFIX}{uid}_{index}"


def parse_endpoint_id(value: object) -> tuple[str, int] | None:
    """(device uid, relay index) of an endpoint id this hub made, else None."""
    if not isinstance(value, str) or not value.startswith(_PREFIX):
        return None
    uid, _, index = value[len(_PREFIX) :].rpartition("_")
    if not topics.UID_RE.match(uid) or not index.isdigit() or len(index) > 3:
        return None
    return uid, int(index)


def echoable_endpoint_id(value: object) -> str | None:
    """The directive's endpoint id if it may be echoed in an answer (the schema's pattern)."""
    return value if isinstance(value, str) and _ENDPOINT_ID_RE.match(value) else None


def _header(namespace: str, name: str, correlation_token: str | None) -> dict[str, Any]:
    header: dict[str, Any] = {
        "namespace": namespace,
        "name": name,
        "payloadVersion": PAYLOAD_VERSION,
        "messageId": str(uuid.uuid4()),
    }
    if correlation_token:
        header["correlationToken"] = correlation_token
    return header


def event(
    namespace: str,
    name: str,
    *,
    correlation_token: str | None = None,
    endpoint: str | None = None,
    payload: dict[str, Any] | None = None,
    properties: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One message to Alexa: ``event`` (header, endpoint, payload) and, for state-bearing
    answers, ``context.properties``."""
    body: dict[str, Any] = {"header": _header(namespace, name, correlation_token)}
    if endpoint is not None:
        body["endpoint"] = {"endpointId": endpoint}
    body["payload"] = payload if payload is not None else {}
    message: dict[str, Any] = {"event": body}
    if properties is not None:
        message["context"] = {"properties": properties}
    return message


def error_response(
    error: AlexaError, *, correlation_token: str | None, endpoint: str | None
) -> dict[str, Any]:
    return event(
        error.namespace,
        "ErrorResponse",
        correlation_token=correlation_token,
        endpoint=endpoint,
        payload={"type": error.type, "message": error.message},
    )


def power_state(on: bool, at: datetime | None, uncertainty_ms: int) -> dict[str, Any]:
    return {
        "namespace": "Alexa.PowerController",
        "name": "powerState",
        "value": "ON" if on else "OFF",
        "timeOfSample": time_of_sample(at),
        "uncertaintyInMilliseconds": uncertainty_ms,
    }


def connectivity(reachable: bool, at: datetime | None = None) -> dict[str, Any]:
    return {
        "namespace": "Alexa.EndpointHealth",
        "name": "connectivity",
        "value": {"value": "OK" if reachable else "UNREACHABLE"},
        "timeOfSample": time_of_sample(at),
        "uncertaintyInMilliseconds": 0,
    }


def _clip(text: str) -> str:
    text = " ".join(text.split())  # Alexa speaks names: no newlines or runs of spaces
    return text if len(text) <= MAX_NAME else text[: MAX_NAME - 1].rstrip() + "…"


@dataclass(frozen=True)
class Relay:
    """What discovery says about one relay of a claimed device."""

    uid: str
    index: int
    model: str
    device_name: str | None
    relay_name: str | None
    fw_version: str | None


def friendly_name(relay: Relay) -> str:
    """The relay's own name; else the device's name (or uid) and the relay's number,
    counted from 1 as people count."""
    if relay.relay_name and relay.relay_name.strip():
        return _clip(relay.relay_name)
    return _clip(f"{(relay.device_name or '').strip() or relay.uid} relay {relay.index + 1}")


def _capability(interface: str, reported: str | None) -> dict[str, Any]:
    capability: dict[str, Any] = {"type": "AlexaInterface", "interface": interface, "version": "3"}
    if reported is not None:
        capability["properties"] = {
            "supported": [{"name": reported}],
            "proactivelyReported": True,
            "retrievable": True,
        }
    return capability


def discovery_endpoint(relay: Relay) -> dict[str, Any]:
    """One relay as a SWITCH endpoint with Alexa, PowerController and EndpointHealth."""
    attributes = {
        "manufacturer": MANUFACTURER,
        "model": relay.model,
        "serialNumber": relay.uid,
    }
    if relay.fw_version:
        attributes["firmwareVersion"] = relay.fw_version
    return {
        "endpointId": endpoint_id(relay.uid, relay.index),
        "manufacturerName": MANUFACTURER,
        "friendlyName": friendly_name(relay),
        "description": _clip(f"{MANUFACTURER} {relay.model} relay {relay.index + 1}"),
        "displayCategories": ["SWITCH"],
        "additionalAttributes": attributes,
        "capabilities": [
            _capability("Alexa", None),
            _capability("Alexa.PowerController", "powerState"),
            _capability("Alexa.EndpointHealth", "connectivity"),
        ],
    }
