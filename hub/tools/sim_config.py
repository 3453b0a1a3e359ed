"""What a simulated switch does with its configuration (docs/protocol.md, "Device
configuration"): input ``n`` drives relay ``n``; a linked push button toggles its relay on
each press; a linked rocker sets its relay to its position (``follow``) or toggles it on
each change (``flip``); a detached input only sends events. The configuration and the
relays survive a restart of the simulator in its state file, and the power-restore mode
decides the relays when it starts again (``off``, ``on``, or ``restore`` the last state).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hexa.hub import topics


def _defaults(count: int) -> list[topics.InputConfig]:
    return [topics.InputConfig(index=i, type="push", link="linked") for i in range(count)]


@dataclass
class SimConfig:
    """The configuration a simulated device runs (version 0: factory defaults)."""

    inputs: list[topics.InputConfig]
    version: int = 0
    power_restore_mode: topics.PowerRestoreMode = "off"

    @classmethod
    def factory(cls, count: int) -> SimConfig:
        return cls(_defaults(count))

    def apply(self, cmd: dict[str, Any]) -> str | None:
        """Take a ``config`` command; the reason it is refused, or None when applied."""
        try:
            command = topics.ConfigCommand.model_validate(cmd)
        except ValidationError as exc:
            return f"bad config: {exc.errors()[0].get('msg')}"
        indexes = sorted(i.index for i in command.inputs)
        if indexes != list(range(len(self.inputs))):
            return f"expected inputs 0-{len(self.inputs) - 1}"
        self.inputs = sorted(command.inputs, key=lambda i: i.index)
        self.version = command.config_version
        self.power_restore_mode = command.power_restore_mode
        return None

    def press(self, relays: list[bool], index: int) -> bool:
        """A push of input ``index``: True when it toggled its relay."""
        wiring = self.inputs[index]
        if wiring.link != "linked" or wiring.type != "push" or index >= len(relays):
            return False
        relays[index] = not relays[index]
        return True

    def rocker(self, relays: list[bool], index: int, position: bool, before: bool) -> bool:
        """Rocker ``index`` moved from ``before`` to ``position``: True when its relay changed."""
        wiring = self.inputs[index]
        if wiring.link != "linked" or wiring.type != "rocker" or index >= len(relays):
            return False
        if wiring.rocker_mode == "flip":
            if position == before:
                return False
            relays[index] = not relays[index]
            return True
        changed = relays[index] != position
        relays[index] = position
        return changed

    def power_on(self, saved: list[bool] | None, count: int) -> list[bool]:
        """The relays when power returns."""
        if self.power_restore_mode == "on":
            return [True] * count
        if self.power_restore_mode == "restore" and saved is not None and len(saved) == count:
            return list(saved)
        return [False] * count

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "power_restore_mode": self.power_restore_mode,
            "inputs": [i.model_dump() for i in self.inputs],
        }

    @classmethod
    def from_json(cls, data: Any, count: int) -> SimConfig:
        """A stored configuration; the factory defaults when it is missing or unreadable."""
        try:
            inputs = [topics.InputConfig.model_validate(i) for i in data["inputs"]]
            config = cls(inputs, int(data["version"]), data["power_restore_mode"])
        except (KeyError, TypeError, ValueError, ValidationError):
            return cls.factory(count)
        if len(inputs) != count or config.power_restore_mode not in ("off", "on", "restore"):
            return cls.factory(count)
        return config


@dataclass
class SimStore:
    """The simulated devices' memory (configuration and relays) under ``"sims"`` in the
    simulator's state file, next to their credentials; None path: nothing is kept."""

    path: Path | None
    _sims: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.path is not None and self.path.exists():
            try:
                sims = json.loads(self.path.read_text()).get("sims")
            except (ValueError, AttributeError):
                sims = None
            self._sims = sims if isinstance(sims, dict) else {}

    def boot(self, uid: str, relay_count: int, input_count: int) -> tuple[SimConfig, list[bool]]:
        """A device powering on: its stored configuration and the relays its power-restore
        mode gives."""
        stored = self._sims.get(uid) or {}
        config = SimConfig.from_json(stored.get("config"), input_count)
        saved = stored.get("relays")
        valid = isinstance(saved, list) and all(isinstance(r, bool) for r in saved)
        return config, config.power_on(saved if valid else None, relay_count)

    def save(self, uid: str, config: SimConfig, relays: list[bool]) -> None:
        """Remember one device's configuration and relays (the rest of the file is kept)."""
        self._sims[uid] = {"config": config.to_json(), "relays": list(relays)}
        if self.path is None:
            return
        try:
            data = json.loads(self.path.read_text()) if self.path.exists() else {}
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        data["sims"] = self._sims
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.chmod(0o600)
        os.replace(tmp, self.path)
