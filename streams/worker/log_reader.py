"""Reading partitions of a topic from given offsets up to their ends (restores, checkpoints, dead letters)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition


async def read_to_end(
    consumer: AIOKafkaConsumer,
    starts: dict[TopicPartition, int],
    ends: dict[TopicPartition, int],
    max_records: int | None = None,
) -> AsyncIterator[ConsumerRecord]:
    """The records of each partition from its start offset up to, not including, its end offset.

    ``consumer`` must be assigned the partitions. The end is reached by position, not by the
    last record: compaction may leave no record at end - 1.
    """
    remaining = {tp for tp in starts if ends[tp] > starts[tp]}
    for tp in remaining:
        consumer.seek(tp, starts[tp])
    while remaining:
        batches = await consumer.getmany(*remaining, timeout_ms=1000, max_records=max_records)
        for tp, records in batches.items():
            for record in records:
                if record.offset < ends[tp]:
                    yield record
        for tp in list(remaining):
            if await consumer.position(tp) >= ends[tp]:
                remaining.discard(tp)
