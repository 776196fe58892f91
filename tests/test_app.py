"""streams.app / streams.pipeline: the Faust app factory, without a broker."""

from __future__ import annotations

import pytest

from streams.app import create_app, faust_options
from streams.pipeline import SMOKE_TOPIC
from streams.settings import Settings


def settings(**values: str) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_app_is_configured_from_settings(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = settings(
        KAFKA_BOOTSTRAP_SERVERS="k1:9092,k2:9092",
        LOYALTY_APP_ID="my-app",
        LOYALTY_STORE="memory",
        LOYALTY_PARTITIONS="3",
        LOYALTY_WEB_PORT="7001",
        LOYALTY_STATE_DIR=str(tmp_path),
    )
    app = create_app(s)
    assert app.conf.id == "my-app"
    assert [str(url) for url in app.conf.broker] == ["kafka://k1:9092", "kafka://k2:9092"]
    assert str(app.conf.store) == "memory:"
    assert app.conf.topic_partitions == 3
    assert app.conf.topic_replication_factor == 1
    assert app.conf.web_port == 7001
    assert str(app.conf.datadir).startswith(str(tmp_path))


@pytest.mark.parametrize(("store", "url"), [("rocksdb", "rocksdb://"), ("memory", "memory://")])
def test_store_choice(store: str, url: str) -> None:
    assert faust_options(settings(LOYALTY_STORE=store))["store"] == url


def test_smoke_agent_consumes_the_prefixed_topic() -> None:
    app = create_app(settings(LOYALTY_TOPIC_PREFIX="p1-", LOYALTY_STORE="memory"))
    topics = {topic for agent in app.agents.values() for topic in agent.channel.topics}
    assert f"p1-{SMOKE_TOPIC}" in topics
