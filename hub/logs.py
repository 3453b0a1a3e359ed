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


def configure(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(RedactSecrets())
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
