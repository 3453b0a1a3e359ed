"""The suite's WebSocket clients: none opens a TLS connection with websockets' sync client.

That client reads its socket in a thread of its own (blocked in ``SSL_read``) while the
caller's thread writes to it (``SSL_write``): two threads on one OpenSSL connection, which
OpenSSL does not allow and Python's ``ssl`` module does not serialize. Over TLS 1.3 the
server's session tickets arrive just after the handshake, while the client writes its
upgrade request: now and then the request never left the client (its socket had sent the
handshake's 597 bytes and nothing more), the hub waited for a request head and the client
for an answer, and the test failed with "timed out while waiting for handshake response"
(about 1 connection in 150; a hub sending no session tickets lost none in 1 500). A
wss:// exchange goes through ``support.ws.wss_exchange`` (websockets' asyncio client, one
thread) instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).parent
SYNC_CLIENT = "websockets.sync.client"


def _sync_connects(tree: ast.Module) -> set[str]:
    """The names a module binds to the sync client's ``connect``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == SYNC_CLIENT:
            names |= {a.asname or a.name for a in node.names if a.name == "connect"}
    return names


def _tls_sync_connects(source: str) -> list[int]:
    """Lines that call the sync client's ``connect`` with a TLS context (``ssl=``)."""
    tree = ast.parse(source)
    names = _sync_connects(tree)
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not any(k.arg == "ssl" for k in node.keywords):
            continue
        func = node.func
        if (isinstance(func, ast.Name) and func.id in names) or (
            isinstance(func, ast.Attribute)
            and func.attr == "connect"
            and ast.unparse(func.value).endswith(SYNC_CLIENT)
        ):
            lines.append(node.lineno)
    return lines


def test_the_check_finds_a_tls_sync_connect() -> None:
    imported = (
        "from websockets.sync.client import connect as open_ws\n"
        "open_ws('wss://h/ws', ssl=ctx)\n"
        "open_ws('ws://h/ws')\n"
    )
    assert _tls_sync_connects(imported) == [2]
    dotted = "import websockets.sync.client\nwebsockets.sync.client.connect('wss://h', ssl=c)\n"
    assert _tls_sync_connects(dotted) == [2]
    other = "from websockets.asyncio.client import connect\nconnect('wss://h', ssl=c)\n"
    assert _tls_sync_connects(other) == []


def test_no_test_opens_tls_with_the_sync_client() -> None:
    found = [
        f"{path.relative_to(TESTS)}:{line}"
        for path in sorted(TESTS.rglob("*.py"))
        for line in _tls_sync_connects(path.read_text())
    ]
    # a wss:// exchange goes through support.ws.wss_exchange
    assert found == [], f"wss:// with websockets' sync client: {found}"
