"""Property-based API tests: schemathesis generates requests for every operation of the
running hub's /openapi.json (valid and invalid ones) and checks that none answers 5xx and
that every answer is one the document describes (status, content type, body schema).

The document is the same on both databases, so the full budget of examples is spent once per
operation: every other operation on SQLite, the rest on PostgreSQL. Each operation still runs
on the other database too, with fewer examples, so that every operation's queries meet both
databases. Without PostgreSQL, SQLite runs every operation in full."""

from __future__ import annotations

from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from support.accounts import register
from support.hubs import RunningHub, fake_ip

#: examples per operation and mode on the database that runs it in full
MAX_EXAMPLES = 25
#: examples per operation and mode on the other database
SHORT_EXAMPLES = 5
#: the database that runs the operation of index i in full: FULL_ON[i % 2]
FULL_ON = ("sqlite", "postgres")
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def examples(index: int, db_kind: str, postgres_available: bool) -> int:
    """How many examples per mode the operation of ``index`` gets on ``db_kind``."""
    if FULL_ON[index % 2] == db_kind or not postgres_available:
        return MAX_EXAMPLES
    return SHORT_EXAMPLES


def test_api_answers_match_the_document(hub: RunningHub, postgres_available: bool) -> None:
    """Generated requests (valid and invalid) for every operation never get a 5xx or an
    answer that /openapi.json does not describe."""
    token = register(hub).access_token
    schema = schemathesis.openapi.from_url(f"{hub.base}/openapi.json")
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 40
    for index, operation in enumerate(operations):
        budget = examples(index, hub.db_kind, postgres_available)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=budget,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                derandomize=True,
                database=None,
            )
            def run(case: Any) -> None:
                # each request from its own address, so that generated logins never
                # throttle the shared hub's loopback address for other tests
                headers = {"Authorization": f"Bearer {token}", "X-Forwarded-For": fake_ip()}
                case.call_and_validate(
                    base_url=hub.base, headers=headers, checks=CHECKS, timeout=30
                )

            try:
                run()
            except Unsatisfiable:
                pass  # no parameters and no body: nothing invalid to generate
            except (Exception, BaseExceptionGroup) as exc:
                failures.append(f"{operation.label} ({mode}): {exc}"[:2000])
    assert not failures, "\n\n".join(failures)


def test_openapi_documents_the_real_error_answers(hub: RunningHub) -> None:
    """/openapi.json lists 400 validation_error (not FastAPI's 422) with the error schema on
    every API operation, and 429 with Retry-After on login."""
    doc = httpx.get(f"{hub.base}/openapi.json", timeout=15).json()
    error = doc["components"]["schemas"]["Error"]
    assert set(error["required"]) == {"code", "message", "details", "request_id"}
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            if path.startswith("/api/v1/"):
                bad = responses["400"]["content"]["application/json"]["schema"]
                assert bad == {"$ref": "#/components/schemas/Error"}, (method, path)
            if "422" in responses:
                assert "/relays" in path or path.endswith("/run"), (method, path)
    login = doc["paths"]["/api/v1/auth/login"]["post"]["responses"]["429"]
    assert "Retry-After" in login["headers"]
