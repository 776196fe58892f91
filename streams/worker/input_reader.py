"""The input topics, read with aiokafka directly rather than through a Faust agent.

Faust spends about as much on each message (event object, sensors, acks,
offset tracking) as our validation does on one event, and the input topics
are the only ones that carry one event per message. Ingest is stateless, so
it needs none of Faust's table machinery: this reader fetches in bulk, hands
each fetch to a handler that validates and routes it (and waits for Kafka to
acknowledge the routed messages); the offsets of handled fetches are committed
at most once a second, when the group takes partitions away (a worker joins or
leaves), and when the reader stops. Delivery stays at least once: a fetch read
again after a crash is routed again, the facts stage drops the duplicate event
ids, and the invalid messages in it are dead-lettered again.

The reader has its own consumer group (``<app id>-ingest``): its partitions
are shared among the workers independently of Faust's assignment.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from streams.logs import get_logger

log = get_logger(__name__)

#: bytes one fetch may bring: bounds the memory a batch holds (about 16,000 events of 250 bytes)
FETCH_MAX_BYTES = 4 * 1024 * 1024
#: a single input message is at most 1 MiB (SPEC: a batch of events)
PARTITION_FETCH_MAX_BYTES = 1024 * 1024 + 64 * 1024
#: records per fetch
MAX_RECORDS = 5000
#: how long a fetch waits for records, and for at least FETCH_MIN_BYTES of them: live traffic
#: arrives in fetches of 25 ms rather than a few records each, so every stage after this one
#: handles a few packed messages a second per partition, not hundreds
FETCH_WAIT_MS = 25
FETCH_MIN_BYTES = 512 * 1024
#: offsets are committed at most this often (and when the reader stops): a commit is a round trip
#: to the broker, and one per fetch cost as much as routing the fetch; a crash reads at most this
#: much again, which the facts stage deduplicates
COMMIT_INTERVAL_S = 1.0

Handler = Callable[[Sequence[ConsumerRecord]], Awaitable[None]]


async def read_inputs(bootstrap_servers: str, topics: Sequence[str], group_id: str, handle: Handler) -> None:
    """Read ``topics`` in group ``group_id`` until cancelled; commit each fetch after ``handle`` returns."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_bytes=FETCH_MAX_BYTES,
        max_partition_fetch_bytes=PARTITION_FETCH_MAX_BYTES,
        max_poll_records=MAX_RECORDS,
        fetch_max_wait_ms=FETCH_WAIT_MS,
        fetch_min_bytes=FETCH_MIN_BYTES,
    )
    progress = _Progress(consumer)
    await consumer.start()
    consumer.subscribe(list(topics), listener=progress)
    log.info("ingest.started", group=group_id, topics=list(topics))
    try:
        while True:
            fetched = await consumer.getmany(timeout_ms=FETCH_WAIT_MS, max_records=MAX_RECORDS)
            if fetched:
                # read with no await since the fetch returned: the lock is free unless a revocation
                # holds it, and then the fetch predates the rebalance and is dropped, since its
                # partitions are read again from the offsets committed at the revocation (a fetch
                # that returns after a rebalance was made from the new assignment, and is kept)
                generation = progress.generation
                async with progress.handling:
                    if progress.generation == generation:
                        records = [record for partition_records in fetched.values() for record in partition_records]
                        await handle(records)
                        progress.uncommitted.update(
                            {tp: batch[-1].offset + 1 for tp, batch in fetched.items() if batch}
                        )
            if progress.uncommitted and time.monotonic() - progress.committed_at >= COMMIT_INTERVAL_S:
                await progress.commit()
    finally:
        try:
            await progress.commit()
        finally:
            await consumer.stop()


class _Progress(ConsumerRebalanceListener):  # type: ignore[misc]
    """The offsets of handled fetches not committed yet, committed too when the group moves partitions.

    Without the commit on revocation, every fetch handled since the last periodic
    commit was read again after a rebalance (a worker joining or leaving), by
    the partitions' new owner or by this reader: its events were deduplicated
    downstream, but its dead letters were sent twice.
    """

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self.consumer = consumer
        self.uncommitted: dict[TopicPartition, int] = {}
        self.committed_at = time.monotonic()
        #: incremented at every revocation: a fetch made before it is not handled
        self.generation = 0
        #: held while a fetch is handled, so a revocation waits for it
        self.handling = asyncio.Lock()

    async def commit(self) -> None:
        """Commit the offsets of the fetches handled so far."""
        offsets, self.uncommitted = self.uncommitted, {}
        self.committed_at = time.monotonic()
        if offsets:
            await _commit(self.consumer, offsets)

    async def on_partitions_revoked(self, revoked: Any) -> None:
        async with self.handling:
            self.generation += 1
            await self.commit()

    async def on_partitions_assigned(self, assigned: Any) -> None:
        return None


async def _commit(consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
    try:
        await consumer.commit(offsets)
    except KafkaError as error:
        # typically a rebalance took the partitions meanwhile (CommitFailedError): their new owner
        # reads the fetch again, and the facts stage drops the event ids it has applied already
        log.warning("ingest.commit_failed", error=str(error), partitions=len(offsets))
