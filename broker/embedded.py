"""The embedded broker as the hub starts it: listeners, limits and plugins from settings."""

from __future__ import annotations

import logging
import secrets
from typing import Any

from amqtt.errors import BrokerError

from hexa.broker.acl import Identity, Kind
from hexa.broker.engine import Engine, Limits
from hexa.broker.gate import HUB_USERNAME, ORG_CACHE_TTL_S, Gate
from hexa.broker.local import LocalBus
from hexa.broker.plugins import Access, HexaAuthPlugin
from hexa.broker.server import HexaBroker
from hexa.hub import topics
from hexa.hub.config import Settings
from hexa.hub.events import DeviceCredentialsRevoked, DeviceEvent, Events, IntegrationRevoked

log = logging.getLogger(__name__)


class EmbeddedBroker:
    """Starts and stops the embedded broker from the hub's settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.hub_password = secrets.token_urlsafe(32)
        # a hub alone on its database hears of every change of a device's organization
        # itself, so the gate need not expire what it knows
        alone = settings.database_is_ours_alone
        self.gate = Gate(self.hub_password, org_ttl=None if alone else ORG_CACHE_TTL_S)
        self._broker: HexaBroker | None = None
        self.port: int | None = None  # the plain listener's, None when it is off
        self._own_port: int | None = None
        self.tls_port: int | None = None
        self.ws_port: int | None = None

    def _config(self) -> dict[str, Any]:
        s = self.settings
        # a "default" listener without an address is not opened (amqtt's own default is
        # 0.0.0.0:1883, so it is set to None explicitly)
        listeners: dict[str, Any] = {
            "default": {"type": "tcp", "max_connections": -1, "bind": None}
        }
        if s.mqtt_plain_listener:
            listeners["default"]["bind"] = f"{s.mqtt_host}:{s.mqtt_port}"
        elif s.embedded_bus == "tcp":
            # No plain listener for the network (HEXA_ENFORCE_HTTPS): the hub's own MQTT
            # connection gets one on loopback, on a free port.
            listeners["default"]["bind"] = "127.0.0.1:0"
        if s.tls_enabled and s.mqtt_tls_port is not None:
            listeners["tls"] = {
                "type": "tcp",
                "bind": f"{s.mqtt_host}:{s.mqtt_tls_port}",
                "ssl": True,
                "certfile": str(s.mqtt_tls_cert),
                "keyfile": str(s.mqtt_tls_key),
            }
        if s.mqtt_ws_port is not None:
            listeners["ws"] = {"type": "ws", "bind": f"{s.mqtt_host}:{s.mqtt_ws_port}"}
        gate = {"gate": self.gate}
        return {
            "listeners": listeners,
            # persistent sessions whose client stayed away this long are dropped
            "session_expiry_interval": s.mqtt_session_expiry_s,
            # Our authentication replaces amqtt's default plugins (loggers that hook every
            # packet, anonymous auth, $SYS); the ACL is the engine's own (plugins.Access).
            "plugins": {f"{HexaAuthPlugin.__module__}.{HexaAuthPlugin.__name__}": gate},
        }

    async def start(self) -> None:
        s = self.settings
        limits = Limits(
            sessions_per_identity=s.mqtt_max_sessions_per_identity,
            queued_messages=s.mqtt_max_queued_messages,
            inflight_messages=s.mqtt_max_inflight_messages,
            device_publish_rate=s.mqtt_device_publish_rate,
            integration_publish_rate=s.mqtt_integration_publish_rate,
        )
        access = Access(self.gate, ha_prefix=s.ha_discovery_prefix)
        engine = Engine(access, max_payload=s.max_mqtt_payload_bytes, limits=limits)
        broker = HexaBroker(self._config(), engine=engine)
        names = {type(p).__name__ for p in broker.plugins_manager.plugins}
        if names != {HexaAuthPlugin.__name__}:
            raise RuntimeError(f"unexpected broker plugins: {sorted(names)}")
        try:
            await broker.start()
        except BrokerError as exc:
            # amqtt wraps bind failures; hand the OSError to the caller to report.
            if isinstance(exc.__cause__, OSError):
                raise exc.__cause__ from None
            raise
        self._broker = broker
        self._own_port = broker.bound_port("default")
        self.port = self._own_port if self.settings.mqtt_plain_listener else None
        self.tls_port = broker.bound_port("tls")
        self.ws_port = broker.bound_port("ws")
        listeners = [
            f"{name} on {self.settings.mqtt_host}:{port}"
            for name, port in (
                ("MQTT", self.port),
                ("MQTT/TLS", self.tls_port),
                ("MQTT/WS", self.ws_port),
            )
            if port is not None
        ]
        log.info("embedded broker listening: %s", ", ".join(listeners) or "no client listener")

    def hub_credentials(self) -> tuple[str, int, str, str]:
        """(host, port, username, password) for the hub's own bus connection."""
        host = self.settings.mqtt_host if self.settings.mqtt_plain_listener else "127.0.0.1"
        if host in ("0.0.0.0", "::", ""):  # noqa: S104
            host = "127.0.0.1"
        # without any plain listener (local bus) the port is never dialled
        return host, self._own_port or 0, HUB_USERNAME, self.hub_password

    def local_bus(self, client_id: str) -> LocalBus:
        """The hub's bus, attached in-process (no socket, no MQTT encoding)."""
        assert self._broker is not None
        return LocalBus(
            self._broker, client_id=client_id, presence_topic=topics.HUB_STATUS.format()
        )

    def attach(self, events: Events) -> None:
        """Close broker sessions when the hub revokes credentials; forget a changed
        device's organization."""
        events.subscribe(DeviceCredentialsRevoked, self._on_device_revoked)
        events.subscribe(DeviceEvent, self._on_device_change)
        events.subscribe(IntegrationRevoked, self._on_integration_revoked)

    async def _on_device_change(self, event: DeviceEvent) -> None:
        self.gate.forget(event.device.device_uid)

    async def _on_device_revoked(self, event: DeviceCredentialsRevoked) -> None:
        await self.close_device(event.uid)

    async def _on_integration_revoked(self, event: IntegrationRevoked) -> None:
        await self.close_integration(event.token_id)

    async def close_device(self, uid: str) -> None:
        self.gate.forget(uid)
        if self._broker is not None:
            await self._broker.kick(key=Identity(Kind.DEVICE, uid).key)

    async def close_integration(self, token_id: str) -> None:
        if self._broker is not None:
            await self._broker.kick(key=Identity(Kind.INTEGRATION, "", id=token_id).key)

    def session_counts(self) -> dict[str, int]:
        return {} if self._broker is None else self._broker.session_counts()

    async def shutdown(self) -> None:
        if self._broker is not None:
            broker, self._broker = self._broker, None
            await broker.shutdown()
