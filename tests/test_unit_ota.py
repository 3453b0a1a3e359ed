"""OTA's pure parts: semantic version order, canonical JSON, signatures, sealed private
keys bound to their key id, and the rollout buckets."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import uuid
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from hexa.hub import ota_crypto as oc


def test_semver_order_and_refusals() -> None:
    """Semver precedence (pre-releases below their release, numeric below alphanumeric
    identifiers, build metadata ignored); anything else is not a version."""
    ordered = [
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-alpha.beta",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0",
        "1.0.1",
        "1.10.0",
        "2.0.0",
    ]
    parsed = [oc.parse_version(v) for v in ordered]
    assert all(p is not None for p in parsed)
    keys = [p.key() for p in parsed if p is not None]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert oc.parse_version("1.0.0+build.5") == oc.parse_version("1.0.0")
    for bad in ("1.0", "v1.0.0", "01.0.0", "1.0.0-", "1.0.0-01", "", "1.0.0 ", "1.2.3.4"):
        assert oc.parse_version(bad) is None, bad
    assert oc.is_above("1.0.1", "1.0.0") and not oc.is_above("1.0.0", "1.0.0")
    assert oc.is_above("1.0.0", None) and oc.is_above("1.0.0", "sim-1.0")
    assert not oc.is_above("1.0.0-rc.1", "1.0.0") and not oc.is_above("nope", "1.0.0")


def test_canonical_json_is_sorted_compact_utf8() -> None:
    """Keys sorted at every level, separators , and :, no whitespace, non-ASCII as UTF-8."""
    doc = {"b": 1, "a": {"z": None, "y": [1, "é"]}, "c": "x y"}
    assert oc.canonical(doc) == '{"a":{"y":[1,"é"],"z":null},"b":1,"c":"x y"}'.encode()


def test_signature_covers_every_field() -> None:
    """A signature verifies over the canonical manifest and over nothing else."""
    key = oc.new_private_key()
    public = oc.load_public_key(oc.public_pem(key))
    assert public is not None
    manifest = {"release_id": str(uuid.uuid4()), "size": 10, "version": "1.2.3"}
    signature = oc.sign(key, manifest)
    assert oc.verify(public, manifest, signature)
    # the same signature, made by any standard library over the canonical bytes
    raw = base64.b64decode(signature)
    public.verify(
        raw,
        json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode(),
        ec.ECDSA(hashes.SHA256()),
    )
    assert not oc.verify(public, {**manifest, "size": 11}, signature)
    assert not oc.verify(public, manifest, "not base64!")
    other = oc.load_public_key(oc.public_pem(oc.new_private_key()))
    assert other is not None and not oc.verify(other, manifest, signature)
    assert oc.load_public_key("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----") is None


def test_sealed_private_key_opens_only_for_its_key_and_kek() -> None:
    """A sealed key opens with its KEK for its own key id only; the text has no key."""
    kek, key = os.urandom(32), oc.new_private_key()
    sealed = oc.seal_private_key(kek, "key-a", key)
    assert sealed.startswith("v1:") and "PRIVATE" not in sealed
    opened = oc.open_private_key(kek, "key-a", sealed)
    assert opened is not None and oc.public_pem(opened) == oc.public_pem(key)
    assert oc.open_private_key(kek, "key-b", sealed) is None  # copied into another row
    assert oc.open_private_key(os.urandom(32), "key-a", sealed) is None  # another KEK
    assert oc.open_private_key(kek, "key-a", sealed[:-4] + "AAAA") is None
    assert oc.open_private_key(kek, "key-a", "plain") is None


def test_rollout_buckets_are_stable_and_spread() -> None:
    """The bucket of a device for a release never changes, differs between releases, and
    spreads a fleet evenly enough over 0-99."""
    release = str(uuid.uuid4())
    assert oc.rollout_bucket("hx-00000001", release) == oc.rollout_bucket("hx-00000001", release)
    buckets = [oc.rollout_bucket(f"hx-{i:08x}", release) for i in range(10_000)]
    assert min(buckets) == 0 and max(buckets) == 99
    below_10 = sum(b < 10 for b in buckets)
    assert 800 < below_10 < 1200
    other = str(uuid.uuid4())
    moved = sum(
        oc.rollout_bucket(f"hx-{i:08x}", release) != oc.rollout_bucket(f"hx-{i:08x}", other)
        for i in range(1000)
    )
    assert moved > 900


def test_artifact_response_reads_without_worker_threads(tmp_path: Path, monkeypatch: Any) -> None:
    """The artifact is sent whole, or by Range, with the bytes of the file, and none of its
    reads goes to a worker thread (a fleet downloading at once started up to 40 of them)."""
    import anyio.to_thread
    from starlette.types import Message

    from hexa.api.routers.ota import ArtifactResponse

    data = os.urandom(200_000)  # over three 64 KiB reads
    path = tmp_path / "fw.bin"
    path.write_bytes(data)

    def no_thread(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a worker thread was used")

    monkeypatch.setattr(anyio.to_thread, "run_sync", no_thread)

    def serve(headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
        sent: list[Message] = []
        scope = {
            "type": "http",
            "method": "GET",
            "headers": headers,
            "asgi": {"version": "3.0", "spec_version": "2.4"},
        }

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            sent.append(message)

        response = ArtifactResponse(
            path, media_type="application/octet-stream", stat_result=os.stat(path)
        )
        asyncio.run(response(scope, receive, send))
        body = b"".join(m.get("body", b"") for m in sent[1:])
        return sent[0]["status"], body

    assert serve([]) == (200, data)
    assert serve([(b"range", b"bytes=70000-140000")]) == (206, data[70000:140001])
    assert serve([(b"range", b"bytes=-100")]) == (206, data[-100:])


def test_fast_routes_take_only_what_the_fastapi_routes_accept_as_is() -> None:
    """The routes ahead of FastAPI's take a device's plain GET of the check (no query but a
    plain ``current_version`` of at most 64 characters) and of its manifest (no query);
    anything else is left to the FastAPI route of the same path, which keeps its name."""
    from fastapi import FastAPI
    from starlette.routing import Match

    from hexa.api.routers import ota

    app = FastAPI()
    app.include_router(ota.router, prefix="/api/v1")
    ota.install_fast_routes(app)
    check, manifest = app.router.routes[:2]
    assert isinstance(check, ota.DeviceFastRoute) and isinstance(manifest, ota.DeviceFastRoute)

    def scope(path: str, query: bytes = b"", method: str = "GET", **extra: Any) -> Any:
        return {"type": "http", "method": method, "path": path, "query_string": query, **extra}

    taken = [
        (check, scope("/api/v1/ota/check")),
        (check, scope("/api/v1/ota/check", b"current_version=")),
        (check, scope("/api/v1/ota/check", b"current_version=1.2.3-rc.1")),
        (check, scope("/api/v1/ota/check", b"current_version=" + b"1" * 64)),
        (manifest, scope("/api/v1/ota/manifest/hx-0001")),
    ]
    for route, s in taken:
        assert route.matches(s)[0] is Match.FULL, s
        assert route.matches(s)[1]["route"] is route  # metrics and the access log
    left = [
        (check, scope("/api/v1/ota/check", method="HEAD")),
        (check, scope("/api/v1/ota/check", method="POST")),
        (check, scope("/api/v1/ota/check", root_path="/hub")),
        (check, scope("/api/v1/ota/check/")),
        (check, scope("/api/v1/ota/check", b"current_version=" + b"1" * 65)),
        (check, scope("/api/v1/ota/check", b"current_version=1.0.0%00")),
        (check, scope("/api/v1/ota/check", b"current_version=1.0.0+1")),
        (check, scope("/api/v1/ota/check", b"current_version=1&current_version=2")),
        (check, scope("/api/v1/ota/check", b"other=1")),
        (manifest, scope("/api/v1/ota/manifest/hx-0001", b"x=1")),
        (manifest, scope("/api/v1/ota/manifest/")),
        (manifest, scope("/api/v1/ota/manifest/a/b")),
        (manifest, scope("/api/v1/ota/keys")),
        (check, {"type": "websocket", "path": "/api/v1/ota/check", "query_string": b""}),
    ]
    for route, s in left:
        assert route.matches(s)[0] is Match.NONE, s
    assert app.url_path_for("check") == "/api/v1/ota/check"
    assert app.url_path_for("manifest", device_uid="hx-1") == "/api/v1/ota/manifest/hx-1"
