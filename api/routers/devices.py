"""``/provision``, ``/devices``: provisioning, claiming, configuration, relay commands."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response

from hexa.api.deps import (
    DEVICE,
    ClaimedDevicesDep,
    HubDep,
    PageDep,
    PrincipalDep,
    fetch,
    in_visible_orgs,
)
from hexa.api.errors import request_id_of
from hexa.api.schemas import (
    AllRelaysCommand,
    ClaimBody,
    ClaimedDevice,
    CommandResult,
    DevicePatch,
    DevicePublic,
    DeviceStatePublic,
    DeviceToken,
    IoConfigPatch,
    MqttEndpoint,
    Page,
    PowerRestorePatch,
    ProvisionBody,
    ProvisionedDevice,
    RelayCommand,
    device_fields,
    device_view,
)
from hexa.hub.access import DeviceRef, Principal
from hexa.hub.commands import Origin, RelayAction
from hexa.hub.errors import NotFound, Unauthorized
from hexa.hub.security import same_secret
from hexa.models import Device, DeviceInput, RelayState

if TYPE_CHECKING:
    from hexa.hub.runtime import Hub

router = APIRouter(tags=["devices"])


async def _full_view(device: Device) -> DevicePublic:
    relays = await RelayState.filter(device_id=device.id)
    inputs = await DeviceInput.filter(device_id=device.id)
    return device_view(device, relays, inputs)


@router.post("/provision/register", status_code=201)
async def provision(
    body: ProvisionBody,
    hub: HubDep,
    x_provision_key: Annotated[str | None, Header()] = None,
) -> ProvisionedDevice:
    expected = hub.settings.device_provision_key
    assert expected is not None
    if not x_provision_key or not same_secret(x_provision_key, expected):
        raise Unauthorized("missing or wrong X-Provision-Key")
    device, token, code = await hub.registry.provision(body.model, body.serial, body.fw_version)
    return ProvisionedDevice(
        id=device.id,
        device_uid=device.device_uid,
        device_token=token,
        claim_code=code,
        model=device.model,
        relay_count=device.relay_count,
        input_count=device.input_count,
        mqtt=MqttEndpoint.model_validate(hub.mqtt_endpoint()),
        ws_url=hub.ws_device_url(),
    )


@router.post("/devices/claim")
async def claim(
    body: ClaimBody, principal: PrincipalDep, hub: HubDep, request: Request
) -> ClaimedDevice:
    device, token = await hub.registry.claim(
        principal,
        body.claim_code,
        body.org_id,
        body.site_id,
        body.area_id,
        body.name,
        request_id=request_id_of(request),
    )
    relays = await RelayState.filter(device_id=device.id)
    inputs = await DeviceInput.filter(device_id=device.id)
    # released before: the token to install on it, shown once (else None, left out)
    return ClaimedDevice(**device_fields(device, relays, inputs), device_token=token)


@router.get("/devices")
async def list_devices(
    principal: PrincipalDep,
    page: PageDep,
    org_id: uuid.UUID | None = None,
    site_id: uuid.UUID | None = None,
    area_id: uuid.UUID | None = None,
    online: bool | None = None,
    model: Annotated[str | None, Query(max_length=64)] = None,
) -> Page[DevicePublic]:
    query = in_visible_orgs(Device.filter(deleted_at=None, org_id__isnull=False), principal)
    if org_id is not None:
        query = query.filter(org_id=org_id)
    if site_id is not None:
        query = query.filter(site_id=site_id)
    if area_id is not None:
        query = query.filter(area_id=area_id)
    if online is not None:
        query = query.filter(online=online)
    if model is not None:
        query = query.filter(model=model)
    devices, total = await page.rows(query)
    return page.wrap(await device_views(devices), total)


async def device_views(devices: Sequence[Device]) -> list[DevicePublic]:
    """Device resources with their relays and inputs, in two queries for the whole page."""
    ids = [d.id for d in devices]
    relays: dict[Any, list[RelayState]] = {i: [] for i in ids}
    inputs: dict[Any, list[DeviceInput]] = {i: [] for i in ids}
    for r in await RelayState.filter(device_id__in=ids):
        relays[r.device_id].append(r)
    for i in await DeviceInput.filter(device_id__in=ids):
        inputs[i.device_id].append(i)
    return [device_view(d, relays[d.id], inputs[d.id]) for d in devices]


@router.get("/devices/{device_id}")
async def get_device(device_id: uuid.UUID, principal: PrincipalDep) -> DevicePublic:
    return await _full_view(await fetch(DEVICE, device_id, principal, "read"))


@router.patch("/devices/{device_id}")
async def patch_device(
    device_id: uuid.UUID, body: DevicePatch, principal: PrincipalDep, hub: HubDep, request: Request
) -> DevicePublic:
    changes = body.changes("site_id", "area_id", "relay_names")
    device = await hub.registry.update(
        principal, device_id, changes, request_id=request_id_of(request)
    )
    return await _full_view(device)


@router.patch("/devices/{device_id}/io-config")
async def patch_io_config(
    device_id: uuid.UUID,
    body: IoConfigPatch,
    principal: PrincipalDep,
    hub: HubDep,
    request: Request,
) -> DevicePublic:
    """Change the listed inputs' wiring (manager+); the whole configuration, at its new
    ``config_version``, goes to the device at once if it is connected, else when it is."""
    device = await hub.device_config.set_io(
        principal,
        device_id,
        [item.model_dump() for item in body.inputs],
        request_id=request_id_of(request),
    )
    return await _full_view(device)


@router.patch("/devices/{device_id}/power-restore-mode")
async def patch_power_restore_mode(
    device_id: uuid.UUID,
    body: PowerRestorePatch,
    principal: PrincipalDep,
    hub: HubDep,
    request: Request,
) -> DevicePublic:
    """What the relays do when power returns: ``off``, ``on`` or ``restore`` (manager+)."""
    device = await hub.device_config.set_power_restore(
        principal, device_id, body.mode, request_id=request_id_of(request)
    )
    return await _full_view(device)


@router.delete("/devices/{device_id}", status_code=204)
async def delete_device(
    device_id: uuid.UUID, principal: PrincipalDep, hub: HubDep, request: Request
) -> Response:
    await hub.registry.delete(principal, device_id, request_id=request_id_of(request))
    return Response(status_code=204)


@router.post("/devices/{device_id}/release")
async def release_device(
    device_id: uuid.UUID, principal: PrincipalDep, hub: HubDep, request: Request
) -> DevicePublic:
    device = await hub.registry.release(principal, device_id, request_id=request_id_of(request))
    return await _full_view(device)


@router.post("/devices/{device_id}/token/rotate")
async def rotate_token(
    device_id: uuid.UUID, principal: PrincipalDep, hub: HubDep, request: Request
) -> DeviceToken:
    token = await hub.registry.rotate_token(principal, device_id, request_id=request_id_of(request))
    return DeviceToken(device_token=token)


@router.get("/devices/{device_id}/state")
async def device_state(device_id: uuid.UUID, principal: PrincipalDep) -> DeviceStatePublic:
    device = await fetch(DEVICE, device_id, principal, "read")
    relays = await RelayState.filter(device_id=device.id).order_by("index")
    inputs = await DeviceInput.filter(device_id=device.id).order_by("index")
    return DeviceStatePublic(
        relays=[r.state for r in relays],
        inputs=[i.state for i in inputs],
        online=device.online,
        last_seen_at=device.last_seen_at,
    )


@router.post("/devices/{device_id}/relays/{relay_index}")
async def set_relay(
    device_id: uuid.UUID,
    relay_index: Annotated[int, Path(ge=0, le=63)],
    body: RelayCommand,
    principal: PrincipalDep,
    devices: ClaimedDevicesDep,
    hub: HubDep,
    request: Request,
) -> CommandResult:
    device = await fetch(devices.scope, device_id, principal, "command_relays")
    if relay_index >= device.relay_count:
        raise NotFound("relay")
    return await _command(hub, principal, device, relay_index, body.state, request)


@router.post("/devices/{device_id}/relays")
async def set_all_relays(
    device_id: uuid.UUID,
    body: AllRelaysCommand,
    principal: PrincipalDep,
    devices: ClaimedDevicesDep,
    hub: HubDep,
    request: Request,
) -> CommandResult:
    device = await fetch(devices.scope, device_id, principal, "command_relays")
    return await _command(hub, principal, device, None, body.state, request)


async def _command(
    hub: Hub,
    principal: Principal,
    device: DeviceRef,
    relay_index: int | None,
    state: bool | str,
    request: Request,
) -> CommandResult:
    """Publish the intent, wait for its result; anything but applied raises its error."""
    result = await hub.commands.execute(
        device.uid,
        RelayAction.of(relay_index, state),
        Origin(
            "api", actor_type="user", actor_id=str(principal.id), request_id=request_id_of(request)
        ),
    )
    return CommandResult.model_validate(
        {
            "device_id": device.id,
            "relays": result.relays,
            "latency_ms": result.latency_ms,
            "command_id": result.command_id,
        }
    )
