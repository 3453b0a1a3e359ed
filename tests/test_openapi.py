"""The API document: /openapi.json of a running hub types every success body and points
every error answer at the one error schema, so clients generated from it are typed."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from support.hubs import RunningHub

ERROR_REF = "#/components/schemas/Error"
PAGE_FIELDS = {"items", "total", "limit", "offset", "has_next", "has_prev"}
#: answers outside the error contract: the probes answer their own body when not ready
PROBE_ANSWERS = {("/health", "503"), ("/readyz", "503")}


@pytest.fixture(scope="module")
def doc(hub: RunningHub) -> dict[str, Any]:
    r = httpx.get(f"{hub.base}/openapi.json", timeout=15)
    assert r.status_code == 200, r.text
    return dict(r.json())


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, operation)
        for path, item in doc["paths"].items()
        for method, operation in item.items()
    ]


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """The schema behind a ``$ref`` (one level), else the schema itself."""
    ref = schema.get("$ref")
    if ref is None:
        return schema
    assert ref.startswith("#/components/schemas/"), ref
    return dict(doc["components"]["schemas"][ref.rsplit("/", 1)[1]])


def test_every_success_answer_with_a_body_has_a_schema(doc: dict[str, Any]) -> None:
    """Every 2xx answer other than 204 of every operation has a non-empty schema: an
    object with properties for JSON, a string for the Prometheus text of /metrics."""
    missing = []
    checked = 0
    for path, method, operation in operations(doc):
        for status, answer in operation["responses"].items():
            if not status.startswith("2"):
                continue
            if status == "204":
                assert not answer.get("content"), (method, path)
                continue
            checked += 1
            content = answer.get("content", {})
            if path == "/metrics":
                assert content == {"text/plain": {"schema": {"type": "string"}}}
                continue
            if "application/octet-stream" in content:  # firmware images
                binary = {"type": "string", "format": "binary"}
                assert content == {"application/octet-stream": {"schema": binary}}, path
                continue
            schema = content.get("application/json", {}).get("schema", {})
            body = resolve(doc, schema)
            if body.get("type") != "object" or not body.get("properties"):
                missing.append(f"{method.upper()} {path} {status}: {schema}")
    assert checked > 45
    assert not missing, "\n".join(missing)


def test_error_answers_reference_the_error_schema(doc: dict[str, Any]) -> None:
    """Every 4xx and 5xx answer is described by the one Error schema (the health probes'
    503, which answers their own body, excepted)."""
    wrong = []
    for path, method, operation in operations(doc):
        for status, answer in operation["responses"].items():
            if status[0] not in "45" or (path, status) in PROBE_ANSWERS:
                continue
            schema = answer.get("content", {}).get("application/json", {}).get("schema")
            if schema != {"$ref": ERROR_REF}:
                wrong.append(f"{method.upper()} {path} {status}: {schema}")
    assert not wrong, "\n".join(wrong)
    for path, status in PROBE_ANSWERS:
        answer = doc["paths"][path]["get"]["responses"][status]
        ok = doc["paths"][path]["get"]["responses"]["200"]
        assert answer["content"] == ok["content"], path


def test_lists_answer_pages(doc: dict[str, Any]) -> None:
    """Every operation taking ``limit`` and ``offset`` answers a page: items, total,
    limit, offset, has_next and has_prev, all required, items typed."""
    lists = 0
    for path, method, operation in operations(doc):
        names = {p["name"] for p in operation.get("parameters", [])}
        if not {"limit", "offset"} <= names:
            continue
        lists += 1
        schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
        page = resolve(doc, schema)
        assert set(page["required"]) == PAGE_FIELDS, (method, path)
        items = page["properties"]["items"]["items"]
        assert resolve(doc, items).get("properties"), (method, path)
    assert lists >= 12


def test_times_are_date_times_and_ids_uuids(doc: dict[str, Any]) -> None:
    """Response fields holding times are documented as date-time strings, ids as uuids."""
    device = doc["components"]["schemas"]["DevicePublic"]["properties"]
    time = {"type": "string", "format": "date-time"}
    assert time.items() <= device["created_at"].items()
    assert time in device["last_seen_at"]["anyOf"]
    assert device["id"]["format"] == "uuid"


def test_documented_extra_fields_are_in_the_schemas(doc: dict[str, Any]) -> None:
    """The fields the API returns beyond the contract (docs/api.md "Deviations") are in
    the document; the claim answer's device_token is optional."""
    schemas = doc["components"]["schemas"]
    device = schemas["DevicePublic"]
    assert {"serial", "updated_at"} <= set(device["required"])
    assert "state" in schemas["InputPublic"]["required"]
    claimed = schemas["ClaimedDevice"]
    assert "device_token" in claimed["properties"]
    assert "device_token" not in claimed["required"]
    claim = doc["paths"]["/api/v1/devices/claim"]["post"]["responses"]["200"]
    assert claim["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ClaimedDevice"
    }
    members = doc["paths"]["/api/v1/orgs/{org_id}/members"]["post"]["responses"]
    assert members["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/MemberPublic")
    assert members["201"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/InvitationPublic"
    )
