"""What devices report about the releases they install, and the automatic halt of a
release that fails on too many of them.

A report is accepted for a release the device reported on before, or one it may have now
(:func:`hexa.hub.ota_offers.offered`); it updates the device's OTA status, and ``applied``
its firmware and security versions. A published release halts once at least
:data:`HALT_MIN_REPORTS` devices reported on it and more than its ``halt_failure_percent``
of them failed.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from tortoise.exceptions import IntegrityError

from hexa.hub import metrics
from hexa.hub.audit import AuditLog
from hexa.hub.errors import NotFound
from hexa.hub.ota_offers import offered
from hexa.hub.security import utcnow
from hexa.hub.state import DeviceCache
from hexa.models import Device, OtaRelease, OtaReport

log = logging.getLogger(__name__)

#: what a device may report about a release
REPORT_STATES = ("downloading", "verified", "installing", "applied", "failed")
#: a release halts only once at least this many devices reported on it
HALT_MIN_REPORTS = 5

# every label exported from the start (at 0), so that the first report shows as an increase
for _status in REPORT_STATES:
    metrics.OTA_REPORTS.labels(_status)


class Reports:
    """Devices' reports, recorded for one hub process."""

    def __init__(self, cache: DeviceCache, audit: AuditLog) -> None:
        self._cache = cache
        self._audit = audit

    async def record(
        self, device: Device, release_id: uuid.UUID, status: str, error: str | None
    ) -> None:
        """Record a device's report. A release it was never offered is 404: accepted are
        releases it reported on before, and those it may have now (:func:`offered`)."""
        release = await OtaRelease.get_or_none(id=release_id, model=device.model)
        if release is None:
            raise NotFound("release")
        now = utcnow()
        existing = await OtaReport.get_or_none(device_id=device.id, release_id=release.id)
        if existing is None:
            if not offered(release, device):
                raise NotFound("release")
            try:
                await OtaReport.create(
                    device_id=device.id, release_id=release.id, status=status, error=error
                )
            except IntegrityError:  # the same device reporting twice at once
                await OtaReport.filter(device_id=device.id, release_id=release.id).update(
                    status=status, error=error, updated_at=now
                )
        else:
            await OtaReport.filter(id=existing.id).update(
                status=status, error=error, updated_at=now
            )
        changes: dict[str, Any] = {
            "ota_release_id": release.id,
            "ota_status": status,
            "ota_error": error,
            "ota_updated_at": now,
        }
        if status == "applied":
            changes["fw_version"] = release.version
            changes["ota_security_version"] = max(
                device.ota_security_version, release.security_version
            )
            cached = self._cache.peek(device.device_uid)
            if cached is not None:
                cached.fw_version = release.version
        await Device.filter(id=device.id).update(**changes)
        metrics.OTA_REPORTS.labels(status).inc()
        if status == "failed":
            await self._maybe_halt(release)

    async def _maybe_halt(self, release: OtaRelease) -> None:
        """Halt a published release once at least ``HALT_MIN_REPORTS`` devices reported
        (since it was last resumed) and more than ``halt_failure_percent`` of them failed."""
        reports = OtaReport.filter(release_id=release.id)
        if release.resumed_at is not None:
            reports = reports.filter(updated_at__gte=release.resumed_at)
        total = await reports.count()
        failed = await reports.filter(status="failed").count()
        if total < HALT_MIN_REPORTS or failed * 100 <= release.halt_failure_percent * total:
            return
        halted = await OtaRelease.filter(id=release.id, status="published").update(
            status="halted", halted_at=utcnow()
        )
        if not halted:
            return
        metrics.OTA_HALTS.inc()
        log.warning(
            "OTA release %s (%s %s) halted: %d of %d devices failed",
            release.id,
            release.model,
            release.version,
            failed,
            total,
        )
        await self._audit.record(
            action="ota_release_halted",
            source="system",
            actor_type="system",
            details={
                "release_id": str(release.id),
                "version": release.version,
                "failed": failed,
                "reported": total,
                "halt_failure_percent": release.halt_failure_percent,
            },
        )
