"""Logging set-up: one format, quiet libraries, and no secrets in any line."""

from __future__ import annotations

import logging
import re
import sys

_SECRET_QUERY = re.compile(r"((?:token|password|key)=)[^&\s\"']+", re.IGNORECASE)


class RedactSecrets(logging.Filter):
    """Blanks ``token=``/``password=``/``key=`` values, e.g. in WebSocket URLs that
    uvicorn logs when it accepts a connection."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _SECRET_QUERY.sub(r"\1***", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: longest message written; the rest is cut (a 64 KB MQTT username is not a log line)
MAX_MESSAGE = 2000


def printable(text: object, limit: int = 200) -> str:
    """A client-supplied string fit for one log line: control characters escaped,
    cut after ``limit`` characters."""
    s = str(text)
    if len(s) > limit:
        s = f"{s[:limit]}...(+{len(s) - limit} chars)"
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", s)


class OneLine(logging.Filter):
    """Every record one line: no newline smuggled in through a topic, client id or
    user name forges another entry, and no message floods the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = printable(message, MAX_MESSAGE)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class PeerFaults(logging.Filter):
    """uvicorn logs a WebSocket text frame that is not UTF-8 as an exception, traceback and
    all, though the fault is the peer's and the socket is closed with 1007 (invalid payload):
    keep one warning line, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UnicodeDecodeError):
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def configure(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(RedactSecrets())
    handler.addFilter(OneLine())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    floor = max(logging.WARNING, logging.getLevelName(level))
    for noisy in ("amqtt", "transitions", "tortoise", "aiosqlite", "asyncio", "httpx"):
        logging.getLogger(noisy).setLevel(floor)
    # uvicorn installs its own handlers; route its records through ours.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("uvicorn.error").filters[:] = [PeerFaults()]
