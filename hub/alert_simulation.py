"""Alert drills: make the hub's own metrics show one alert's condition for a while.

An operator who wires the shipped alert rules to a pager wants to see the whole path work
(scrape, rule, Alertmanager, notification) without breaking the hub. A drill changes only
what ``/metrics`` reports, never what the hub does: the bus stays connected, devices keep
working. It is off unless ``HEXA_ALLOW_ALERT_SIMULATION=true``, so a production hub cannot
be made to page by a stolen admin token unless its operator opted in.

The state is per process, like the Prometheus registry it feeds.
"""

from __future__ import annotations

import time

from hexa.hub.errors import Conflict

#: each alert of docs/ops/alerts.yml and how long its drill lasts by default: long enough
#: for the rule's rate window and ``for:`` duration, plus a few scrapes
DEFAULT_WINDOWS_S: dict[str, int] = {
    "HexaHubDown": 5 * 60,
    "HexaBusDisconnected": 5 * 60,
    "HexaCommandTimeoutRatio": 25 * 60,
    "HexaFleetOffline": 20 * 60,
    "HexaSchedulerLag": 10 * 60,
    "HexaApi5xxRatio": 15 * 60,
    "HexaBackupStale": 20 * 60,
    "HexaOtaIntegrityFailure": 15 * 60,
}
#: synthetic failures added at each scrape while a ratio alert is drilled: far more than a
#: hub's real traffic between two scrapes, so the ratio crosses its threshold
BURST = 1000
#: the scheduler lag reported while HexaSchedulerLag is drilled (the rule fires above 60 s)
DRILL_LAG_S = 600.0


class SimulationDisabled(Conflict):
    """Alert drills are off on this hub."""

    code = "alert_simulation_disabled"


class AlertSimulation:
    """Which alerts are being drilled, until when (Unix time)."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}

    def start(self, alert: str, duration_s: int | None = None) -> float:
        """Drill ``alert`` for ``duration_s`` (its default window when None); the Unix time
        the drill ends. Starting a running drill again extends it."""
        until = time.time() + (duration_s or DEFAULT_WINDOWS_S[alert])
        self._until[alert] = until
        return until

    def active(self, alert: str) -> bool:
        until = self._until.get(alert)
        if until is None:
            return False
        if time.time() < until:
            return True
        del self._until[alert]
        return False


SIMULATION = AlertSimulation()
