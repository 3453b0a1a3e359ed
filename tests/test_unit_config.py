"""Settings: precedence, validation with one clear message, secrets kept across restarts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hexa.hub.config import SettingError, load_settings, setting_names


def test_defaults_without_environment(tmp_path: Path) -> None:
    """With nothing set, the embedded defaults apply and the SQLite file lives in the data dir."""
    s = load_settings(environ={"HEXA_DATA_DIR": str(tmp_path)})
    assert (s.http_host, s.http_port, s.mqtt_port) == ("127.0.0.1", 8000, 1883)
    assert s.command_timeout_ms == 5000 and s.scheduler_tick_s == 10
    assert s.resolved_database_url == f"sqlite://{(tmp_path / 'hexa.db').resolve()}"
    assert s.broker_url is None


def test_flags_override_environment(tmp_path: Path) -> None:
    """A flag wins over the environment variable of the same setting."""
    env = {"HEXA_DATA_DIR": str(tmp_path), "HEXA_HTTP_PORT": "9000"}
    assert load_settings(environ=env).http_port == 9000
    assert load_settings({"http_port": "9100"}, environ=env).http_port == 9100


@pytest.mark.parametrize(
    ("name", "value", "needle"),
    [
        ("HEXA_HTTP_PORT", "eighty", "HEXA_HTTP_PORT"),
        ("HEXA_HTTP_PORT", "70000", "HEXA_HTTP_PORT"),
        ("HEXA_MQTT_PORT", "-1", "HEXA_MQTT_PORT"),
        ("HEXA_COMMAND_TIMEOUT_MS", "0", "HEXA_COMMAND_TIMEOUT_MS"),
        ("HEXA_SCHEDULER_TICK_S", "soon", "HEXA_SCHEDULER_TICK_S"),
        ("HEXA_DATABASE_URL", "mysql://x", "HEXA_DATABASE_URL"),
        ("HEXA_BROKER_URL", "http://broker", "HEXA_BROKER_URL"),
        ("HEXA_JWT_SECRET", "short", "HEXA_JWT_SECRET"),
        ("HEXA_LOG_LEVEL", "LOUD", "HEXA_LOG_LEVEL"),
        ("HEXA_TRUST_PROXY", "maybe", "HEXA_TRUST_PROXY"),
        ("HEXA_MQTT_TLS_CERT", "/nonexistent.pem", "HEXA_MQTT_TLS"),
        ("HEXA_BROKER_CA_FILE", "/nonexistent-ca.pem", "HEXA_BROKER_CA_FILE"),
        ("HEXA_EVENT_LOOP", "trio", "HEXA_EVENT_LOOP"),
        ("HEXA_MQTT_DEVICE_PUBLISH_RATE", "-1", "HEXA_MQTT_DEVICE_PUBLISH_RATE"),
        ("HEXA_MQTT_INTEGRATION_PUBLISH_RATE", "fast", "HEXA_MQTT_INTEGRATION_PUBLISH_RATE"),
        ("HEXA_MQTT_INTEGRATION_PUBLISH_RATE", "nan", "HEXA_MQTT_INTEGRATION_PUBLISH_RATE"),
    ],
)
def test_bad_setting_names_itself(tmp_path: Path, name: str, value: str, needle: str) -> None:
    """Every bad value raises one SettingError whose message names the setting."""
    with pytest.raises(SettingError) as info:
        load_settings(environ={"HEXA_DATA_DIR": str(tmp_path), name: value})
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_secret_values_are_not_echoed(tmp_path: Path) -> None:
    """A rejected secret is not repeated in the error message."""
    with pytest.raises(SettingError) as info:
        load_settings(environ={"HEXA_DATA_DIR": str(tmp_path), "HEXA_JWT_SECRET": "tooshort"})
    assert "tooshort" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("HEXA_BROKER_URL", "http://hub:s3cr3t-pw@broker:1883"),
        ("HEXA_HA_BROKER_URL", "ws://ha:s3cr3t-pw@homeassistant.local"),
        ("HEXA_DATABASE_URL", "mysql://root:s3cr3t-pw@db/hexa"),
    ],
)
def test_a_refused_url_does_not_repeat_its_password(tmp_path: Path, name: str, url: str) -> None:
    """A URL with the wrong scheme is named in the error with its password replaced."""
    with pytest.raises(SettingError) as info:
        load_settings(environ={"HEXA_DATA_DIR": str(tmp_path), name: url})
    assert "s3cr3t-pw" not in str(info.value) and "***@" in str(info.value)
    assert name in str(info.value)


def test_generated_secrets_survive_a_restart(tmp_path: Path) -> None:
    """Provision key and JWT secret are generated once into the data dir and reused."""
    first = load_settings(environ={"HEXA_DATA_DIR": str(tmp_path)})
    second = load_settings(environ={"HEXA_DATA_DIR": str(tmp_path)})
    assert first.device_provision_key and first.jwt_secret
    assert (first.device_provision_key, first.jwt_secret) == (
        second.device_provision_key,
        second.jwt_secret,
    )
    stored = tmp_path / "secrets.json"
    assert stored.stat().st_mode & 0o077 == 0
    assert set(json.loads(stored.read_text())) == {"device_provision_key", "jwt_secret"}


def test_given_secrets_are_not_stored(tmp_path: Path) -> None:
    """Secrets set in the environment are used as given and never written to disk."""
    env = {
        "HEXA_DATA_DIR": str(tmp_path),
        "HEXA_JWT_SECRET": "x" * 40,
        "HEXA_DEVICE_PROVISION_KEY": "y" * 40,
    }
    s = load_settings(environ=env)
    assert s.jwt_secret == "x" * 40
    assert not (tmp_path / "secrets.json").exists()


def test_postgresql_scheme_is_normalised(tmp_path: Path) -> None:
    """postgresql:// URLs are accepted as postgres://."""
    s = load_settings(
        environ={"HEXA_DATA_DIR": str(tmp_path), "HEXA_DATABASE_URL": "postgresql://u@h/db"}
    )
    assert s.resolved_database_url == "postgres://u@h/db"


def test_every_setting_has_an_environment_variable() -> None:
    """The documented variables are derived from the settings themselves."""
    names = setting_names()
    assert "HEXA_COMMAND_TIMEOUT_MS" in names and "HEXA_BROKER_URL" in names
    docs = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    missing = [n for n in names if n not in docs]
    assert not missing, f"docs/configuration.md does not document {missing}"


def test_storage_is_prepared(tmp_path: Path) -> None:
    """The data dir is created even when every secret is configured (no secrets file)."""
    from hexa.hub.config import prepare_storage

    data = tmp_path / "new" / "data"
    env = {
        "HEXA_DATA_DIR": str(data),
        "HEXA_JWT_SECRET": "x" * 40,
        "HEXA_DEVICE_PROVISION_KEY": "y" * 40,
    }
    prepare_storage(load_settings(environ=env))
    assert data.is_dir()


def test_sqlite_in_a_missing_directory_is_a_setting_error(tmp_path: Path) -> None:
    """A SQLite URL whose directory does not exist is refused, naming the setting."""
    from hexa.hub.config import prepare_storage

    env = {"HEXA_DATA_DIR": str(tmp_path), "HEXA_DATABASE_URL": "sqlite:///nonexistent/x/h.db"}
    with pytest.raises(SettingError, match="HEXA_DATABASE_URL"):
        prepare_storage(load_settings(environ=env))
