"""The ``hexa`` command line, run as an operator runs it: a subprocess of this Python."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

HEXA = [sys.executable, "-m", "hexa.hub.cli"]


def hexa_cli(
    args: list[str], env: dict[str, str], *, timeout: float = 120, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """``hexa <args>`` with ``env`` over this process's environment; its exit status and
    output (text), never raising on a failure."""
    return subprocess.run(
        HEXA + args,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )
