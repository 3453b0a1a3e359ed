"""HAP-python, adapted to run inside the hub's event loop and task tree.

HAP-python's ``AccessoryDriver`` is built to own a process: it persists its state to a
file from executor threads, registers mDNS with its own zeroconf, starts accessory
tasks and answers a controller's write with whatever a synchronous setter did. Here:

- **no threads, no file**: the driver's state (keys, pairings, configuration number) is
  loaded from and saved to the database by its owner (``on_change`` marks it dirty; a
  supervised task writes it), and the readvertising after a pairing, which HAP-python
  runs in an executor, runs on the loop;
- **no tasks of its own**: ``async_start``/``async_stop`` only open and close the HAP
  server on a socket the owner bound (so port 0 works and a taken port is one clear
  error); mDNS is the owner's, so that a network without multicast never stops a bridge;
- **pair-setup that works every time**: HAP-python's SRP exchange drops leading zero
  bytes that controllers keep, refusing the right setup code about once in 85 tries;
  :class:`PairSetupSrp` pads as HAP requires;
- **writes answered after the fact**: a controller's ``PUT /characteristics`` on a relay
  is handed to the owner (``on_write``, a bounded queue drained by a supervised task), and
  its HTTP answer waits for the relay service's result; the HAP status says what
  happened (-70402 for an offline device, -70409 for a device no longer bridged); a
  timed write runs only with a ``pid`` its connection prepared and that has not expired.

Everything that reaches into HAP-python's internals is in this module; the tests pin
the behaviour (pairing, writes, events, restarts) against a real controller.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from pyhap.accessory import Accessory, Bridge
from pyhap.accessory_driver import AccessoryDriver, AccessoryMDNSServiceInfo
from pyhap.characteristic import Characteristic
from pyhap.const import CATEGORY_SWITCH, HAP_SERVER_STATUS, STANDALONE_AID
from pyhap.encoder import AccessoryEncoder
from pyhap.hap_handler import HAPResponse, HAPServerHandler
from pyhap.hap_protocol import HAPServerProtocol
from pyhap.hap_server import HAPServer
from pyhap.hsrp import Server as SrpServer
from pyhap.params import get_srp_context
from pyhap.util import from_hap_json, to_hap_json

log = logging.getLogger(__name__)

#: HAP status codes (HAP specification, table 6-11) the bridge answers writes with
SUCCESS = HAP_SERVER_STATUS.SUCCESS
COMMUNICATION_FAILURE = HAP_SERVER_STATUS.SERVICE_COMMUNICATION_FAILURE
RESOURCE_BUSY = HAP_SERVER_STATUS.RESOURCE_BUSY
TIMED_OUT = HAP_SERVER_STATUS.OPERATION_TIMED_OUT
NO_SUCH_RESOURCE = HAP_SERVER_STATUS.RESOURCE_DOES_NOT_EXIST
INVALID_VALUE = HAP_SERVER_STATUS.INVALID_VALUE_IN_REQUEST
#: HAP strings are at most 64 characters by default (HAP specification, 6.7.1)
MAX_NAME = 64


def hap_name(name: str, fallback: str) -> str:
    """A name HomeKit shows: printable, trimmed, at most 64 characters."""
    cleaned = "".join(c for c in name if c.isprintable()).strip()[:MAX_NAME].strip()
    return cleaned or fallback[:MAX_NAME]


class DeviceAccessory(Accessory):  # type: ignore[misc]  # HAP-python ships no types
    """One claimed device: its information and one ``Switch`` service per relay."""

    category = CATEGORY_SWITCH

    def __init__(
        self,
        driver: HubDriver,
        *,
        aid: int,
        uid: str,
        name: str,
        model: str,
        fw_version: str | None,
        relay_names: list[str],
        relays: list[bool],
        online: bool,
    ) -> None:
        super().__init__(driver, name, aid=aid)
        self.uid = uid
        self.online = online
        self.set_info_service(
            firmware_revision=fw_version or "0.0.0",
            manufacturer="Hexa",
            model=model,
            serial_number=uid,
        )
        self.relay_chars: list[Characteristic] = []
        for index, (relay_name, state) in enumerate(zip(relay_names, relays, strict=True)):
            service = self.add_preload_service("Switch", chars=["Name"], unique_id=index)
            service.configure_char("Name", value=relay_name)
            self.relay_chars.append(service.configure_char("On", value=state))

    @property
    def available(self) -> bool:
        """Reads of an offline device answer -70402, which Home shows as "No Response"."""
        return self.online

    def relay_of(self, char: Characteristic) -> int | None:
        """The relay index ``char`` switches, or None for another characteristic."""
        for index, candidate in enumerate(self.relay_chars):
            if candidate is char:
                return index
        return None


@dataclass
class RelayWrite:
    """One characteristic of a controller's write: a relay to switch, or a status the
    bridge already knows (``status`` set)."""

    aid: int
    iid: int
    accessory: DeviceAccessory | None = None
    index: int = 0
    value: bool = False
    status: int | None = None


@dataclass
class WriteRequest:
    """A controller's ``PUT /characteristics`` with relays to switch; ``reply`` gets the
    HAP answer body (None: every write succeeded)."""

    writes: list[RelayWrite]
    #: the controller's pairing id, for the audit log
    controller: str | None
    reply: asyncio.Future[dict[str, Any] | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def answer(self) -> None:
        """Resolve ``reply`` from the statuses of the writes (unless the controller left)."""
        if self.reply.done():
            return
        self.reply.set_result(answer_of(self.writes))


def answer_of(writes: list[RelayWrite]) -> dict[str, Any] | None:
    """The body of a write's answer: None (204) when everything succeeded, else each
    characteristic's status (207)."""
    if all(w.status == SUCCESS for w in writes):
        return None
    return {
        "characteristics": [
            {"aid": w.aid, "iid": w.iid, "status": w.status if w.status is not None else SUCCESS}
            for w in writes
        ]
    }


class _SessionKey(int):
    """An SRP session key that keeps all 64 bytes through HAP-python's ``long_to_bytes``
    (which drops leading zero bytes of an int, but asks the int for its length)."""

    def bit_length(self) -> int:
        return 512


class PairSetupSrp(SrpServer):  # type: ignore[misc]  # HAP-python ships no types
    """HAP-python's SRP-6a server with the padding HAP uses, as iOS and aiohomekit do.

    HAP-python hashes the premaster secret S without padding it to the length of N,
    keeps the session key K as an int and sends B as an int's bytes; whenever S, K or B
    starts with a zero byte (about one exchange in 85) the proofs differ and a controller
    with the right setup code is refused. Here S is padded, K keeps its 64 bytes, and b
    is drawn again until B fills all 384 bytes."""

    B: int
    S: int
    N_len: int

    def __init__(self, ctx: dict[str, Any], username: bytes, password: bytes) -> None:
        super().__init__(ctx, username, password)
        while self.B.bit_length() <= self.N_len - 8:
            self.b = int.from_bytes(os.urandom(ctx["secret_len"]), "big")
            self.B = self._derive_B()
        self.Bb = self.B.to_bytes(self.N_len // 8, "big")

    def set_A(self, bytes_A: bytes) -> None:
        super().set_A(bytes_A)
        self.Sb = self.S.to_bytes(self.N_len // 8, "big")
        self.Kb = self._digest(self.Sb)
        self.K = _SessionKey(int.from_bytes(self.Kb, "big"))
        self.M = self._get_M()
        self.HAMK = self._get_HAMK()


class _Handler(HAPServerHandler):  # type: ignore[misc]  # HAP-python ships no types
    """HAP-python's request handler, with writes answered when they are done."""

    accessory_handler: HubDriver

    def dispatch(self, request: Any, body: bytes | None = None) -> HAPResponse:
        response: HAPResponse = super().dispatch(request, body)
        if response.pairing_changed:
            # HAP-python readvertises from an executor thread once the answer is out; the
            # answer is written before the loop runs this, so readvertise on the loop
            response.pairing_changed = False
            asyncio.get_running_loop().call_soon(self.accessory_handler.async_update_advertisement)
        return response

    def handle_set_characteristics(self) -> None:
        if not self.is_encrypted:
            super().handle_set_characteristics()  # answers 401
            return
        assert self.request_body is not None
        query = from_hap_json(self.request_body)
        response: HAPResponse = self.response
        client = self.client_uuid
        outcome = self.accessory_handler.submit_write(
            query, self.client_address, None if client is None else str(client)
        )
        body: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def finish(done: asyncio.Future[dict[str, Any] | None]) -> None:
            if body.done():  # the controller went away (HAP-python cancelled the answer)
                return
            if done.cancelled() or done.exception() is not None:
                body.set_exception(RuntimeError("write failed"))
                return
            result = done.result()
            status = HTTPStatus.NO_CONTENT if result is None else HTTPStatus.MULTI_STATUS
            response.status_code, response.reason = status.value, status.phrase
            if result is None:
                body.set_result(b"")
                return
            response.headers.append(("Content-Type", self.JSON_RESPONSE_TYPE))
            body.set_result(to_hap_json(result))

        outcome.add_done_callback(finish)
        response.task = body


class _Protocol(HAPServerProtocol):  # type: ignore[misc]  # HAP-python ships no types
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.handler = _Handler(self.accessory_driver, self.peername)


class _Server(HAPServer):  # type: ignore[misc]  # HAP-python ships no types
    """HAP-python's server on a socket bound by the bridge."""

    def __init__(self, sock: socket.socket, driver: HubDriver) -> None:
        super().__init__(sock.getsockname()[:2], driver)
        self._sock = sock

    async def async_start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.server = await loop.create_server(
            lambda: _Protocol(loop, self.connections, self.accessory_handler), sock=self._sock
        )
        self.async_cleanup_connections()

    def close(self) -> None:
        """Stop serving: close the connections and the socket (started or not)."""
        if self.server is None:
            self._sock.close()
            return
        self.async_stop()


class HubDriver(AccessoryDriver):  # type: ignore[misc]  # HAP-python ships no types
    """An ``AccessoryDriver`` whose state lives in the database and whose work runs in
    the hub's tasks (see the module's docstring)."""

    def __init__(
        self,
        *,
        sock: socket.socket,
        addresses: list[str],
        hap_id: str,
        setup_code: str,
        setup_id: str,
        hap_state: dict[str, Any] | None,
        on_change: Callable[[], None],
        on_advertise: Callable[[], None],
        on_write: Callable[[WriteRequest], bool],
        on_pairing: Callable[[str, bool], None],
    ) -> None:
        port = sock.getsockname()[1]
        super().__init__(
            loop=asyncio.get_running_loop(),
            address=addresses[0],
            advertised_address=addresses,
            port=port,
            mac=hap_id,
            pincode=setup_code.encode(),
            advertise=False,
        )
        # events to controllers are sent at once from the loop's thread, which is not the
        # main thread when a hub runs embedded (tests)
        self.tid = threading.current_thread()
        self.state.setup_id = setup_id
        if hap_state is not None:
            AccessoryEncoder.load_into(io.StringIO(json.dumps(hap_state)), self.state)
        self.state.mac = hap_id
        self.http_server = _Server(sock, self)
        self._on_change = on_change
        self._on_advertise = on_advertise
        self._on_write = on_write
        self._on_pairing = on_pairing

    @property
    def port(self) -> int:
        return int(self.state.port)

    @property
    def bridge(self) -> Bridge:
        assert isinstance(self.accessory, Bridge)
        return self.accessory

    def setup_srp_verifier(self) -> None:
        """A new SRP exchange for pair-setup, padded as HAP requires (see :class:`PairSetupSrp`)."""
        context = get_srp_context(3072, hashlib.sha512, 16)
        self._srp_verifier = PairSetupSrp(context, b"Pair-Setup", self.state.pincode)

    def add_accessory(self, accessory: Accessory) -> None:
        """Take the bridge (AID 1); its state was loaded from the database already."""
        accessory.aid = STANDALONE_AID
        self.accessory = accessory

    def snapshot(self) -> dict[str, Any]:
        """The state to store: what HAP-python would write to its file."""
        buffer = io.StringIO()
        AccessoryEncoder.persist(buffer, self.state)
        return dict(json.loads(buffer.getvalue()))

    # --- persistence and advertising: handed to the owner ---------------------------
    def persist(self) -> None:
        self._on_change()

    def async_persist(self) -> None:
        self._on_change()

    def load(self) -> None:
        """Never from a file: the owner loads the state from the database."""

    def async_update_advertisement(self) -> None:
        self._on_advertise()

    # --- lifecycle: the HAP server only -------------------------------------------------
    async def async_start(self) -> None:
        self.aio_stop_event = asyncio.Event()
        await self.http_server.async_start(self.loop)
        self.refresh()

    async def async_stop(self) -> None:
        self.stop_event.set()
        if self.aio_stop_event is not None:
            self.aio_stop_event.set()
        self.http_server.close()

    def refresh(self) -> bool:
        """After accessories changed: bump the configuration number if what controllers
        see changed (they then fetch the accessories again), save, readvertise."""
        if not self.state.set_accessories_hash(self.accessories_hash):
            return False
        self._on_change()
        self._on_advertise()
        return True

    def pair(
        self, client_username_bytes: bytes, client_public: bytes, client_permissions: bytes
    ) -> bool:
        """A controller paired (pair-setup, or a paired admin adding another): the owner
        audits it, by the pairing id that its writes are audited with."""
        paired: bool = super().pair(client_username_bytes, client_public, client_permissions)
        if paired:
            self._on_pairing(str(uuid.UUID(client_username_bytes.decode())), True)
        return paired

    def unpair(self, client_uuid: uuid.UUID) -> None:
        """A paired admin removed a controller (itself, when a home removes the bridge)."""
        super().unpair(client_uuid)
        self._on_pairing(str(client_uuid), False)

    def forget_pairings(self) -> None:
        """Forget every paired controller and end their sessions."""
        for key in list(self.state.paired_clients):
            if key in self.state.paired_clients:  # the last admin takes the others along
                self.state.remove_paired_client(key)
        for protocol in list(self.http_server.connections.values()):
            protocol.close()
        self._on_change()
        self._on_advertise()

    def service_info(self) -> AccessoryMDNSServiceInfo:
        """The mDNS record of the bridge (``_hap._tcp``), as HAP-python builds it."""
        return AccessoryMDNSServiceInfo(self.accessory, self.state, self.zeroconf_server)

    # --- writes -------------------------------------------------------------------------
    def submit_write(
        self, query: dict[str, Any], client_addr: tuple[str, int], controller: str | None
    ) -> asyncio.Future[dict[str, Any] | None]:
        """Subscriptions (``ev``) at once; relay writes handed to the owner; the answer's
        body once every write is done."""
        queries: list[dict[str, Any]] = list(query.get("characteristics") or [])
        self._notify(queries, client_addr)
        if "pid" in query and not self._prepared(query["pid"], client_addr):
            writes = [_invalid(q) for q in queries if "value" in q]  # unknown or expired
        else:
            writes = [self._write_of(q, client_addr) for q in queries if "value" in q]
        request = WriteRequest(writes, controller)
        if all(w.status is not None for w in writes):
            request.answer()
        elif not self._on_write(request):
            for w in writes:
                if w.status is None:
                    w.status = RESOURCE_BUSY
            request.answer()
        return request.reply

    def _prepared(self, pid: Any, client_addr: tuple[str, int]) -> bool:
        """Whether a timed write's ``pid`` was prepared by this connection (``/prepare``,
        which HAP-python handles) and has not expired; either way it is used up."""
        expires = self.prepared_writes.get(client_addr, {}).pop(pid, None)
        return expires is not None and time.time() <= expires

    def _write_of(self, query: dict[str, Any], client_addr: tuple[str, int]) -> RelayWrite:
        aid, iid, value = query.get("aid"), query.get("iid"), query.get("value")
        if not isinstance(aid, int) or not isinstance(iid, int):
            return _invalid(query)
        accessory = self.bridge if aid == STANDALONE_AID else self.bridge.accessories.get(aid)
        char = None if accessory is None else accessory.get_characteristic(aid, iid)
        if char is None:
            return RelayWrite(aid, iid, status=NO_SUCH_RESOURCE)
        index = accessory.relay_of(char) if isinstance(accessory, DeviceAccessory) else None
        if index is None:  # Identify and the like: HAP-python's own handling
            try:
                char.client_update_value(value, client_addr)
            except Exception:  # HAP-python's setters raise anything; the answer says so
                log.warning("HomeKit write to %s.%s failed", aid, iid, exc_info=True)
                return RelayWrite(aid, iid, status=COMMUNICATION_FAILURE)
            return RelayWrite(aid, iid, status=SUCCESS)
        if not isinstance(value, bool | int) or value not in (0, 1):
            return RelayWrite(aid, iid, status=INVALID_VALUE)
        return RelayWrite(aid, iid, accessory=accessory, index=index, value=bool(value))


def _invalid(query: dict[str, Any]) -> RelayWrite:
    """The answer -70410 (invalid value in request) for one characteristic of a write."""
    aid, iid = query.get("aid"), query.get("iid")
    if isinstance(aid, int) and isinstance(iid, int):
        return RelayWrite(aid, iid, status=INVALID_VALUE)
    return RelayWrite(-1, -1, status=INVALID_VALUE)
