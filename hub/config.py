"""Settings: command-line flags, then ``HEXA_*`` environment variables, then defaults."""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import os
import re
import secrets
import ssl
import stat
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class SettingError(ValueError):
    """A setting has a value the hub cannot run with; the message names the setting."""

    def __init__(self, name: str, value: object, reason: str) -> None:
        self.name, self.value, self.reason = name, value, reason
        super().__init__(f"invalid setting {name}={value!r}: {reason}")


def _port(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SettingError(name, raw, "must be a port number 0-65535") from None
    if not 0 <= value <= 65535:
        raise SettingError(name, raw, "must be a port number 0-65535")
    return value


def _optional_port(name: str, raw: str) -> int | None:
    if raw.strip().lower() in ("", "off", "none", "disabled"):
        return None
    return _port(name, raw)


def _positive_int(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SettingError(name, raw, "must be a positive integer") from None
    if value <= 0:
        raise SettingError(name, raw, "must be a positive integer")
    return value


def _packet_ids(name: str, raw: str) -> int:
    """A count of MQTT packet ids in flight at once (1 to 65535)."""
    value = _positive_int(name, raw)
    if value > 65535:
        raise SettingError(name, raw, "must be at most 65535 (MQTT packet ids)")
    return value


def _positive_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingError(name, raw, "must be a positive number") from None
    if value <= 0:
        raise SettingError(name, raw, "must be a positive number")
    return value


def _rate(name: str, raw: str) -> float:
    """A rate a second; 0 turns the limit off."""
    try:
        value = float(raw)
    except ValueError:
        raise SettingError(name, raw, "must be a number (0: unlimited)") from None
    if not value >= 0 or value == float("inf"):
        raise SettingError(name, raw, "must be a finite number >= 0 (0: unlimited)")
    return value


def _bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise SettingError(name, raw, "must be true or false")


def _without_password(url: str) -> str:
    """``url`` as it may be shown in an error: any password in it replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.partition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"


def _database_url(name: str, raw: str) -> str:
    if not raw.startswith(("sqlite://", "postgres://", "postgresql://", "asyncpg://")):
        raise SettingError(name, _without_password(raw), "must start with sqlite:// or postgres://")
    if raw.startswith("postgresql://"):
        return "postgres://" + raw.removeprefix("postgresql://")
    return raw


def _broker_url(name: str, raw: str) -> str | None:
    if not raw:
        return None
    if not raw.startswith(("mqtt://", "mqtts://")):
        raise SettingError(name, _without_password(raw), "must start with mqtt:// or mqtts://")
    return raw


def _embedded_bus(name: str, raw: str) -> str:
    value = raw.lower()
    if value not in ("local", "tcp"):
        raise SettingError(name, raw, "must be local or tcp")
    return value


def _event_loop(name: str, raw: str) -> str:
    value = raw.lower()
    if value not in ("uvloop", "asyncio"):
        raise SettingError(name, raw, "must be uvloop or asyncio")
    return value


def _log_level(name: str, raw: str) -> str:
    level = raw.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise SettingError(name, raw, "must be one of DEBUG, INFO, WARNING, ERROR")
    return level


def _secret(name: str, raw: str) -> str | None:
    if not raw:
        return None
    if len(raw) < 16:
        raise SettingError(name, "***", "must be at least 16 characters")
    return raw


def _uuid(name: str, raw: str) -> uuid.UUID | None:
    if not raw:
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise SettingError(name, raw, "must be an organization id (a UUID)") from None


def _discovery_prefix(name: str, raw: str) -> str:
    """Home Assistant's discovery prefix: one topic level, not the hub's own."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", raw) or raw == "hexa":
        raise SettingError(name, raw, "must be one topic level (letters, digits, _ or -)")
    return raw


#: ``HEXA_TRUST_PROXY=true``: a proxy on the same host (loopback)
_LOOPBACK = ("127.0.0.0/8", "::1/128")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _trusted_proxies(name: str, raw: str) -> tuple[Network, ...]:
    """The peers whose ``X-Forwarded-*`` headers are believed: ``false`` (none), ``true``
    (loopback), ``*`` (any) or a comma-separated list of addresses and CIDR networks."""
    lowered = raw.strip().lower()
    if lowered in ("", "0", "false", "no", "off"):
        return ()
    items = {"1": _LOOPBACK, "true": _LOOPBACK, "yes": _LOOPBACK, "on": _LOOPBACK}.get(
        lowered, ("0.0.0.0/0", "::/0") if lowered == "*" else lowered.split(",")
    )
    try:
        return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in items)
    except ValueError:
        raise SettingError(
            name, raw, "must be true, false, * or addresses/networks (10.0.0.0/8,...)"
        ) from None


_ORIGIN = re.compile(
    r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$"
)


def _origins(name: str, raw: str) -> tuple[str, ...]:
    """Browser origins allowed to call the API (CORS): ``*`` or scheme://host[:port],..."""
    origins = tuple(item.strip().rstrip("/") for item in raw.split(",") if item.strip())
    for origin in origins:
        if origin != "*" and not _ORIGIN.match(origin):
            raise SettingError(name, raw, f"{origin!r} is not an origin (https://host[:port])")
    return origins


#: HEXA_PASSWORD_HASH's values (their argon2id parameters: security.PASSWORD_PROFILES)
PASSWORD_HASH_PROFILES = ("strong", "light")


def _password_hash(name: str, raw: str) -> str:
    value = raw.lower()
    if value not in PASSWORD_HASH_PROFILES:
        raise SettingError(name, raw, "must be strong or light")
    return value


def _log_format(name: str, raw: str) -> str:
    value = raw.lower()
    if value not in ("text", "json"):
        raise SettingError(name, raw, "must be text or json")
    return value


def _ota_kek(name: str, raw: str) -> bytes | None:
    """The OTA key-encryption key: base64 of exactly 32 bytes."""
    if not raw:
        return None
    try:
        key = base64.b64decode(raw, validate=True)
    except ValueError:
        raise SettingError(name, "***", "must be base64 of 32 bytes") from None
    if len(key) != 32:
        raise SettingError(name, "***", "must be base64 of 32 bytes")
    return key


def _hosts(name: str, raw: str) -> tuple[str, ...]:
    """A comma-separated list of host names (empty: the default)."""
    hosts = tuple(h.strip().lower() for h in raw.split(",") if h.strip())
    for host in hosts:
        if not re.fullmatch(r"[a-z0-9.:\[\]-]{1,253}", host):
            raise SettingError(name, raw, "must be host names separated by commas")
    return hosts


def _base_url(name: str, raw: str) -> str | None:
    if not raw:
        return None
    if not re.fullmatch(r"https?://[^/\s?#]+(/[^\s?#]*)?", raw):
        raise SettingError(name, raw, "must be an http:// or https:// URL")
    return raw.rstrip("/")


def _text(_name: str, raw: str) -> str | None:
    return raw or None


def _path(_name: str, raw: str) -> Path:
    return Path(raw).expanduser()


def _optional_path(name: str, raw: str) -> Path | None:
    return _path(name, raw) if raw else None


def _backup_key(name: str, raw: str) -> str | None:
    if not raw:
        return None
    if len(raw) < 32:
        raise SettingError(name, "***", "must be at least 32 characters")
    return raw


def _backup_schedule(name: str, raw: str) -> str | None:
    """A cron expression (UTC), or ``off``."""
    if raw.strip().lower() in ("off", "none", "disabled"):
        return None
    from croniter import croniter

    if not croniter.is_valid(raw):
        raise SettingError(name, raw, "must be a cron expression (0 3 * * *) or off")
    return raw


@dataclass(frozen=True)
class Settings:
    """Every knob of a hub process. Build it with :func:`load_settings`."""

    data_dir: Path = Path("data")
    database_url: str | None = None
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_tls_port: int | None = 8883
    mqtt_ws_port: int | None = None
    mqtt_tls_cert: Path | None = None
    mqtt_tls_key: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    broker_url: str | None = None
    broker_ca_file: Path | None = None
    embedded_bus: str = "local"
    event_loop: str = "uvloop"
    public_host: str | None = None
    homekit_bind: str | None = None
    device_provision_key: str | None = None
    jwt_secret: str | None = None
    admin_email: str | None = None
    admin_password: str | None = None
    command_timeout_ms: int = 5000
    scheduler_tick_s: float = 10.0
    scheduler_grace_s: float = 60.0
    access_token_ttl_s: int = 900
    password_hash: str = "strong"  # noqa: S105 - the name of an argon2id profile
    refresh_token_ttl_s: int = 30 * 24 * 3600
    heartbeat_s: float = 30.0
    max_body_bytes: int = 1024 * 1024
    http_header_timeout_s: float = 10.0
    http_keepalive_timeout_s: int = 5
    max_mqtt_payload_bytes: int = 64 * 1024
    mqtt_session_expiry_s: int = 2 * 3600
    mqtt_max_sessions_per_identity: int = 16
    mqtt_max_queued_messages: int = 1000
    mqtt_max_inflight_messages: int = 32
    mqtt_device_publish_rate: float = 100.0
    mqtt_integration_publish_rate: float = 1000.0
    login_max_failures: int = 5
    login_window_s: int = 900
    idempotency_ttl_s: int = 24 * 3600
    trust_proxy: tuple[Network, ...] = ()
    enforce_https: bool = False
    cors_origins: tuple[str, ...] = ()
    allow_alert_simulation: bool = False
    ota_max_bytes: int = 32 * 1024 * 1024
    ota_kek: bytes | None = field(default=None, repr=False)
    ota_allowed_hosts: tuple[str, ...] = ()
    ota_base_url: str | None = None
    log_level: str = "INFO"
    log_format: str = "text"
    access_log: bool = True
    ha_discovery: bool = True
    ha_discovery_prefix: str = "homeassistant"
    ha_broker_url: str | None = None
    ha_username: str | None = None
    ha_password: str | None = None
    ha_org_id: uuid.UUID | None = None
    ha_ca_file: Path | None = None
    ha_cert_file: Path | None = None
    ha_key_file: Path | None = None
    ha_tls_insecure: bool = False
    backup_key: str | None = None
    backup_schedule: str | None = "0 3 * * *"
    backup_dir: Path | None = None
    backup_keep: int = 14
    secrets_generated: tuple[str, ...] = field(default=(), compare=False)
    #: the settings given by a flag or the environment (the rest are defaults)
    explicit: frozenset[str] = field(default=frozenset(), compare=False)

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file in the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite://{(self.data_dir / 'hexa.db').resolve()}"

    @property
    def database_is_ours_alone(self) -> bool:
        """Whether this hub is its database's only server (SQLite), so that it sees every
        change itself and may keep what it read until it changes it; several hubs may share
        a PostgreSQL database."""
        return self.resolved_database_url.startswith("sqlite://")

    @property
    def command_timeout_s(self) -> float:
        return self.command_timeout_ms / 1000

    @property
    def advertised_host(self) -> str:
        """The host name devices are told to reach (provisioning answers)."""
        if self.public_host:
            return self.public_host
        host = self.mqtt_host
        return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104

    @property
    def tls_enabled(self) -> bool:
        return self.mqtt_tls_cert is not None and self.mqtt_tls_key is not None

    @property
    def https(self) -> bool:
        """The HTTP listener serves HTTPS (and WSS) itself."""
        return self.tls_cert_file is not None and self.tls_key_file is not None

    @property
    def mqtt_plain_listener(self) -> bool:
        """Whether the embedded broker opens its plain MQTT listener to the network: not
        under ``HEXA_ENFORCE_HTTPS`` unless ``HEXA_MQTT_PORT`` is given explicitly."""
        return not self.enforce_https or "mqtt_port" in self.explicit


Parser = Callable[[str, str], Any]

#: setting name → parser. The environment variable is ``HEXA_`` + the upper-cased name.
_PARSERS: dict[str, Parser] = {
    "data_dir": _path,
    "database_url": _database_url,
    "http_host": lambda _n, raw: raw,
    "http_port": _port,
    "mqtt_host": lambda _n, raw: raw,
    "mqtt_port": _port,
    "mqtt_tls_port": _optional_port,
    "mqtt_ws_port": _optional_port,
    "mqtt_tls_cert": _optional_path,
    "mqtt_tls_key": _optional_path,
    "tls_cert_file": _optional_path,
    "tls_key_file": _optional_path,
    "broker_url": _broker_url,
    "broker_ca_file": _optional_path,
    "embedded_bus": _embedded_bus,
    "event_loop": _event_loop,
    "public_host": _text,
    "homekit_bind": _text,
    "device_provision_key": _secret,
    "jwt_secret": _secret,
    "admin_email": _text,
    "admin_password": _text,
    "command_timeout_ms": _positive_int,
    "scheduler_tick_s": _positive_float,
    "scheduler_grace_s": _positive_float,
    "access_token_ttl_s": _positive_int,
    "password_hash": _password_hash,
    "refresh_token_ttl_s": _positive_int,
    "heartbeat_s": _positive_float,
    "max_body_bytes": _positive_int,
    "http_header_timeout_s": _positive_float,
    "http_keepalive_timeout_s": _positive_int,
    "max_mqtt_payload_bytes": _positive_int,
    "mqtt_session_expiry_s": _positive_int,
    "mqtt_max_sessions_per_identity": _positive_int,
    "mqtt_max_queued_messages": _positive_int,
    "mqtt_max_inflight_messages": _packet_ids,
    "mqtt_device_publish_rate": _rate,
    "mqtt_integration_publish_rate": _rate,
    "login_max_failures": _positive_int,
    "login_window_s": _positive_int,
    "idempotency_ttl_s": _positive_int,
    "trust_proxy": _trusted_proxies,
    "enforce_https": _bool,
    "cors_origins": _origins,
    "allow_alert_simulation": _bool,
    "ota_max_bytes": _positive_int,
    "ota_kek": _ota_kek,
    "ota_allowed_hosts": _hosts,
    "ota_base_url": _base_url,
    "log_level": _log_level,
    "log_format": _log_format,
    "access_log": _bool,
    "ha_discovery": _bool,
    "ha_discovery_prefix": _discovery_prefix,
    "ha_broker_url": _broker_url,
    "ha_username": _text,
    "ha_password": _text,
    "ha_org_id": _uuid,
    "ha_ca_file": _optional_path,
    "ha_cert_file": _optional_path,
    "ha_key_file": _optional_path,
    "ha_tls_insecure": _bool,
    "backup_key": _backup_key,
    "backup_schedule": _backup_schedule,
    "backup_dir": _optional_path,
    "backup_keep": _positive_int,
}


def env_name(setting: str) -> str:
    return "HEXA_" + setting.upper()


def load_settings(
    overrides: Mapping[str, str | None] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    with_secrets: bool = True,
) -> Settings:
    """Resolve settings from flags (``overrides``), then the environment, then defaults.

    With ``with_secrets`` the provision key and JWT secret are read from, or generated
    into, ``<data_dir>/secrets.json`` when not given, so that a restart keeps them.
    Raises :class:`SettingError` naming the first bad setting.
    """
    environ = os.environ if environ is None else environ
    overrides = overrides or {}
    values: dict[str, Any] = {}
    for name, parse in _PARSERS.items():
        raw = overrides.get(name)
        label = f"--{name.replace('_', '-')}"
        if raw is None:
            raw = environ.get(env_name(name))
            label = env_name(name)
        if raw is None:
            continue
        values[name] = parse(label, raw.strip())
    settings = Settings(**values, explicit=frozenset(values))
    for cert, key in (("mqtt_tls_cert", "mqtt_tls_key"), ("tls_cert_file", "tls_key_file")):
        for given, missing in ((cert, key), (key, cert)):
            if getattr(settings, given) is not None and getattr(settings, missing) is None:
                raise SettingError(
                    env_name(missing), None, f"required when {env_name(given)} is set"
                )
    for name in ("mqtt_tls_cert", "mqtt_tls_key", "broker_ca_file"):
        path = getattr(settings, name)
        if path is not None and not path.is_file():
            raise SettingError(env_name(name), str(path), "file not found")
    settings = _check_tls(settings)
    if settings.ha_broker_url is not None:
        ha_tls_context(settings)  # a bad HEXA_HA_* setting stops start-up here, in one line
    if with_secrets:
        settings = _with_stored_secrets(settings)
    return settings


def _check_tls(settings: Settings) -> Settings:
    """Check the HTTPS and MQTT/TLS certificate pairs (one line naming the setting when
    one does not load); the MQTT TLS listener uses the HTTPS pair unless it has its own."""
    from hexa.hub.tls import check_pair

    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        check_pair(
            settings.tls_cert_file, settings.tls_key_file, "HEXA_TLS_CERT_FILE", "HEXA_TLS_KEY_FILE"
        )
    if settings.mqtt_tls_cert is not None and settings.mqtt_tls_key is not None:
        check_pair(
            settings.mqtt_tls_cert, settings.mqtt_tls_key, "HEXA_MQTT_TLS_CERT", "HEXA_MQTT_TLS_KEY"
        )
    elif settings.https:
        settings = replace(
            settings, mqtt_tls_cert=settings.tls_cert_file, mqtt_tls_key=settings.tls_key_file
        )
    return settings


def ha_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of the outbound Home Assistant bridge (None: plain MQTT): the
    private CA of ``HEXA_HA_CA_FILE`` (else the system's), the client certificate of
    ``HEXA_HA_CERT_FILE``/``HEXA_HA_KEY_FILE``, and no verification at all only with
    ``HEXA_HA_TLS_INSECURE``. Raises :class:`SettingError` naming the setting."""
    if settings.ha_broker_url is None:
        return None
    if settings.ha_org_id is None:
        raise SettingError(
            "HEXA_HA_ORG_ID", None, "required with HEXA_HA_BROKER_URL (whose devices to show)"
        )
    if (settings.ha_cert_file is None) != (settings.ha_key_file is None):
        missing = "HEXA_HA_KEY_FILE" if settings.ha_key_file is None else "HEXA_HA_CERT_FILE"
        raise SettingError(missing, None, "a client certificate needs both the cert and the key")
    tls = settings.ha_broker_url.startswith("mqtts://")
    for name in ("ha_ca_file", "ha_cert_file", "ha_key_file"):
        path = getattr(settings, name)
        if path is None:
            continue
        if not tls:
            raise SettingError(env_name(name), str(path), "needs an mqtts:// HEXA_HA_BROKER_URL")
        if not path.is_file() or not os.access(path, os.R_OK):
            raise SettingError(env_name(name), str(path), "file not found or not readable")
    if not tls:
        return None
    try:
        context = ssl.create_default_context(
            cafile=str(settings.ha_ca_file) if settings.ha_ca_file else None
        )
    except (ssl.SSLError, OSError) as exc:
        raise SettingError("HEXA_HA_CA_FILE", str(settings.ha_ca_file), str(exc)) from None
    if settings.ha_cert_file is not None and settings.ha_key_file is not None:
        try:
            context.load_cert_chain(str(settings.ha_cert_file), str(settings.ha_key_file))
        except (ssl.SSLError, OSError) as exc:
            raise SettingError("HEXA_HA_CERT_FILE", str(settings.ha_cert_file), str(exc)) from None
    if settings.ha_tls_insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


_GENERATED = ("device_provision_key", "jwt_secret")


def _with_stored_secrets(settings: Settings) -> Settings:
    missing = [name for name in _GENERATED if getattr(settings, name) is None]
    if not missing:
        return settings
    _make_data_dir(settings.data_dir)
    path = settings.data_dir / "secrets.json"
    stored: dict[str, str] = {}
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            raise SettingError(
                "HEXA_DATA_DIR", str(settings.data_dir), "secrets.json is unreadable"
            ) from None
    generated = []
    for name in missing:
        if name not in stored:
            stored[name] = secrets.token_urlsafe(32)
            generated.append(name)
    if generated:
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        # created 0600, so the secrets are never readable by others, not even for a moment
        with os.fdopen(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600), "w") as f:
            f.write(json.dumps(stored, indent=2))
        tmp.replace(path)
    return replace(
        settings,
        secrets_generated=tuple(generated),
        **{name: stored[name] for name in missing},  # type: ignore[arg-type]
    )


def _make_data_dir(data_dir: Path) -> None:
    """Create the data directory 0700, or tighten an existing one (logged)."""
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = stat.S_IMODE(data_dir.stat().st_mode)
        if mode & 0o077:
            data_dir.chmod(0o700)
            log.warning("data directory %s was mode %04o: tightened to 0700", data_dir, mode)
        secrets_file = data_dir / "secrets.json"
        if secrets_file.is_file() and stat.S_IMODE(secrets_file.stat().st_mode) & 0o077:
            secrets_file.chmod(0o600)
            log.warning("%s was readable by others: tightened to 0600", secrets_file)
    except OSError as exc:
        raise SettingError("HEXA_DATA_DIR", str(data_dir), exc.strerror or str(exc)) from None


def prepare_storage(settings: Settings) -> None:
    """Create the data directory (0700) and check that a SQLite database can be created.

    Raises :class:`SettingError` naming the setting when not (SQLite would otherwise
    fail deep inside the driver, or hang).
    """
    _make_data_dir(settings.data_dir)
    url = settings.resolved_database_url
    if url.startswith("sqlite://") and ":memory:" not in url:
        path = Path(url.removeprefix("sqlite://").split("?", 1)[0])
        if not path.parent.is_dir():
            raise SettingError("HEXA_DATABASE_URL", url, f"directory {path.parent} does not exist")
        if not os.access(path.parent, os.W_OK):
            raise SettingError("HEXA_DATABASE_URL", url, f"directory {path.parent} is not writable")


def setting_names() -> list[str]:
    """Every setting's environment variable, for the docs and ``--help``."""
    return [env_name(f.name) for f in fields(Settings) if f.name in _PARSERS]
