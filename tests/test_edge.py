"""The hub's edge (contract §7): 426 for plain HTTP and WS under HEXA_ENFORCE_HTTPS with the
loopback exception for probes, trusted proxies only, HSTS, native HTTPS/WSS (and MQTT/TLS
with the same certificate), certificates that do not load, security headers, CORS."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import socket
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.accounts import register, unique_email
from support.checks import error_shape_ok
from support.hubs import PROVISION_KEY, UNSET, RunningHub, free_port, spawned_hub
from support.tls import self_signed
from support.ws import wss_exchange
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

#: the proxy the enforcing hub trusts: a loopback address of its own, so a test can be
#: that proxy (bind to it) or an untrusted peer (127.0.0.1) on one machine
PROXY = "127.0.0.2"
PROBES = ("/health", "/healthz", "/readyz", "/metrics")
ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
def enforcing(db_kind: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningHub]:
    """HEXA_ENFORCE_HTTPS without a certificate (TLS ends at a proxy on 127.0.0.2);
    HEXA_MQTT_PORT not given, so no plain MQTT listener."""
    tmp = tmp_path_factory.mktemp(f"enforcing-{db_kind}")
    with spawned_hub(db_kind, tmp, enforce_https="true", trust_proxy=PROXY, mqtt_port=UNSET) as hub:
        yield hub


@pytest.fixture(scope="module")
def tls(
    db_kind: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningHub, Path, int]]:
    """A hub serving HTTPS/WSS itself, MQTT/TLS with the same pair, enforcing HTTPS, with
    HEXA_MQTT_PORT given (its plain listener stays on) and CORS for one origin."""
    tmp = tmp_path_factory.mktemp(f"tls-{db_kind}")
    cert, key = self_signed(tmp)
    tls_port = free_port()
    with spawned_hub(
        db_kind,
        tmp,
        tls_cert_file=str(cert),
        tls_key_file=str(key),
        mqtt_tls_port=str(tls_port),
        enforce_https="true",
        cors_origins=f"{ORIGIN},http://localhost:5173",
    ) as hub:
        yield hub, cert, tls_port


def _proxy(hub: RunningHub, **headers: str) -> httpx.Client:
    """A client that is the trusted proxy: its connections come from 127.0.0.2."""
    transport = httpx.HTTPTransport(local_address=PROXY)
    return httpx.Client(base_url=hub.base, headers=headers, transport=transport, timeout=15)


def _https(hub: RunningHub, cert: Path, **headers: str) -> httpx.Client:
    return httpx.Client(
        base_url=hub.base,
        verify=ssl.create_default_context(cafile=str(cert)),
        headers=headers,
        timeout=15,
    )


def _assert_426(r: httpx.Response) -> None:
    assert r.status_code == 426, (r.request.method, r.request.url, r.status_code, r.text)
    assert r.headers["upgrade"] == "TLS/1.2, HTTP/1.1"
    body = r.json()
    assert error_shape_ok(body) and body["code"] == "https_required"
    assert body["request_id"] == r.headers["x-request-id"]
    assert "strict-transport-security" not in r.headers  # never over plain HTTP
    assert r.headers["x-content-type-options"] == "nosniff"


def _every_operation(hub: RunningHub) -> list[tuple[str, str]]:
    """(method, path) of every operation the API describes, ids filled in."""
    spec = httpx.get(hub.base + "/openapi.json").json()
    ops = []
    for path, item in spec["paths"].items():
        concrete = re.sub(r"\{[^}]+\}", str(uuid.uuid4()), path)
        ops += [(method.upper(), concrete) for method in item if method != "parameters"]
    return ops


def _ws_status(url: str, sock: socket.socket | None = None, **headers: str) -> int:
    """The HTTP status a WebSocket upgrade is answered with (101 when accepted)."""
    try:
        with connect(url, open_timeout=10, proxy=None, sock=sock, additional_headers=headers):
            return 101
    except InvalidStatus as exc:
        return int(exc.response.status_code)


def _from_proxy(hub: RunningHub) -> socket.socket:
    port = int(hub.base.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(PROXY, 0))


# --- HEXA_ENFORCE_HTTPS ---------------------------------------------------------------------


def test_plain_http_to_every_route_group_is_426(hub: RunningHub, enforcing: RunningHub) -> None:
    """Every operation of the API (the shared hub's description lists them), the docs and
    the description itself: 426 over plain HTTP, even from loopback."""
    ops = _every_operation(hub)
    assert len(ops) > 50
    groups = {path.split("/")[3] if path.startswith("/api/v1/") else path for _m, path in ops}
    assert {"auth", "devices", "orgs", "admin", "audit", "provision"} <= groups
    with httpx.Client(base_url=enforcing.base, timeout=15) as c:
        for method, path in [*ops, ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/nope")]:
            if path in PROBES and method == "GET":
                continue  # loopback probes: see the next test
            _assert_426(c.request(method, path, json={} if method != "GET" else None))
        # credentials sent in the clear are not even looked at
        _assert_426(
            c.post("/api/v1/provision/register", headers={"X-Provision-Key": PROVISION_KEY})
        )


def test_plain_websocket_upgrades_are_426(enforcing: RunningHub) -> None:
    for path in ("/ws/client?token=x", "/ws/device?uid=hx-1&token=x"):
        assert _ws_status(enforcing.ws_base + path) == 426


def test_probes_from_loopback_pass_over_plain_http(enforcing: RunningHub) -> None:
    with httpx.Client(base_url=enforcing.base, timeout=15) as c:
        for path in PROBES:
            r = c.get(path)
            assert r.status_code in (200, 503), (path, r.status_code)
            assert "strict-transport-security" not in r.headers
        # a forwarded-for header from an untrusted peer changes nothing either way
        assert c.get("/metrics", headers={"X-Forwarded-For": "203.0.113.9"}).status_code == 200
        # a probe path is no wildcard: anything else from loopback is refused
        _assert_426(c.get("/version"))
        _assert_426(c.get("/health/x"))


def test_spoofed_forwarded_headers_from_an_untrusted_peer_change_nothing(
    enforcing: RunningHub,
) -> None:
    spoof = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "127.0.0.1"}
    with httpx.Client(base_url=enforcing.base, headers=spoof, timeout=15) as c:
        _assert_426(c.get("/version"))
        _assert_426(c.post("/api/v1/auth/login", json={"email": "a@b.c", "password": "x"}))
    status = _ws_status(enforcing.ws_base + "/ws/client?token=x", **spoof)
    assert status == 426


def test_a_trusted_proxy_forwarding_https_is_served_with_hsts(enforcing: RunningHub) -> None:
    email = unique_email()
    with _proxy(enforcing, **{"X-Forwarded-Proto": "https"}) as c:
        r = c.post("/api/v1/auth/register", json={"email": email, "password": "S3cure-pass-word!"})
        assert r.status_code == 201, r.text
        assert r.headers["strict-transport-security"].startswith("max-age=")
        token = r.json()["access_token"]
        me = c.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
        assert me.status_code == 200 and me.json()["email"] == email
        assert "strict-transport-security" in me.headers
        # the proxy said the client spoke plain HTTP: refused like a direct request
        _assert_426(c.get("/version", headers={"X-Forwarded-Proto": "http"}))
    # a WebSocket upgrade the proxy forwards from a TLS client is accepted
    url = f"{enforcing.ws_base}/ws/client?token={token}"
    assert _ws_status(url, _from_proxy(enforcing), **{"X-Forwarded-Proto": "https"}) == 101
    assert _ws_status(url, _from_proxy(enforcing), **{"X-Forwarded-Proto": "http"}) == 426


def test_probes_through_the_proxy_are_not_loopback(enforcing: RunningHub) -> None:
    """A probe a trusted proxy forwards for a remote client over plain HTTP is that
    client's request: refused; forwarded as HTTPS it is served."""
    remote = {"X-Forwarded-For": "203.0.113.7"}
    with _proxy(enforcing, **remote) as c:
        _assert_426(c.get("/metrics", headers={"X-Forwarded-Proto": "http"}))
        _assert_426(c.get("/metrics"))
        r = c.get("/metrics", headers={"X-Forwarded-Proto": "https"})
        assert r.status_code == 200 and "strict-transport-security" in r.headers
        # a client that forges a loopback hop left of the proxy's entry gains nothing
        forged = {"X-Forwarded-For": "127.0.0.1, 203.0.113.7", "X-Forwarded-Proto": "http"}
        _assert_426(c.get("/health", headers=forged))


def test_426_and_413_are_counted_as_api_errors(enforcing: RunningHub) -> None:
    def count() -> float:
        text = httpx.get(enforcing.base + "/metrics").text
        m = re.search(r'^hexa_api_errors_total\{code="https_required"\} (\S+)$', text, re.M)
        return float(m.group(1)) if m else 0.0

    before = count()
    httpx.get(enforcing.base + "/version")
    assert count() == before + 1

    def too_large() -> float:
        text = httpx.get(enforcing.base + "/metrics").text
        m = re.search(r'^hexa_api_errors_total\{code="payload_too_large"\} (\S+)$', text, re.M)
        return float(m.group(1)) if m else 0.0

    before = too_large()
    with _proxy(enforcing, **{"X-Forwarded-Proto": "https"}) as c:
        big = c.post("/api/v1/auth/login", content=b"x" * (enforcing.settings.max_body_bytes + 1))
    assert big.status_code == 413
    assert too_large() == before + 1


def test_no_plain_mqtt_under_enforcement_unless_set(enforcing: RunningHub) -> None:
    with _proxy(enforcing, **{"X-Forwarded-Proto": "https"}) as c:
        r = c.post(
            "/api/v1/provision/register",
            headers={"X-Provision-Key": PROVISION_KEY},
            json={"model": "hexa-mini-switch-v1", "serial": uuid.uuid4().hex[:8]},
        )
    assert r.status_code == 201, r.text
    assert r.json()["mqtt"]["port"] is None
    assert r.json()["ws_url"].startswith("wss://")
    log = (Path(enforcing.settings.data_dir) / "hub.log").read_text()
    assert "plain MQTT off" in log
    assert not any(line.endswith(":None") for line in log.splitlines())  # no port "None"


# --- native HTTPS / WSS ---------------------------------------------------------------------


def test_https_and_wss_are_served_with_the_certificate(
    tls: tuple[RunningHub, Path, int],
) -> None:
    hub, cert, _tls_port = tls
    assert hub.base.startswith("https://")
    with _https(hub, cert) as c:
        health = c.get("/health")
        assert health.status_code == 200
        assert health.headers["strict-transport-security"] == "max-age=31536000"
        email = unique_email()
        r = c.post("/api/v1/auth/register", json={"email": email, "password": "S3cure-pass-word!"})
        assert r.status_code == 201, r.text
        token = r.json()["access_token"]
        p = c.post(
            "/api/v1/provision/register",
            headers={"X-Provision-Key": PROVISION_KEY},
            json={"model": "hexa-mini-switch-v1", "serial": uuid.uuid4().hex[:8]},
        ).json()
    assert p["ws_url"].startswith("wss://")
    assert p["mqtt"]["port"] is not None  # HEXA_MQTT_PORT given: the plain listener stays
    context = ssl.create_default_context(cafile=str(cert))
    answer = wss_exchange(f"{hub.ws_base}/ws/client?token={token}", context, {"type": "ping"})
    assert answer["type"] == "pong"
    # a client that does not trust the certificate gets no answer at all
    with pytest.raises(httpx.ConnectError):
        httpx.get(hub.base + "/health", verify=True)


def test_mqtt_tls_listener_uses_the_https_certificate(tls: tuple[RunningHub, Path, int]) -> None:
    _hub, cert, tls_port = tls
    context = ssl.create_default_context(cafile=str(cert))
    with (
        socket.create_connection(("127.0.0.1", tls_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls_sock,
    ):
        served = tls_sock.getpeercert(binary_form=True)
    pem = cert.read_text()
    assert served == ssl.PEM_cert_to_DER_cert(pem[: pem.index("-----END CERTIFICATE-----") + 25])


def _serve_fails(tmp: Path, **env: str) -> tuple[int, list[str]]:
    run = subprocess.run(
        [sys.executable, "-m", "hexa.hub.cli", "serve"],
        env={
            **os.environ,
            "HEXA_DATA_DIR": str(tmp / "data"),
            "HEXA_HTTP_PORT": "0",
            "HEXA_MQTT_PORT": "0",
            **{f"HEXA_{k.upper()}": v for k, v in env.items()},
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    return run.returncode, (run.stdout + run.stderr).strip().splitlines()


def test_a_certificate_that_does_not_load_stops_start_up_in_one_line(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _other_cert, other_key = self_signed(other)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text(
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"
    )
    cases = [
        (
            {"tls_cert_file": str(tmp_path / "missing.pem"), "tls_key_file": str(key)},
            "HEXA_TLS_CERT_FILE",
            "not found",
        ),
        (
            {"tls_cert_file": str(garbage), "tls_key_file": str(key)},
            "HEXA_TLS_CERT_FILE",
            "not a PEM certificate",
        ),
        (
            {"tls_cert_file": str(cert), "tls_key_file": str(cert)},
            "HEXA_TLS_KEY_FILE",
            "not a PEM private key",
        ),
        (
            {"tls_cert_file": str(cert), "tls_key_file": str(other_key)},
            "HEXA_TLS_KEY_FILE",
            "does not match",
        ),
        ({"tls_cert_file": str(cert)}, "HEXA_TLS_KEY_FILE", "required"),
    ]
    for env, setting, reason in cases:
        code, lines = _serve_fails(tmp_path, **env)
        assert code == 2, (env, lines)
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"hexa: invalid setting {setting}") and reason in lines[0]


# --- security headers and CORS --------------------------------------------------------------


def _security_headers(r: httpx.Response) -> None:
    assert r.headers["x-content-type-options"] == "nosniff", r.request.url
    assert r.headers["referrer-policy"] == "no-referrer", r.request.url


def test_security_headers_on_json_html_and_errors(hub: RunningHub) -> None:
    user = register(hub)
    with httpx.Client(base_url=hub.base, timeout=15) as c:
        answers = [
            c.get("/health"),
            c.get("/metrics"),
            c.get("/openapi.json"),
            c.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {user.access_token}"}),
            c.get("/api/v1/auth/me"),  # 401
            c.get("/api/v1/nope"),  # 404
            c.post(
                "/api/v1/auth/login", content=b"{", headers={"content-type": "application/json"}
            ),
            c.post("/api/v1/auth/login", content=b"x" * (hub.settings.max_body_bytes + 1)),  # 413
        ]
        for r in answers:
            _security_headers(r)
            assert "strict-transport-security" not in r.headers  # plain HTTP
            if r.status_code >= 400:
                assert error_shape_ok(r.json())
        assert [r.status_code for r in answers[4:]] == [401, 404, 400, 413]
        assert "content-security-policy" not in answers[0].headers  # JSON: not a page
        docs = c.get("/docs")
    _security_headers(docs)
    assert docs.headers["content-type"].startswith("text/html")
    csp = docs.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'" and directives["frame-ancestors"] == "'none'"
    # exactly Swagger UI runs: its inline script by hash, its files from where the page loads them
    for script in re.findall(r"<script>(.*?)</script>", docs.text, re.S):
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in directives["script-src"]
    assert "'unsafe-inline'" not in directives["script-src"]
    for tag, attr, directive in (("script", "src", "script-src"), ("link", "href", "style-src")):
        for url in re.findall(rf'<{tag}[^>]*\b{attr}="([^"]+)"', docs.text):
            if url.endswith((".js", ".css")):
                origin = "/".join(url.split("/")[:3])
                assert origin in directives[directive], (url, csp)
    assert "'self'" in directives["connect-src"]  # the page fetches /openapi.json


def test_cors_preflights_and_answers(tls: tuple[RunningHub, Path, int]) -> None:
    hub, cert, _ = tls
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
    }
    with _https(hub, cert) as c:
        ok = c.options("/api/v1/devices", headers={"Origin": ORIGIN, **preflight})
        assert ok.status_code == 204
        assert ok.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in ok.headers["access-control-allow-methods"]
        assert "idempotency-key" in ok.headers["access-control-allow-headers"]
        assert "access-control-allow-credentials" not in ok.headers
        _security_headers(ok)
        refused: list[httpx.Response] = [
            c.options("/api/v1/devices", headers={"Origin": "https://evil.example", **preflight}),
            c.options("/api/v1/devices", headers={"Origin": f"{ORIGIN}.evil.example", **preflight}),
            c.options(
                "/api/v1/devices",
                headers={"Origin": ORIGIN, "Access-Control-Request-Method": "TRACE"},
            ),
            c.options(
                "/api/v1/devices",
                headers={
                    "Origin": ORIGIN,
                    "Access-Control-Request-Method": "GET",
                    "Access-Control-Request-Headers": "x-custom-secret",
                },
            ),
        ]
        for r in refused:
            assert r.status_code == 403 and error_shape_ok(r.json())
            assert not [h for h in r.headers if h.startswith("access-control-")], r.headers
            _security_headers(r)
        # actual requests: the listed origin may read the answer, errors included
        listed = c.get("/api/v1/devices", headers={"Origin": ORIGIN})
        assert listed.status_code == 401
        assert listed.headers["access-control-allow-origin"] == ORIGIN
        assert "X-Request-ID" in listed.headers["access-control-expose-headers"]
        assert "Origin" in listed.headers["vary"]
        unlisted = c.get("/health", headers={"Origin": "https://evil.example"})
        assert unlisted.status_code == 200
        assert not [h for h in unlisted.headers if h.startswith("access-control-")]
        _security_headers(unlisted)
        # no Origin: no CORS at all
        assert "access-control-allow-origin" not in c.get("/health").headers


def test_cors_is_off_unless_configured(hub: RunningHub) -> None:
    r = httpx.options(
        hub.base + "/api/v1/devices",
        headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"},
    )
    assert not [h for h in r.headers if h.startswith("access-control-")]
    _security_headers(r)
