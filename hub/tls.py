"""Certificates the hub serves with (HTTPS, WSS, MQTT over TLS), checked before start-up.

A certificate or key that is missing, unreadable, malformed or does not belong to the
other stops start-up with one line naming the setting, instead of a traceback from deep
inside the TLS library once the listener opens.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from hexa.hub.config import SettingError

_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _read(path: Path, setting: str) -> bytes:
    if not path.is_file():
        raise SettingError(setting, str(path), "file not found")
    if not os.access(path, os.R_OK):
        raise SettingError(setting, str(path), "file not readable by the hub's user")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SettingError(setting, str(path), exc.strerror or str(exc)) from None


def check_pair(cert: Path, key: Path, cert_setting: str, key_setting: str) -> None:
    """Raise :class:`SettingError` unless ``cert`` is a PEM certificate chain and ``key``
    the unencrypted PEM private key of its first certificate."""
    cert_pem, key_pem = _read(cert, cert_setting), _read(key, key_setting)
    try:
        leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError:
        raise SettingError(cert_setting, str(cert), "not a PEM certificate") from None
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise SettingError(
            key_setting, str(key), "the key is encrypted: give an unencrypted PEM key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise SettingError(key_setting, str(key), "not a PEM private key") from None
    if leaf.public_key().public_bytes(*_SPKI) != private.public_key().public_bytes(*_SPKI):
        raise SettingError(key_setting, str(key), f"does not match the certificate {cert_setting}")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise SettingError(cert_setting, str(cert), f"not usable for TLS ({exc})") from None
