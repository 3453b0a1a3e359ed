"""WebSocket clients for tests: a reader thread collects every JSON document a socket
receives; ``WsDevice`` simulates a hexa-mini-switch-v1 over /ws/device (contract §4)."""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from websockets.asyncio.client import connect as connect_async
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from support.accounts import User
from support.checks import wait_until
from support.devices import claimed_device
from support.hubs import RunningHub


def connect_ws(url: str) -> ClientConnection:
    """A WebSocket connection to ``url`` (no proxy, bounded handshake and close)."""
    return connect(url, open_timeout=10, close_timeout=5, proxy=None)


def wss_exchange(
    url: str, context: ssl.SSLContext, doc: dict[str, Any], timeout: float = 10
) -> dict[str, Any]:
    """Send ``doc`` over a new wss:// connection; the first JSON document answered.

    With websockets' asyncio client, never its sync one over TLS: the sync client reads in
    a thread of its own while the caller's thread writes, two threads on one OpenSSL
    connection, and its upgrade request was now and then lost (tests/test_unit_ws_clients.py).
    """

    async def exchange() -> dict[str, Any]:
        async with connect_async(
            url, ssl=context, proxy=None, open_timeout=timeout, close_timeout=5
        ) as ws:
            await ws.send(json.dumps(doc))
            answer: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
            return answer

    return asyncio.run(exchange())


class WsPeer:
    """A WebSocket connection with a reader thread collecting every JSON document."""

    def __init__(self, url: str) -> None:
        self.ws = connect_ws(url)
        self.docs: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.close_code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for raw in self.ws:
                try:
                    doc = json.loads(raw)
                except ValueError:
                    doc = {"type": "<not json>", "raw": raw}
                with self.lock:
                    self.docs.append(doc)
                self.on_doc(doc)
        except ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code
            self.closed.set()

    def on_doc(self, doc: dict[str, Any]) -> None:
        pass

    def send(self, doc: dict[str, Any] | str | bytes) -> None:
        self.ws.send(json.dumps(doc) if isinstance(doc, dict) else doc)

    def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 5
    ) -> dict[str, Any] | None:
        def find() -> dict[str, Any] | None:
            with self.lock:
                return next((d for d in self.docs if pred(d)), None)

        found: dict[str, Any] | None = wait_until(find, timeout)
        return found

    def result(self, request_id: str, timeout: float = 10) -> dict[str, Any] | None:
        """The command_result answering ``request_id``."""
        return self.wait_for(
            lambda d: d.get("type") == "command_result" and d.get("request_id") == request_id,
            timeout,
        )

    def count(self, kind: str) -> int:
        return len(self.of_type(kind))

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        """Every document received so far whose ``type`` is ``kind``."""
        return self.messages(lambda d: d.get("type") == kind)

    def messages(
        self, pred: Callable[[dict[str, Any]], bool] | None = None
    ) -> list[dict[str, Any]]:
        with self.lock:
            return [d for d in self.docs if pred is None or pred(d)]

    def close(self) -> None:
        self.ws.close()
        self.thread.join(10)


class WsDevice(WsPeer):
    """A simulated hexa-mini-switch-v1 over /ws/device (auto-acks relay commands)."""

    def __init__(self, hub: RunningHub, uid: str, token: str, *, auto_ack: bool = True) -> None:
        self.uid = uid
        self.relays = [False, False, False]
        self.auto_ack = auto_ack
        super().__init__(f"{hub.ws_base}/ws/device?{urlencode({'uid': uid, 'token': token})}")

    def on_doc(self, doc: dict[str, Any]) -> None:
        if not self.auto_ack or doc.get("type") not in ("set_relay", "set_all_relays"):
            return
        if doc["type"] == "set_relay":
            self.relays[doc["relay_index"]] = bool(doc["state"])
        else:
            self.relays = [bool(doc["state"])] * 3
        self.send(
            {"type": "ack", "command_id": doc["command_id"], "ok": True, "relays": self.relays}
        )


def client_url(hub: RunningHub, token: str) -> str:
    """The /ws/client address authenticated with ``token``."""
    return f"{hub.ws_base}/ws/client?{urlencode({'token': token})}"


def close_code_of(url: str) -> int | None:
    """Connect, and return the close code the server answers with (None: stayed open)."""
    ws = connect_ws(url)
    try:
        ws.recv(timeout=5)
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else None
    except TimeoutError:
        return None
    finally:
        ws.close()
    return ws.close_code


def ws_device(
    hub: RunningHub, user: User, track: Callable[[Any], Any], **kwargs: Any
) -> tuple[dict[str, Any], WsDevice]:
    """A claimed device connected over /ws/device and seen online."""
    p, dev = claimed_device(hub, user)
    d = track(WsDevice(hub, p["device_uid"], p["device_token"], **kwargs))
    with hub.api(user.access_token) as c:
        assert wait_until(lambda: c.get(f"/devices/{dev['id']}").json()["online"] is True, 5)
    return dev, d


def ws_client(hub: RunningHub, user: User, track: Callable[[Any], Any]) -> WsPeer:
    """A /ws/client connection of ``user``, registered by the hub (a ping was answered)."""
    client = track(WsPeer(client_url(hub, user.access_token)))
    client.send({"type": "ping"})
    assert client.wait_for(lambda d: d.get("type") == "pong", 5), "client socket not ready"
    return client
