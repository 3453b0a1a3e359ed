"""Secrets never reach the logs."""

from __future__ import annotations

import logging

from hexa.hub.logs import RedactSecrets


def _render(msg: str, *args: object) -> str:
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, msg, args, None)
    RedactSecrets().filter(record)
    return record.getMessage()


def test_websocket_tokens_are_redacted() -> None:
    """A WebSocket URL with a token in its query is logged with the token blanked."""
    line = _render(
        '%s - "WebSocket %s" [accepted]', "127.0.0.1:5", "/ws/client?token=eyJabc.def&x=1"
    )
    assert "eyJabc" not in line and "token=***&x=1" in line


def test_other_lines_are_untouched() -> None:
    """Lines without secrets keep their text and arguments."""
    assert _render("device %s online", "hx-1") == "device hx-1 online"


def test_password_and_key_parameters_are_redacted() -> None:
    """password= and key= values are blanked as well, case-insensitively."""
    line = _render("GET /x?Password=hunter2&provision_KEY=abc")
    assert "hunter2" not in line and "abc" not in line
