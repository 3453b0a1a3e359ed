"""The embedded broker: amqtt, hardened and configured for the hub."""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import BrokerError, NoDataError
from amqtt.session import Session

from hexa.broker import metrics
from hexa.broker.gate import HUB_USERNAME, Gate
from hexa.broker.local import LocalBus
from hexa.broker.plugins import IDENTITY, HexaAclPlugin, HexaAuthPlugin
from hexa.hub import topics
from hexa.hub.config import Settings

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
PREAUTHENTICATED = "hexa.preauthenticated"
#: intents are commands: never retained (contract §3, Hygiene)
NO_RETAIN = tuple(t.filter() for t in topics.INTENT_TOPICS)


def _transport_of(handler: Any) -> Any:
    writer = handler.writer
    if hasattr(writer, "_writer"):
        return writer._writer.transport
    if hasattr(writer, "_protocol"):
        return writer._protocol.transport
    return None


class HexaBroker(Broker):  # type: ignore[misc]
    """amqtt with the fixes the hub relies on (each method extends, none copies, amqtt).

    - every socket is closed when amqtt is done with it, and a client must CONNECT
      within 10 s (amqtt waits forever, and its shutdown hangs on such sockets);
    - retained intents and oversized payloads are dropped (acked, never delivered);
    - a last will goes through the same PUBLISH ACL as any publish;
    - a CONNECT for a live client id of another identity is refused without disturbing
      the live session (amqtt drops it before authenticating the newcomer);
    - retained messages are replayed only for the session's own subscriptions and only
      where delivery is allowed (amqtt replays every client's filters on CONNECT).
    """

    def __init__(self, config: dict[str, Any], *, max_payload: int) -> None:
        super().__init__(config)
        self._transports: set[Any] = set()
        self.max_payload = max_payload
        self._filters_version = 0
        self._wildcards: tuple[int, list[str]] = (-1, [])
        # amqtt logs repr(self._subscriptions) at DEBUG after every SUBSCRIBE, formatting
        # every session of every filter even with DEBUG off: O(devices) per subscribe.
        self._subscriptions = _Subscriptions(self.__dict__["_subscriptions"])
        # filters per client id: amqtt calls _publish_retained_messages_for_subscription
        # for every filter of every client on each CONNECT; most are not the client's.
        self._filters_of: dict[str, set[str]] = {}

    # --- routing: amqtt scans every filter for every message (and formats a debug line
    # per miss); with one exact filter per device that is O(devices) per message. We look
    # up exact filters in the dict and scan only the wildcard ones.
    async def add_subscription(self, subscription: tuple[str, int], session: Any) -> int:
        self._filters_version += 1
        granted = int(await super().add_subscription(subscription, session))
        if granted != 0x80:
            self._filters_of.setdefault(session.client_id, set()).add(subscription[0])
        return granted

    def _del_subscription(self, a_filter: str, session: Any) -> int:
        self._filters_version += 1
        self._filters_of.get(session.client_id, set()).discard(a_filter)
        return int(super()._del_subscription(a_filter, session))

    async def _del_all_subscriptions(self, session: Any) -> None:
        await super()._del_all_subscriptions(session)
        self._filters_of.pop(session.client_id, None)
        self._filters_version += 1

    def _matching_filters(self, topic: str) -> list[str]:
        version, wildcards = self._wildcards
        if version != self._filters_version:
            wildcards = [f for f in self._subscriptions if "+" in f or "#" in f]
            self._wildcards = (self._filters_version, wildcards)
        found = [f for f in wildcards if self._matches(topic, f)]
        if topic in self._subscriptions:
            found.append(topic)
        return found

    async def _run_broadcast(self, running_tasks: Any) -> None:
        broadcast = await self._broadcast_queue.get()
        topic = broadcast["topic"]
        for flt in self._matching_filters(topic):
            for target, sub_qos in list(self._subscriptions.get(flt, ())):
                qos = broadcast.get("qos", sub_qos)
                if not await self._topic_filtering(target, topic=topic, action=Action.RECEIVE):
                    continue
                connected = target.transitions.state == "connected"
                if not connected:
                    # MQTT-3.1.2-4: a persistent session keeps QoS 1/2 messages while away
                    if not target.clean_session and qos in (1, 2) and not target.is_anonymous:
                        await self._retain_broadcast_message(broadcast, qos, target)
                    continue
                handler = self._get_handler(target)
                if handler is not None:
                    running_tasks.append(
                        asyncio.ensure_future(
                            handler.mqtt_publish(topic, broadcast["data"], qos, retain=False)
                        )
                    )

    async def stream_connected(self, reader: Any, writer: Any, listener_name: str) -> None:
        transport = writer.transport
        self._transports.add(transport)
        try:
            await super().stream_connected(reader, writer, listener_name)
        finally:
            self._transports.discard(transport)
            transport.abort()

    async def ws_connected(self, websocket: Any, listener_name: str) -> None:
        transport = websocket.transport
        self._transports.add(transport)
        try:
            await super().ws_connected(websocket, listener_name)
        finally:
            self._transports.discard(transport)
            transport.abort()

    async def _delete_session(self, client_id: str) -> None:
        # amqtt deletes the live session of a client id as soon as a clean-session CONNECT
        # for it arrives, before authenticating the newcomer: anybody could cut a device
        # off. A live session is kept here; _handle_client_session decides.
        entry = self._sessions.get(client_id)
        if entry is not None and entry[0].transitions.is_connected():
            return
        await super()._delete_session(client_id)

    async def _handle_client_session(
        self,
        reader: Any,
        writer: Any,
        client_session: Any,
        handler: Any,
        server: Any,
        listener_name: str,
    ) -> None:
        live = self._sessions.get(client_session.client_id) if client_session.client_id else None
        if live is not None and live[0].transitions.is_connected():
            owner = live[0].attributes.get(IDENTITY)
            ok = await self._authenticate(client_session, self.listeners_config[listener_name])
            mine = client_session.attributes.get(IDENTITY)
            if not ok or owner is None or mine is None or mine.name != owner.name:
                if client_session is live[0]:  # a persistent session: amqtt overwrote it
                    client_session.attributes[IDENTITY] = owner
                    client_session.username = owner.name if owner else None
                log.warning(
                    "refused a CONNECT for the live client id %r of %r",
                    client_session.client_id,
                    owner.name if owner else None,
                )
                refused = Session()
                refused.client_id = client_session.client_id
                handler.attach(refused, reader, writer)
                await handler.mqtt_connack_authorize(False)
                await writer.close()
                return
            # The same identity reconnecting (e.g. over a half-open connection): let amqtt
            # take the session over, with the deletion deferred above.
            if client_session is not live[0]:
                await super()._delete_session(client_session.client_id)
            client_session.attributes[PREAUTHENTICATED] = True
        await super()._handle_client_session(
            reader, writer, client_session, handler, server, listener_name
        )

    async def _authenticate(self, session: Any, listener: Any) -> bool:
        if session.attributes.pop(PREAUTHENTICATED, False):
            return True
        return bool(await super()._authenticate(session, listener))

    async def _initialize_client_session(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.wait_for(
                super()._initialize_client_session(*args, **kwargs), CONNECT_TIMEOUT_S
            )
        except TimeoutError as exc:
            raise NoDataError("no CONNECT received in time") from exc

    def _refused(self, topic: str, data: bytes | bytearray | None, retain: bool) -> str | None:
        if data is not None and len(data) > self.max_payload:
            return "oversized"
        if retain and data and any(self._matches(topic, f) for f in NO_RETAIN):
            return "retained"
        return None

    async def _handle_message_delivery(
        self, client_session: Any, handler: Any, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        message = wait_deliver.result()
        if message is not None and message.topic:
            retain = bool(message.publish_packet and message.publish_packet.retain_flag)
            reason = self._refused(message.topic, message.data, retain)
            if reason is not None:
                metrics.DROPPED.labels(reason).inc()
                log.warning(
                    "dropped %s publish on %s from %s",
                    reason,
                    message.topic,
                    client_session.client_id,
                )
                return True
        return bool(await super()._handle_message_delivery(client_session, handler, wait_deliver))

    async def _handle_disconnect(
        self, client_session: Any, handler: Any, disconnect_waiter: asyncio.Future[Any]
    ) -> None:
        s = client_session
        if s.will_flag and s.will_topic:
            allowed = await self._topic_filtering(s, s.will_topic, Action.PUBLISH)
            if not allowed or self._refused(s.will_topic, s.will_message, bool(s.will_retain)):
                s.will_flag = False
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Any
    ) -> None:
        flt, _ = subscription
        if flt not in self._filters_of.get(session.client_id, ()):
            return
        mine = [q for s, q in self._subscriptions.get(flt, []) if s.client_id == session.client_id]
        handler = self._get_handler(session)
        if not mine or handler is None:
            return
        sub_qos = mine[0]
        sends = []
        if "+" in flt or "#" in flt:
            candidates = list(self._retained_messages.items())
        else:  # an exact filter (every device's own cmd topic): no scan of all retained
            exact = self._retained_messages.get(flt)
            candidates = [] if exact is None else [(flt, exact)]
        for topic, retained in candidates:
            if self._matches(topic, flt) and await self._topic_filtering(
                session, topic, Action.RECEIVE
            ):
                qos = min(sub_qos, retained.qos if retained.qos is not None else sub_qos)
                sends.append(handler.mqtt_publish(retained.topic, retained.data, qos, retain=True))
        if sends:
            await asyncio.gather(*sends, return_exceptions=True)

    async def kick(self, *, username: str) -> int:
        """Close every live session of ``username`` (its will, if any, is published)."""
        closed = 0
        for _cid, (session, handler) in list(self._sessions.items()):
            if session.username != username or session.transitions.state != "connected":
                continue
            transport = _transport_of(handler)
            if transport is not None:
                transport.abort()
            await handler.handle_connection_closed()
            closed += 1
        return closed

    async def shutdown(self) -> None:
        # Deliver what was accepted (e.g. the hub's last "offline") before closing.
        # Delivery crosses several amqtt queues and tasks, so wait for a quiet spell.
        loop = asyncio.get_running_loop()
        deadline, quiet = loop.time() + 2.0, 0
        while loop.time() < deadline and quiet < 5:
            quiet = 0 if self._undelivered() else quiet + 1
            await asyncio.sleep(0.01)
        for transport in list(self._transports):
            transport.abort()
        await asyncio.sleep(0)
        await super().shutdown()

    def _undelivered(self) -> bool:
        """Whether accepted publishes are still on their way to subscribers."""
        return (
            not self._broadcast_queue.empty()
            or any(not task.done() for task in self._tasks_queue)
            or any(not s.delivered_message_queue.empty() for s, _ in self._sessions.values())
        )

    def bound_port(self, listener: str) -> int | None:
        server = self._servers.get(listener)
        if server is None or server.instance is None:
            return None
        return int(server.instance.sockets[0].getsockname()[1])


class _Subscriptions(dict[str, Any]):
    """amqtt's filter → subscribers table, with a repr that does not walk it."""

    def __repr__(self) -> str:
        return f"<{len(self)} subscription filters>"


class EmbeddedBroker:
    """Starts and stops the embedded broker from the hub's settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.hub_password = secrets.token_urlsafe(32)
        self.gate = Gate(self.hub_password)
        self._broker: HexaBroker | None = None
        self.port: int | None = None
        self.tls_port: int | None = None
        self.ws_port: int | None = None

    def _config(self) -> dict[str, Any]:
        s = self.settings
        listeners: dict[str, Any] = {
            "default": {
                "type": "tcp",
                "bind": f"{s.mqtt_host}:{s.mqtt_port}",
                "max_connections": -1,
            }
        }
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
            # Our own plugin set replaces amqtt's defaults (loggers that hook every
            # packet, anonymous auth, $SYS), which cost up to 2x throughput.
            "plugins": {
                f"{HexaAuthPlugin.__module__}.{HexaAuthPlugin.__name__}": gate,
                f"{HexaAclPlugin.__module__}.{HexaAclPlugin.__name__}": gate,
            },
        }

    async def start(self) -> None:
        broker = HexaBroker(self._config(), max_payload=self.settings.max_mqtt_payload_bytes)
        names = {type(p).__name__ for p in broker.plugins_manager.plugins}
        if names != {HexaAuthPlugin.__name__, HexaAclPlugin.__name__}:
            raise RuntimeError(f"unexpected broker plugins: {sorted(names)}")
        try:
            await broker.start()
        except BrokerError as exc:
            # amqtt wraps bind failures; hand the OSError to the caller to report.
            if isinstance(exc.__cause__, OSError):
                raise exc.__cause__ from None
            raise
        self._broker = broker
        self.port = broker.bound_port("default")
        self.tls_port = broker.bound_port("tls")
        self.ws_port = broker.bound_port("ws")
        log.info("embedded broker listening on %s:%s", self.settings.mqtt_host, self.port)

    def hub_credentials(self) -> tuple[str, int, str, str]:
        """(host, port, username, password) for the hub's own bus connection."""
        host = self.settings.mqtt_host
        if host in ("0.0.0.0", "::", ""):  # noqa: S104
            host = "127.0.0.1"
        assert self.port is not None
        return host, self.port, HUB_USERNAME, self.hub_password

    def local_bus(self, client_id: str) -> LocalBus:
        """The hub's bus, attached in-process (no socket, no MQTT encoding)."""
        assert self._broker is not None
        return LocalBus(
            self._broker, client_id=client_id, presence_topic=topics.HUB_STATUS.format()
        )

    def attach(self, hub: Any) -> None:
        """Close broker sessions when the hub revokes credentials."""
        hub.registry.session_closers.append(self.close_device)
        hub.registry.hooks.append(self._on_device_change)
        hub.integration_closers.append(self.close_integration)

    async def _on_device_change(self, device: Any, what: str) -> None:
        self.gate.forget(device.device_uid)

    async def close_device(self, uid: str) -> None:
        self.gate.forget(uid)
        if self._broker is not None:
            await self._broker.kick(username=uid)

    async def close_integration(self, name: str) -> None:
        if self._broker is not None:
            await self._broker.kick(username=name)

    async def shutdown(self) -> None:
        if self._broker is not None:
            broker, self._broker = self._broker, None
            await broker.shutdown()
