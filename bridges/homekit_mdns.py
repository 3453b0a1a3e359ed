"""mDNS for the HomeKit bridges: one zeroconf instance for every bridge of the hub.

Controllers find a bridge through its ``_hap._tcp`` record; a paired one also learns
there that the bridge's accessories changed (the configuration number). Advertising is
best effort: a host without multicast (a container, a VPN) still serves controllers
that pair by address and port, so a zeroconf failure is logged and never stops a bridge.
"""

from __future__ import annotations

import logging
from typing import Any

from zeroconf import Error as ZeroconfError
from zeroconf.asyncio import AsyncZeroconf

from hexa.bridges.homekit_hap import HubDriver

log = logging.getLogger(__name__)

#: what zeroconf raises where multicast does not work (no interface, no route, a name clash)
MDNS_ERRORS = (OSError, ZeroconfError)


class Advertiser:
    """mDNS for every bridge of the hub, through one zeroconf instance made on first use.

    Best effort by design: a host without multicast (a container, a VPN) must still serve
    controllers that pair by address, so every failure is logged once and otherwise
    ignored."""

    def __init__(self) -> None:
        self._zeroconf: AsyncZeroconf | None = None
        self._broken = False
        self._registered: dict[int, Any] = {}

    async def _instance(self) -> AsyncZeroconf | None:
        if self._zeroconf is None and not self._broken:
            try:
                self._zeroconf = AsyncZeroconf()
            except MDNS_ERRORS as exc:  # zeroconf raises OSError and its own errors
                self._broken = True
                log.warning("HomeKit: no mDNS on this host (%s); pair by address and port", exc)
        return self._zeroconf

    async def advertise(self, driver: HubDriver) -> None:
        """Register the bridge's ``_hap._tcp`` record, or update it."""
        zeroconf = await self._instance()
        if zeroconf is None:
            return
        info = driver.service_info()
        try:
            if driver.port in self._registered:
                await zeroconf.async_update_service(info)
            else:
                await zeroconf.async_register_service(info, cooperating_responders=True)
            self._registered[driver.port] = info
        except MDNS_ERRORS as exc:  # a network without multicast: reachable by address
            log.warning("HomeKit: mDNS advertising on port %d failed: %s", driver.port, exc)

    async def withdraw(self, driver: HubDriver) -> None:
        info = self._registered.pop(driver.port, None)
        if info is None or self._zeroconf is None:
            return
        try:
            await self._zeroconf.async_unregister_service(info)
        except MDNS_ERRORS as exc:  # the record simply expires (TTL)
            log.info("HomeKit: mDNS record on port %d not withdrawn: %s", driver.port, exc)

    async def close(self) -> None:
        if self._zeroconf is not None:
            try:
                await self._zeroconf.async_close()
            except MDNS_ERRORS as exc:  # closing a broken socket
                log.info("HomeKit: zeroconf did not close cleanly: %s", exc)
            self._zeroconf = None
