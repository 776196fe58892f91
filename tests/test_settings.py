"""streams.settings: every SPEC section 2 variable, its default, parsing and validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from metrics.alerts import AlertConfig
from streams.settings import Settings, load_settings

VARIABLES = (
    "KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL", "LOYALTY_APP_ID", "LOYALTY_TOPIC_PREFIX", "LOYALTY_WINDOWS",
    "LOYALTY_BUCKET", "LOYALTY_ACTIVE_HORIZON", "LOYALTY_CLOCK", "LOYALTY_EMIT_INTERVAL", "LOYALTY_STORE",
    "LOYALTY_CHECKPOINT_INTERVAL", "LOYALTY_SLICE_EVENTS", "LOYALTY_STANDBY_REPLICAS",
    "LOYALTY_MAX_FUTURE_SKEW", "LOYALTY_DEDUPE_TTL", "LOYALTY_STATE_DIR", "LOYALTY_PARTITIONS",
    "LOYALTY_REPLICATION_FACTOR", "LOYALTY_WEB_PORT", "LOYALTY_DASHBOARD_HOST", "LOYALTY_DASHBOARD_PORT",
    "LOYALTY_ALERT_WINDOW", "LOYALTY_ALERT_STEP", "LOYALTY_ALERT_K", "LOYALTY_ALERT_MIN_CHURNED",
    "LOYALTY_ALERT_MIN_RESPONSES", "LOYALTY_ALERT_COOLDOWN", "LOYALTY_ALERT_HALF_LIFE", "LOYALTY_ALERT_WARMUP",
    "LOYALTY_ALERT_GRACE", "LOYALTY_ALERT_IDLE", "LOYALTY_ALERT_WEBHOOK", "LOYALTY_ALERT_WEBHOOK_FORMAT",
    "LOYALTY_LOG_LEVEL", "KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_PASSWORD", "KAFKA_SSL_CAFILE", "KAFKA_SSL_CERTFILE", "KAFKA_SSL_KEYFILE", "REDIS_SSL_CA_FILE",
)  # fmt: skip
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no .env of the developer's


def test_defaults_are_the_spec_defaults(tmp_path: Path) -> None:
    s = load_settings()
    assert s.kafka_bootstrap_servers == "localhost:9092"
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.app_id == "loyalty-metrics"
    assert s.topic_prefix == ""
    assert s.windows == ("1h", "24h", "7d", "30d")
    assert s.window_ms == {"1h": 3_600_000, "24h": 86_400_000, "7d": 604_800_000, "30d": 2_592_000_000}
    assert s.bucket_ms == 60_000
    assert s.active_horizon_ms == 90 * 86_400_000
    assert s.clock == "wall"
    assert s.emit_interval_ms == 1_000
    assert s.checkpoint_interval_ms == 30_000
    assert s.slice_events == 5_000
    assert s.standby_replicas == 0
    assert s.store == "rocksdb"
    assert s.max_future_skew_ms == 300_000
    assert s.dedupe_ttl_ms == 30 * 86_400_000
    assert s.state_dir == tmp_path / ".loyalty"
    assert (s.partitions, s.replication_factor, s.web_port, s.dashboard_port) == (8, 1, 6066, 8080)
    assert s.dashboard_host == "127.0.0.1"
    assert s.alert_webhook is None
    assert s.alert_webhook_format == "json"
    assert s.alert_config() == AlertConfig()
    assert s.log_level == "info"
    assert s.kafka_security_protocol == "PLAINTEXT"
    assert (s.kafka_sasl_mechanism, s.kafka_sasl_username, s.kafka_sasl_password) == (None, None, None)
    assert (s.kafka_ssl_cafile, s.kafka_ssl_certfile, s.kafka_ssl_keyfile, s.redis_ssl_ca_file) == (None,) * 4
    assert s.model_fields_set == set()


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": "k1:9092, k2:9093",
        "REDIS_URL": "rediss://:pw@r:6380/2",
        "LOYALTY_APP_ID": "app",
        "LOYALTY_TOPIC_PREFIX": "dev-",
        "LOYALTY_WINDOWS": "15m, 2h",
        "LOYALTY_BUCKET": "5m",
        "LOYALTY_ACTIVE_HORIZON": "30d",
        "LOYALTY_CLOCK": "event",
        "LOYALTY_EMIT_INTERVAL": "250ms",
        "LOYALTY_CHECKPOINT_INTERVAL": "2m",
        "LOYALTY_SLICE_EVENTS": "500",
        "LOYALTY_STANDBY_REPLICAS": "1",
        "LOYALTY_STORE": "memory",
        "LOYALTY_MAX_FUTURE_SKEW": "1m",
        "LOYALTY_DEDUPE_TTL": "7d",
        "LOYALTY_STATE_DIR": "state",
        "LOYALTY_PARTITIONS": "4",
        "LOYALTY_WEB_PORT": "7000",
        "LOYALTY_DASHBOARD_PORT": "9000",
        "LOYALTY_ALERT_WINDOW": "2h",
        "LOYALTY_ALERT_STEP": "10m",
        "LOYALTY_ALERT_K": "2.5",
        "LOYALTY_ALERT_MIN_CHURNED": "4",
        "LOYALTY_ALERT_MIN_RESPONSES": "20",
        "LOYALTY_ALERT_COOLDOWN": "1h",
        "LOYALTY_ALERT_HALF_LIFE": "2d",
        "LOYALTY_ALERT_WARMUP": "1d",
        "LOYALTY_ALERT_GRACE": "30m",
        "LOYALTY_ALERT_IDLE": "5s",
        "LOYALTY_ALERT_WEBHOOK": "http://hook.example/alerts",
        "LOYALTY_ALERT_WEBHOOK_FORMAT": "slack",
        "LOYALTY_LOG_LEVEL": "DEBUG",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s = load_settings()
    assert s.bootstrap_servers == ["k1:9092", "k2:9093"]
    assert s.broker_urls == ["kafka://k1:9092", "kafka://k2:9093"]
    assert s.redis_url == "rediss://:pw@r:6380/2"
    assert (s.app_id, s.topic("orders")) == ("app", "dev-orders")
    assert s.window_ms == {"15m": 900_000, "2h": 7_200_000}
    assert (s.bucket_ms, s.active_horizon_ms, s.emit_interval_ms) == (300_000, 30 * 86_400_000, 250)
    assert s.checkpoint_interval_ms == 120_000
    assert s.slice_events == 500
    assert s.standby_replicas == 1
    assert (s.clock, s.store, s.max_future_skew_ms, s.dedupe_ttl_ms) == ("event", "memory", 60_000, 7 * 86_400_000)
    assert s.state_dir == tmp_path / "state"
    assert (s.partitions, s.web_port, s.dashboard_port) == (4, 7000, 9000)
    assert s.alert_webhook == "http://hook.example/alerts"
    assert s.alert_webhook_format == "slack"
    assert s.alert_config() == AlertConfig(
        window="2h", step_ms=600_000, k=2.5, min_churned=4, min_responses=20, cooldown_ms=3_600_000,
        half_life_ms=2 * 86_400_000, warmup_ms=86_400_000, grace_ms=1_800_000, idle_ms=5_000, bucket_ms=300_000,
    )
    assert s.log_level == "debug"
    assert s.is_set("kafka_bootstrap_servers") and s.is_set("redis_url")


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("LOYALTY_APP_ID=from-dotenv\nLOYALTY_STORE=memory\n")
    s = load_settings()
    assert (s.app_id, s.store) == ("from-dotenv", "memory")


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(ValidationError):
        s.app_id = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "value", "complaint"),
    [
        ("LOYALTY_WINDOWS", "1h,90s", "not a multiple of the bucket"),
        ("LOYALTY_WINDOWS", "1h,60m", "repeat"),
        ("LOYALTY_WINDOWS", "1h,soon", "not a positive duration"),
        ("LOYALTY_ACTIVE_HORIZON", "90s", "not a multiple of the bucket"),
        ("LOYALTY_BUCKET", "0m", "not a positive duration"),
        ("LOYALTY_CLOCK", "sundial", "wall"),
        ("LOYALTY_STORE", "disk", "rocksdb"),
        ("LOYALTY_PARTITIONS", "0", "greater than or equal to 1"),
        ("KAFKA_BOOTSTRAP_SERVERS", "no-port", "host:port"),
        ("REDIS_URL", "http://redis", "redis://"),
        ("LOYALTY_LOG_LEVEL", "loud", "debug"),
        ("LOYALTY_ALERT_WINDOW", "12h", "not one of LOYALTY_WINDOWS"),
        ("LOYALTY_ALERT_STEP", "90s", "not a multiple of the bucket"),
        ("LOYALTY_ALERT_K", "-1", "greater than or equal to 0"),
        ("LOYALTY_ALERT_WEBHOOK_FORMAT", "xml", "json"),
    ],
)
def test_invalid_values_are_rejected(monkeypatch: pytest.MonkeyPatch, name: str, value: str, complaint: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=complaint):
        load_settings()


@pytest.mark.parametrize(
    ("variables", "complaint"),
    [
        ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "not one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"),
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "GSSAPI", "KAFKA_SASL_USERNAME": "u",
          "KAFKA_SASL_PASSWORD": "p"}, "not one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"),
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"},
         "SASL_SSL needs KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD"),
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "PLAIN", "KAFKA_SASL_USERNAME": "u"},
         "needs KAFKA_SASL_PASSWORD"),
        ({"KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "p"}, "KAFKA_SECURITY_PROTOCOL is PLAINTEXT"),
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "", "KAFKA_SASL_USERNAME": "u",
          "KAFKA_SASL_PASSWORD": "p"}, "needs KAFKA_SASL_MECHANISM"),
        ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": "missing-ca.pem"}, "missing-ca.pem is not a readable"),
        ({"KAFKA_SSL_CAFILE": "ca.pem"}, "KAFKA_SSL_\\* files are set but KAFKA_SECURITY_PROTOCOL is PLAINTEXT"),
        ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_KEYFILE": "ca.pem"}, "without KAFKA_SSL_CERTFILE"),
        ({"REDIS_SSL_CA_FILE": "missing-ca.pem"}, "missing-ca.pem is not a readable"),
        ({"REDIS_SSL_CA_FILE": "ca.pem"}, "REDIS_URL is not a rediss://"),
    ],
)
def test_invalid_security_settings_are_rejected(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variables: dict[str, str], complaint: str
) -> None:
    """Unknown protocols or mechanisms, SASL without credentials, unreadable or unused files: a clear error."""
    (tmp_path / "ca.pem").write_text("not checked here\n")
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=complaint):
        load_settings()


def test_sasl_ssl_settings_make_client_options_and_hide_secrets(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """SASL_SSL with SCRAM and a CA file: aiokafka options, Faust credentials, and no secret in any repr."""
    import faust

    from streams.connections import faust_credentials, kafka_client_options, redis_options

    ca = tmp_path / "ca.pem"
    ca.write_text(CA_PEM)
    for name, value in {
        "KAFKA_BOOTSTRAP_SERVERS": "broker-1.example:9093,broker-2.example:9093",
        "KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
        "KAFKA_SASL_MECHANISM": "scram-sha-512",
        "KAFKA_SASL_USERNAME": "loyalty",
        "KAFKA_SASL_PASSWORD": "kafka-s3cret",
        "KAFKA_SSL_CAFILE": str(ca),
        "REDIS_URL": "rediss://:redis-s3cret@cache.example:6380/0",
        "REDIS_SSL_CA_FILE": str(ca),
    }.items():
        monkeypatch.setenv(name, value)
    s = load_settings()
    assert (s.kafka_security_protocol, s.kafka_sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
    assert s.kafka_sasl_password is not None and s.kafka_sasl_password.get_secret_value() == "kafka-s3cret"
    for text in (repr(s), str(s), s.redis_url_redacted):
        assert "kafka-s3cret" not in text and "redis-s3cret" not in text
    assert "rediss://:***@cache.example:6380/0" in repr(s)

    options = kafka_client_options(s)
    context = options.pop("ssl_context")
    assert options == {
        "bootstrap_servers": "broker-1.example:9093,broker-2.example:9093",
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "loyalty",
        "sasl_plain_password": "kafka-s3cret",
    }
    assert context.check_hostname and context.verify_mode.name == "CERT_REQUIRED"
    credentials = faust_credentials(s)
    assert isinstance(credentials, faust.SASLCredentials)
    assert (credentials.protocol.value, credentials.mechanism.value) == ("SASL_SSL", "SCRAM-SHA-512")
    assert credentials.ssl_context is context and "kafka-s3cret" not in repr(credentials)
    url, redis_kwargs = redis_options(s)
    assert url == "rediss://:redis-s3cret@cache.example:6380/0" and redis_kwargs["ssl_ca_certs"] == str(ca)
    assert redis_kwargs["socket_timeout"] and redis_kwargs["socket_connect_timeout"]


def test_ssl_settings_make_tls_clients_without_sasl(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """SSL alone: a verifying TLS context for aiokafka and Faust's SSLCredentials, no SASL options."""
    import faust

    from streams.connections import faust_credentials, kafka_client_options

    ca = tmp_path / "ca.pem"
    ca.write_text(CA_PEM)
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("KAFKA_SSL_CAFILE", str(ca))
    s = load_settings()
    options = kafka_client_options(s)
    assert sorted(options) == ["bootstrap_servers", "security_protocol", "ssl_context"]
    credentials = faust_credentials(s)
    assert isinstance(credentials, faust.SSLCredentials)
    assert credentials.protocol.value == "SSL" and credentials.context is options["ssl_context"]


def test_plaintext_settings_make_plain_clients() -> None:
    """The default: PLAINTEXT Kafka without Faust credentials, Redis without a CA."""
    from streams.connections import faust_credentials, kafka_client_options, redis_options

    s = load_settings()
    assert kafka_client_options(s) == {"bootstrap_servers": "localhost:9092", "security_protocol": "PLAINTEXT"}
    assert faust_credentials(s) is None
    assert "ssl_ca_certs" not in redis_options(s)[1]


def test_keywords_by_field_name() -> None:
    s = Settings(app_id="kw", store="memory", windows="1h")  # type: ignore[call-arg]
    assert (s.app_id, s.store, s.windows) == ("kw", "memory", ("1h",))
    assert s.alert_config() is None  # the default alert window is not computed: alerts off, no error


def test_env_example_and_readme_list_every_variable() -> None:
    example = (ROOT / ".env.example").read_text()
    readme = (ROOT / "README.md").read_text()
    for name in VARIABLES:
        assert f"{name}=" in example, name
        assert f"`{name}`" in readme, name


#: a self-signed CA certificate (its key was thrown away): the test that loads it only builds a TLS context
CA_PEM = """-----BEGIN CERTIFICATE-----
MIIBijCCATGgAwIBAgIUYD7X3l19+Tze40aWvPgXeYUXRXEwCgYIKoZIzj0EAwIw
GjEYMBYGA1UEAwwPbG95YWx0eSB0ZXN0IENBMCAXDTI2MTIwMzEzNDcxNloYDzIx
MjYxMTA5MTM0NzE2WjAaMRgwFgYDVQQDDA9sb3lhbHR5IHRlc3QgQ0EwWTATBgcq
hkjOPQIBBggqhkjOPQMBBwNCAAS4ifffybi/fV5Lh2D0cQPrPTIbVquQPvq+HPd4
h5H2DXdQmiq+AzlsJQ5wHFjuzaRFLLxTPLc15Qu2nYMlt7Pvo1MwUTAdBgNVHQ4E
FgQUCWTfIIPZhO8uyu4Q5ShZ7m+A0r0wHwYDVR0jBBgwFoAUCWTfIIPZhO8uyu4Q
5ShZ7m+A0r0wDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNHADBEAiAqdLoI
PVvE49ZA/szFFFZ4JTb1XCD5PXUdyg9nsjM+3gIgMwMG+nbLGuEGuxoOh/ZJusCv
U8ZJVql6AAmuSGt3Qfg=
-----END CERTIFICATE-----
"""
