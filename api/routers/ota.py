"""``/ota``: signed firmware updates. Keys and releases for platform admins; check,
manifest, artifact and report for devices (HTTP Basic: ``device_uid:device_token``);
``/devices/{id}/ota`` tells a connected device to check now."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, FastAPI, File, Form, Query, Request, Response, UploadFile
from fastapi.responses import FileResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.datastructures import URLPath
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.types import Receive, Scope, Send

from hexa.api.deps import HubDep, PageDep, PrincipalDep, get_principal
from hexa.api.errors import request_id_of
from hexa.api.schemas import Body, Page, Timestamp
from hexa.hub import ota_crypto
from hexa.hub.access import Principal
from hexa.hub.errors import Forbidden, NotFound, Unauthorized, ValidationFailed
from hexa.hub.ota import Offer
from hexa.hub.ota_reports import REPORT_STATES
from hexa.models import Device, OtaKey, OtaRelease

if TYPE_CHECKING:
    from hexa.hub.runtime import Hub

router = APIRouter(tags=["ota"])

Channel = Literal["dev", "beta", "stable"]

_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
_INTEGRITY: dict[int | str, dict[str, Any]] = {
    409: {"description": "release_integrity_failed: a fail-closed check failed", "content": _ERROR}
}


# --- who is asking -------------------------------------------------------------------------
async def platform_admin(principal: PrincipalDep) -> Principal:
    if not principal.is_platform_admin:
        raise Forbidden("OTA keys and releases are managed by platform admins")
    return principal


AdminDep = Annotated[Principal, Depends(platform_admin)]
_bearer = HTTPBearer(auto_error=False)


def _basic(request: Request) -> tuple[str, str] | None:
    return _basic_pair(request.headers.get("authorization", ""))


def _basic_pair(header: str) -> tuple[str, str] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    uid, sep, token = decoded.partition(":")
    return (uid, token) if sep else None


async def current_device(request: Request) -> Device:
    """The device of the ``Authorization: Basic base64(device_uid:device_token)`` header:
    the same pair as MQTT. Missing, wrong or revoked → 401."""
    return await _authenticated(request.app.state.hub, _basic(request))


async def _authenticated(hub: Hub, pair: tuple[str, str] | None) -> Device:
    device = await hub.ota.authenticate(*pair) if pair else None
    if device is None:
        raise Unauthorized("device credentials are missing or wrong")
    return device


DeviceDep = Annotated[Device, Depends(current_device)]


async def user_or_device(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> object:
    """A signed-in user (Bearer) or a device (Basic)."""
    if _basic(request) is not None:
        return await current_device(request)
    return await get_principal(request, credentials)


# --- shapes --------------------------------------------------------------------------------
class OtaKeyPublic(BaseModel):
    key_id: str
    status: Literal["active", "next", "retired"]
    public_key_pem: str
    created_at: Timestamp
    activated_at: Timestamp | None
    retired_at: Timestamp | None


class OtaKeyList(BaseModel):
    items: list[OtaKeyPublic]


class OtaReleasePublic(BaseModel):
    id: uuid.UUID
    model: str
    version: str
    channel: Channel
    security_version: int
    notes: str | None
    sha256: str
    size: int
    status: Literal["draft", "published", "halted", "withdrawn"]
    rollout_percent: int
    halt_failure_percent: int
    key_id: str
    next_key_id: str | None
    created_at: Timestamp
    updated_at: Timestamp
    expires_at: Timestamp
    published_at: Timestamp | None
    halted_at: Timestamp | None


class ReleasePatch(Body):
    status: Literal["published", "withdrawn"] | None = None
    rollout_percent: Annotated[int, Field(ge=0, le=100)] | None = None
    halt_failure_percent: Annotated[int, Field(ge=1, le=100)] | None = None


class CheckAnswer(BaseModel):
    update: bool
    release_id: uuid.UUID | None = Field(default=None, exclude_if=lambda v: v is None)
    version: str | None = Field(default=None, exclude_if=lambda v: v is None)
    security_version: int | None = Field(default=None, exclude_if=lambda v: v is None)
    manifest_url: str | None = Field(default=None, exclude_if=lambda v: v is None)


class ManifestFields(BaseModel):
    release_id: str
    model: str
    version: str
    channel: str
    security_version: int
    url: str
    sha256: str
    size: int
    issued_at: str
    expires_at: str
    key_id: str
    next_key_id: str | None


class SignedManifest(BaseModel):
    manifest: ManifestFields
    alg: str
    key_id: str
    signature: str


class Report(Body):
    release_id: uuid.UUID
    status: Literal["downloading", "verified", "installing", "applied", "failed"]
    error: Annotated[str, Field(max_length=500)] | None = None


class OtaCommandSent(BaseModel):
    command_id: str
    release_id: uuid.UUID
    version: str
    manifest_url: str


def key_view(key: OtaKey) -> OtaKeyPublic:
    return OtaKeyPublic.model_validate(
        {
            "key_id": str(key.id),
            "status": key.status,
            "public_key_pem": key.public_key_pem,
            "created_at": key.created_at,
            "activated_at": key.activated_at,
            "retired_at": key.retired_at,
        }
    )


def release_view(r: OtaRelease) -> OtaReleasePublic:
    return OtaReleasePublic.model_validate(
        {name: getattr(r, name) for name in OtaReleasePublic.model_fields}
    )


# --- keys ----------------------------------------------------------------------------------
@router.get("/ota/keys")
async def list_keys(
    _: Annotated[object, Depends(user_or_device)], page: PageDep
) -> Page[OtaKeyPublic]:
    """The public keys and their status (any signed-in user, and devices), newest first,
    so the active and next keys are always on the first page."""
    return await page.of(OtaKey.all(), key_view, "-created_at", "-id")


@router.post("/ota/keys", status_code=201)
async def create_key(principal: AdminDep, hub: HubDep, request: Request) -> OtaKeyPublic:
    """A new signing key: ``active`` if there is none, else ``next`` (409 if one exists)."""
    return key_view(await hub.ota.create_key(principal, request_id=request_id_of(request)))


@router.post("/ota/keys/rotate")
async def rotate_keys(principal: AdminDep, hub: HubDep, request: Request) -> OtaKeyList:
    """``next`` becomes ``active``, ``active`` becomes ``retired`` (409 without a next key)."""
    keys = await hub.ota.rotate(principal, request_id=request_id_of(request))
    return OtaKeyList(items=[key_view(k) for k in keys])


# --- releases ------------------------------------------------------------------------------
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _stage(source: IO[bytes], target: Path, limit: int) -> tuple[str, int]:
    """Copy the spooled upload into ``target`` chunk by chunk, hashing as it goes; refuses
    (and removes the copy) past ``limit`` bytes. Never holds the image in memory."""
    digest = hashlib.sha256()
    size = 0
    source.seek(0)
    with target.open("xb") as out:
        while chunk := source.read(1024 * 1024):
            size += len(chunk)
            if size > limit:
                break
            digest.update(chunk)
            out.write(chunk)
        out.flush()
    if size > limit:
        target.unlink(missing_ok=True)
        raise HTTPException(413, f"the firmware image exceeds HEXA_OTA_MAX_BYTES ({limit} bytes)")
    target.chmod(0o600)
    return digest.hexdigest(), size


@router.post("/ota/releases", status_code=201)
async def upload_release(
    principal: AdminDep,
    hub: HubDep,
    request: Request,
    file: Annotated[UploadFile, File(description="the firmware image")],
    model: Annotated[str, Form(max_length=64)],
    version: Annotated[str, Form(max_length=64)],
    channel: Annotated[Channel, Form()],
    security_version: Annotated[int, Form(ge=0, le=2**31 - 1)],
    notes: Annotated[str | None, Form(max_length=10_000)] = None,
    expires_at: Annotated[datetime | None, Form()] = None,
) -> OtaReleasePublic:
    """Upload a firmware image (``multipart/form-data``): stored, hashed and signed as a
    draft. 409 for a model+version that exists, 413 above ``HEXA_OTA_MAX_BYTES``."""
    if not _MODEL.match(model):
        raise ValidationFailed("model: not a model name", details={"field": "model"})
    if ota_crypto.parse_version(version) is None:
        raise ValidationFailed(
            "version: not a semantic version (MAJOR.MINOR.PATCH)", details={"field": "version"}
        )
    if expires_at is not None and expires_at.tzinfo is None:
        raise ValidationFailed("expires_at: needs a time zone (Z)", details={"field": "expires_at"})
    ota = hub.ota
    ota.prepare_storage()
    staged = ota.artifacts / f".upload-{uuid.uuid4().hex}"
    try:
        sha256, size = await anyio.to_thread.run_sync(
            _stage, file.file, staged, hub.settings.ota_max_bytes
        )
        if size == 0:
            raise ValidationFailed("file: the firmware image is empty", details={"field": "file"})
        release = await ota.upload(
            principal,
            model=model,
            version=version,
            channel=channel,
            security_version=security_version,
            notes=notes,
            expires_at=expires_at,
            staged=staged,
            sha256=sha256,
            size=size,
            request_id=request_id_of(request),
        )
    finally:
        staged.unlink(missing_ok=True)
        await file.close()
    return release_view(release)


@router.get("/ota/releases")
async def list_releases(
    _: AdminDep,
    page: PageDep,
    model: Annotated[str | None, Query(max_length=64)] = None,
    status: Literal["draft", "published", "halted", "withdrawn"] | None = None,
    channel: Channel | None = None,
) -> Page[OtaReleasePublic]:
    query = OtaRelease.all()
    if model is not None:
        query = query.filter(model=model)
    if status is not None:
        query = query.filter(status=status)
    if channel is not None:
        query = query.filter(channel=channel)
    return await page.of(query, release_view)


@router.get("/ota/releases/{release_id}")
async def get_release(_: AdminDep, release_id: uuid.UUID) -> OtaReleasePublic:
    release = await OtaRelease.get_or_none(id=release_id)
    if release is None:
        raise NotFound("release")
    return release_view(release)


@router.patch("/ota/releases/{release_id}")
async def patch_release(
    principal: AdminDep, release_id: uuid.UUID, body: ReleasePatch, hub: HubDep, request: Request
) -> OtaReleasePublic:
    """Publish (or resume a halted release), withdraw, set the rollout percentage and the
    failure percentage that halts it."""
    release = await hub.ota.update(
        principal,
        release_id,
        body.model_dump(exclude_unset=True),
        request_id=request_id_of(request),
    )
    return release_view(release)


# --- devices -------------------------------------------------------------------------------
@router.get("/ota/check")
async def check(
    device: DeviceDep,
    hub: HubDep,
    current_version: Annotated[str | None, Query(max_length=64)] = None,
) -> CheckAnswer:
    """Whether an update is offered to the calling device. ``current_version``, when
    given, is the version it runs (recorded as its ``fw_version``)."""
    return CheckAnswer.model_validate(check_answer(await _offer(hub, device, current_version)))


async def _offer(hub: Hub, device: Device, current_version: str | None) -> Offer | None:
    if current_version and current_version != device.fw_version:
        await Device.filter(id=device.id).update(fw_version=current_version)
        device.fw_version = current_version
    return await hub.ota.offer(device, device.fw_version)


def check_answer(offer: Offer | None) -> dict[str, Any]:
    """What ``GET /ota/check`` answers, in :class:`CheckAnswer`'s order."""
    if offer is None:
        return {"update": False}
    return {
        "update": True,
        "release_id": str(offer.release.id),
        "version": offer.release.version,
        "security_version": offer.release.security_version,
        "manifest_url": offer.manifest_url,
    }


@router.get("/ota/manifest/{device_uid}", responses=_INTEGRITY)
async def manifest(device_uid: str, device: DeviceDep, hub: HubDep) -> SignedManifest:
    """The signed manifest of the release offered to the device (404 ``no_update``; 409
    ``release_integrity_failed``). Another device's uid is 404."""
    if device_uid != device.device_uid:
        raise NotFound("device")
    return SignedManifest.model_validate(await hub.ota.signed_manifest(device))


@router.get(
    "/ota/artifacts/{release_id}",
    response_class=FileResponse,
    responses={
        200: {"description": "the firmware image", "content": _BINARY},
        206: {"description": "the requested Range of it", "content": _BINARY},
        **_INTEGRITY,
    },
)
async def artifact(release_id: uuid.UUID, device: DeviceDep, hub: HubDep) -> Response:
    """The firmware image of a release offered to the device (``Range`` honoured)."""
    path, release = await hub.ota.artifact(device, release_id)
    return ArtifactResponse(
        path,
        media_type="application/octet-stream",
        filename=f"{release.model}-{release.version}.bin",
        headers={"ETag": f'"{release.sha256}"', "Cache-Control": "no-store"},
        stat_result=os.stat(path),  # a syscall here rather than a worker thread per download
    )


class _LoopFile:
    """A regular file read in the event loop, unbuffered (see :class:`ArtifactResponse`)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by aclose

    async def read(self, size: int = -1) -> bytes:
        return self._file.read(size)

    async def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    async def aclose(self) -> None:
        self._file.close()


class ArtifactResponse(FileResponse):
    """:class:`FileResponse` (``Range`` and all) that reads the artifact in the event loop,
    16 KiB a read, instead of handing every read to a worker thread (a hundred concurrent
    downloads started up to 40 of them). A read of an artifact the hub has just checked
    comes from the page cache: microseconds."""

    #: 16 KiB a read: with Starlette's 64 KiB, a hundred downloads to slow readers grew the
    #: hub by about 12 MiB while they ran (bytes waiting in the connections' buffers); with
    #: 16 KiB by under a MiB (``hexa bench --ota``), for a few more sends per MiB
    chunk_size = 16 * 1024

    @asynccontextmanager
    async def _open_file(self) -> AsyncIterator[_LoopFile]:  # type: ignore[override]
        file = _LoopFile(self.path)
        try:
            yield file
        finally:
            await file.aclose()


@router.post("/ota/report", status_code=204)
async def report(body: Report, device: DeviceDep, hub: HubDep) -> Response:
    """A step of an update: downloading, verified, installing, applied or failed."""
    assert body.status in REPORT_STATES
    await hub.ota.report(device, body.release_id, body.status, body.error)
    return Response(status_code=204)


@router.post(
    "/devices/{device_id}/ota",
    status_code=202,
    responses={503: {"description": "device_offline: not connected", "content": _ERROR}},
)
async def tell_device(
    device_id: uuid.UUID, principal: PrincipalDep, hub: HubDep, request: Request
) -> OtaCommandSent:
    """Tell a connected device to update now (manager+): 404 ``no_update`` when no release
    is offered to it, 503 ``device_offline`` when it is not connected."""
    command, release = await hub.ota.tell_device(
        principal, device_id, request_id=request_id_of(request)
    )
    return OtaCommandSent(
        command_id=command.command_id,
        release_id=release.id,
        version=release.version,
        manifest_url=command.manifest_url,
    )


# --- the fleet's routes without the dependency machinery ------------------------------------
#: a query string the fast path takes as it is: none, or ``current_version`` once, of
#: characters that stand for themselves (no %-escapes, no ``+``), within its 64-character limit
_PLAIN_CHECK_QUERY = re.compile(rb"(?:current_version=([A-Za-z0-9._~-]{0,64}))?")
_JSON_HEADERS = b"application/json"


class DeviceFastRoute(BaseRoute):
    """``GET /ota/check`` and ``GET /ota/manifest/{device_uid}`` as the fleet sends them,
    answered without FastAPI's route scan, dependency resolution and response validation
    (most of what a check cost the hub). Placed first among the application's routes, so
    inside the whole middleware stack (request id, 426, security headers, body limit,
    metrics, access log) and the exception handlers (the error envelope) like any route.

    It takes only requests the FastAPI route would accept as they are: GET, no root path,
    no query for the manifest, and for the check no query but ``current_version`` in plain
    characters. Anything else (another method, %-escapes, extra or repeated parameters, an
    over-long version) does not match and goes on to the FastAPI route of the same path,
    which validates it. Both
    run the same code below them (:func:`_offer`, :meth:`Ota.signed_manifest`): the
    device's credentials and every fail-closed check of the release on every request.
    """

    def __init__(self, path: str, kind: Literal["check", "manifest"]) -> None:
        self.path = self.path_format = path  # the template: metrics and the access log
        self.kind = kind
        self.prefix = path.removesuffix("{device_uid}")
        self.name = f"ota_{kind}_fast"
        self.include_in_schema = False  # the FastAPI route of the same path documents it

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http" or scope["method"] != "GET" or scope.get("root_path"):
            return Match.NONE, {}
        path: str = scope["path"]
        if self.kind == "check":
            if path != self.path or not _PLAIN_CHECK_QUERY.fullmatch(scope["query_string"]):
                return Match.NONE, {}
            return Match.FULL, {"route": self, "endpoint": self.handle, "path_params": {}}
        uid = path[len(self.prefix) :]
        if scope["query_string"] or not path.startswith(self.prefix) or not uid or "/" in uid:
            return Match.NONE, {}
        return Match.FULL, {
            "route": self,
            "endpoint": self.handle,
            "path_params": {"device_uid": uid},
        }

    def url_path_for(self, name: str, /, **path_params: Any) -> URLPath:
        raise NoMatchFound(name, path_params)  # the FastAPI route of the same path has a name

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        hub: Hub = scope["app"].state.hub
        authorization = ""
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        device = await _authenticated(hub, _basic_pair(authorization))
        if self.kind == "check":
            plain = _PLAIN_CHECK_QUERY.fullmatch(scope["query_string"])
            version = plain[1].decode() if plain and plain[1] is not None else None
            answer = check_answer(await _offer(hub, device, version))
            body = json.dumps(answer, separators=(",", ":")).encode()
        else:
            if scope["path_params"]["device_uid"] != device.device_uid:
                raise NotFound("device")
            signed = SignedManifest.model_validate(await hub.ota.signed_manifest(device))
            body = signed.model_dump_json().encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-length", str(len(body)).encode()),
                    (b"content-type", _JSON_HEADERS),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def install_fast_routes(app: FastAPI, prefix: str = "/api/v1") -> None:
    """Put :class:`DeviceFastRoute` ahead of every other route of ``app``."""
    app.router.routes[0:0] = [
        DeviceFastRoute(f"{prefix}/ota/check", "check"),
        DeviceFastRoute(f"{prefix}/ota/manifest/{{device_uid}}", "manifest"),
    ]
