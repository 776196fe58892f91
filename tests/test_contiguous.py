"""The in-order guard of the Faust stages (streams/worker/contiguous.py) on the real Kafka."""

from __future__ import annotations

from types import SimpleNamespace

from aiokafka import AIOKafkaProducer

from streams.worker.contiguous import Contiguous
from streams.worker.topics import ensure_topics


class _Topic:
    def __init__(self, name: str) -> None:
        self.name = name

    def get_topic_name(self) -> str:
        return self.name


def _event(partition: int, offset: int, value: bytes) -> SimpleNamespace:
    return SimpleNamespace(message=SimpleNamespace(partition=partition, offset=offset), value=value)


async def _produce(bootstrap: str, topic: str, partition: int, count: int) -> None:
    await ensure_topics(bootstrap, [topic], 2)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for number in range(count):
            await producer.send_and_wait(topic, f"m{number}".encode(), partition=partition)
    finally:
        await producer.stop()


async def test_holes_are_read_back_and_repeats_dropped(services, topic_prefix) -> None:
    """Offsets 0 1 2 5 4 6 3 7 of a partition come out as 0..7 once each, 3 and 4 read from Kafka."""
    topic = topic_prefix + "guarded"
    await _produce(services.kafka_bootstrap, topic, 1, 8)
    guard = Contiguous(None, _Topic(topic), services.kafka_bootstrap, 2, group_id=topic_prefix + "group")
    delivered = [_event(1, offset, f"m{offset}".encode()) for offset in (0, 1, 2, 5, 4, 6)]
    first = await guard.in_order(delivered)
    second = await guard.in_order([_event(1, 3, b"m3"), _event(1, 7, b"m7")])
    assert [offset for _, offset, _ in first] == [0, 1, 2, 3, 4, 5, 6]
    assert [value for _, _, value in first] == [f"m{n}".encode() for n in range(7)]
    assert [offset for _, offset, _ in second] == [7]
    assert guard.next == {0: 0, 1: 8}  # partition 0 starts at its beginning, no commit yet
    assert guard.done == {0: 0, 1: 0}
    guard.mark_done()
    assert guard.done == {0: 0, 1: 8}


async def test_a_partition_starts_where_it_begins_when_nothing_is_committed(services, topic_prefix) -> None:
    """Without a commit, a first delivery at offset 3 means offsets 0-2 were skipped: they are read back."""
    topic = topic_prefix + "fresh"
    await _produce(services.kafka_bootstrap, topic, 0, 4)
    guard = Contiguous(None, _Topic(topic), services.kafka_bootstrap, 2, group_id=topic_prefix + "group")
    out = await guard.in_order([_event(0, 3, b"m3")])
    assert [(partition, offset, value) for partition, offset, value in out] == [
        (0, 0, b"m0"), (0, 1, b"m1"), (0, 2, b"m2"), (0, 3, b"m3")
    ]
    assert guard.take_started() == {0: "", 1: ""} and guard.take_started() == {}


async def test_a_seeded_guard_starts_at_its_seed(services, topic_prefix) -> None:
    """The aggregation seeds the guard with its rebuild's positions: earlier offsets are dropped."""
    topic = topic_prefix + "seeded"
    await _produce(services.kafka_bootstrap, topic, 0, 3)
    guard = Contiguous(None, _Topic(topic), services.kafka_bootstrap, 2, group_id=None)
    guard.seed({0: 2})
    out = await guard.in_order([_event(0, offset, f"m{offset}".encode()) for offset in range(3)])
    assert [offset for _, offset, _ in out] == [2]
