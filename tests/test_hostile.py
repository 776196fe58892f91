"""Nothing a producer sends stops or bloats the worker (issue 14): SPEC 3's limits and a fuzz run, through a real
``loyalty worker`` on the session's real Kafka and Redis, end with the reference's numbers and exact dead letters."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from bench.fuzz import (
    HORIZON,
    WINDOWS,
    FuzzWorker,
    Identity,
    Message,
    Plan,
    Report,
    check_dead_letters,
    redis_differences,
    run_fuzz,
)
from metrics.events import MAX_STORE_CHANNELS, OTHER_CHANNEL, Event
from metrics.reference import ReferenceConfig, reference_all
from metrics.timegrid import parse_duration
from metrics.validation import MAX_BATCH_BYTES, MAX_BATCH_EVENTS, parse_message
from streams.sinks.redis_sink import metric_key, read_health
from streams.tools.history import generate_history, wire_body
from streams.tools.storefront import base36
from support import async_wait_for

#: Redis database of this module (test_alerts_worker's too: both empty it first, and the session runs one at a time)
DATABASE = 4
T = 1_700_100_000_000  # inside the history's days


def tiny(index: int) -> dict[str, Any]:
    """A ``loyalty.left`` of at most 103 bytes (ids in base 36): 10,000 and 10,001 of them fit in 1 MiB."""
    name = base36(index)
    return {"event_id": name, "type": "loyalty.left", "occurred_at": T, "store_id": "L", "customer_id": name}



def batch_of(count: int, size: int | None = None) -> bytes:
    """``count`` tiny signups as one JSON array, padded with spaces to ``size`` bytes."""
    text = orjson.dumps([tiny(index) for index in range(count)])
    if size is not None:
        assert len(text) <= size
        text = text[:-1] + b" " * (size - len(text)) + b"]"
    return text


def limit_messages() -> tuple[list[Message], list[Message]]:
    """Phase one: the limits, 105 signup channels in a batch, half a history; phase two: spend by channel, the rest."""
    history = [Message(event.topic, orjson.dumps(wire_body(event)), "history")
               for event in generate_history(seed=5, customers_per_store=60, days=30, start_ms=T - 10 * 86_400_000)]
    half = len(history) // 2
    deep = b"[" * 300 + b"]" * 300
    signups = [{"event_id": f"s{i}", "type": "customer.signed_up", "occurred_at": T + i, "store_id": "chan",
                "customer_id": f"c{i}", "channel": f"ch-{i}"} for i in range(MAX_STORE_CHANNELS + 5)]
    first = [
        Message("orders", deep, "deep", ((0, "not_an_event"),)),
        Message("loyalty-activity", batch_of(MAX_BATCH_EVENTS, MAX_BATCH_BYTES), "one_mib"),
        Message("loyalty-activity", batch_of(MAX_BATCH_EVENTS, MAX_BATCH_BYTES + 1), "one_mib_and_a_byte",
                ((None, "message_too_large"),)),
        Message("loyalty-activity", batch_of(MAX_BATCH_EVENTS + 1), "too_many", ((None, "batch_too_large"),)),
        Message("orders", b"[" + b"x" * 999_999, "huge_junk", ((None, "invalid_json"),)),
        Message("signups", orjson.dumps(signups), "channels"),
        *history[:half],
    ]
    spend = [{"event_id": f"p{i}", "type": "spend.recorded", "occurred_at": T + i, "store_id": "chan",
              "amount": "10", "currency": "EUR", "channel": channel}
             for i, channel in enumerate(["ch-0", "ch-99", "ch-100", "ch-104", OTHER_CHANNEL, "new", None])]
    second = [Message("marketing-spend", orjson.dumps(body), "spend") for body in spend]
    return first, [*second, *history[half:]]


def valid_events(messages: list[Message]) -> list[Event]:
    events = []
    for message in messages:
        items = parse_message(message.value, message.topic, now_ms=time.time_ns() // 1_000_000, max_future_skew_ms=0)
        events.extend(item for item in items if isinstance(item, Event))
    return events


async def send(bootstrap: str, prefix: str, messages: list[Message], expected: dict[Identity, str]) -> None:
    """Send in order (gzip: a 1 MiB value fits the broker's limit only compressed); note the dead letters due."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                                compression_type="gzip", max_request_size=4 * 1024 * 1024)
    await producer.start()
    try:
        for message in messages:
            meta = await (await producer.send(prefix + message.topic, message.value))
            for index, reason in message.rejections:
                expected[(meta.topic, meta.partition, meta.offset, index)] = reason
    finally:
        await producer.stop()


@pytest.mark.timeout(240)
async def test_limits_through_the_worker(services, tmp_path: Path) -> None:
    """A 300-deep array, a 1 MiB batch of 10,000 events (and one byte more), a 10,001-element batch and 105
    channels give SPEC 3's dead letters and ``other``; the same worker goes on to the reference's numbers."""
    bootstrap = services.kafka_bootstrap
    redis_url = services.redis_url.rsplit("/", 1)[0] + f"/{DATABASE}"
    first, second = limit_messages()
    events = valid_events(first + second)
    assert sum(1 for e in events if e.store_id == "L") == MAX_BATCH_EVENTS  # only the exact 1 MiB batch counts
    as_of_ms = max(e.occurred_at_ms for e in events)
    config = ReferenceConfig(bucket_ms=60_000, horizon_ms=parse_duration(HORIZON))
    reference = reference_all(events, windows_ms=[parse_duration(w) for w in WINDOWS], as_of_ms=as_of_ms, config=config)
    plan = Plan([*first, *second], reference, as_of_ms, len(events))
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    await client.flushdb()
    worker = await FuzzWorker.start(bootstrap, redis_url, tmp_path)
    pid = worker.process.pid
    expected: dict[Identity, str] = {}
    try:
        await send(bootstrap, worker.prefix, first, expected)
        # the spend comes once the 105 signups are in: which channels are the store's first 100 is arrival order
        phase_one = len(valid_events(first))

        async def applied() -> bool:
            assert worker.process.poll() is None, worker.log_text()[-3000:]
            health = await read_health(client)
            return health.get("events_applied", 0) + health.get("duplicates", 0) >= phase_one

        await async_wait_for(applied, timeout=120, interval=0.2, message=lambda: worker.log_text()[-3000:])
        await send(bootstrap, worker.prefix, second, expected)
        last: list[str] = []

        async def equal() -> bool:
            assert worker.process.poll() is None, worker.log_text()[-3000:]
            last[:] = (await redis_differences(client, plan))[0]
            return not last

        await async_wait_for(equal, timeout=120, interval=0.5, message=lambda: "\n".join(last[:20]))
        by_channel = orjson.loads((await client.hget(metric_key("chan", "30d"), "cac_by_channel")) or "{}")
        assert len(by_channel) == MAX_STORE_CHANNELS + 1 and OTHER_CHANNEL in by_channel and "ch-104" not in by_channel
        report = Report()
        await check_dead_letters(bootstrap, worker.prefix, expected, report)
        assert report.dead_letters_by_reason == {"batch_too_large": 1, "invalid_json": 1, "message_too_large": 1,
                                                 "not_an_event": 1}
        assert report.dead_letters_missing == report.dead_letters_unexpected == report.dead_letters_sent_again == 0
        assert worker.process.poll() is None and worker.process.pid == pid
        assert worker.trouble() == []
    finally:
        worker.stop()
        await client.flushdb()
        await client.aclose()


@pytest.mark.timeout(240)
async def test_fuzz_through_the_worker(services, tmp_path: Path) -> None:
    """3,000 hostile messages in a storefront history: no crash, each bad element dead-lettered once, the reference."""
    redis_url = services.redis_url.rsplit("/", 1)[0] + f"/{DATABASE}"
    report = await run_fuzz(services.kafka_bootstrap, redis_url, tmp_path, hostile=3000, customers_per_store=100,
                            seed=2026, timeout_s=150)
    print(orjson.dumps(report.__dict__, option=orjson.OPT_INDENT_2).decode())
    assert report.hostile_messages == 3000 and report.elements_compared > 1000
    assert sum(report.dead_letters_by_reason.values()) == report.dead_letters_expected > 2000
    assert Counter(report.hostile_kinds).keys() >= {"random_bytes", "utf8", "truncated", "near_json", "deep",
                                                    "mixed_batch", "wrong_topic", "oversized", "too_many"}
    assert report.ok, report
