"""The input reader on the real Kafka: fetches handled once when the group changes, dead letters once after a crash."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord

from conftest import Services
from streams.sinks.dead_letters import DeadLetterLedger, dead_letter, dead_letter_key, dead_letter_partition
from streams.stages.watermarks import InputMarks
from streams.worker import input_reader
from streams.worker.agents.ingest import InputCommits
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


async def _dead_letter_once(producer: AIOKafkaProducer, ledger: DeadLetterLedger, dead_topic: str,
                            record: ConsumerRecord) -> None:
    """Dead-letter a record unless the ledger knows its dead letter is in the topic, as the ingest does:
    sent to its input partition's dead-letter partition, acknowledged, then recorded."""
    letter = dead_letter("bad", "test", record.value, (record.topic, record.partition, record.offset), None, 0)
    if ledger.already_sent(letter):
        return
    partition = dead_letter_partition(record.topic, record.partition, PARTITIONS)
    sent = await (await producer.send(dead_topic, orjson.dumps(letter), key=dead_letter_key(letter),
                                      partition=partition))
    ledger.record(sent.partition, sent.offset)


class ReadingStopped(Exception):
    """A reader stopped halfway through reading again (as if killed after a commit)."""


def _dead_lettering(producer: AIOKafkaProducer, ledger: DeadLetterLedger, dead_topic: str, bad: set[int],
                    handled: list[int], stop_at: int | None = None) -> Any:
    """A handler that dead-letters the ``bad`` values once, as the ingest does, and lists what it handled; with
    ``stop_at``, it stops (raises) at the first fetch holding a value from there on, without handling it."""
    async def handle(records: list[ConsumerRecord]) -> None:
        if stop_at is not None and any(int(record.value) >= stop_at for record in records):
            raise ReadingStopped(stop_at)
        for record in records:
            if int(record.value) in bad:
                await _dead_letter_once(producer, ledger, dead_topic, record)
        # handled once Kafka has its dead letters, as the worker's ingest does: a reader stopped after
        # this leaves none in flight (a killed worker's unsent requests die with it)
        handled.extend(int(record.value) for record in records)

    return handle


async def _never_commit(self: Any) -> None:
    """In place of the reader's commit: it is as if the reader were killed before each commit."""
    self.uncommitted = {}


async def _dead_letter_keys(bootstrap: str, dead_topic: str, expected: int) -> list[bytes]:
    """The keys of every dead letter in the topic, once ``expected`` of them are in (and a second more)."""
    consumer = AIOKafkaConsumer(dead_topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    try:
        letters: list[Any] = []

        async def all_read() -> bool:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                letters.extend(records)
            return len(letters) >= expected

        await async_wait_for(all_read, timeout=30)
        for records in (await consumer.getmany(timeout_ms=1000)).values():
            letters.extend(records)  # any duplicate would be here by now
    finally:
        await consumer.stop()
    return [letter.key for letter in letters]


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


async def test_dead_letters_of_elements_read_again_after_a_crash_are_sent_once(
    services: Services, topic_prefix: str, app_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader dies before committing, the next reads it all again: still one dead letter per bad element."""
    bootstrap = services.kafka_bootstrap
    topic, dead_topic = topic_prefix + "orders", topic_prefix + "loyalty-dead-letters"
    await ensure_topics(bootstrap, [topic, dead_topic], PARTITIONS)
    await _send(bootstrap, topic, range(200))
    bad = {value for value in range(200) if value % 7 == 3}
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    handled: list[int] = []

    def handler(ledger: DeadLetterLedger) -> Any:
        return _dead_lettering(producer, ledger, dead_topic, bad, handled)

    try:
        # the first reader never commits after its first assignment: it is as if it were killed
        monkeypatch.setattr(input_reader._Progress, "commit", _never_commit)
        first = DeadLetterLedger(bootstrap, dead_topic, PARTITIONS)
        reader = asyncio.create_task(input_reader.read_inputs(bootstrap, [topic], app_id, handler(first), first))
        await async_wait_for(lambda: len(handled) >= 200, timeout=60, message=lambda: f"{len(handled)} handled")
        await _stop(reader)
        monkeypatch.undo()
        second = DeadLetterLedger(bootstrap, dead_topic, PARTITIONS)
        reader = asyncio.create_task(input_reader.read_inputs(bootstrap, [topic], app_id, handler(second), second))
        await async_wait_for(lambda: len(handled) >= 400, timeout=60, message=lambda: f"{len(handled)} handled")
        await _stop(reader)
    finally:
        await producer.stop()
    assert sorted(handled) == sorted(list(range(200)) * 2)  # everything was read again
    keys = await _dead_letter_keys(bootstrap, dead_topic, len(bad))
    assert len(keys) == len(set(keys)) == len(bad)


class HandlingFailed(Exception):
    """A failure halfway through handling a fetch (a send that timed out, say)."""


async def test_a_reader_failing_halfway_through_a_fetch_commits_no_position_past_its_dead_letters(
    services: Services, topic_prefix: str, app_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fetch fails after its first dead letter went out: the reader started again sends each dead letter once."""
    # no periodic commit: the offsets of the fetches handled before the failure are committed when the
    # reader stops, after the failing fetch has sent a dead letter
    monkeypatch.setattr(input_reader, "COMMIT_INTERVAL_S", 3600.0)
    bootstrap = services.kafka_bootstrap
    topic, dead_topic = topic_prefix + "orders", topic_prefix + "loyalty-dead-letters"
    await ensure_topics(bootstrap, [topic, dead_topic], PARTITIONS)
    bad = {value for value in range(200) if value % 7 == 3}
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    handled: list[int] = []
    failed: list[int] = []

    def handler(ledger: DeadLetterLedger, fail: bool) -> Any:
        async def handle(records: list[ConsumerRecord]) -> None:
            for record in records:
                value = int(record.value)
                if value in bad:
                    await _dead_letter_once(producer, ledger, dead_topic, record)
                    if fail and value >= 100:
                        failed.append(value)
                        raise HandlingFailed(value)  # the rest of this fetch is not handled
                handled.append(value)

        return handle

    try:
        await _send(bootstrap, topic, range(100))
        first = DeadLetterLedger(bootstrap, dead_topic, PARTITIONS)
        reader = asyncio.create_task(input_reader.read_inputs(bootstrap, [topic], app_id, handler(first, True), first))
        await async_wait_for(lambda: len(handled) >= 100, timeout=60, message=lambda: f"{len(handled)} handled")
        await _send(bootstrap, topic, range(100, 200))
        with pytest.raises(HandlingFailed):
            await asyncio.wait_for(reader, timeout=60)
        second = DeadLetterLedger(bootstrap, dead_topic, PARTITIONS)
        reader = asyncio.create_task(input_reader.read_inputs(bootstrap, [topic], app_id, handler(second, False),
                                                              second))
        await async_wait_for(lambda: set(range(200)) <= set(handled), timeout=60,
                             message=lambda: f"{len(set(range(200)) - set(handled))} not handled")
        await _stop(reader)
    finally:
        await producer.stop()
    assert failed and failed[0] >= 100
    keys = await _dead_letter_keys(bootstrap, dead_topic, len(bad))
    assert sorted(set(keys)) == sorted(keys), [key for key in set(keys) if keys.count(key) > 1]
    assert len(keys) == len(bad)


async def test_a_reader_dying_halfway_through_reading_again_leaves_its_successor_the_dead_letters_it_learnt(
    services: Services, topic_prefix: str, app_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash, a reader that commits part of what it reads again and dies, a third: each dead letter once."""
    bootstrap = services.kafka_bootstrap
    topic, dead_topic = topic_prefix + "orders", topic_prefix + "loyalty-dead-letters"
    # one input partition: no other partition's commit makes the readers read its dead letters from earlier
    await ensure_topics(bootstrap, [topic], 1)
    await ensure_topics(bootstrap, [dead_topic], PARTITIONS)
    await _send(bootstrap, topic, range(200))
    bad = {value for value in range(200) if value % 7 == 3}
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    handled: list[int] = []

    def handler(ledger: DeadLetterLedger, stop_at: int | None = None) -> Any:
        return _dead_lettering(producer, ledger, dead_topic, bad, handled, stop_at)

    try:
        # the first reader dead-letters every bad element and dies without a commit
        with monkeypatch.context() as patched:
            patched.setattr(input_reader._Progress, "commit", _never_commit)
            first = DeadLetterLedger(bootstrap, dead_topic, PARTITIONS)
            reader = asyncio.create_task(input_reader.read_inputs(bootstrap, [topic], app_id, handler(first), first))
            await async_wait_for(lambda: len(handled) >= 200, timeout=60, message=lambda: f"{len(handled)} handled")
            await _stop(reader)
        # the second reads it again in small fetches, and stops at the first one holding 100 or more: it
        # commits the fetches before, whose offsets are before the elements of later dead letters
        with monkeypatch.context() as patched:
            patched.setattr(input_reader, "MAX_RECORDS", 5)
            second = DeadLetterLedger(bootstrap, dead_topic, PARTITIONS)
            reader = asyncio.create_task(input_reader.read_inputs(bootstrap, [topic], app_id,
                                                                  handler(second, stop_at=100), second))
            with pytest.raises(ReadingStopped):
                await asyncio.wait_for(reader, timeout=60)
        assert 0 < len(handled) - 200 < 200, "the second reader handled some fetches again, not all"
        third = DeadLetterLedger(bootstrap, dead_topic, PARTITIONS)
        reader = asyncio.create_task(input_reader.read_inputs(bootstrap, [topic], app_id, handler(third), third))
        await async_wait_for(lambda: set(range(100, 200)) <= set(handled[200:]), timeout=60,
                             message=lambda: f"{len(set(range(100, 200)) - set(handled[200:]))} not read again")
        await _stop(reader)
    finally:
        await producer.stop()
    keys = await _dead_letter_keys(bootstrap, dead_topic, len(bad))
    assert sorted(set(keys)) == sorted(keys), [key for key in set(keys) if keys.count(key) > 1]
    assert len(keys) == len(bad)


async def test_a_reader_taking_partitions_over_knows_their_largest_event_time(
    services: Services, topic_prefix: str, app_id: str
) -> None:
    """The ingest commits each partition's largest routed event time; the next reader restores it, idle later."""
    bootstrap = services.kafka_bootstrap
    topic, dead_topic = topic_prefix + "orders", topic_prefix + "loyalty-dead-letters"
    await ensure_topics(bootstrap, [topic, dead_topic], PARTITIONS)
    await _send(bootstrap, topic, range(100))
    handled: dict[int, list[int]] = {}

    def handler(commits: InputCommits) -> Any:
        async def handle(records: list[ConsumerRecord]) -> None:
            latest: dict[str, int] = {}
            for record in records:
                key = InputMarks.key(record.topic, record.partition)
                latest[key] = max(latest.get(key, 0), int(record.value) * 1000)  # the record's "event time"
                handled.setdefault(record.partition, []).append(int(record.value))
            assert commits.marks is not None
            commits.marks.routed(latest, 0.0)

        return handle

    first = InputCommits(DeadLetterLedger(bootstrap, dead_topic, PARTITIONS), InputMarks(idle_ms=1000))
    reader = asyncio.create_task(input_reader.read_inputs(bootstrap, [topic], app_id, handler(first), first))
    await async_wait_for(lambda: sum(map(len, handled.values())) >= 100, timeout=60)
    await _stop(reader)  # stopping commits
    expected = {InputMarks.key(topic, partition): max(values) * 1000 for partition, values in handled.items()}
    assert len(expected) == PARTITIONS

    marks = InputMarks(idle_ms=1000)
    second = InputCommits(DeadLetterLedger(bootstrap, dead_topic, PARTITIONS), marks)

    def report_lags(lags: dict[tuple[str, int], int]) -> None:
        marks.report_lags({InputMarks.key(*tp): lag for tp, lag in lags.items()})

    reader = asyncio.create_task(input_reader.read_inputs(bootstrap, [topic], app_id, handler(second), second,
                                                           report_lags))
    try:
        def restored() -> bool:
            return marks.latest == expected and marks.lags is not None and not any(marks.lags.values())

        await async_wait_for(restored, timeout=60,
                             message=lambda: f"{marks.latest} != {expected}")
        restored_at = max(marks.last_data.values())
        assert marks.marks(restored_at + 999, None) == {key: [time, False] for key, time in expected.items()}
        assert marks.marks(restored_at + 1000, None) == {key: [time, True] for key, time in expected.items()}
        assert sum(map(len, handled.values())) == 100  # nothing read again: the marks came from the commits
    finally:
        await _stop(reader)
