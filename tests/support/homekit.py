"""A HomeKit controller (aiohomekit) pairing with a hub's bridge by address, as a phone
would after finding it through mDNS."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from aiohomekit.characteristic_cache import CharacteristicCacheMemory
from aiohomekit.controller.ip.controller import IpController
from aiohomekit.controller.ip.discovery import IpDiscovery
from aiohomekit.controller.ip.pairing import IpPairing
from aiohomekit.model import Categories
from aiohomekit.model.feature_flags import FeatureFlags
from aiohomekit.model.status_flags import StatusFlags
from aiohomekit.zeroconf import HomeKitService


def controller() -> IpController:
    return IpController(char_cache=CharacteristicCacheMemory(), zeroconf_instance=None)


def description(bridge: dict[str, Any]) -> HomeKitService:
    """What mDNS would tell a controller about the bridge: its address is given instead."""
    return HomeKitService(
        name="Hexa",
        id=bridge["hap_id"].lower(),
        model="Hexa Hub",
        feature_flags=FeatureFlags(0),
        status_flags=StatusFlags.UNPAIRED,
        config_num=1,
        state_num=1,
        category=Categories.BRIDGE,
        protocol_version="1.1",
        type="_hap._tcp.local.",
        address="127.0.0.1",
        addresses=["127.0.0.1"],
        port=bridge["port"],
    )


async def pair(bridge: dict[str, Any], code: str | None = None) -> IpPairing:
    """Pair a new controller by address and port with the setup code (or ``code``)."""

    def by_address() -> IpDiscovery:
        return IpDiscovery(controller(), description(bridge))

    return await pair_through(by_address, code or bridge["setup_code"])


async def pair_through(
    discovered: Callable[[], Any], code: str, *, close: bool = True
) -> IpPairing:
    """Pair with ``code`` through a discovery (by address or by mDNS)."""
    discovery = discovered()
    try:
        finish = await discovery.async_start_pairing(f"t-{uuid.uuid4().hex[:6]}")
        return await finish(code)
    finally:
        if close:
            await discovery.close()
