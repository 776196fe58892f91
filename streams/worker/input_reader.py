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
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from streams.connections import KafkaTarget, kafka_client_options
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


class CommitHooks(Protocol):
    """What a handler keeps beside the offsets: metadata committed with them, recovered on assignment."""

    def commit_metadata(self, topic: str, partition: int, offset: int) -> str:
        """The metadata to commit with ``offset`` (the next to read) of an input partition."""

    async def on_assigned(self, committed: dict[tuple[str, int], tuple[int, str | None]]) -> None:
        """Input partitions assigned, each with its committed ``(offset, metadata)``, before any is read."""

    def on_revoked(self, topic: str, partition: int) -> None:
        """An input partition taken away (its offsets are committed)."""


async def read_inputs(
    kafka: KafkaTarget,
    topics: Sequence[str],
    group_id: str,
    handle: Handler,
    hooks: CommitHooks | None = None,
    on_lag: Callable[[dict[tuple[str, int], int]], None] | None = None,
) -> None:
    """Read ``topics`` in group ``group_id`` until cancelled; commit each fetch after ``handle`` returns.

    With ``hooks``, every commit carries their metadata, and an assignment hands them the
    committed offsets and metadata before any record of the new partitions is handled; a
    partition without a commit is committed at its beginning first, so that it has metadata.
    """
    consumer = AIOKafkaConsumer(
        **kafka_client_options(kafka),
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_bytes=FETCH_MAX_BYTES,
        max_partition_fetch_bytes=PARTITION_FETCH_MAX_BYTES,
        max_poll_records=MAX_RECORDS,
        fetch_max_wait_ms=FETCH_WAIT_MS,
        fetch_min_bytes=FETCH_MIN_BYTES,
    )
    progress = _Progress(consumer, hooks)
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
                        progress.handled(fetched)
            if time.monotonic() - progress.committed_at >= COMMIT_INTERVAL_S:
                await progress.commit()
                if on_lag is not None:  # reported when idle too, so a caught-up lag shows 0
                    on_lag(await _lags(consumer))
    finally:
        try:
            await progress.commit()
        finally:
            await consumer.stop()


async def _lags(consumer: AIOKafkaConsumer) -> dict[tuple[str, int], int]:
    """Messages between each assigned partition's position and its end (as of the last fetch).

    -1 for a partition whose end or position is not known yet (no fetch answered for it, or its
    position is being reset): the alerts' watermark must not pass it by, as if it had no data.
    """
    lags = {}
    for tp in consumer.assignment():
        highwater = consumer.highwater(tp)
        position = _position_now(consumer, tp)
        lags[(tp.topic, tp.partition)] = -1 if highwater is None or position is None else max(0, highwater - position)
    return lags


def _position_now(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    """The partition's fetch position if the consumer has one; never waits.

    ``AIOKafkaConsumer.position()`` waits, up to the request timeout and then again, for a
    partition whose position is being reset: called from the read loop, it could stall the input.
    """
    try:
        state = consumer._subscription.subscription.assignment.state_value(tp)
    except (AttributeError, KeyError):
        return None
    return int(state.position) if state is not None and state.has_valid_position else None


class _Progress(ConsumerRebalanceListener):  # type: ignore[misc]
    """The offsets of handled fetches not committed yet, committed too when the group moves partitions.

    Without the commit on revocation, every fetch handled since the last periodic
    commit was read again after a rebalance (a worker joining or leaving), by
    the partitions' new owner or by this reader: its events were deduplicated
    downstream, but its dead letters were sent twice.
    """

    def __init__(self, consumer: AIOKafkaConsumer, hooks: CommitHooks | None = None) -> None:
        self.consumer = consumer
        self.hooks = hooks
        #: handled fetches not committed yet: partition -> next offset, with the hooks' metadata as of
        #: its handling
        self.uncommitted: dict[TopicPartition, Any] = {}
        self.committed_at = time.monotonic()
        #: incremented at every revocation: a fetch made before it is not handled
        self.generation = 0
        #: held while a fetch is handled, so a revocation waits for it
        self.handling = asyncio.Lock()

    def handled(self, fetched: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        """A fetch is handled: its partitions' next offsets, to commit with the metadata as they stand now.

        Not as they stand at the commit: a fetch that failed halfway may have sent dead letters
        since, and a commit naming a position past them, with an offset before their elements,
        would have them sent again after a restart.
        """
        for tp, batch in fetched.items():
            if batch:
                self.uncommitted[tp] = self._entry(tp, batch[-1].offset + 1)

    async def commit(self) -> None:
        """Commit the offsets of the fetches handled so far."""
        offsets, self.uncommitted = self.uncommitted, {}
        self.committed_at = time.monotonic()
        if offsets:
            await _commit(self.consumer, offsets)

    def _entry(self, tp: TopicPartition, offset: int) -> Any:
        """What to commit for a partition: its offset, with the hooks' metadata as of now."""
        hooks = self.hooks
        return offset if hooks is None else (offset, hooks.commit_metadata(tp.topic, tp.partition, offset))

    async def on_partitions_revoked(self, revoked: Any) -> None:
        async with self.handling:
            self.generation += 1
            await self.commit()
            if self.hooks is not None:
                for tp in revoked:
                    self.hooks.on_revoked(tp.topic, tp.partition)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        hooks = self.hooks
        if hooks is None or not assigned:
            return
        # no fetch of the new partitions is handled before the hooks know their commits: the
        # reader's loop may already hold records of them while this runs
        async with self.handling:
            await self._assigned(hooks, list(assigned))

    async def _assigned(self, hooks: CommitHooks, partitions: list[TopicPartition]) -> None:
        # the metadata comes only with the coordinator's answer (``committed()`` returns the offset alone)
        found = await self.consumer._coordinator.fetch_committed_offsets(partitions)
        committed: dict[tuple[str, int], tuple[int, str | None]] = {}
        missing = []
        for tp in partitions:
            entry = found.get(tp)
            if entry is None or entry.offset < 0:
                missing.append(tp)
            else:
                committed[(tp.topic, tp.partition)] = (entry.offset, entry.metadata or None)
        if missing:
            beginnings = await self.consumer.beginning_offsets(missing)
            for tp in missing:
                committed[(tp.topic, tp.partition)] = (beginnings[tp], None)
        # where each partition starts and what its ledger reads back: a dead letter sent twice is traced from here
        log.info("ingest.assigned", committed={f"{topic}:{partition}": list(entry)
                                               for (topic, partition), entry in sorted(committed.items())})
        await hooks.on_assigned(committed)
        if missing:
            # a first commit, so that a crash before the first periodic one finds metadata
            await _commit(self.consumer, {tp: self._entry(tp, committed[(tp.topic, tp.partition)][0])
                                          for tp in missing})


async def _commit(consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, Any]) -> None:
    try:
        await consumer.commit(offsets)
    except KafkaError as error:
        # typically a rebalance took the partitions meanwhile (CommitFailedError): their new owner
        # reads the fetch again, and the facts stage drops the event ids it has applied already
        log.warning("ingest.commit_failed", error=str(error), partitions=len(offsets))
