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
    "LOYALTY_CHECKPOINT_INTERVAL",
    "LOYALTY_MAX_FUTURE_SKEW", "LOYALTY_DEDUPE_TTL", "LOYALTY_STATE_DIR", "LOYALTY_PARTITIONS",
    "LOYALTY_REPLICATION_FACTOR", "LOYALTY_WEB_PORT", "LOYALTY_DASHBOARD_HOST", "LOYALTY_DASHBOARD_PORT",
    "LOYALTY_ALERT_WINDOW", "LOYALTY_ALERT_STEP", "LOYALTY_ALERT_K", "LOYALTY_ALERT_MIN_CHURNED",
    "LOYALTY_ALERT_MIN_RESPONSES", "LOYALTY_ALERT_COOLDOWN", "LOYALTY_ALERT_HALF_LIFE", "LOYALTY_ALERT_WARMUP",
    "LOYALTY_ALERT_GRACE", "LOYALTY_ALERT_IDLE", "LOYALTY_ALERT_WEBHOOK", "LOYALTY_ALERT_WEBHOOK_FORMAT",
    "LOYALTY_LOG_LEVEL",
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
