"""Which releases a device may have (contract §5): pure rules over a release and a device.

A device takes the releases of its channel (and the steadier ones), above its firmware
version, not below its security version and inside the staged rollout; it is offered the
highest of them. The queries and the checks before anything is served are the service's
(:class:`hexa.hub.ota.Ota`).
"""

from __future__ import annotations

from collections.abc import Iterable

from hexa.hub import ota_crypto
from hexa.hub.security import utcnow
from hexa.models import Device, OtaRelease


def takes(device: Device) -> frozenset[str]:
    """The channels whose releases the device takes."""
    return ota_crypto.CHANNEL_TAKES.get(device.ota_channel, frozenset({"stable"}))


def ranked(published: Iterable[OtaRelease], device: Device) -> list[OtaRelease]:
    """Of the published releases for the device's model, those unexpired on a channel it
    takes, highest version first."""
    channels = takes(device)
    now = utcnow()
    rows = [r for r in published if r.channel in channels and r.expires_at > now]
    versioned = [(ota_crypto.parse_version(r.version), r) for r in rows]
    ordered = [(v, r) for v, r in versioned if v is not None]
    ordered.sort(key=lambda pair: pair[0].key(), reverse=True)
    return [r for _, r in ordered]


def eligible(release: OtaRelease, device: Device, fw_version: str | None) -> bool:
    """Contract §5's rules for one release (status, channel and expiry are the query's):
    above the device's version, not below its security version, inside the rollout."""
    return (
        ota_crypto.is_above(release.version, fw_version)
        and release.security_version >= device.ota_security_version
        and ota_crypto.rollout_bucket(device.device_uid, str(release.id)) < release.rollout_percent
    )


def offered(release: OtaRelease, device: Device) -> bool:
    """Whether the device may have ``release`` now: published, unexpired, on a channel it
    takes and eligible by the rules of :func:`eligible` — not necessarily the highest
    (a device that started on one release finishes it when a newer one appears)."""
    return (
        release.status == "published"
        and release.expires_at > utcnow()
        and release.channel in takes(device)
        and eligible(release, device, device.fw_version)
    )
