"""``/metrics``: Prometheus text read from Redis at scrape time (nothing is cached between scrapes).

The scrape reads every snapshot hash (``*`` and the stores of ``loyalty:stores``, every window)
and the ``loyalty:health`` hash in one pipeline, then a custom collector turns what it read into
metric families:

- ``loyalty_metric{store,window,name}``: every numeric metric of every snapshot (null ones are absent);
- ``loyalty_segment_metric{store,window,name,segment}``: the ``*_by_nps_segment`` maps, named
  without that suffix (``churn_rate``, ``repeat_purchase_rate``, ``net_revenue``), one series per
  NPS segment (``promoter``, ``passive``, ``detractor``, ``none``) with a value;
- ``loyalty_snapshot_as_of_seconds{store,window}``: the snapshot's ``as_of``;
- ``loyalty_events_processed_total`` (health field ``events_applied``);
- ``loyalty_dead_letters_total{reason}`` (fields ``dead_letters:{reason}``);
- ``loyalty_consumer_lag{topic,partition}`` (fields ``consumer_lag:{topic}:{partition}``);
- ``loyalty_alerts_total{kind,state}`` (fields ``alerts:{kind}:{state}``);
- ``loyalty_alert_sampling_behind_seconds{partition}`` (fields ``alert_sampling_behind_ms:{partition}``;
  ``partition="*"``: the evaluation of ``*``);
- ``loyalty_redis_up``: 1, or 0 (and nothing else) when Redis did not answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from streams.dashboard.data import as_float, hash_metrics, list_stores, text
from streams.sinks.redis_sink import HEALTH_KEY, metric_key

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: the name ending of the per-NPS-segment maps
SEGMENT_SUFFIX = "_by_nps_segment"


@dataclass
class ScrapeData:
    """What one scrape read from Redis."""

    redis_up: bool = True
    snapshots: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    health: dict[str, str] = field(default_factory=dict)


async def read_scrape(client: aioredis.Redis, windows: tuple[str, ...]) -> ScrapeData:
    """Every snapshot hash and the health hash, or ``redis_up=False``."""
    try:
        stores = await list_stores(client)
        keys = [(store, window) for store in stores for window in windows]
        async with client.pipeline(transaction=False) as pipe:
            for store, window in keys:
                pipe.hgetall(metric_key(store, window))
            pipe.hgetall(HEALTH_KEY)
            replies = await pipe.execute()
    except (aioredis.RedisError, OSError):
        return ScrapeData(redis_up=False)
    data = ScrapeData(health={text(k): text(v) for k, v in replies[-1].items()})
    for (store, window), raw in zip(keys, replies[:-1], strict=True):
        if raw:
            data.snapshots.append((store, window, {text(k): text(v) for k, v in raw.items()}))
    return data


def _number(raw: str) -> float | None:
    try:
        return float(raw)
    except ValueError:
        return None


class RedisCollector:
    """A custom collector over one :class:`ScrapeData`."""

    def __init__(self, data: ScrapeData) -> None:
        self.data = data

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("loyalty_redis_up", "1 when Redis answered this scrape, else 0")
        up.add_metric([], 1.0 if self.data.redis_up else 0.0)
        yield up
        if not self.data.redis_up:
            return
        values = GaugeMetricFamily(
            "loyalty_metric", "Current value of a published metric (SPEC 5)", labels=["store", "window", "name"]
        )
        by_segment = GaugeMetricFamily(
            "loyalty_segment_metric", "A metric of the customers of one NPS segment (their latest answer)",
            labels=["store", "window", "name", "segment"],
        )
        as_of = GaugeMetricFamily(
            "loyalty_snapshot_as_of_seconds", "as_of of the current snapshot (Unix time)", labels=["store", "window"]
        )
        for store, window, fields in self.data.snapshots:
            for name, value in hash_metrics(fields).items():
                number = as_float(value)
                if number is not None:
                    values.add_metric([store, window, name], number)
                elif name.endswith(SEGMENT_SUFFIX) and isinstance(value, dict):
                    for segment, entry in value.items():
                        number = as_float(entry)
                        if number is not None:
                            by_segment.add_metric([store, window, name.removesuffix(SEGMENT_SUFFIX), segment], number)
            stamp = _number(fields.get("as_of_ms", ""))
            if stamp is not None:
                as_of.add_metric([store, window], stamp / 1000)
        yield values
        yield by_segment
        yield as_of

        processed = CounterMetricFamily("loyalty_events_processed", "Events applied by the workers")
        dead = CounterMetricFamily("loyalty_dead_letters", "Input elements dead-lettered, by reason", labels=["reason"])
        lag = GaugeMetricFamily(
            "loyalty_consumer_lag", "Messages behind the end of an input partition", labels=["topic", "partition"]
        )
        alerts = CounterMetricFamily("loyalty_alerts", "Alerts sent, by kind and state", labels=["kind", "state"])
        behind = GaugeMetricFamily(
            "loyalty_alert_sampling_behind_seconds",
            "How far a deltas partition's alert sampling lags the last boundary due", labels=["partition"],
        )
        for name, raw in sorted(self.data.health.items()):
            number = _number(raw)
            if number is None:
                continue
            if name == "events_applied":
                processed.add_metric([], number)
            elif name.startswith("dead_letters:"):
                dead.add_metric([name.removeprefix("dead_letters:")], number)
            elif name.startswith("consumer_lag:"):
                topic, sep, partition = name.removeprefix("consumer_lag:").rpartition(":")
                if sep and topic:
                    lag.add_metric([topic, partition], number)
            elif name.startswith("alert_sampling_behind_ms:"):
                behind.add_metric([name.removeprefix("alert_sampling_behind_ms:")], number / 1000)
            elif name.startswith("alerts:"):
                kind, sep, state = name.removeprefix("alerts:").rpartition(":")
                if sep and kind:
                    alerts.add_metric([kind, state], number)
        if "events_applied" not in self.data.health:
            processed.add_metric([], 0.0)  # a counter that exists from the start rates correctly
        yield processed
        yield dead
        yield lag
        yield alerts
        yield behind


def exposition(data: ScrapeData) -> bytes:
    """The Prometheus text format of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedisCollector(data))
    return generate_latest(registry)
