"""Fixtures and hooks: a real hub (embedded broker on a free port, real database) per
database kind, and clients closed after each test. Database-backed tests run on SQLite and,
when a server answers, on PostgreSQL. The helpers tests share live in ``tests/support``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from support.databases import PG_URL, REQUIRE_PG, new_database_url, pg_unreachable
from support.hubs import RunningHub, start_hub, stop_hub
from support.mqtt import MqttClient
from support.rawmqtt import raws  # noqa: F401  (a fixture, for every test module)

T = TypeVar("T")

_pg_skipped: list[str] = []


@pytest.fixture(scope="session")
def postgres_available() -> bool:
    reason = pg_unreachable()
    if reason is None:
        return True
    if REQUIRE_PG:
        pytest.fail(
            f"HEXA_REQUIRE_POSTGRES is set but PostgreSQL at {PG_URL} is unreachable: {reason}"
        )
    _pg_skipped.append(reason)
    return False


@pytest.fixture(
    scope="session", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def db_kind(request: pytest.FixtureRequest, postgres_available: bool) -> str:
    if request.param == "postgres" and not postgres_available:
        pytest.skip(f"PostgreSQL unreachable at {PG_URL}")
    return str(request.param)


@pytest.fixture(scope="session")
def hub(db_kind: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningHub]:
    """One hub per database kind, shared by the tests (each test makes its own users)."""
    tmp = tmp_path_factory.mktemp(f"hub-{db_kind}")
    url, drop = new_database_url(db_kind, tmp)
    h = start_hub(url, tmp / "data")
    yield h
    stop_hub(h)
    drop()


@pytest.fixture
def track() -> Iterator[Callable[[T], T]]:
    """Register clients (MQTT, WebSocket: anything with close()); all are closed after the
    test, whatever its outcome, newest first."""
    opened: list[Any] = []

    def add(client: T) -> T:
        opened.append(client)
        return client

    yield add
    for client in reversed(opened):
        if isinstance(client, MqttClient):  # see close_all: those of a stopped hub stop together
            with contextlib.suppress(Exception):
                client.c.disconnect()
    for client in reversed(opened):
        with contextlib.suppress(Exception):  # best-effort cleanup
            client.close()


@pytest.fixture
def tmp_data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def anyio_backend() -> str:
    """Tests marked ``anyio`` run on asyncio, the loop the hub runs on."""
    return "asyncio"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """HEXA_TEST_EMBEDDED_BUS chooses the bus of the shared hub only (``hub``): a test without
    it (a unit test, or one on a hub process of its own) would repeat the default pass
    exactly, so a pass with the variable set runs only the tests on the shared hub."""
    if os.environ.get("HEXA_TEST_EMBEDDED_BUS", "local") == "local":
        return
    keep, drop = [], []
    for item in items:
        (keep if "hub" in getattr(item, "fixturenames", ()) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if not _pg_skipped and not REQUIRE_PG and config.getoption("numprocesses", None):
        # the tests ran in worker processes (scripts/test), which skipped them: ask here
        reason = pg_unreachable()
        if reason is not None:
            _pg_skipped.append(reason)
    if _pg_skipped:
        terminalreporter.write_sep("!", "POSTGRESQL TESTS SKIPPED", red=True, bold=True)
        terminalreporter.write_line(
            f"No PostgreSQL at {PG_URL} ({_pg_skipped[0]}).\n"
            "Every database test ran on SQLite only. "
            "Start a server (or set HEXA_TEST_POSTGRES_URL) to run them on PostgreSQL too; "
            "CI sets HEXA_REQUIRE_POSTGRES=1 and fails instead of skipping.",
            red=True,
        )
