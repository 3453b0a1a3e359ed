"""The JSON messages both WebSocket gateways accept: bounded in size and depth, objects only.

Parsing is orjson's (Rust, no Python recursion: stdlib ``json`` raises RecursionError on a
few thousand nested brackets). Our messages are flat; a document nested deeper than
:data:`MAX_DEPTH` is refused before anything re-encodes or validates it.
"""

from __future__ import annotations

from typing import Any

import orjson

#: the deepest nesting of objects and arrays a message may have (ours need 3)
MAX_DEPTH = 32


class BadMessage(ValueError):
    """A message the hub will not process; ``reason`` is what the peer is told."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode(data: str | bytes, *, max_bytes: int) -> dict[str, Any]:
    """One WebSocket message as a JSON object; raises :class:`BadMessage` saying why not."""
    size = len(data.encode("utf-8", "surrogatepass")) if isinstance(data, str) else len(data)
    if size > max_bytes:
        raise BadMessage(f"message larger than {max_bytes} bytes")
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:  # bad UTF-8, bad JSON, NaN, nesting > 1024
        raise BadMessage(f"not UTF-8 JSON ({exc.msg})") from None
    if not isinstance(doc, dict):
        raise BadMessage("expected a JSON object")
    if too_deep(doc, MAX_DEPTH):
        raise BadMessage(f"JSON nested deeper than {MAX_DEPTH} levels")
    return doc


def too_deep(doc: Any, limit: int) -> bool:
    """True when objects and arrays in ``doc`` nest more than ``limit`` levels (iterative)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False
