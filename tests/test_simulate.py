"""The storefront simulator: valid, complete, deterministic, seasonal traffic; the churn spike and the NPS drop;
`loyalty simulate` on Kafka."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from metrics.events import INPUT_TOPICS, TYPE_TOPIC
from metrics.formulas import nps
from metrics.validation import Event, Rejection, parse_message, parse_timestamp
from streams.tools.simulate import TokenBucket, parse_nps_drop
from streams.tools.storefront import ChurnSpike, NpsDrop, Storefronts
from support import async_wait_for, clean_env, run_loyalty

START_MS = 1_700_006_400_000
STEP_MS = 50
ROOT = Path(__file__).resolve().parents[1]


def generate(count: int, seed: int = 11, spike: ChurnSpike | None = None, stores: int = 3,
             customers: int = 3_000, drop: NpsDrop | None = None,
             step_ms: int = STEP_MS) -> list[tuple[str, dict[str, Any]]]:
    """``count`` events on a virtual clock that moves ``step_ms`` per event."""
    clock = itertools.count(START_MS, step_ms).__next__
    return list(itertools.islice(
        Storefronts(seed=seed, stores=stores, customers=customers, clock=clock, churn_spike=spike, nps_drop=drop),
        count))


def order_share(events: list[tuple[str, dict[str, Any]]], keep: Any) -> float:
    """The share of ``order.placed`` among the events whose UTC datetime passes ``keep``."""
    from datetime import UTC, datetime

    kept = [body["type"] for _, body in events
            if keep(datetime.fromtimestamp(parse_timestamp(body["occurred_at"]) / 1000, tz=UTC))]
    return kept.count("order.placed") / len(kept)


def test_demand_peaks_on_weekends_and_evenings_and_is_quiet_at_night() -> None:
    """Over two weeks, orders are a larger share of events on weekends than weekdays, and of evenings than nights."""
    events = generate(40_000, seed=2, step_ms=30_000)  # 14 days from a Wednesday 00:00 UTC
    weekend = order_share(events, lambda t: t.weekday() >= 5)
    weekday = order_share(events, lambda t: t.weekday() < 5)
    evening = order_share(events, lambda t: 18 <= t.hour <= 21)
    night = order_share(events, lambda t: 1 <= t.hour <= 5)
    assert weekend > 1.1 * weekday, (weekend, weekday)
    assert evening > 2 * night, (evening, night)
    assert night < 0.25 < evening, (night, evening)


def test_generated_events_are_valid_and_cover_every_type_and_survey() -> None:
    """5,000 generated events all pass validation and cover the ten event types and the four survey kinds."""
    events = generate(5_000)
    last_ms = START_MS + len(events) * STEP_MS
    rejections: list[Rejection] = []
    valid: list[Event] = []
    for topic, body in events:
        assert TYPE_TOPIC[body["type"]] == topic
        for item in parse_message(orjson.dumps(body), topic, now_ms=last_ms, max_future_skew_ms=0):
            (rejections if isinstance(item, Rejection) else valid).append(item)
    assert rejections == []
    assert len(valid) == 5_000
    assert {event.type for event in valid} == set(TYPE_TOPIC)
    assert {event.survey for event in valid if event.survey} == {"nps", "csat", "ces", "cli"}
    assert len({event.event_id for event in valid}) == 5_000
    assert {event.store_id for event in valid} == {"store-1", "store-2", "store-3"}


def test_same_seed_gives_the_same_events() -> None:
    """The same seed and clock give the same events; another seed gives other events."""
    assert generate(3_000, seed=5) == generate(3_000, seed=5)
    assert generate(3_000, seed=5) != generate(3_000, seed=6)


def test_churn_spike_closes_accounts_and_stops_orders_in_its_store_only() -> None:
    """A spike multiplies its store's closures after AT (>= FACTOR/2) and stops its orders; other stores unchanged."""
    count, factor = 20_000, 10.0
    at_ms = START_MS + count // 2 * STEP_MS
    plain = generate(count, seed=3)
    spiked = generate(count, seed=3, spike=ChurnSpike(store_index=1, at_ms=at_ms, factor=factor))

    def after(events: list[tuple[str, dict[str, Any]]], store: str) -> Counter[str]:
        return Counter(body["type"] for _, body in events
                       if body["store_id"] == store and parse_timestamp(body["occurred_at"]) >= at_ms)

    normal, spike = after(plain, "store-2"), after(spiked, "store-2")
    assert normal["customer.closed"] >= 10, normal
    assert spike["customer.closed"] >= factor / 2 * normal["customer.closed"], (normal, spike)
    assert spike["order.placed"] < normal["order.placed"] / 10, (normal, spike)
    before = [(t, b) for t, b in plain if parse_timestamp(b["occurred_at"]) < at_ms]
    assert before == [(t, b) for t, b in spiked if parse_timestamp(b["occurred_at"]) < at_ms]
    for store in ("store-1", "store-3"):
        assert [e for e in plain if e[1]["store_id"] == store] == [e for e in spiked if e[1]["store_id"] == store]


def test_nps_drop_makes_its_store_detract_only_during_it() -> None:
    """In the drop its store's NPS is below -40; every other event (and each score outside it) is unchanged."""
    count = 60_000
    at_ms, duration_ms = START_MS + 20_000 * STEP_MS, 20_000 * STEP_MS
    plain = generate(count, seed=4)
    dropped = generate(count, seed=4, drop=NpsDrop(store_index=2, at_ms=at_ms, duration_ms=duration_ms))

    def in_drop(body: dict[str, Any]) -> bool:
        return body["store_id"] == "store-3" and at_ms <= parse_timestamp(body["occurred_at"]) < at_ms + duration_ms

    def score_of(events: list[tuple[str, dict[str, Any]]], inside: bool) -> float | None:
        scores = [body["score"] for _, body in events if body.get("survey") == "nps" and in_drop(body) == inside
                  and body["store_id"] == "store-3"]
        assert len(scores) >= 30, len(scores)
        return nps(sum(s >= 9 for s in scores), sum(s <= 6 for s in scores), len(scores))

    assert score_of(dropped, inside=True) < -40 < 10 < score_of(plain, inside=True)  # type: ignore[operator]
    assert score_of(dropped, inside=False) == score_of(plain, inside=False)
    assert [b for _, b in plain if not in_drop(b)] == [b for _, b in dropped if not in_drop(b)]
    assert [{**b, "score": 0} for _, b in plain] == [{**b, "score": 0} for _, b in dropped]
    assert parse_nps_drop("1h:30m").resolve(2, START_MS) == NpsDrop(2, START_MS + 3_600_000, 1_800_000)


def test_token_bucket_keeps_the_long_run_rate_with_irregular_loops() -> None:
    """The token bucket grants rate x elapsed tokens whatever the loop's timing, without drift."""
    now = [0.0]
    bucket = TokenBucket(200.0, burst=50.0, clock=lambda: now[0])
    rng = random.Random(1)
    granted = 0
    while now[0] < 60.0:
        taken, wait = bucket.take(64)
        granted += taken
        now[0] += wait + rng.uniform(0.0, 0.05)  # a late wake-up, as an event loop gives
    assert abs(granted - 200.0 * now[0]) <= 51


@pytest.mark.slow
async def test_loyalty_simulate_publishes_exactly_the_events_in_batches(services, topic_prefix) -> None:
    """`loyalty simulate --events 500 --batch 50` exits 0; the topics hold exactly 500 valid events, <= 50 a message."""
    env = clean_env(KAFKA_BOOTSTRAP_SERVERS=services.kafka_bootstrap, LOYALTY_TOPIC_PREFIX=topic_prefix)
    result = run_loyalty("simulate", "--events", "500", "--batch", "50", "--seed", "4", env=env, cwd=ROOT,
                         timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sent 500 events" in result.stdout

    names = [topic_prefix + name for name in INPUT_TOPICS]
    consumer = AIOKafkaConsumer(*names, bootstrap_servers=services.kafka_bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        await async_wait_for(lambda: {tp.topic for tp in consumer.assignment()} == set(names), timeout=30,
                             message=lambda: f"assigned {consumer.assignment()}")
        partitions = sorted(consumer.assignment())
        ends = await consumer.end_offsets(partitions)
        sizes: list[int] = []
        rejections: list[Rejection] = []

        async def read_to_the_end() -> bool:
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                for record in records:
                    name = tp.topic.removeprefix(topic_prefix)
                    items = parse_message(record.value, name, now_ms=2**41, max_future_skew_ms=0)
                    rejections.extend(item for item in items if isinstance(item, Rejection))
                    sizes.append(len(items))
            return all([await consumer.position(tp) >= ends[tp] for tp in partitions])

        await async_wait_for(read_to_the_end, timeout=60, interval=0, message=lambda: f"read {sum(sizes)} events")
    finally:
        await consumer.stop()
    assert sum(sizes) == 500
    assert max(sizes) <= 50
    assert rejections == []
