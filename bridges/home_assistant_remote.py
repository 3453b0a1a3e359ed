"""The outbound Home Assistant bridge: one organization's devices on a separate broker.

For a Home Assistant that has its own broker (its Mosquitto add-on, a broker in another
network), the hub connects to it as a client (``HEXA_HA_*`` settings, contract §6) and
publishes there what Home Assistant needs: the discovery configs, the relay states and
aggregate state, the devices' availability (all retained), the input events, and its own
``hexa/hub/status`` backed by its will. It takes intents from there
(``hexa/+/relay/+/set``, ``hexa/+/relays/set``) for that organization's devices only and
puts them on its own bus as ``home_assistant``; it answers ``homeassistant/status`` births
with a republish. When the broker goes away it reconnects with back-off and publishes
everything again, and clears the retained configs of devices that left meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import aiomqtt
import anyio
from anyio.abc import TaskStatus

from hexa.bridges.home_assistant_config import DeviceView, configs
from hexa.bridges.home_assistant_sync import Births, Discovery, cached
from hexa.hub import metrics, topics
from hexa.hub.config import ha_tls_context
from hexa.hub.errors import BusUnavailable
from hexa.hub.logs import printable
from hexa.hub.mqtt import inbox
from hexa.hub.mqtt.bus import BrokerAddress
from hexa.hub.mqtt.busapi import Message
from hexa.hub.relay import state_messages
from hexa.models import Device

if TYPE_CHECKING:
    from hexa.hub.config import Settings
    from hexa.hub.runtime import Hub

log = logging.getLogger(__name__)

#: reconnect back-off: doubles from the first to the last, with ±20 % jitter
MIN_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
#: a session that lasted this long starts the back-off over (one that a broker drops at
#: once, say for a refused subscription, keeps backing off)
STABLE_S = 30.0
#: how long one MQTT operation on the Home Assistant broker may take
OPERATION_TIMEOUT_S = 10.0
#: messages waiting for the Home Assistant broker; beyond it everything is republished
MAX_PENDING = 10_000

#: what the hub forwards from its bus to Home Assistant's, for the organization's devices
#: (the first three retained, as on the hub's bus)
RETAINED: tuple[topics.Topic[Any], ...] = (topics.RELAY_STATE, topics.STATE, topics.AVAILABILITY)
MIRRORED: tuple[topics.Topic[Any], ...] = (*RETAINED, topics.INPUT_EVENT)


@dataclass(frozen=True)
class _Forward:
    """One message to pass on as it is."""

    topic: str
    payload: bytes
    retain: bool


@dataclass(frozen=True)
class _Device:
    """A device whose configs to bring up to date (or remove)."""

    uid: str
    relay_count: int
    input_count: int
    with_states: bool = False


@dataclass(frozen=True)
class _Republish:
    """Every config and state of the organization's devices."""


#: What the one writer to Home Assistant's broker sends, in the order asked. A republish
#: is one of them rather than a task of its own, so that the states it reads from the hub
#: never overtake a newer state forwarded meanwhile: whatever changed after it read a
#: state is forwarded after it.
_Job = _Forward | _Device | _Republish


class RemoteHomeAssistant:
    """Discovery, state and intents for one organization on a separate broker."""

    name: ClassVar[str] = "home_assistant_remote"

    def __init__(self, hub: Hub) -> None:
        settings = hub.settings
        assert settings.ha_broker_url is not None and settings.ha_org_id is not None
        self.hub = hub
        self.org_id: uuid.UUID = settings.ha_org_id
        self.tls: ssl.SSLContext | None = ha_tls_context(settings)
        # read as the hub reads HEXA_BROKER_URL: credentials in the URL count too
        address = BrokerAddress.from_url(settings.ha_broker_url)
        self.host, self.port = address.host, address.port
        self.username = settings.ha_username or address.username
        self.password = settings.ha_password or address.password
        self.client_id = f"hexa-hub-{hub.instance}-ha"
        self.prefix = settings.ha_discovery_prefix
        self.discovery = Discovery(self._publish, org_id=self.org_id, prefix=self.prefix)
        self._status_topic = topics.ha_topic(topics.HA_STATUS.format(), self.prefix)
        self.births = Births()
        self._client: aiomqtt.Client | None = None
        self._on_report = inbox.on(topics.REPORT, self._report)
        self._jobs: asyncio.Queue[_Job] = asyncio.Queue(MAX_PENDING)
        self._overflow = False
        #: uid → the availability each device last published on the hub's bus (retained
        #: there, so known from the start): what a republish mirrors
        self._availability: dict[str, bytes] = {}
        #: devices whose leftovers this session already clears
        self._pruned: set[str] = set()
        #: how many sessions with the broker became ready
        self.sessions = 0

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        return settings.ha_broker_url is not None

    @property
    def where(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    # --- lifecycle ---------------------------------------------------------------------
    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. Ready at once: Home Assistant's broker being away is no
        reason to hold up the hub; the bridge keeps trying in the background."""
        unfollow = self.discovery.follow(self.hub.events, self._changed)
        for topic in MIRRORED:
            await self.hub.bus.subscribe(topic.filter(), self._on_hub_message)
        await self.hub.bus.subscribe(topics.REPORT.filter(), self._on_report)
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(self.births.run, self.republish)
                tg.start_soon(self._connect_forever)
                task_status.started()
        finally:
            unfollow()
            with anyio.CancelScope(shield=True):
                for topic in MIRRORED:
                    await self.hub.bus.unsubscribe(topic.filter(), self._on_hub_message)
                await self.hub.bus.unsubscribe(topics.REPORT.filter(), self._on_report)

    async def _connect_forever(self) -> None:
        backoff = MIN_BACKOFF_S
        while True:
            connected, began = self.sessions, time.monotonic()
            try:
                await self._connect_once()
            except Exception as exc:  # a lost dependency: retried below, with back-off
                if _network_error(exc):
                    log.warning("Home Assistant broker %s: %s", self.where, _describe(exc))
                else:
                    log.exception("Home Assistant bridge to %s failed", self.where)
            if self.sessions != connected and time.monotonic() - began > STABLE_S:
                backoff = MIN_BACKOFF_S  # it had been connected a while: start over
            delay = backoff * random.uniform(0.8, 1.2)
            log.info("reconnecting to the Home Assistant broker in %.1f s", delay)
            await anyio.sleep(delay)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    def _new_client(self) -> aiomqtt.Client:
        hub_status = topics.HUB_STATUS.format()
        return aiomqtt.Client(
            self.host,
            self.port,
            username=self.username,
            password=self.password,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V311,
            clean_session=True,
            will=aiomqtt.Will(hub_status, topics.encode_availability(False), qos=1, retain=True),
            tls_context=self.tls,
            # hostname checking is part of the context; aiomqtt must not turn it back on
            tls_insecure=None if self.tls is None else not self.tls.check_hostname,
            keepalive=30,
            timeout=OPERATION_TIMEOUT_S,
        )

    async def _connect_once(self) -> None:
        async with self._new_client() as client:
            hub_status = topics.HUB_STATUS.format()
            await client.publish(hub_status, topics.encode_availability(True), qos=1, retain=True)
            for flt in (
                topics.RELAY_SET.filter(),
                topics.RELAYS_SET.filter(),
                self._status_topic,
                *(topics.ha_topic(config.filter(), self.prefix) for config in topics.HA_CONFIGS),
            ):
                await client.subscribe(flt, qos=1)
            while not self._jobs.empty():  # the full republish below covers them
                self._jobs.get_nowait()
            self._overflow = False
            self._pruned.clear()
            self._client = client
            self.sessions += 1
            log.info("connected to the Home Assistant broker %s", self.where)
            # Home Assistant's birth is not retained: a bridge that connects after Home
            # Assistant publishes everything on its own
            await self.republish()
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._work)
                    async for message in client.messages:
                        await self._on_remote(message)
            finally:
                self._client = None
                with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                    try:  # a clean goodbye: the will only covers a lost connection
                        await client.publish(
                            hub_status, topics.encode_availability(False), qos=1, retain=True
                        )
                    except aiomqtt.MqttError:
                        pass

    # --- publishing there ---------------------------------------------------------------
    async def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        client = self._client
        if client is None:
            raise BusUnavailable("not connected to the Home Assistant broker")
        try:
            await client.publish(topic, payload, qos=1, retain=retain)
        except aiomqtt.MqttError as exc:
            raise BusUnavailable(f"Home Assistant broker: {exc}") from None

    async def republish(self) -> None:
        """Ask for every configuration and state of the organization's devices (after a
        connect or a birth); nothing while disconnected, as the next connect asks."""
        self._enqueue(_Republish())

    async def _republish_now(self) -> None:
        count = await self.discovery.republish(self._states)
        log.info("Home Assistant discovery published for %d devices on %s", count, self.where)

    async def _states(self, views: list[DeviceView]) -> None:
        for device in await cached(self.hub.cache, views):
            for topic, payload in state_messages(device):
                await self._publish(topic, payload, True)
            # Here, unlike on the hub's bus, the hub is the only one to speak for the
            # device: what the device last said (the cache may not have heard it yet),
            # else the cache.
            availability = self._availability.get(device.uid)
            if availability is None:
                availability = topics.encode_availability(device.online)
            await self._publish(topics.AVAILABILITY.format(uid=device.uid), availability, True)

    async def _clear_states(self, uid: str, relay_count: int) -> None:
        """A device that left the organization leaves no retained state behind there."""
        for index in range(relay_count):
            await self._publish(topics.RELAY_STATE.format(uid=uid, index=index), b"", True)
        await self._publish(topics.STATE.format(uid=uid), b"", True)
        await self._publish(topics.AVAILABILITY.format(uid=uid), b"", True)

    async def _work(self) -> None:
        """Send what the hub's events and bus asked for, in order, while connected."""
        while True:
            job = await self._jobs.get()
            if self._overflow:
                self._overflow = False
                while not self._jobs.empty():
                    self._jobs.get_nowait()
                job = _Republish()
            if isinstance(job, _Republish):
                await self._republish_now()
                continue
            if isinstance(job, _Forward):
                await self._publish(job.topic, job.payload, job.retain)
                continue
            view = await self.discovery.reconcile(
                job.uid,
                relay_count=job.relay_count,
                input_count=job.input_count,
            )
            if view is None:
                await self._clear_states(job.uid, job.relay_count)
            elif job.with_states:
                await self._states([view])

    def _enqueue(self, job: _Job) -> None:
        if self._client is None:
            return  # the next connect publishes everything
        try:
            self._jobs.put_nowait(job)
        except asyncio.QueueFull:
            self._overflow = True

    # --- what the hub hears -------------------------------------------------------------
    async def _changed(self, device: Device, with_states: bool) -> None:
        """A device event: its configs (and states, after a claim) are sent in turn.
        Another organization's device that was never shown there is left out: even its
        removal would tell that broker the device's uid."""
        if device.org_id != self.org_id and not self.discovery.describes(device.device_uid):
            return
        self._enqueue(
            _Device(device.device_uid, device.relay_count, device.input_count, with_states)
        )

    async def _report(self, params: dict[str, str], report: topics.Report, msg: Message) -> None:
        """A device's new firmware version goes into its configs' ``sw_version``."""
        uid = params["uid"]
        if self.discovery.reported(uid, report.fw_version):
            device = await self.hub.cache.get(uid)
            if device is not None:
                self._enqueue(_Device(uid, device.relay_count, device.input_count))

    async def _on_hub_message(self, msg: Message) -> None:
        """State, availability and input events of the organization's devices."""
        uid = topics.device_of(msg.topic)
        if uid is None:
            return
        if topics.AVAILABILITY.parse(msg.topic) is not None:
            # noted for every device (one may join the organization later), and while
            # disconnected too: the republish on connect mirrors it
            if msg.payload:
                self._availability[uid] = bytes(msg.payload)
            else:
                self._availability.pop(uid, None)
        if self._client is None:
            return
        device = self.hub.cache.peek(uid) or await self.hub.cache.get(uid)
        if device is None or device.org_id != self.org_id:
            return
        retain = any(t.parse(msg.topic) is not None for t in RETAINED)
        self._enqueue(_Forward(msg.topic, bytes(msg.payload), retain))

    # --- what Home Assistant's broker sends -------------------------------------------
    async def _on_remote(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = message.payload
        data = payload if isinstance(payload, bytes | bytearray) else str(payload).encode()
        data = bytes(data)
        if topic == self._status_topic:
            self.births.status(data)
            return
        object_id = topics.ha_config_object(topic)
        if object_id is not None:
            if message.retain and data:
                await self._prune(topic, object_id)
            return
        for intent_topic in topics.INTENT_TOPICS:
            params = intent_topic.parse(topic)
            if params is not None:
                await self._forward_intent(intent_topic, params, data, message.retain, topic)
                return

    async def _prune(self, topic: str, object_id: str) -> None:
        """A retained config found on connect that should not be there any more (its
        device was released or deleted while the bridge was away, or has fewer relays
        now) is cleared. Configs of devices this hub does not know are left alone: they
        may be another hub's."""
        uid = topics.uid_of_ha_object(object_id)
        if uid is None:
            return
        view = await self.discovery.wanted(uid)
        if view is not None and topic in configs(view, self.prefix):
            return
        if view is not None:  # a config the device no longer has (fewer relays)
            log.info("clearing stale Home Assistant config %s", printable(topic))
            self._enqueue(_Forward(topic, b"", True))
            return
        device = await Device.get_or_none(device_uid=uid)  # deleted ones too
        if device is None or uid in self._pruned:
            return
        self._pruned.add(uid)
        log.info("clearing Home Assistant configs and states of %s, gone meanwhile", uid)
        self._enqueue(_Device(uid, device.relay_count, device.input_count))

    async def _forward_intent(
        self,
        intent_topic: topics.Topic[topics.Intent],
        params: dict[str, str],
        data: bytes,
        retained: bool,
        topic: str,
    ) -> None:
        """An intent from Home Assistant goes on the hub's bus as ``home_assistant``, for
        the organization's devices only; anything else is dropped here."""
        if retained:  # a retained command would replay on every connect: refused
            metrics.INTENTS_REFUSED.labels("retained").inc()
            log.warning("refused retained intent from Home Assistant on %s", printable(topic))
            return
        uid = params["uid"]
        device = await self.hub.cache.get(uid)
        if device is None or device.org_id != self.org_id:
            metrics.INTENTS_REFUSED.labels("not_allowed").inc()
            log.info("refused Home Assistant intent for %s: not this organization's", uid)
            return
        try:
            asked = intent_topic.decode(data)
        except topics.PayloadError as exc:
            metrics.INTENTS_REFUSED.labels("malformed").inc()
            log.info("refused Home Assistant intent on %s: %s", printable(topic), exc)
            return
        intent = topics.Intent(
            state=asked.state,
            source="home_assistant",
            intent_id=asked.intent_id,
            actor_type="integration",
        )
        sealed = topics.seal_intent(intent, topic, self.hub.commands.seal_key)
        try:
            await self.hub.bus.publish(topic, topics.encode_intent(sealed))
        except BusUnavailable:
            log.warning("Home Assistant intent for %s dropped: the hub's bus is down", uid)


def _network_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or every exception of a group) is the broker or network failing."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_network_error(e) for e in exc.exceptions)
    return isinstance(exc, aiomqtt.MqttError | BusUnavailable | OSError)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return str(exc) or type(exc).__name__
