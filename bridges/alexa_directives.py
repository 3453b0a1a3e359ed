"""Alexa Smart Home directives in, Alexa events out (Smart Home Skill API v3, contract §6).

:class:`SmartHome` takes the body of a directive exactly as Alexa sends it to a skill and
returns the one message Alexa expects back:

- ``Alexa.Discovery``/``Discover`` → ``Discover.Response``: one SWITCH endpoint per relay
  of every device the token's memberships reach;
- ``Alexa.PowerController``/``TurnOn``, ``TurnOff`` → ``Alexa.Response``: a relay intent
  on the bus (source ``alexa``), answered after the relay service's result, with the new
  ``powerState`` and ``connectivity``;
- ``Alexa``/``ReportState`` → ``StateReport`` with the same two properties;
- ``Alexa.Authorization``/``AcceptGrant`` → ``AcceptGrant.Response``.

Anything else is an ``ErrorResponse``. Nothing here raises: a failure the hub did not
foresee is logged and answered ``INTERNAL_ERROR``, because Alexa reads an HTTP error as
the skill being down, not as an answer to the customer's request.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from hexa.bridges.alexa_auth import Account, authenticate
from hexa.bridges.alexa_messages import (
    ACCEPT_GRANT_FAILED,
    ENDPOINT_BUSY,
    ENDPOINT_UNREACHABLE,
    INSUFFICIENT_PERMISSIONS,
    INTERNAL_ERROR,
    INVALID_DIRECTIVE,
    MAX_ENDPOINTS,
    NO_SUCH_ENDPOINT,
    PAYLOAD_VERSION,
    AlexaError,
    Relay,
    connectivity,
    discovery_endpoint,
    echoable_endpoint_id,
    error_response,
    event,
    parse_endpoint_id,
    power_state,
)
from hexa.hub.access import require_role
from hexa.hub.commands import Origin, RelayAction
from hexa.hub.errors import (
    CommandRejected,
    DeviceOffline,
    DeviceTimeout,
    Forbidden,
    NotFound,
    RateLimited,
)
from hexa.models import Device, RelayState

if TYPE_CHECKING:
    from hexa.hub.runtime import Hub

log = logging.getLogger(__name__)

SOURCE = "alexa"


@dataclass(frozen=True)
class Directive:
    """The parts of a directive the hub reads."""

    namespace: str
    name: str
    correlation_token: str | None
    endpoint_id: str | None
    #: the bearer token of ``endpoint.scope``, ``payload.scope`` or ``payload.grantee``
    token: object
    payload: dict[str, Any]
    #: the HTTP request that carried it, recorded with the intent's audit entry
    request_id: str | None = None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _bearer(scope: object) -> object:
    """The token of a ``{"type": "BearerToken", "token": …}`` scope, else None."""
    if isinstance(scope, dict) and scope.get("type") == "BearerToken":
        return scope.get("token")
    return None


def parse(body: bytes) -> Directive:
    """The directive in ``body``; AlexaError(INVALID_DIRECTIVE) when it is none."""
    try:
        message = json.loads(body)
    except (ValueError, RecursionError):
        raise AlexaError(INVALID_DIRECTIVE, "the body is not JSON") from None
    directive = message.get("directive") if isinstance(message, dict) else None
    if not isinstance(directive, dict):
        raise AlexaError(INVALID_DIRECTIVE, "no directive object")
    header = directive.get("header")
    if not isinstance(header, dict):
        raise AlexaError(INVALID_DIRECTIVE, "the directive has no header")
    payload = directive.get("payload", {})
    endpoint = directive.get("endpoint")
    if not isinstance(payload, dict) or (endpoint is not None and not isinstance(endpoint, dict)):
        raise AlexaError(INVALID_DIRECTIVE, "payload and endpoint must be objects")
    namespace, name = _text(header.get("namespace")), _text(header.get("name"))
    if namespace is None or name is None or not _text(header.get("messageId")):
        raise AlexaError(INVALID_DIRECTIVE, "the header needs namespace, name and messageId")
    if header.get("payloadVersion") != PAYLOAD_VERSION:
        raise AlexaError(INVALID_DIRECTIVE, "only payloadVersion 3 is supported")
    endpoint = endpoint or {}
    if namespace == "Alexa.Authorization":
        token = _bearer(payload.get("grantee"))
    elif namespace == "Alexa.Discovery":
        token = _bearer(payload.get("scope"))
    else:
        token = _bearer(endpoint.get("scope"))
    return Directive(
        namespace=namespace,
        name=name,
        correlation_token=_text(header.get("correlationToken")),
        endpoint_id=_text(endpoint.get("endpointId")),
        token=token,
        payload=payload,
    )


def _salvage(body: bytes) -> tuple[str | None, str | None]:
    """The correlation token and endpoint id of a directive that did not parse, so that
    even its ErrorResponse can be matched to the request."""
    try:
        message = json.loads(body)
    except (ValueError, RecursionError):
        return None, None
    directive = message.get("directive") if isinstance(message, dict) else None
    if not isinstance(directive, dict):
        return None, None
    header, endpoint = directive.get("header"), directive.get("endpoint")
    token = _text(header.get("correlationToken")) if isinstance(header, dict) else None
    found = endpoint.get("endpointId") if isinstance(endpoint, dict) else None
    return token, echoable_endpoint_id(found)


@dataclass(frozen=True)
class _Endpoint:
    device: Device
    index: int
    endpoint_id: str


Handler = Callable[[Directive, Account], Awaitable[dict[str, Any]]]


class SmartHome:
    """Answers directives for one hub: reads devices from the database and switches
    relays through ``hub.commands``, like every other source of a relay change."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._handlers: dict[tuple[str, str], Handler] = {
            ("Alexa.Discovery", "Discover"): self._discover,
            ("Alexa.PowerController", "TurnOn"): self._power,
            ("Alexa.PowerController", "TurnOff"): self._power,
            ("Alexa", "ReportState"): self._report_state,
            ("Alexa.Authorization", "AcceptGrant"): self._accept_grant,
        }

    async def handle(self, body: bytes, *, request_id: str | None = None) -> dict[str, Any]:
        """The answer to one directive: its response, or an ErrorResponse."""
        directive: Directive | None = None
        try:
            directive = replace(parse(body), request_id=request_id)
            handler = self._handlers.get((directive.namespace, directive.name))
            if handler is None:
                raise AlexaError(
                    INVALID_DIRECTIVE,
                    f"{directive.namespace}.{directive.name} is not supported by this skill",
                )
            account = await self._authenticate(directive)
            return await handler(directive, account)
        except AlexaError as exc:
            error = exc
        except Exception:  # logged: Alexa must get an answer, never an HTTP error
            log.exception("Alexa directive failed (request %s)", request_id)
            error = AlexaError(INTERNAL_ERROR, "the hub could not handle the directive")
        if directive is None:
            correlation, endpoint = _salvage(body)
        else:
            correlation = directive.correlation_token
            endpoint = echoable_endpoint_id(directive.endpoint_id)
        return error_response(error, correlation_token=correlation, endpoint=endpoint)

    async def _authenticate(self, directive: Directive) -> Account:
        secret = self.hub.settings.jwt_secret
        assert secret is not None  # settings always resolve one
        try:
            return await authenticate(directive.token, secret)
        except AlexaError as exc:
            if directive.namespace == "Alexa.Authorization":
                raise AlexaError(ACCEPT_GRANT_FAILED, exc.message, "Alexa.Authorization") from None
            raise

    # --- the directives ------------------------------------------------------------------
    async def _discover(self, directive: Directive, account: Account) -> dict[str, Any]:
        if not account.roles:  # a user without memberships: nothing to ask the database
            return event("Alexa.Discovery", "Discover.Response", payload={"endpoints": []})
        devices = await Device.filter(
            org_id__in=list(account.roles), deleted_at=None, org__deleted_at__isnull=True
        ).order_by("created_at", "id")
        names: dict[tuple[uuid.UUID, int], str | None] = {
            (r.device_id, r.index): r.name
            for r in await RelayState.filter(device_id__in=[d.id for d in devices])
        }
        endpoints = [
            discovery_endpoint(
                Relay(
                    uid=d.device_uid,
                    index=i,
                    model=d.model,
                    device_name=d.name,
                    relay_name=names.get((d.id, i)),
                    fw_version=d.fw_version,
                )
            )
            for d in devices
            for i in range(d.relay_count)
        ]
        if len(endpoints) > MAX_ENDPOINTS:
            log.warning(
                "Alexa discovery: %d relays, only the first %d listed (Alexa's limit)",
                len(endpoints),
                MAX_ENDPOINTS,
            )
            endpoints = endpoints[:MAX_ENDPOINTS]
        return event("Alexa.Discovery", "Discover.Response", payload={"endpoints": endpoints})

    async def _power(self, directive: Directive, account: Account) -> dict[str, Any]:
        target = await self._endpoint(directive, account, "command_relays")
        device = target.device
        origin = Origin(
            SOURCE,
            actor_type=account.actor_type,
            actor_id=account.actor_id,
            request_id=directive.request_id,
        )
        action = RelayAction.of(target.index, directive.name == "TurnOn")
        # the relay service's outcomes, as REST sees them (hub.commands.execute), in
        # Alexa's words
        try:
            result = await self.hub.commands.execute(device.device_uid, action, origin)
        except (DeviceOffline, DeviceTimeout) as exc:
            raise AlexaError(ENDPOINT_UNREACHABLE, exc.message) from None
        except RateLimited as exc:  # the device said it is busy
            raise AlexaError(ENDPOINT_BUSY, exc.message) from None
        except CommandRejected as exc:
            raise AlexaError(INTERNAL_ERROR, exc.message) from None
        if result.relays is None or target.index >= len(result.relays):
            raise AlexaError(INTERNAL_ERROR, "the device acknowledged without that relay's state")
        return event(
            "Alexa",
            "Response",
            correlation_token=directive.correlation_token,
            endpoint=target.endpoint_id,
            properties=[
                power_state(result.relays[target.index], None, 0),
                connectivity(True),
            ],
        )

    async def _report_state(self, directive: Directive, account: Account) -> dict[str, Any]:
        """The last state the device reported or acknowledged. An offline device still
        gets a StateReport, with connectivity UNREACHABLE, as Alexa.EndpointHealth asks;
        its powerState is then as old as the device's last word."""
        target = await self._endpoint(directive, account, "read")
        device = target.device
        relay = await RelayState.get_or_none(device_id=device.id, index=target.index)
        on = bool(relay.state) if relay is not None else False
        sampled = relay.updated_at if relay is not None else device.updated_at
        uncertainty = 0 if device.online else _age_ms(device.last_seen_at or sampled)
        return event(
            "Alexa",
            "StateReport",
            correlation_token=directive.correlation_token,
            endpoint=target.endpoint_id,
            properties=[
                power_state(on, sampled, uncertainty),
                connectivity(bool(device.online)),
            ],
        )

    async def _accept_grant(self, directive: Directive, account: Account) -> dict[str, Any]:
        """The grant (an authorization code for Amazon's event gateway) is acknowledged so
        that account linking completes; the hub answers directives synchronously and
        sends no proactive reports, so it keeps no Amazon credential."""
        grant = directive.payload.get("grant")
        if not isinstance(grant, dict) or not _text(grant.get("code")):
            raise AlexaError(ACCEPT_GRANT_FAILED, "no grant code", "Alexa.Authorization")
        return event("Alexa.Authorization", "AcceptGrant.Response")

    async def _endpoint(self, directive: Directive, account: Account, action: str) -> _Endpoint:
        """The relay a directive targets, if the account reaches it and may ``action`` it.

        An endpoint of an organization the account is not in does not exist for it
        (NO_SUCH_ENDPOINT, as for REST's 404); a role too low for the action is
        INSUFFICIENT_PERMISSIONS."""
        if directive.endpoint_id is None:
            raise AlexaError(INVALID_DIRECTIVE, "the directive names no endpoint")
        parsed = parse_endpoint_id(directive.endpoint_id)
        device = None
        if parsed is not None:
            device = await Device.get_or_none(
                device_uid=parsed[0], deleted_at=None, org__deleted_at__isnull=True
            )
        if parsed is None or device is None or parsed[1] >= device.relay_count:
            raise AlexaError(NO_SUCH_ENDPOINT, "no such endpoint")
        try:  # tenancy and roles exactly as for REST: another org's device does not exist
            require_role(account.role_in(device.org_id), action, "endpoint")
        except NotFound:
            raise AlexaError(NO_SUCH_ENDPOINT, "no such endpoint") from None
        except Forbidden as exc:
            raise AlexaError(INSUFFICIENT_PERMISSIONS, exc.message) from None
        return _Endpoint(device, parsed[1], directive.endpoint_id)


def _age_ms(at: datetime | None) -> int:
    if at is None:
        return 0
    return max(0, int((datetime.now(UTC) - at).total_seconds() * 1000))
