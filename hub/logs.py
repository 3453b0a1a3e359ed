"""Logging set-up: one format, quiet libraries, and no secrets in any line."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

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


class JsonLines(logging.Formatter):
    """``HEXA_LOG_FORMAT=json``: one JSON object per line (``ts``, ``level``, ``logger``,
    ``message``, and the ``fields`` a record carries, e.g. every field of an access line;
    ``exc`` with a traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exc"] = printable(self.formatException(record.exc_info), MAX_MESSAGE * 4)
        return json.dumps(line, default=str)


class WsChatter(logging.Filter):
    """uvicorn's INFO lines about WebSocket connections ("... WebSocket /ws/device?uid=...
    [accepted]", "connection open", "connection closed") repeat what the access log says,
    with the raw path and query string: dropped (its warnings and errors stay)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        message = str(record.msg)
        return not (
            message in ("connection open", "connection closed") or '"WebSocket %s"' in message
        )


def configure(level: str, fmt: str = "text", access_log: bool = True) -> None:
    """Log to stderr in ``fmt`` (``text`` or ``json``) at ``level``; the access log
    (logger ``hexa.access``, INFO) is silenced when ``access_log`` is false."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonLines())
    else:
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
    logging.getLogger("uvicorn.error").filters[:] = [PeerFaults(), WsChatter()]
    logging.getLogger("hexa.access").setLevel(logging.NOTSET if access_log else logging.WARNING)
