"""HomeKit settings of organizations: where the REST API and the HomeKit bridge meet.

The API may not import ``bridges`` (architecture.md), and the bridge serves many
organizations from one hub process, so the per-organization state lives here, in the
database, and the two talk through the hub's typed events: the API stores a change and
publishes :class:`HomeKitChanged`; the bridge (``hexa.bridges.homekit``) applies it — starts,
stops or moves an organization's HAP server, forgets its controllers — and answers on the
event's ``reply``. So the API needs no handle on the bridge, a hub process without the
bridge still stores settings (the bridge applies them when it starts), and what the API
answers (the port chosen, whether anyone is paired) is read back from the database, the
one place that survives restarts and backups.

The HAP state holds the bridge's long-term private key (whoever has it can pose as the
bridge to every paired controller), so it is stored sealed (:mod:`hexa.hub.sealing`,
with the hub's secret, bound to its organization) as ``{"sealed": "v1:…"}``. A state an
older hub stored in clear is still read, and sealed when the hub starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import string
import uuid
from dataclasses import dataclass, field
from typing import Any

from tortoise.exceptions import IntegrityError

from hexa.hub.errors import Conflict, HubError
from hexa.hub.events import Event, Events
from hexa.hub.sealing import Sealer
from hexa.models import HomeKitAccessory, HomeKitBridge

#: devices one bridge serves: HAP allows 150 accessories per bridge, the bridge included
MAX_DEVICES = 149
#: the HAP accessory category of a bridge (HAP specification, table 12-3)
CATEGORY_BRIDGE = 2
#: setup codes HAP forbids (HAP specification, 4.2.1.1)
_TRIVIAL_CODES = frozenset(
    {f"{d}" * 8 for d in "0123456789"} | {"12345678", "87654321"},
)
_SETUP_ID_ALPHABET = string.digits + string.ascii_uppercase
#: the key under which a stored HAP state keeps its sealed form
_SEALED = "sealed"


def _pending_reply() -> asyncio.Future[None]:
    return asyncio.get_running_loop().create_future()


@dataclass(frozen=True, slots=True)
class HomeKitChanged(Event):
    """An organization's HomeKit settings changed (enabled, disabled, port, or its
    controllers forgotten): the bridge applies the stored settings and resolves ``reply``
    with None, or with the :class:`HubError` that stopped it (a port that is taken)."""

    org_id: uuid.UUID
    forget_pairings: bool = False
    reply: asyncio.Future[None] = field(default_factory=_pending_reply)


@dataclass(frozen=True, slots=True)
class HomeKitView:
    """What ``GET /orgs/{id}/homekit`` answers."""

    enabled: bool
    port: int | None
    hap_id: str | None
    setup_code: str | None
    setup_uri: str | None
    paired: bool
    accessories: int


def new_setup_code() -> str:
    """A random setup code ``XXX-XX-XXX`` that HAP accepts (not a trivial one)."""
    while True:
        digits = f"{secrets.randbelow(10**8):08d}"
        if digits not in _TRIVIAL_CODES:
            return f"{digits[:3]}-{digits[3:5]}-{digits[5:]}"


def new_setup_id() -> str:
    """Four characters (0-9, A-Z) that end the setup URI and tell bridges apart."""
    return "".join(secrets.choice(_SETUP_ID_ALPHABET) for _ in range(4))


def new_hap_id() -> str:
    """A random accessory id, shaped like a MAC address (``AA:BB:CC:DD:EE:FF``)."""
    return ":".join(f"{b:02X}" for b in secrets.token_bytes(6))


def _base36(value: int) -> str:
    digits = ""
    while value:
        value, rest = divmod(value, 36)
        digits = _SETUP_ID_ALPHABET[rest] + digits
    return digits or "0"


def setup_uri(setup_code: str, setup_id: str, category: int = CATEGORY_BRIDGE) -> str:
    """The ``X-HM://`` setup payload a QR code carries (HAP specification, 4.2.1.2):
    version 0, the category, the "IP" flag and the setup code in 45 bits, in base 36 and
    padded to 9 characters, followed by the setup id."""
    payload = (category & 0xFF) << 31 | (2 & 0xF) << 27 | int(setup_code.replace("-", ""))
    return "X-HM://" + _base36(payload).rjust(9, "0") + setup_id


@functools.cache
def _sealer(secret: str) -> Sealer:
    return Sealer(secret, b"hexa homekit state v1")


def seal_state(secret: str, org_id: uuid.UUID, state: dict[str, Any]) -> dict[str, Any]:
    """What to store for the organization's HAP ``state``: sealed, bound to the org."""
    return {_SEALED: _sealer(secret).seal(state, org_id.bytes)}


def is_sealed(stored: dict[str, Any] | None) -> bool:
    return stored is not None and isinstance(stored.get(_SEALED), str)


def open_state(
    secret: str, org_id: uuid.UUID, stored: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The HAP state of a stored row (None before the bridge first ran; one an older hub
    stored in clear as it is). Raises :class:`Conflict` when it was sealed with another
    secret: starting with fresh keys would silently cut off every paired controller."""
    if stored is None or not is_sealed(stored):
        return stored
    state = _sealer(secret).open(stored[_SEALED], org_id.bytes)
    if state is None:
        raise Conflict(
            "the HomeKit keys of this organization were stored with another hub secret "
            "(HEXA_JWT_SECRET or secrets.json): restore that secret, or forget the "
            "pairings to give the bridge new keys",
            details={"reason": "homekit_state_unreadable"},
        )
    return state


def paired_in(secret: str, org_id: uuid.UUID, stored: dict[str, Any] | None) -> bool:
    """Whether a stored HAP state holds at least one paired controller (not when it
    cannot be opened: no controller can reach that bridge)."""
    try:
        state = open_state(secret, org_id, stored)
    except Conflict:
        return False
    return bool((state or {}).get("paired_clients"))


async def seal_stored_states(secret: str) -> int:
    """Seal the HAP states an older hub stored in clear; how many there were."""
    sealed = 0
    for row in await HomeKitBridge.filter(hap_state__isnull=False):
        if row.hap_state is not None and not is_sealed(row.hap_state):
            row.hap_state = seal_state(secret, row.org_id, row.hap_state)
            await row.save(update_fields=["hap_state", "updated_at"])
            sealed += 1
    return sealed


async def view(secret: str, org_id: uuid.UUID) -> HomeKitView:
    """The organization's HomeKit settings and status, as stored."""
    row = await HomeKitBridge.get_or_none(org_id=org_id)
    if row is None:
        return HomeKitView(False, None, None, None, None, False, 0)
    return HomeKitView(
        enabled=row.enabled,
        port=row.port,
        hap_id=row.hap_id,
        setup_code=row.setup_code,
        setup_uri=setup_uri(row.setup_code, row.setup_id),
        paired=paired_in(secret, org_id, row.hap_state),
        accessories=await HomeKitAccessory.filter(bridge_id=row.id).count() if row.enabled else 0,
    )


async def configure(
    events: Events, secret: str, org_id: uuid.UUID, *, enabled: bool, port: int | None
) -> HomeKitView:
    """Enable or disable the organization's bridge (``port``: None keeps the one asked for
    before, 0 asks for any free one) and have the bridge apply it. The first enabling
    gives the bridge its identity: accessory id and setup code."""
    row = await HomeKitBridge.get_or_none(org_id=org_id)
    if row is None:
        if not enabled:
            return await view(secret, org_id)
        try:
            row = await HomeKitBridge.create(
                org_id=org_id,
                hap_id=new_hap_id(),
                setup_code=new_setup_code(),
                setup_id=new_setup_id(),
            )
        except IntegrityError:  # a concurrent first PUT made it: use that one
            row = await HomeKitBridge.get(org_id=org_id)
    before = (row.enabled, row.requested_port, row.port)
    row.enabled = enabled
    if port is not None:
        row.requested_port = port
        if port:
            row.port = port
    await row.save(update_fields=["enabled", "requested_port", "port", "updated_at"])
    try:
        await _ask_bridge(events, HomeKitChanged(org_id))
    except HubError:
        # refused (a port that is taken): nothing changes, the bridge as it was runs on
        row.enabled, row.requested_port, row.port = before
        await row.save(update_fields=["enabled", "requested_port", "port", "updated_at"])
        with contextlib.suppress(HubError):
            await _ask_bridge(events, HomeKitChanged(org_id))
        raise
    return await view(secret, org_id)


async def forget_pairings(events: Events, secret: str, org_id: uuid.UUID) -> HomeKitView:
    """Forget every controller paired with the organization's bridge: they lose access at
    once and the bridge can be paired again with its setup code. A state sealed with
    another secret is dropped whole: the bridge starts again with new keys."""
    if not await _ask_bridge(events, HomeKitChanged(org_id, forget_pairings=True)):
        # no bridge runs in this process: forget them in the stored state
        row = await HomeKitBridge.get_or_none(org_id=org_id)
        if row is not None and row.hap_state is not None:
            try:
                state = open_state(secret, org_id, row.hap_state)
            except Conflict:
                state = None
            if state is not None:
                for key in ("paired_clients", "client_properties", "client_uuid_to_bytes"):
                    state[key] = {}
            row.hap_state = None if state is None else seal_state(secret, org_id, state)
            await row.save(update_fields=["hap_state", "updated_at"])
            with contextlib.suppress(HubError):  # a bridge its old keys kept stopped starts
                await _ask_bridge(events, HomeKitChanged(org_id))
    return await view(secret, org_id)


async def _ask_bridge(events: Events, change: HomeKitChanged) -> bool:
    """Publish ``change``; True once a bridge applied it, raising what stopped it."""
    await events.publish(change)
    if not change.reply.done():
        change.reply.cancel()
        return False
    error = change.reply.exception()
    if error is not None:
        if isinstance(error, HubError):
            raise error
        raise HubError("the HomeKit bridge failed to apply the change") from error
    return True
