"""``hexa sim``: firmware updates as a device performs them.

On an ``ota`` command (or a periodic ``GET /ota/check``) a simulated device fetches the
hub's public keys and the signed manifest, verifies the signature over the canonical JSON
with a key that is not retired, checks the manifest (its model, a version above its own,
a security version not below its own, not expired), downloads the artifact, checks its
size and SHA-256, and reports each step (``downloading``, ``verified``, ``installing``,
``applied``). Anything that does not verify is refused and reported ``failed``; the device
keeps the firmware it runs. Verification is written here as firmware would write it, from
docs/protocol.md, not with the hub's own code.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

if TYPE_CHECKING:
    from hexa.hub.tools.sim import SimDevice

log = logging.getLogger(__name__)

ALG = "ecdsa-p256-sha256"
_SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")


class Refused(Exception):
    """The update does not verify; the message says why (it is reported as the error)."""


def _version_key(text: str) -> tuple[Any, ...] | None:
    m = _SEMVER.match(text or "")
    if m is None:
        return None
    pre = m.group(4)
    parts: tuple[Any, ...] = (
        tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split(".")) if pre else ()
    )
    return (int(m.group(1)), int(m.group(2)), int(m.group(3)), 0 if pre else 1, parts)


def canonical(document: dict[str, Any]) -> bytes:
    """Keys sorted, separators ``,`` and ``:``, no whitespace, UTF-8."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def check_manifest(
    signed: dict[str, Any],
    keys: list[dict[str, Any]],
    *,
    model: str,
    fw_version: str,
    security_version: int,
    now: datetime,
) -> dict[str, Any]:
    """The manifest, if it verifies in every respect; else :class:`Refused`."""
    manifest = signed.get("manifest")
    if not isinstance(manifest, dict):
        raise Refused("no manifest")
    if signed.get("alg") != ALG:
        raise Refused(f"algorithm {signed.get('alg')!r} is not {ALG}")
    key_id = signed.get("key_id")
    if key_id != manifest.get("key_id"):
        raise Refused("the signature's key is not the manifest's")
    trusted = {k["key_id"]: k for k in keys if k.get("status") in ("active", "next")}
    if key_id not in trusted:
        raise Refused("signed with a key that is unknown or retired")
    public = serialization.load_pem_public_key(trusted[key_id]["public_key_pem"].encode())
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise Refused("the key is not an EC key")
    try:
        signature = base64.b64decode(str(signed.get("signature")), validate=True)
        public.verify(signature, canonical(manifest), ec.ECDSA(hashes.SHA256()))
    except (ValueError, InvalidSignature):
        raise Refused("the signature does not verify") from None
    if manifest.get("model") != model:
        raise Refused(f"firmware for {manifest.get('model')!r}, not this model")
    new, old = _version_key(str(manifest.get("version"))), _version_key(fw_version)
    if new is None or (old is not None and new <= old):
        raise Refused(f"version {manifest.get('version')} is not above {fw_version}")
    if not isinstance(manifest.get("security_version"), int) or (
        manifest["security_version"] < security_version
    ):
        raise Refused("security version below the one installed (anti-rollback)")
    try:
        expires = datetime.strptime(
            str(manifest.get("expires_at")).replace("Z", "+0000"), "%Y-%m-%dT%H:%M:%S%z"
        )
    except ValueError:
        raise Refused("no valid expiry") from None
    if expires <= now:
        raise Refused("the manifest has expired")
    if not isinstance(manifest.get("size"), int) or not isinstance(manifest.get("sha256"), str):
        raise Refused("no size or hash")
    return manifest


@dataclass
class SimOta:
    """A simulated device's firmware: its version, security version, and update worker."""

    fw_version: str = "1.0.0"
    security_version: int = 0
    model: str = "hexa-mini-switch-v1"
    #: the outcome of each update attempted: ``applied <version>`` or ``failed: <reason>``
    outcomes: list[str] = field(default_factory=list)
    _jobs: asyncio.Queue[str] = field(default_factory=lambda: asyncio.Queue(16))

    def request(self, cmd: dict[str, Any]) -> None:
        """An ``ota`` command: update from its ``manifest_url`` (queued, one at a time)."""
        url = cmd.get("manifest_url")
        if isinstance(url, str) and url.startswith(("http://", "https://")):
            try:
                self._jobs.put_nowait(url)
            except asyncio.QueueFull:
                log.warning("ota command dropped: updates already queued")

    async def run(self, device: SimDevice, check_every: float | None = None) -> None:
        """Perform queued updates; with ``check_every``, ask the hub that often too."""
        while True:
            url: str | None
            try:
                url = await asyncio.wait_for(self._jobs.get(), check_every)
            except TimeoutError:
                url = await self._check(device)
            if url is not None:
                await self.update(device, url)

    async def _check(self, device: SimDevice) -> str | None:
        base = device.creds.ws_url.replace("ws://", "http://").replace("wss://", "https://")
        base = base.removesuffix("/ws/device") + "/api/v1"
        async with self._client(device) as client:
            try:
                r = await client.get(
                    f"{base}/ota/check", params={"current_version": self.fw_version}
                )
            except httpx.HTTPError:
                return None
        body = r.json() if r.status_code == 200 else {}
        return body.get("manifest_url") if body.get("update") else None

    @staticmethod
    def _client(device: SimDevice) -> httpx.AsyncClient:
        return httpx.AsyncClient(auth=(device.uid, device.creds.device_token), timeout=60)

    async def update(self, device: SimDevice, manifest_url: str) -> str:
        """One update from ``manifest_url``; returns and records its outcome."""
        api = manifest_url.split("/ota/manifest/")[0]
        release_id: str | None = None
        async with self._client(device) as client:

            async def report(status: str, error: str | None = None) -> None:
                if release_id is None:
                    return
                body: dict[str, Any] = {"release_id": release_id, "status": status}
                if error:
                    body["error"] = error[:500]
                try:
                    await client.post(f"{api}/ota/report", json=body)
                except httpx.HTTPError as exc:
                    log.warning("sim %s: report %s not sent (%s)", device.uid, status, exc)

            try:
                keys = (await client.get(f"{api}/ota/keys")).json()["items"]
                r = await client.get(manifest_url)
                if r.status_code != 200:
                    raise Refused(f"manifest answered {r.status_code}")
                signed = r.json()
                manifest_doc = signed.get("manifest") if isinstance(signed, dict) else None
                if isinstance(manifest_doc, dict) and isinstance(
                    manifest_doc.get("release_id"), str
                ):
                    release_id = manifest_doc["release_id"]
                manifest = check_manifest(
                    signed,
                    keys,
                    model=self.model,
                    fw_version=self.fw_version,
                    security_version=self.security_version,
                    now=datetime.now(UTC),
                )
                await report("downloading")
                digest, size = hashlib.sha256(), 0
                async with client.stream("GET", manifest["url"]) as download:
                    if download.status_code != 200:
                        raise Refused(f"artifact answered {download.status_code}")
                    async for chunk in download.aiter_bytes():
                        size += len(chunk)
                        if size > manifest["size"]:
                            raise Refused("the artifact is larger than the manifest says")
                        digest.update(chunk)
                if size != manifest["size"]:
                    raise Refused(f"the artifact has {size} bytes, not {manifest['size']}")
                if digest.hexdigest() != manifest["sha256"]:
                    raise Refused("the artifact's SHA-256 does not match the manifest")
                await report("verified")
                await report("installing")
                self.fw_version = manifest["version"]
                self.security_version = max(self.security_version, manifest["security_version"])
                await report("applied")
                outcome = f"applied {self.fw_version}"
            except (Refused, httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                outcome = f"failed: {exc}"
                await report("failed", str(exc) or type(exc).__name__)
        self.outcomes.append(outcome)
        log.info("sim %s: update %s", device.uid, outcome)
        await device.report()
        return outcome
