"""The one configuration object of the product (SPEC section 2).

Every value comes from an environment variable (or a ``.env`` file in the current
directory) and has a default; :func:`load_settings` reads them once and returns a
frozen :class:`Settings`. Durations are parsed to milliseconds with
:func:`metrics.timegrid.parse_duration`.

>>> s = Settings(LOYALTY_TOPIC_PREFIX="dev-", LOYALTY_WINDOWS="1h,24h")
>>> s.topic("orders"), s.window_ms
('dev-orders', {'1h': 3600000, '24h': 86400000})
>>> s.bucket_ms, s.broker_urls
(60000, ['kafka://localhost:9092'])
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from metrics.alerts import AlertConfig
from metrics.timegrid import format_duration, parse_duration

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
KAFKA_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def _env(name: str) -> Any:
    """Field alias: the environment variable name (also accepted as a keyword)."""
    return AliasChoices(name, name.lower())


def _duration_ms(value: object) -> object:
    if isinstance(value, str):
        return parse_duration(value)
    return value


class Settings(BaseSettings):
    """Frozen settings; construct with :func:`load_settings` (or keywords named like the variables)."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        frozen=True,
        extra="ignore",
        case_sensitive=False,
        populate_by_name=True,
    )

    kafka_bootstrap_servers: str = Field("localhost:9092", validation_alias=_env("KAFKA_BOOTSTRAP_SERVERS"))
    redis_url: str = Field("redis://localhost:6379/0", validation_alias=_env("REDIS_URL"))
    app_id: str = Field("loyalty-metrics", min_length=1, validation_alias=_env("LOYALTY_APP_ID"))
    topic_prefix: str = Field("", validation_alias=_env("LOYALTY_TOPIC_PREFIX"))
    windows: Annotated[tuple[str, ...], NoDecode] = Field(
        ("1h", "24h", "7d", "30d"), validation_alias=_env("LOYALTY_WINDOWS")
    )
    bucket_ms: int = Field(60_000, gt=0, validation_alias=_env("LOYALTY_BUCKET"))
    active_horizon_ms: int = Field(90 * 86_400_000, gt=0, validation_alias=_env("LOYALTY_ACTIVE_HORIZON"))
    clock: Literal["wall", "event"] = Field("wall", validation_alias=_env("LOYALTY_CLOCK"))
    emit_interval_ms: int = Field(1_000, gt=0, validation_alias=_env("LOYALTY_EMIT_INTERVAL"))
    checkpoint_interval_ms: int = Field(30_000, gt=0, validation_alias=_env("LOYALTY_CHECKPOINT_INTERVAL"))
    shutdown_timeout_ms: int = Field(30_000, gt=0, validation_alias=_env("LOYALTY_SHUTDOWN_TIMEOUT"))
    slice_events: int = Field(5_000, ge=1, validation_alias=_env("LOYALTY_SLICE_EVENTS"))
    gate_bypass: bool = Field(True, validation_alias=_env("LOYALTY_GATE_BYPASS"))
    store: Literal["rocksdb", "memory"] = Field("rocksdb", validation_alias=_env("LOYALTY_STORE"))
    standby_replicas: int = Field(0, ge=0, validation_alias=_env("LOYALTY_STANDBY_REPLICAS"))
    max_future_skew_ms: int = Field(300_000, gt=0, validation_alias=_env("LOYALTY_MAX_FUTURE_SKEW"))
    dedupe_ttl_ms: int = Field(30 * 86_400_000, gt=0, validation_alias=_env("LOYALTY_DEDUPE_TTL"))
    state_dir: Path = Field(default_factory=lambda: Path.cwd() / ".loyalty", validation_alias=_env("LOYALTY_STATE_DIR"))
    partitions: int = Field(8, ge=1, le=10_000, validation_alias=_env("LOYALTY_PARTITIONS"))
    replication_factor: int = Field(1, ge=1, validation_alias=_env("LOYALTY_REPLICATION_FACTOR"))
    web_port: int = Field(6066, ge=1, le=65535, validation_alias=_env("LOYALTY_WEB_PORT"))
    dashboard_host: str = Field("127.0.0.1", min_length=1, validation_alias=_env("LOYALTY_DASHBOARD_HOST"))
    dashboard_port: int = Field(8080, ge=1, le=65535, validation_alias=_env("LOYALTY_DASHBOARD_PORT"))
    alert_window: str = Field("24h", min_length=1, validation_alias=_env("LOYALTY_ALERT_WINDOW"))
    alert_step_ms: int = Field(15 * 60_000, gt=0, validation_alias=_env("LOYALTY_ALERT_STEP"))
    alert_k: float = Field(3.0, ge=0, allow_inf_nan=False, validation_alias=_env("LOYALTY_ALERT_K"))
    alert_min_churned: int = Field(10, ge=0, validation_alias=_env("LOYALTY_ALERT_MIN_CHURNED"))
    alert_min_responses: int = Field(30, ge=0, validation_alias=_env("LOYALTY_ALERT_MIN_RESPONSES"))
    alert_cooldown_ms: int = Field(6 * 3_600_000, ge=0, validation_alias=_env("LOYALTY_ALERT_COOLDOWN"))
    alert_half_life_ms: int = Field(7 * 86_400_000, gt=0, validation_alias=_env("LOYALTY_ALERT_HALF_LIFE"))
    alert_warmup_ms: int = Field(3 * 86_400_000, ge=0, validation_alias=_env("LOYALTY_ALERT_WARMUP"))
    alert_grace_ms: int = Field(3_600_000, ge=0, validation_alias=_env("LOYALTY_ALERT_GRACE"))
    alert_idle_ms: int = Field(30_000, gt=0, validation_alias=_env("LOYALTY_ALERT_IDLE"))
    alert_webhook: str | None = Field(None, validation_alias=_env("LOYALTY_ALERT_WEBHOOK"))
    alert_webhook_format: Literal["json", "slack"] = Field(
        "json", validation_alias=_env("LOYALTY_ALERT_WEBHOOK_FORMAT")
    )
    log_level: str = Field("info", validation_alias=_env("LOYALTY_LOG_LEVEL"))
    # Kafka security (every Kafka client of the product) and Redis TLS
    kafka_security_protocol: str = Field("PLAINTEXT", validation_alias=_env("KAFKA_SECURITY_PROTOCOL"))
    kafka_sasl_mechanism: str | None = Field(None, validation_alias=_env("KAFKA_SASL_MECHANISM"))
    kafka_sasl_username: str | None = Field(None, validation_alias=_env("KAFKA_SASL_USERNAME"))
    kafka_sasl_password: SecretStr | None = Field(None, validation_alias=_env("KAFKA_SASL_PASSWORD"))
    kafka_ssl_cafile: Path | None = Field(None, validation_alias=_env("KAFKA_SSL_CAFILE"))
    kafka_ssl_certfile: Path | None = Field(None, validation_alias=_env("KAFKA_SSL_CERTFILE"))
    kafka_ssl_keyfile: Path | None = Field(None, validation_alias=_env("KAFKA_SSL_KEYFILE"))
    redis_ssl_ca_file: Path | None = Field(None, validation_alias=_env("REDIS_SSL_CA_FILE"))

    # -- parsing ---------------------------------------------------------------------------

    @field_validator(
        "bucket_ms",
        "active_horizon_ms",
        "emit_interval_ms",
        "checkpoint_interval_ms",
        "shutdown_timeout_ms",
        "max_future_skew_ms",
        "dedupe_ttl_ms",
        "alert_step_ms",
        "alert_cooldown_ms",
        "alert_half_life_ms",
        "alert_warmup_ms",
        "alert_grace_ms",
        "alert_idle_ms",
        mode="before",
    )
    @classmethod
    def _parse_duration(cls, value: object) -> object:
        return _duration_ms(value)

    @field_validator("windows", mode="before")
    @classmethod
    def _split_windows(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("windows")
    @classmethod
    def _check_windows(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one window is needed (e.g. 1h,24h,7d,30d)")
        lengths = [parse_duration(w) for w in value]
        if len(set(lengths)) != len(lengths):
            raise ValueError(f"windows repeat a length: {','.join(value)}")
        return tuple(w.strip() for w in value)

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _check_bootstrap(cls, value: str) -> str:
        servers = [s.strip() for s in value.split(",") if s.strip()]
        if not servers:
            raise ValueError("empty Kafka bootstrap server list")
        for server in servers:
            if "://" in server:
                server = server.split("://", 1)[1]
            host, sep, port = server.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"{server!r} is not host:port")
        return ",".join(servers)

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"{value!r} is not a redis://, rediss:// or unix:// URL")
        return value

    @field_validator(
        "alert_webhook",
        "kafka_sasl_mechanism",
        "kafka_sasl_username",
        "kafka_sasl_password",
        "kafka_ssl_cafile",
        "kafka_ssl_certfile",
        "kafka_ssl_keyfile",
        "redis_ssl_ca_file",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("alert_window", "alert_webhook_format", mode="before")
    @classmethod
    def _strip(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _check_level(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().lower()
            if value not in LOG_LEVELS:
                raise ValueError(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
        return value

    @field_validator("kafka_security_protocol", mode="before")
    @classmethod
    def _check_protocol(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().upper()
            if value not in KAFKA_SECURITY_PROTOCOLS:
                raise ValueError(f"{value!r} is not one of {', '.join(KAFKA_SECURITY_PROTOCOLS)}")
        return value

    @field_validator("kafka_sasl_mechanism", mode="before")
    @classmethod
    def _check_mechanism(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().upper()
            if not value:
                return None
            if value not in KAFKA_SASL_MECHANISMS:
                raise ValueError(f"{value!r} is not one of {', '.join(KAFKA_SASL_MECHANISMS)}")
        return value

    @field_validator("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile", "redis_ssl_ca_file")
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        value = value.expanduser().absolute()
        if not value.is_file() or not os.access(value, os.R_OK):
            raise ValueError(f"{value} is not a readable file")
        return value

    @field_validator("state_dir")
    @classmethod
    def _absolute_state_dir(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @model_validator(mode="after")
    def _check_security(self) -> Settings:
        protocol = self.kafka_security_protocol
        sasl = protocol.startswith("SASL_")
        if sasl:
            missing = [
                name
                for name, value in (
                    ("KAFKA_SASL_MECHANISM", self.kafka_sasl_mechanism),
                    ("KAFKA_SASL_USERNAME", self.kafka_sasl_username),
                    ("KAFKA_SASL_PASSWORD", self.kafka_sasl_password),
                )
                if value is None
            ]
            if missing:
                raise ValueError(f"KAFKA_SECURITY_PROTOCOL={protocol} needs {', '.join(missing)}")
        elif self.kafka_sasl_mechanism or self.kafka_sasl_username or self.kafka_sasl_password:
            raise ValueError(
                f"KAFKA_SASL_* are set but KAFKA_SECURITY_PROTOCOL is {protocol} (SASL_SSL or SASL_PLAINTEXT uses them)"
            )
        ssl_files = (self.kafka_ssl_cafile, self.kafka_ssl_certfile, self.kafka_ssl_keyfile)
        if not protocol.endswith("SSL") and any(ssl_files):
            raise ValueError(
                f"KAFKA_SSL_* files are set but KAFKA_SECURITY_PROTOCOL is {protocol} (SSL or SASL_SSL uses them)"
            )
        if self.kafka_ssl_keyfile and not self.kafka_ssl_certfile:
            raise ValueError("KAFKA_SSL_KEYFILE is set without KAFKA_SSL_CERTFILE")
        if self.redis_ssl_ca_file and not self.redis_url.startswith("rediss://"):
            raise ValueError("REDIS_SSL_CA_FILE is set but REDIS_URL is not a rediss:// (TLS) URL")
        return self

    @model_validator(mode="after")
    def _check_grid(self) -> Settings:
        bucket = format_duration(self.bucket_ms)
        for name, ms in self.window_ms.items():
            if ms % self.bucket_ms:
                raise ValueError(f"window {name} is not a multiple of the bucket {bucket} (LOYALTY_BUCKET)")
        if self.active_horizon_ms % self.bucket_ms:
            raise ValueError(
                f"active horizon {format_duration(self.active_horizon_ms)} is not a multiple of the bucket {bucket}"
            )
        # the detectors read the aggregate's metrics of the alert window: it must be one the worker computes.
        # Given explicitly, a window the worker does not compute is an error; the default (24h) missing from
        # LOYALTY_WINDOWS turns the alerts off instead, so a worker with other windows still starts.
        alert_ms = parse_duration(self.alert_window)
        if alert_ms not in self.window_ms.values() and self.is_set("alert_window"):
            raise ValueError(
                f"the alert window {self.alert_window} (LOYALTY_ALERT_WINDOW) is not one of LOYALTY_WINDOWS "
                f"({','.join(self.windows)})"
            )
        if self.alert_step_ms % self.bucket_ms:
            raise ValueError(
                f"the alert step {format_duration(self.alert_step_ms)} (LOYALTY_ALERT_STEP) is not a multiple of "
                f"the bucket {bucket}"
            )
        return self

    # -- derived values --------------------------------------------------------------------

    @property
    def window_ms(self) -> dict[str, int]:
        """Window name (as configured, e.g. ``"24h"``) to its length in milliseconds, in order."""
        return {name: parse_duration(name) for name in self.windows}

    @property
    def bootstrap_servers(self) -> list[str]:
        """``host:port`` of every Kafka bootstrap server."""
        return [s.split("://", 1)[-1] for s in self.kafka_bootstrap_servers.split(",")]

    @property
    def broker_urls(self) -> list[str]:
        """The bootstrap servers as Faust broker URLs."""
        return [f"kafka://{s}" for s in self.bootstrap_servers]

    @property
    def alert_window_name(self) -> str | None:
        """The alert window as spelled in ``LOYALTY_WINDOWS`` (``1d`` there, ``24h`` here); ``None``: alerts off."""
        alert_ms = parse_duration(self.alert_window)
        return next((name for name, ms in self.window_ms.items() if ms == alert_ms), None)

    def alert_config(self) -> AlertConfig | None:
        """The detectors' configuration (SPEC section 7); ``None`` when the default alert window is not computed."""
        window = self.alert_window_name
        if window is None:
            return None
        return AlertConfig(
            window=window,
            step_ms=self.alert_step_ms,
            k=self.alert_k,
            min_churned=self.alert_min_churned,
            min_responses=self.alert_min_responses,
            cooldown_ms=self.alert_cooldown_ms,
            half_life_ms=self.alert_half_life_ms,
            warmup_ms=self.alert_warmup_ms,
            grace_ms=self.alert_grace_ms,
            idle_ms=self.alert_idle_ms,
            bucket_ms=self.bucket_ms,
        )

    def topic(self, name: str) -> str:
        """The Kafka topic name of ``name`` with ``LOYALTY_TOPIC_PREFIX`` applied."""
        return f"{self.topic_prefix}{name}"

    @property
    def redis_url_redacted(self) -> str:
        """``REDIS_URL`` with its password shown as ``***`` (for messages and logs)."""
        return redact_url(self.redis_url)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # the password of REDIS_URL never shows in a repr (SecretStr hides the SASL password)
        for name, value in super().__repr_args__():
            yield name, (redact_url(value) if name == "redis_url" else value)

    def is_set(self, field: str) -> bool:
        """Whether ``field`` was given explicitly (environment, ``.env`` or keyword) rather than defaulted."""
        return field in self.model_fields_set


def redact_url(url: str) -> str:
    """A URL without its password.

    >>> redact_url("rediss://user:secret@cache:6380/0"), redact_url("redis://localhost:6379/0")
    ('rediss://user:***@cache:6380/0', 'redis://localhost:6379/0')
    """
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment and ``.env``; keywords override both."""
    return Settings(**overrides)
