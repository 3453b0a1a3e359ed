"""ACL decisions of contract §3, as a matrix over identities and topics."""

from __future__ import annotations

import uuid

import pytest

from hexa.broker.acl import Identity, Kind, may_publish, may_receive, may_subscribe

ORG_A, ORG_B = uuid.uuid4(), uuid.uuid4()
DEVICES = {"hx-a1": ORG_A, "hx-b1": ORG_B, "hx-free": None}


def org_of(uid: str) -> uuid.UUID | None:
    return DEVICES[uid]


DEV = Identity(Kind.DEVICE, "hx-a1")
INT_A = Identity(Kind.INTEGRATION, "int-a", org_id=ORG_A)
HUB = Identity(Kind.HUB, "$hub")


@pytest.mark.parametrize(
    ("topic", "allowed"),
    [
        ("hexa/hx-a1/ack", True),
        ("hexa/hx-a1/report", True),
        ("hexa/hx-a1/event", True),
        ("hexa/hx-a1/availability", True),
        ("hexa/hx-a1/state", False),
        ("hexa/hx-a1/cmd", False),
        ("hexa/hx-a1/relay/0/set", False),
        ("hexa/hx-b1/report", False),
        ("hexa/hx-b1/ack", False),
        ("hexa/hub/status", False),
        ("homeassistant/status", False),
    ],
)
def test_device_publish(topic: str, allowed: bool) -> None:
    """A device publishes only its own ack, report, event and availability."""
    assert may_publish(DEV, topic, org_of) is allowed


@pytest.mark.parametrize(
    ("flt", "allowed"),
    [
        ("hexa/hx-a1/cmd", True),
        ("hexa/hub/status", True),
        ("hexa/hx-b1/cmd", False),
        ("hexa/+/cmd", False),
        ("hexa/#", False),
        ("#", False),
        ("hexa/hx-a1/state", False),
    ],
)
def test_device_subscribe(flt: str, allowed: bool) -> None:
    """A device subscribes only to its own cmd (and the hub's status)."""
    assert may_subscribe(DEV, flt, org_of) is allowed


@pytest.mark.parametrize(
    ("topic", "allowed"),
    [
        ("hexa/hx-a1/relay/0/set", True),
        ("hexa/hx-a1/relays/set", True),
        ("hexa/hx-b1/relay/0/set", False),
        ("hexa/hx-free/relay/0/set", False),
        ("hexa/hx-unknown/relay/0/set", False),
        ("hexa/hx-a1/cmd", False),
        ("hexa/hx-a1/relay/0/state", False),
        ("hexa/hx-a1/report", False),
        ("homeassistant/status", True),
        ("homeassistant/switch/x/config", False),
        ("hexa/hub/status", False),
    ],
)
def test_integration_publish(topic: str, allowed: bool) -> None:
    """An integration publishes intents for its org's devices and homeassistant/status only."""
    assert may_publish(INT_A, topic, org_of) is allowed


@pytest.mark.parametrize(
    ("flt", "allowed"),
    [
        ("hexa/#", True),
        ("homeassistant/#", True),
        ("hexa/+/state", True),
        ("hexa/hx-a1/#", True),
        ("hexa/hx-b1/#", False),
        ("#", False),
        ("+/status", False),
        ("$SYS/#", False),
    ],
)
def test_integration_subscribe(flt: str, allowed: bool) -> None:
    """An integration subscribes under hexa/ and homeassistant/, never to another org's device."""
    assert may_subscribe(INT_A, flt, org_of) is allowed


@pytest.mark.parametrize(
    ("topic", "allowed"),
    [
        ("hexa/hx-a1/state", True),
        ("hexa/hx-a1/relay/1/state", True),
        ("hexa/hub/status", True),
        ("hexa/hx-b1/state", False),
        ("hexa/hx-free/state", False),
        ("hexa/hx-unknown/state", False),
        ("homeassistant/switch/hexa_hx-a1_0/config", True),
        ("homeassistant/switch/hexa_hx-b1_0/config", False),
        ("homeassistant/status", True),
    ],
)
def test_integration_receive(topic: str, allowed: bool) -> None:
    """Delivery to an integration is limited to its org's devices and shared hub topics."""
    assert may_receive(INT_A, topic, org_of) is allowed


def test_device_receives_only_its_commands() -> None:
    """A device is delivered its own cmd and the hub status, nothing else."""
    assert may_receive(DEV, "hexa/hx-a1/cmd", org_of)
    assert may_receive(DEV, "hexa/hub/status", org_of)
    assert not may_receive(DEV, "hexa/hx-b1/cmd", org_of)
    assert not may_receive(DEV, "hexa/hx-a1/state", org_of)


def test_hub_may_do_everything() -> None:
    """The hub's own session is unrestricted."""
    assert may_publish(HUB, "hexa/hx-b1/cmd", org_of)
    assert may_subscribe(HUB, "#", org_of)
    assert may_receive(HUB, "hexa/hx-free/ack", org_of)
