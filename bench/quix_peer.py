"""The Python peer: Quix Streams doing one keyed state update per event (run by ``loyalty bench``).

    python -m bench.quix_peer   (configured by the BENCH_* variables below)

What a user choosing a Python stream processor for this product would try first: a Quix
Streams application with its defaults (RocksDB state, changelog topics, at-least-once) that
reads the same pre-filled input topics as the worker, splits each message into its events
(a JSON array gives its elements) and, per event, adds one to its store's count in the state.
That is the least a loyalty metric needs per event, so the peer's rate is an upper bound on
what the same framework would do with the real metrics.

When ``BENCH_EVENTS`` events are counted it writes ``{"messages", "events", "seconds",
"stores"}`` (first message to last, and the counts by store) to ``BENCH_RESULT``; the bench
then stops it. The Kafka security settings of the product (``KAFKA_SECURITY_PROTOCOL``...)
apply as they do to the worker.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import orjson

from streams.settings import Settings, load_settings


def librdkafka_security(settings: Settings) -> dict[str, str]:
    """The product's Kafka security settings as librdkafka properties (Quix Streams' client).

    >>> librdkafka_security(Settings(_env_file=None))
    {'security.protocol': 'PLAINTEXT'}
    """
    protocol = settings.kafka_security_protocol
    config = {"security.protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        for name, value in (("ssl.ca.location", settings.kafka_ssl_cafile),
                            ("ssl.certificate.location", settings.kafka_ssl_certfile),
                            ("ssl.key.location", settings.kafka_ssl_keyfile)):
            if value:
                config[name] = str(value)
    if protocol.startswith("SASL"):
        password = settings.kafka_sasl_password
        config["sasl.mechanism"] = settings.kafka_sasl_mechanism or ""  # required with SASL (settings)
        config["sasl.username"] = settings.kafka_sasl_username or ""
        config["sasl.password"] = password.get_secret_value() if password is not None else ""
    return config


def main() -> None:
    """Run the peer until the bench stops it."""
    from quixstreams import Application
    from quixstreams.kafka.configuration import ConnectionConfig

    settings = load_settings()
    expected = int(os.environ["BENCH_EVENTS"])
    result_path = Path(os.environ["BENCH_RESULT"])
    connection = ConnectionConfig.from_librdkafka_dict(
        {"bootstrap.servers": settings.kafka_bootstrap_servers, **librdkafka_security(settings)})
    app = Application(
        broker_address=connection,
        consumer_group=os.environ["BENCH_APP_ID"],
        auto_offset_reset="earliest",
        state_dir=os.environ["BENCH_DATADIR"],
        loglevel="WARNING",
    )
    progress: dict[str, Any] = {"messages": 0, "events": 0, "first": None}
    stores: dict[str, int] = {}

    def events_of(value: Any) -> list[Any]:
        if progress["first"] is None:
            progress["first"] = time.perf_counter()
        progress["messages"] += 1
        return value if isinstance(value, list) else [value]

    def count(event: dict[str, Any], state: Any) -> None:
        store = event["store_id"]
        total = state.get(store, 0) + 1
        state.set(store, total)
        stores[store] = stores.get(store, 0) + 1  # the state is per input topic; this is per store
        progress["events"] += 1
        if progress["events"] == expected:  # once: the count only grows
            seconds = time.perf_counter() - progress["first"]
            result = {"messages": progress["messages"], "events": progress["events"], "seconds": seconds,
                      "stores": dict(sorted(stores.items()))}
            result_path.write_bytes(orjson.dumps(result))

    for name in os.environ["BENCH_TOPICS"].split(","):
        topic = app.topic(name, value_deserializer="json")
        app.dataframe(topic).apply(events_of, expand=True).update(count, stateful=True)
    app.run()


if __name__ == "__main__":
    main()
