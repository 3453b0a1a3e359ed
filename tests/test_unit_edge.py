"""The edge's pure logic: which peers are trusted, who the client is behind them, what is
refused under enforcement, which headers an answer gets; its settings and certificate
checks, each failure naming its setting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from support.tls import self_signed

from hexa.api.edge import HTML_CSP, Edge
from hexa.hub.config import SettingError, load_settings


def _settings(**env: str) -> Any:
    return load_settings(
        environ={f"HEXA_{k.upper()}": v for k, v in env.items()}, with_secrets=False
    )


def _scope(peer: str, path: str = "/api/v1/devices", **headers: str) -> dict[str, Any]:
    return {
        "type": "http",
        "scheme": "http",
        "path": path,
        "client": (peer, 40000),
        "headers": [(k.lower().replace("_", "-").encode(), v.encode()) for k, v in headers.items()],
    }


def _edge(trust: str, enforce: bool = True) -> Edge:
    return Edge(trusted=_settings(trust_proxy=trust).trust_proxy, enforce_https=enforce)


@pytest.mark.parametrize(
    ("trust", "peer", "trusted"),
    [
        ("false", "127.0.0.1", False),
        ("true", "127.0.0.1", True),
        ("true", "127.9.9.9", True),
        ("true", "::1", True),
        ("true", "10.0.0.7", False),
        ("10.0.0.7, 172.18.0.0/16", "172.18.3.4", True),
        ("10.0.0.7,172.18.0.0/16", "10.0.0.8", False),
        ("*", "203.0.113.5", True),
        ("*", "2001:db8::1", True),
    ],
)
def test_which_peers_are_trusted(trust: str, peer: str, trusted: bool) -> None:
    scope = _scope(peer, X_Forwarded_Proto="https", X_Forwarded_For="198.51.100.1")
    _edge(trust).resolve(scope)
    assert (scope["scheme"] == "https") is trusted
    assert scope["client"][0] == ("198.51.100.1" if trusted else peer)


def test_the_client_is_the_first_untrusted_hop_from_the_right() -> None:
    edge = _edge("10.0.0.0/8")
    scope = _scope("10.0.0.2", X_Forwarded_For="127.0.0.1, 198.51.100.9, 10.0.0.1")
    edge.resolve(scope)
    assert scope["client"][0] == "198.51.100.9"  # the forged loopback entry is ignored
    garbage = _scope("10.0.0.2", X_Forwarded_For="not-an-ip, 10.0.0.1")
    edge.resolve(garbage)
    assert garbage["client"][0] == "10.0.0.1"
    only_garbage = _scope("10.0.0.2", X_Forwarded_For="<script>")
    edge.resolve(only_garbage)
    assert only_garbage["client"][0] == "10.0.0.2"


def test_what_enforcement_refuses() -> None:
    edge = _edge("false")
    assert edge.refuses(_scope("127.0.0.1"))
    assert not edge.refuses(_scope("127.0.0.1", "/metrics"))
    assert not edge.refuses(_scope("::1", "/readyz"))
    assert edge.refuses(_scope("192.168.1.5", "/metrics"))
    assert edge.refuses(_scope("127.0.0.1", "/metrics/"))
    assert not edge.refuses({**_scope("192.168.1.5"), "scheme": "https"})
    assert not _edge("false", enforce=False).refuses(_scope("192.168.1.5"))


def test_answer_headers() -> None:
    plain = dict(Edge.headers(_scope("127.0.0.1"), [(b"content-type", b"application/json")]))
    assert plain[b"x-content-type-options"] == b"nosniff"
    assert plain[b"referrer-policy"] == b"no-referrer"
    assert b"strict-transport-security" not in plain and b"content-security-policy" not in plain
    https = {**_scope("127.0.0.1"), "scheme": "https"}
    page = dict(Edge.headers(https, [(b"content-type", b"text/html; charset=utf-8")]))
    assert page[b"content-security-policy"] == HTML_CSP
    assert page[b"strict-transport-security"].startswith(b"max-age=")
    own = Edge.headers(https, [(b"content-type", b"text/html"), (b"content-security-policy", b"x")])
    assert [v for k, v in own if k == b"content-security-policy"] == [b"x"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("trust_proxy", "10.0.0.300"),
        ("trust_proxy", "proxy.example.com"),
        ("cors_origins", "app.example.com"),
        ("cors_origins", "https://app.example.com/path"),
        ("log_format", "xml"),
        ("access_log", "sometimes"),
    ],
)
def test_bad_edge_settings_name_themselves(name: str, value: str) -> None:
    with pytest.raises(SettingError, match=f"HEXA_{name.upper()}"):
        _settings(**{name: value})


def test_mqtt_tls_uses_the_https_pair_unless_it_has_its_own(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    s = _settings(tls_cert_file=str(cert), tls_key_file=str(key))
    assert s.https and (s.mqtt_tls_cert, s.mqtt_tls_key) == (cert, key)
    own = tmp_path / "mqtt"
    own.mkdir()
    mcert, mkey = self_signed(own)
    s = _settings(
        tls_cert_file=str(cert),
        tls_key_file=str(key),
        mqtt_tls_cert=str(mcert),
        mqtt_tls_key=str(mkey),
    )
    assert (s.mqtt_tls_cert, s.mqtt_tls_key) == (mcert, mkey)
    # the MQTT pair is checked like the HTTPS one
    with pytest.raises(SettingError, match=r"HEXA_MQTT_TLS_KEY.*does not match"):
        _settings(mqtt_tls_cert=str(mcert), mqtt_tls_key=str(key))


def test_plain_mqtt_listener_under_enforcement() -> None:
    assert _settings().mqtt_plain_listener
    assert not _settings(enforce_https="true").mqtt_plain_listener
    assert _settings(enforce_https="true", mqtt_port="1883").mqtt_plain_listener


def test_an_encrypted_key_is_named(tmp_path: Path) -> None:
    cert, _key = self_signed(tmp_path)
    locked = tmp_path / "locked.pem"
    locked.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    with pytest.raises(SettingError, match=r"HEXA_TLS_KEY_FILE.*encrypted"):
        _settings(tls_cert_file=str(cert), tls_key_file=str(locked))
