"""``/ws/client`` loses access when its user does: a removed member (4403), a disabled user
(4401) and an expired access token (4401) are closed, also when the change is made through
another hub instance on the same database, and every command is re-authorized."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.accounts import User, add_member, admin_token, register
from support.checks import NEGATIVE_WAIT_S, wait_until
from support.databases import migrated_database_url
from support.devices import online_device
from support.hubs import RunningHub, spawn_hub, spawned_hub, stop_hub
from support.ws import WsPeer, client_url, ws_client
from websockets.exceptions import ConnectionClosed

CLOSE_DEADLINE_S = 3.0  # the hub re-checks every 0.5 s; a generous bound for a busy machine


def remove_member(hub: RunningHub, by: User, who: User) -> None:
    with hub.api(by.access_token) as c:
        r = c.delete(f"/orgs/{by.org_id}/members/{who.id}")
    assert r.status_code == 204, r.text


def set_relay(peer: WsPeer, request_id: str, device_id: str, index: int) -> None:
    """Send set_relay; a socket the hub already closed refuses it, which is fine here."""
    with contextlib.suppress(ConnectionClosed):
        peer.send(
            {
                "type": "set_relay",
                "request_id": request_id,
                "device_id": device_id,
                "relay_index": index,
                "state": True,
            }
        )


def closed_with(peer: WsPeer, code: int, timeout: float = CLOSE_DEADLINE_S) -> bool:
    return bool(wait_until(peer.closed.is_set, timeout)) and peer.close_code == code


def state_of(peer: WsPeer, device_id: str, relays: list[bool]) -> dict[str, Any] | None:
    return peer.wait_for(
        lambda d: (
            d.get("type") == "device_state"
            and d.get("device_id") == device_id
            and d.get("relays") == relays
        ),
        5,
    )


def test_removed_member_socket_closes_4403(hub: RunningHub, track: Any) -> None:
    """A member removed from the organization is closed with 4403, its set_relay racing the
    close reaches no device, and the owner's socket stays open and keeps receiving."""
    owner, member = register(hub), register(hub)
    add_member(hub, owner, member, "operator")
    dev, device = online_device(hub, owner, track)
    mine, theirs = ws_client(hub, owner, track), ws_client(hub, member, track)
    with hub.api(owner.access_token) as api:
        assert api.post(f"/devices/{dev['id']}/relays/0", json={"state": True}).status_code == 200
    assert state_of(theirs, dev["id"], [True, False, False]), theirs.messages()
    remove_member(hub, owner, member)
    set_relay(theirs, "after-removal", dev["id"], 2)  # at once: before the periodic re-check
    assert closed_with(theirs, 4403), (theirs.close_code, theirs.messages())
    time.sleep(NEGATIVE_WAIT_S)  # nothing is expected to arrive
    assert [c for c in device.commands if c.get("relay_index") == 2] == []
    answer = theirs.wait_for(lambda d: d.get("request_id") == "after-removal", 0)
    assert answer is None or answer["ok"] is False
    with hub.api(owner.access_token) as api:
        assert api.post(f"/devices/{dev['id']}/relays/1", json={"state": True}).status_code == 200
        assert api.get(f"/devices/{dev['id']}/state").json()["relays"] == [True, True, False]
    assert state_of(mine, dev["id"], [True, True, False]), mine.messages()
    assert not mine.closed.is_set()
    assert not theirs.messages(lambda d: d.get("relays") == [True, True, False])


def test_lowered_role_closes_4403_and_wider_grants_apply(hub: RunningHub, track: Any) -> None:
    """A member who joins a second organization keeps its socket, is authorized and receives
    devices there at once; lowered from operator to viewer, it is closed with 4403."""
    owner, other_owner, member = register(hub), register(hub), register(hub)
    add_member(hub, owner, member, "operator")
    widened = ws_client(hub, member, track)
    dev, _device = online_device(hub, other_owner, track)
    add_member(hub, other_owner, member, "viewer")
    set_relay(widened, "as-viewer", dev["id"], 0)  # authorized against the database, not the
    answer = widened.result("as-viewer")  # connect-time memberships: forbidden, not not_found
    assert answer is not None and answer["ok"] is False and answer["code"] == "forbidden", answer
    with hub.api(other_owner.access_token) as api:
        assert api.post(f"/devices/{dev['id']}/relays/0", json={"state": True}).status_code == 200
    assert state_of(widened, dev["id"], [True, False, False]), widened.messages()
    with hub.api(owner.access_token) as api:
        r = api.post(
            f"/orgs/{owner.org_id}/members", json={"email": member.email, "role": "viewer"}
        )
        assert r.status_code in (200, 201), r.text
        members = api.get(f"/orgs/{owner.org_id}/members", params={"limit": 100}).json()
    assert {m["user_id"]: m["role"] for m in members["items"]}[member.id] == "viewer"
    assert closed_with(widened, 4403), (widened.close_code, widened.messages())


def test_disabled_user_socket_closes_4401(hub: RunningHub, track: Any) -> None:
    """A user disabled by a platform admin is closed with 4401; another user's socket stays."""
    victim, bystander = register(hub), register(hub)
    dev, _device = online_device(hub, bystander, track)
    gone, stays = ws_client(hub, victim, track), ws_client(hub, bystander, track)
    with hub.api(admin_token(hub)) as api:
        r = api.patch(f"/admin/users/{victim.id}", json={"is_active": False})
    assert r.status_code == 200, r.text
    assert closed_with(gone, 4401), (gone.close_code, gone.messages())
    with hub.api(bystander.access_token) as api:
        assert api.post(f"/devices/{dev['id']}/relays/2", json={"state": True}).status_code == 200
    assert state_of(stays, dev["id"], [False, False, True]), stays.messages()
    assert not stays.closed.is_set()


@pytest.fixture
def short_ttl_hub(db_kind: str, tmp_path: Path) -> Iterator[RunningHub]:
    """A hub in its own process whose access tokens live two seconds."""
    with spawned_hub(db_kind, tmp_path, access_token_ttl_s="2") as h:
        yield h


def test_expired_token_socket_closes_4401(
    short_ttl_hub: RunningHub, tmp_path: Path, track: Any
) -> None:
    """A client socket is closed with 4401 when its access token expires, without a
    traceback in the hub's log."""
    user = register(short_ttl_hub)
    peer = track(WsPeer(client_url(short_ttl_hub, user.access_token)))
    peer.send({"type": "ping"})
    assert peer.wait_for(lambda d: d.get("type") == "pong", 5)
    assert closed_with(peer, 4401, 2 + CLOSE_DEADLINE_S), (peer.close_code, peer.messages())
    stop_hub(short_ttl_hub)
    log = (tmp_path / "data" / "hub.log").read_text()
    assert "Traceback" not in log, log


@pytest.fixture
def two_instances(db_kind: str, tmp_path: Path) -> Iterator[tuple[RunningHub, RunningHub]]:
    """Two hub processes serving one database, as behind a load balancer."""
    url, drop = migrated_database_url(db_kind, tmp_path)
    first = spawn_hub(url, tmp_path / "first")
    second = None
    try:
        second = spawn_hub(url, tmp_path / "second")
        yield first, second
    finally:
        for h in (second, first):
            if h is not None:
                stop_hub(h)
        drop()


def test_member_removed_through_another_instance_closes_4403(
    two_instances: tuple[RunningHub, RunningHub], track: Any
) -> None:
    """A member removed through one hub instance is closed with 4403 on another instance."""
    first, second = two_instances
    owner, member = register(first), register(first)
    add_member(first, owner, member, "operator")
    theirs = ws_client(first, member, track)
    mine = ws_client(first, owner, track)
    remove_member(second, owner, member)
    assert closed_with(theirs, 4403), (theirs.close_code, theirs.messages())
    mine.send({"type": "ping"})
    assert wait_until(lambda: mine.count("pong") == 2, 5)
