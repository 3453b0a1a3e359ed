"""Cross-cutting REST rules (contract §2): the error shape, input hygiene, body limits,
X-Request-ID, Idempotency-Key, health endpoints and pagination."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import httpx
import pytest
from support.accounts import User, register
from support.checks import assert_error
from support.hubs import RunningHub

SQLISH = "' OR 1=1 --"


def _org_count(hub: RunningHub, user: User) -> int:
    with hub.api(user.access_token) as c:
        r = c.get("/orgs")
    assert r.status_code == 200, r.text
    return int(r.json()["total"])


# --- error shape -------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/api/v1/no-such-thing", "/no-such-thing", "/api/v2/orgs"])
def test_unknown_route_is_404_with_error_shape(hub: RunningHub, path: str) -> None:
    """An unknown route answers 404 not_found in the error shape."""
    r = httpx.get(hub.base + path)
    assert_error(r, 404, "not_found")


def test_wrong_method_is_405_with_error_shape(hub: RunningHub) -> None:
    """A known route with a wrong method answers 405 in the error shape."""
    user = register(hub)
    with hub.api(user.access_token) as c:
        body = assert_error(c.put("/orgs", json={"name": "x"}), 405)
    assert body["code"] == "method_not_allowed"
    assert_error(httpx.post(hub.base + "/health"), 405, "method_not_allowed")


def test_unauthenticated_is_401_with_error_shape(hub: RunningHub) -> None:
    """A protected route without a token answers 401 unauthorized in the error shape."""
    with hub.api() as c:
        assert_error(c.get("/devices"), 401, "unauthorized")
    with hub.api("not-a-jwt") as c:
        assert_error(c.get("/orgs"), 401, "unauthorized")


def test_missing_field_is_400_validation_error_with_details(hub: RunningHub) -> None:
    """A body missing a required field answers 400 validation_error with details naming it."""
    user = register(hub)
    with hub.api(user.access_token) as c:
        body = assert_error(c.post("/orgs", json={}), 400, "validation_error")
    assert isinstance(body["details"], dict)
    errors = body["details"]["errors"]
    assert isinstance(errors, list) and errors
    assert any(e["field"] == "name" for e in errors)


def test_malformed_json_is_400(hub: RunningHub) -> None:
    """A body that is not valid JSON answers 400 validation_error."""
    user = register(hub)
    before = _org_count(hub, user)
    with hub.api(user.access_token) as c:
        r = c.post("/orgs", content=b'{"name": "x",', headers={"Content-Type": "application/json"})
        assert_error(r, 400, "validation_error")
        r = c.post(
            "/orgs", content=b"not json at all", headers={"Content-Type": "application/json"}
        )
        assert_error(r, 400, "validation_error")
    assert _org_count(hub, user) == before


def test_unknown_field_is_400(hub: RunningHub) -> None:
    """A body with an unknown field answers 400 validation_error naming that field."""
    user = register(hub)
    before = _org_count(hub, user)
    with hub.api(user.access_token) as c:
        body = assert_error(
            c.post("/orgs", json={"name": "ok", "owner_id": str(uuid.uuid4())}),
            400,
            "validation_error",
        )
    assert any("owner_id" in e["field"] for e in body["details"]["errors"])
    assert _org_count(hub, user) == before


@pytest.mark.parametrize(
    "path,payload",
    [
        ("/orgs", {"name": 123}),
        ("/orgs", {"name": ["a"]}),
        ("/orgs", {"name": None}),
        ("/orgs", ["name"]),
        ("/devices/claim", {"claim_code": 12345678}),
        ("/devices/claim", {"claim_code": "ABCD-EFGH", "org_id": "not-a-uuid"}),
    ],
)
def test_wrong_types_are_400(hub: RunningHub, path: str, payload: Any) -> None:
    """Fields of the wrong type answer 400 validation_error."""
    user = register(hub)
    with hub.api(user.access_token) as c:
        assert_error(c.post(path, json=payload), 400, "validation_error")


def test_relay_state_is_strict_bool(hub: RunningHub) -> None:
    """A relay command with a non-boolean state ("yes", 1, null) answers 400 validation_error."""
    user = register(hub)
    with hub.api(user.access_token) as c:
        for state in ("yes", 1, None):
            r = c.post(f"/devices/{uuid.uuid4()}/relays/0", json={"state": state})
            assert_error(r, 400, "validation_error")


def test_sqlish_name_is_stored_verbatim(hub: RunningHub) -> None:
    """An SQL-looking organization name is stored and returned verbatim."""
    user = register(hub)
    tricky = SQLISH + '; DROP TABLE organizations; -- "\\ %_'
    with hub.api(user.access_token) as c:
        r = c.post("/orgs", json={"name": tricky})
        assert r.status_code == 201, r.text
        org = r.json()
        assert org["name"] == tricky
        got = c.get(f"/orgs/{org['id']}")
        assert got.status_code == 200 and got.json()["name"] == tricky
        names = [o["name"] for o in c.get("/orgs").json()["items"]]
    assert tricky in names
    assert _org_count(hub, user) == 2  # personal org + this one: nothing leaked in


@pytest.mark.parametrize(
    "bad_id", [SQLISH, "1 OR 1=1", "00000000-0000-0000-0000-00000000000'", "%00", "..%2f..%2fetc"]
)
@pytest.mark.parametrize("route", ["/orgs/{}", "/devices/{}", "/sites/{}", "/devices/{}/state"])
def test_sqlish_path_ids_are_400_or_404(hub: RunningHub, route: str, bad_id: str) -> None:
    """SQL-ish or garbage ids in the path answer 400 or 404 in the error shape, never 500."""
    user = register(hub)
    with hub.api(user.access_token) as c:
        r = c.get(route.format(bad_id))
    assert r.status_code in (400, 404), r.text
    assert_error(r, r.status_code)


def test_sqlish_query_param_is_400(hub: RunningHub) -> None:
    """An SQL-ish value in a uuid query filter answers 400 validation_error and leaks nothing."""
    user = register(hub)
    with hub.api(user.access_token) as c:
        assert_error(c.get("/devices", params={"org_id": SQLISH}), 400, "validation_error")
        r = c.get("/devices", params={"model": SQLISH})
    assert r.status_code == 200, r.text
    assert r.json()["items"] == [] and r.json()["total"] == 0


def test_oversized_body_is_413(hub: RunningHub) -> None:
    """A body over 1 MiB answers 413 payload_too_large and creates nothing."""
    user = register(hub)
    before = _org_count(hub, user)
    big = json.dumps({"name": "x" * (1024 * 1024 + 10)}).encode()
    with hub.api(user.access_token) as c:
        r = c.post("/orgs", content=big, headers={"Content-Type": "application/json"})
    assert_error(r, 413, "payload_too_large")
    assert _org_count(hub, user) == before


def test_oversized_chunked_body_is_413(hub: RunningHub) -> None:
    """A body over 1 MiB sent chunked (no Content-Length) also answers 413 payload_too_large."""
    user = register(hub)
    before = _org_count(hub, user)

    def chunks() -> Any:
        yield b'{"name": "'
        for _ in range(20):
            yield b"x" * 65536
        yield b'"}'

    with hub.api(user.access_token) as c:
        r = c.post("/orgs", content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(r, 413, "payload_too_large")
    assert _org_count(hub, user) == before


def test_body_just_under_limit_is_not_413(hub: RunningHub) -> None:
    """A body under 1 MiB is parsed normally (its too-long name gives 400, not 413)."""
    user = register(hub)
    body = json.dumps({"name": "x" * (512 * 1024)}).encode()
    with hub.api(user.access_token) as c:
        r = c.post("/orgs", content=body, headers={"Content-Type": "application/json"})
    assert_error(r, 400, "validation_error")


def test_non_utf8_body_is_400(hub: RunningHub) -> None:
    """A JSON body that is not valid UTF-8 answers 400 in the error shape and creates nothing."""
    user = register(hub)
    before = _org_count(hub, user)
    with hub.api(user.access_token) as c:
        r = c.post(
            "/orgs",
            content=b'{"name": "\xff\xfe\xc3("}',
            headers={"Content-Type": "application/json"},
        )
    assert_error(r, 400, "validation_error")  # invalid UTF-8 is malformed JSON (RFC 8259 §8.1)
    assert _org_count(hub, user) == before


# --- X-Request-ID ------------------------------------------------------------------------
def test_request_id_echoed_when_sane(hub: RunningHub) -> None:
    """A sane X-Request-ID is echoed on success and error responses and in error bodies."""
    rid = f"req-{uuid.uuid4().hex}"
    r = httpx.get(hub.base + "/healthz", headers={"X-Request-ID": rid})
    assert r.status_code == 200 and r.headers["x-request-id"] == rid
    r = httpx.get(hub.api_base + "/nowhere", headers={"X-Request-ID": rid})
    body = assert_error(r, 404, "not_found")
    assert body["request_id"] == rid
    user = register(hub)
    with hub.api(user.access_token, **{"X-Request-ID": rid}) as c:
        r = c.post("/orgs", json={})
    assert assert_error(r, 400, "validation_error")["request_id"] == rid


def test_request_id_generated_when_absent(hub: RunningHub) -> None:
    """Without X-Request-ID each response carries a fresh generated one."""
    a = httpx.get(hub.base + "/healthz")
    b = httpx.get(hub.base + "/healthz")
    assert a.headers.get("x-request-id") and b.headers.get("x-request-id")
    assert a.headers["x-request-id"] != b.headers["x-request-id"]
    err = httpx.get(hub.api_base + "/nowhere")
    assert assert_error(err, 404)["request_id"] == err.headers["x-request-id"]


@pytest.mark.parametrize(
    "insane", ["x" * 500, "has spaces in it", "semi;colon", "new\tline", "<script>"]
)
def test_insane_request_id_is_replaced(hub: RunningHub, insane: str) -> None:
    """An insane X-Request-ID (too long, spaces, odd characters) is replaced by a generated one."""
    r = httpx.get(hub.base + "/healthz", headers={"X-Request-ID": insane})
    assert r.status_code == 200
    rid = r.headers.get("x-request-id")
    assert rid and rid != insane and len(rid) <= 128 and " " not in rid
    err = httpx.get(hub.api_base + "/nowhere", headers={"X-Request-ID": insane})
    body = assert_error(err, 404)
    assert body["request_id"] != insane


def test_request_id_on_413_and_401(hub: RunningHub) -> None:
    """Errors raised before routing (413) and by auth (401) carry X-Request-ID too."""
    rid = f"rid-{uuid.uuid4().hex[:12]}"
    r = httpx.post(
        hub.api_base + "/orgs",
        content=b"x" * (1024 * 1024 + 1),
        headers={"X-Request-ID": rid, "Content-Type": "application/json"},
    )
    assert assert_error(r, 413, "payload_too_large")["request_id"] == rid
    r = httpx.get(hub.api_base + "/orgs", headers={"X-Request-ID": rid})
    assert assert_error(r, 401, "unauthorized")["request_id"] == rid


# --- Idempotency-Key ---------------------------------------------------------------------
def test_idempotent_post_replays_and_creates_nothing_new(hub: RunningHub) -> None:
    """A POST replayed with the same key and body returns the stored answer, marked replayed."""
    user = register(hub)
    key = uuid.uuid4().hex
    before = _org_count(hub, user)
    with hub.api(user.access_token, **{"Idempotency-Key": key}) as c:
        first = c.post("/orgs", json={"name": "Idem"})
        assert first.status_code == 201, first.text
        assert first.headers.get("idempotency-replayed") is None
        second = c.post("/orgs", json={"name": "Idem"})
        third = c.post("/orgs", json={"name": "Idem"})
    for again in (second, third):
        assert again.status_code == 201, again.text
        assert again.json() == first.json()
        assert again.headers.get("idempotency-replayed") == "true"
        assert again.headers.get("x-request-id")
    assert _org_count(hub, user) == before + 1


def test_idempotency_key_with_different_body_is_409(hub: RunningHub) -> None:
    """The same Idempotency-Key with a different body answers 409 idempotency_conflict."""
    user = register(hub)
    key = uuid.uuid4().hex
    with hub.api(user.access_token, **{"Idempotency-Key": key}) as c:
        assert c.post("/orgs", json={"name": "One"}).status_code == 201
        r = c.post("/orgs", json={"name": "Two"})
    assert_error(r, 409, "idempotency_conflict")
    with hub.api(user.access_token) as c:
        names = [o["name"] for o in c.get("/orgs").json()["items"]]
    assert "One" in names and "Two" not in names


def test_idempotency_keys_are_per_caller(hub: RunningHub) -> None:
    """Two users using the same Idempotency-Key get independent results."""
    alice, bob = register(hub), register(hub)
    key = f"shared-{uuid.uuid4().hex}"
    with hub.api(alice.access_token, **{"Idempotency-Key": key}) as c:
        a = c.post("/orgs", json={"name": "Same"})
    with hub.api(bob.access_token, **{"Idempotency-Key": key}) as c:
        b = c.post("/orgs", json={"name": "Same"})
    assert a.status_code == 201 and b.status_code == 201, (a.text, b.text)
    assert b.headers.get("idempotency-replayed") is None
    assert a.json()["id"] != b.json()["id"]
    assert _org_count(hub, alice) == 2 and _org_count(hub, bob) == 2
    with hub.api(bob.access_token) as c:
        assert c.get(f"/orgs/{b.json()['id']}").status_code == 200
        assert_error(c.get(f"/orgs/{a.json()['id']}"), 404, "not_found")


def test_concurrent_duplicates_create_exactly_one(hub: RunningHub) -> None:
    """Five identical POSTs with one Idempotency-Key fired at once create exactly one object."""
    user = register(hub)
    key = uuid.uuid4().hex
    before = _org_count(hub, user)
    barrier = threading.Barrier(5)
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def fire() -> None:
        with hub.api(user.access_token, **{"Idempotency-Key": key}) as c:
            barrier.wait()
            r = c.post("/orgs", json={"name": "Race"})
        with lock:
            results.append(r)

    threads = [threading.Thread(target=fire) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 5
    ok = [r for r in results if r.status_code == 201]
    assert all(r.status_code in (201, 409) for r in results), [r.text for r in results]
    for r in results:
        if r.status_code == 409:
            assert_error(r, 409, "idempotency_conflict")
    assert ok, "none of the concurrent requests succeeded"
    assert len({r.json()["id"] for r in ok}) == 1
    assert sum(r.headers.get("idempotency-replayed") != "true" for r in ok) == 1
    assert _org_count(hub, user) == before + 1
    with hub.api(user.access_token) as c:
        assert [o["name"] for o in c.get("/orgs").json()["items"]].count("Race") == 1


def test_idempotent_delete_replays_204(hub: RunningHub) -> None:
    """A DELETE replayed with the same Idempotency-Key answers 204 again, marked replayed."""
    user = register(hub)
    with hub.api(user.access_token) as c:
        org = c.post("/orgs", json={"name": "Doomed"}).json()
    key = uuid.uuid4().hex
    with hub.api(user.access_token, **{"Idempotency-Key": key}) as c:
        first = c.delete(f"/orgs/{org['id']}")
        assert first.status_code == 204, first.text
        second = c.delete(f"/orgs/{org['id']}")
    assert second.status_code == 204, second.text
    assert second.content == b""
    assert second.headers.get("idempotency-replayed") == "true"
    with hub.api(user.access_token) as c:
        assert_error(c.get(f"/orgs/{org['id']}"), 404, "not_found")
        assert_error(c.delete(f"/orgs/{org['id']}"), 404, "not_found")  # no key: really gone


def test_invalid_idempotency_key_is_400(hub: RunningHub) -> None:
    """An Idempotency-Key over 255 characters answers 400 validation_error and runs nothing."""
    user = register(hub)
    before = _org_count(hub, user)
    with hub.api(user.access_token, **{"Idempotency-Key": "k" * 256}) as c:
        r = c.post("/orgs", json={"name": "Nope"})
    assert_error(r, 400, "validation_error")
    assert _org_count(hub, user) == before
    with hub.api(user.access_token, **{"Idempotency-Key": "k" * 255}) as c:
        assert c.post("/orgs", json={"name": "Edge"}).status_code == 201


def test_idempotency_key_ignored_on_get(hub: RunningHub) -> None:
    """An Idempotency-Key on GET is ignored: the answer is live, never marked replayed."""
    user = register(hub)
    key = uuid.uuid4().hex
    with hub.api(user.access_token, **{"Idempotency-Key": key}) as c:
        a = c.get("/orgs")
        c.post("/orgs", json={"name": "Later"}, headers={"Idempotency-Key": uuid.uuid4().hex})
        b = c.get("/orgs")
    assert a.status_code == 200 and b.status_code == 200
    assert b.headers.get("idempotency-replayed") is None
    assert b.json()["total"] == a.json()["total"] + 1


# --- health ------------------------------------------------------------------------------
def test_health(hub: RunningHub) -> None:
    """/health answers 200 with database true."""
    r = httpx.get(hub.base + "/health")
    assert r.status_code == 200, r.text
    assert r.json()["database"] is True


def test_healthz(hub: RunningHub) -> None:
    """/healthz answers 200."""
    r = httpx.get(hub.base + "/healthz")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ok"


def test_readyz(hub: RunningHub) -> None:
    """/readyz answers 200 with database and bus true."""
    r = httpx.get(hub.base + "/readyz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["database"] is True and body["bus"] is True


def test_version(hub: RunningHub) -> None:
    """/version answers 200 with a non-empty version string."""
    r = httpx.get(hub.base + "/version")
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["version"], str) and r.json()["version"]


def test_metrics_prometheus_text(hub: RunningHub) -> None:
    """/metrics answers Prometheus text exposition containing hexa_ metrics."""
    httpx.get(hub.base + "/healthz")
    r = httpx.get(hub.base + "/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    assert "# TYPE hexa_" in r.text
    assert "hexa_http_request_seconds" in r.text


def test_health_endpoints_are_outside_api_prefix(hub: RunningHub) -> None:
    """Health endpoints live at the root, not under /api/v1."""
    assert_error(httpx.get(hub.api_base + "/health"), 404, "not_found")


def test_docs_and_openapi(hub: RunningHub) -> None:
    """/docs serves HTML and /openapi.json the API description with the v1 routes."""
    docs = httpx.get(hub.base + "/docs")
    assert docs.status_code == 200
    assert docs.headers["content-type"].startswith("text/html")
    assert "<html" in docs.text.lower()
    spec = httpx.get(hub.base + "/openapi.json")
    assert spec.status_code == 200
    body = spec.json()
    assert body["openapi"].startswith("3.")
    assert "/api/v1/devices" in body["paths"] and "/api/v1/orgs" in body["paths"]


# --- pagination --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 101},
        {"limit": -1},
        {"offset": -1},
        {"limit": "ten"},
        {"offset": "x"},
    ],
)
def test_pagination_bounds_are_400(hub: RunningHub, params: dict[str, Any]) -> None:
    """limit outside 1-100 or a negative/non-numeric offset answers 400 validation_error."""
    user = register(hub)
    with hub.api(user.access_token) as c:
        for path in ("/orgs", "/devices"):
            assert_error(c.get(path, params=params), 400, "validation_error")


def test_pagination_shape_and_flags(hub: RunningHub) -> None:
    """Pages carry total/limit/offset and correct has_next/has_prev, covering every item once."""
    user = register(hub)
    with hub.api(user.access_token) as c:
        for i in range(4):
            assert c.post("/orgs", json={"name": f"page-{i}"}).status_code == 201
        default = c.get("/orgs").json()
        assert default["limit"] == 20 and default["offset"] == 0 and default["total"] == 5
        assert (
            len(default["items"]) == 5
            and default["has_next"] is False
            and default["has_prev"] is False
        )
        pages = [c.get("/orgs", params={"limit": 2, "offset": o}).json() for o in (0, 2, 4)]
        edge = c.get("/orgs", params={"limit": 100, "offset": 0}).json()
        beyond = c.get("/orgs", params={"limit": 2, "offset": 10}).json()
    for p in [*pages, edge, beyond]:
        assert set(p) >= {"items", "total", "limit", "offset", "has_next", "has_prev"}
        assert p["total"] == 5
    assert [len(p["items"]) for p in pages] == [2, 2, 1]
    assert [p["has_next"] for p in pages] == [True, True, False]
    assert [p["has_prev"] for p in pages] == [False, True, True]
    assert [p["offset"] for p in pages] == [0, 2, 4] and all(p["limit"] == 2 for p in pages)
    ids = [o["id"] for p in pages for o in p["items"]]
    assert len(ids) == len(set(ids)) == 5
    assert ids == [o["id"] for o in default["items"]]
    assert edge["limit"] == 100 and len(edge["items"]) == 5
    assert beyond["items"] == [] and beyond["has_next"] is False and beyond["has_prev"] is True
