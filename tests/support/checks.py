"""Waiting with a deadline, and the checks every API answer must pass."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

NEGATIVE_WAIT_S = 0.5  # bounded wait used only to assert that something does NOT arrive or happen


def wait_until(pred: Callable[[], Any], timeout: float = 5.0, step: float = 0.02) -> Any:
    """The first truthy value of ``pred()`` within ``timeout`` seconds, else its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    return pred()


def error_shape_ok(body: dict[str, Any]) -> bool:
    """The body has every field of the error schema."""
    return {"code", "message", "details", "request_id"} <= set(body)


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """Assert ``r`` is an error answer of ``status`` (and ``code``, when given) in the error
    schema, tied to its request by X-Request-ID; return its body."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert error_shape_ok(body), body
    assert isinstance(body["code"], str) and body["code"]
    assert isinstance(body["message"], str) and body["message"]
    assert body["details"] is None or isinstance(body["details"], dict)
    if code is not None:
        assert body["code"] == code, body
    assert body["request_id"] and body["request_id"] == r.headers.get("x-request-id")
    return dict(body)


def ok(r: httpx.Response, status: int = 200) -> Any:
    """Assert ``r`` answered ``status``; return its JSON body (None when empty)."""
    assert r.status_code == status, r.text
    return r.json() if r.content else None
