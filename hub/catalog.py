"""The device model catalog: what each model is made of. Data, not code."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceModel:
    """A device model's fixed capabilities."""

    name: str
    device_class: str
    relay_count: int = 0
    input_count: int = 0
    default_input_mode: str = "momentary"
    #: claimed devices get "hold any input 10 s: all relays off"
    default_hold_rule: bool = False
    description: str = ""


CATALOG: dict[str, DeviceModel] = {
    m.name: m
    for m in (
        DeviceModel(
            name="hexa-mini-switch-v1",
            device_class="relay_controller",
            relay_count=3,
            input_count=3,
            default_hold_rule=True,
            description="3 relays and 3 inputs",
        ),
    )
}


def lookup(model: str) -> DeviceModel | None:
    return CATALOG.get(model)
