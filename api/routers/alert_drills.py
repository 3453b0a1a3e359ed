"""``POST /admin/alerts/simulate``: an alert drill, for platform admins.

It makes the hub's own metrics show one alert's condition for a while (see
``hexa.hub.alert_simulation``), so an operator can check the path from rule to
notification end to end. Refused with 409 unless ``HEXA_ALLOW_ALERT_SIMULATION=true``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from hexa.api.auditing import ActorDep
from hexa.api.deps import HubDep
from hexa.api.routers.admin import AdminDep
from hexa.api.schemas import Timestamp
from hexa.hub.alert_simulation import SIMULATION, SimulationDisabled
from hexa.hub.audit import write

router = APIRouter(prefix="/admin/alerts", tags=["admin"])

AlertName = Literal[
    "HexaHubDown",
    "HexaBusDisconnected",
    "HexaCommandTimeoutRatio",
    "HexaFleetOffline",
    "HexaSchedulerLag",
    "HexaApi5xxRatio",
    "HexaBackupStale",
    "HexaOtaIntegrityFailure",
]


class SimulateRequest(BaseModel):
    alert: AlertName
    #: how long the drill lasts; by default long enough for the rule to fire
    duration_s: Annotated[int, Field(ge=60, le=3600)] | None = None


class SimulateAnswer(BaseModel):
    alert: AlertName
    until: Timestamp


@router.post("/simulate", status_code=202)
async def simulate(
    _: AdminDep, actor: ActorDep, hub: HubDep, body: SimulateRequest
) -> SimulateAnswer:
    """Start (or extend) a drill of one alert of ``docs/ops/alerts.yml``."""
    if not hub.settings.allow_alert_simulation:
        raise SimulationDisabled(
            "alert simulation is off on this hub (HEXA_ALLOW_ALERT_SIMULATION=true enables it)"
        )
    until = SIMULATION.start(body.alert, body.duration_s)
    at = datetime.fromtimestamp(until, UTC)
    details = {"alert": body.alert, "duration_s": body.duration_s, "until": at.isoformat()}
    await write(actor, "alert_simulated", details=details)  # of the hub, in no organization
    return SimulateAnswer(alert=body.alert, until=at)
