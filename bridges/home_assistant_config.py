"""Home Assistant MQTT discovery configs of a device (contract §6), as pure data.

One switch per relay and one device trigger per input event; both name the device by the
same ``identifiers`` so that Home Assistant groups them under one device. A config is
published retained on its topic, and an empty retained payload on the same topic removes
it (MQTT-3.3.1-10, and Home Assistant's discovery removes the entity).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from hexa.hub import __version__, topics
from hexa.models import Area, Device, RelayState

#: Home Assistant's trigger type for each input event the hub sends as a device trigger
#: (``release`` is not one: a press already reports the whole gesture)
TRIGGER_TYPES = {
    "press": "button_short_press",
    "hold": "button_long_press",
    "double_press": "button_double_press",
}

#: topic → config document (None: an empty retained payload, which removes it)
Configs = dict[str, dict[str, Any] | None]


@dataclass(frozen=True)
class DeviceView:
    """What the discovery configs of one claimed device are made from."""

    uid: str
    org_id: uuid.UUID
    name: str
    model: str
    sw_version: str | None
    area: str | None
    relay_names: tuple[str, ...]
    input_count: int


def relay_name(index: int, name: str | None) -> str:
    """A relay's name as Home Assistant shows it: its own, else ``Relay <n+1>``."""
    return name or f"Relay {index + 1}"


#: devices whose views are read with one set of queries at most (SQL parameters)
LOAD_BATCH = 500


async def load(uid: str, org_id: uuid.UUID | None = None) -> DeviceView | None:
    """The device as it is now, if it is claimed and live (and of ``org_id``, when
    given); None otherwise. Read at publish time, so that a config is never built from
    an ownership that has since changed."""
    return (await load_many([uid], org_id)).get(uid)


async def load_many(uids: list[str], org_id: uuid.UUID | None = None) -> dict[str, DeviceView]:
    """:func:`load` for many devices: uid → view of those that are claimed and live (and
    of ``org_id``), in three queries per :data:`LOAD_BATCH` devices."""
    out: dict[str, DeviceView] = {}
    for i in range(0, len(uids), LOAD_BATCH):
        out.update(await _load_batch(uids[i : i + LOAD_BATCH], org_id))
    return out


async def _load_batch(uids: list[str], org_id: uuid.UUID | None) -> dict[str, DeviceView]:
    query = Device.filter(device_uid__in=uids, deleted_at=None, org_id__isnull=False)
    if org_id is not None:
        query = query.filter(org_id=org_id)
    rows = await query.values(
        "id", "device_uid", "org_id", "name", "model", "fw_version", "area_id",
        "relay_count", "input_count",
    )  # fmt: skip
    if not rows:
        return {}
    names: dict[str, dict[int, str | None]] = {}
    for device_id, index, name in await RelayState.filter(
        device_id__in=[row["id"] for row in rows]
    ).values_list("device_id", "index", "name"):
        names.setdefault(str(device_id), {})[index] = name
    area_ids = {row["area_id"] for row in rows if row["area_id"] is not None}
    areas: dict[str, str] = {}
    if area_ids:
        areas = {
            str(area_id): name
            for area_id, name in await Area.filter(id__in=area_ids, deleted_at=None).values_list(
                "id", "name"
            )
        }
    out: dict[str, DeviceView] = {}
    for row in rows:
        uid = str(row["device_uid"])
        relay_names = names.get(str(row["id"]), {})
        area_id = row["area_id"]
        out[uid] = DeviceView(
            uid=uid,
            org_id=_uuid(row["org_id"]),
            name=row["name"] or uid,
            model=row["model"],
            sw_version=row["fw_version"],
            area=areas.get(str(area_id)) if area_id is not None else None,
            relay_names=tuple(relay_name(i, relay_names.get(i)) for i in range(row["relay_count"])),
            input_count=row["input_count"],
        )
    return out


def _uuid(value: Any) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def switch_topic(uid: str, index: int, prefix: str = topics.HA_PREFIX) -> str:
    topic = topics.HA_SWITCH_CONFIG.format(object_id=topics.ha_object_id(uid, index))
    return topics.ha_topic(topic, prefix)


def trigger_topic(uid: str, input_index: int, event: str, prefix: str = topics.HA_PREFIX) -> str:
    topic = topics.HA_TRIGGER_CONFIG.format(
        object_id=topics.ha_trigger_object_id(uid, input_index, event)
    )
    return topics.ha_topic(topic, prefix)


def config_topics(
    uid: str, relay_count: int, input_count: int, prefix: str = topics.HA_PREFIX
) -> Iterator[str]:
    """Every discovery topic of a device with these many relays and inputs."""
    for index in range(relay_count):
        yield switch_topic(uid, index, prefix)
    for index in range(input_count):
        for event in TRIGGER_TYPES:
            yield trigger_topic(uid, index, event, prefix)


def configs(view: DeviceView, prefix: str = topics.HA_PREFIX) -> Configs:
    """Every discovery config of the device, by topic (contract §6), under the
    discovery ``prefix``."""
    uid = view.uid
    device: dict[str, Any] = {
        "identifiers": [f"hexa_{uid}"],
        "name": view.name,
        "manufacturer": "Hexa",
        "model": view.model,
    }
    if view.sw_version:  # Home Assistant rejects a null sw_version: leave it out instead
        device["sw_version"] = view.sw_version
    if view.area:
        device["suggested_area"] = view.area
    origin = {"name": "Hexa Hub", "sw_version": __version__}
    availability = [
        {"topic": topics.AVAILABILITY.format(uid=uid)},
        {"topic": topics.HUB_STATUS.format()},
    ]
    out: Configs = {}
    for index, name in enumerate(view.relay_names):
        out[switch_topic(uid, index, prefix)] = {
            "name": name,
            "unique_id": topics.ha_object_id(uid, index),
            "command_topic": topics.RELAY_SET.format(uid=uid, index=index),
            "state_topic": topics.RELAY_STATE.format(uid=uid, index=index),
            "payload_on": "ON",
            "payload_off": "OFF",
            "availability": availability,
            "availability_mode": "all",
            "qos": 1,
            "retain": False,
            "device": device,
            "origin": origin,
        }
    for index in range(view.input_count):
        for event, kind in TRIGGER_TYPES.items():
            out[trigger_topic(uid, index, event, prefix)] = {
                "automation_type": "trigger",
                "topic": topics.INPUT_EVENT.format(uid=uid, index=index),
                "type": kind,
                "subtype": f"button_{index + 1}",
                "value_template": "{{ value_json.event }}",
                "payload": event,
                "device": {"identifiers": [f"hexa_{uid}"]},
            }
    return out


def encode(config: dict[str, Any] | None) -> bytes:
    """A config as its retained payload (UTF-8 JSON; empty for a removal). Names are
    user text: JSON escaping makes quotes, backslashes and emoji safe."""
    if config is None:
        return b""
    return json.dumps(config, ensure_ascii=False, separators=(",", ":")).encode()
