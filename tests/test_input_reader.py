"""The input reader on the real Kafka: every fetch handled once, also when the group changes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord

from conftest import Services
from streams.worker import input_reader
from streams.worker.topics import ensure_topics
from support import async_wait_for, group_is_stable

PARTITIONS = 4


async def _send(bootstrap: str, topic: str, values: range) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        for value in values:
            await producer.send(topic, str(value).encode(), key=str(value).encode())
        await producer.flush()
    finally:
        await producer.stop()


async def _stop(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_reader_joining_the_group_reads_nothing_the_first_one_handled(
    services: Services, topic_prefix: str, app_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second reader joining the group takes partitions over without any handled message being read again."""
    # only a revocation (or a stop) commits during the test: the handled fetches are all uncommitted
    # when the second reader joins, as they are up to a second after each periodic commit
    monkeypatch.setattr(input_reader, "COMMIT_INTERVAL_S", 3600.0)
    bootstrap = services.kafka_bootstrap
    topic = topic_prefix + "orders"
    await ensure_topics(bootstrap, [topic], PARTITIONS)
    handled: list[int] = []

    async def handle(records: list[ConsumerRecord]) -> None:
        handled.extend(int(record.value) for record in records)

    await _send(bootstrap, topic, range(300))
    readers = [asyncio.create_task(input_reader.read_inputs(bootstrap, [topic], app_id, handle))]
    try:
        await async_wait_for(lambda: len(handled) >= 300, timeout=60, message=lambda: f"{len(handled)} handled")
        readers.append(asyncio.create_task(input_reader.read_inputs(bootstrap, [topic], app_id, handle)))
        await async_wait_for(lambda: group_is_stable(bootstrap, app_id, 2), timeout=60, message="a stable group of 2")
        await _send(bootstrap, topic, range(300, 600))
        # within a partition the new messages come after the old ones: once every new one is
        # handled, whatever a reader was going to read again (from an uncommitted offset) is too
        await async_wait_for(lambda: set(range(300, 600)) <= set(handled), timeout=60,
                             message=lambda: f"{len(set(range(300, 600)) - set(handled))} new messages missing")
    finally:
        for reader in readers:
            await _stop(reader)
    assert sorted(handled) == list(range(600))
