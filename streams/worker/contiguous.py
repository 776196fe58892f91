"""Every message of a Faust stage's input partition processed once, in order, and committed by the stage.

faust-streaming's consumer loses messages around a worker's start. Its recovery resumes the
stream partitions, the agents start consuming, and only then does it seek them to their
committed offsets. A message fetched while the flow is suspended is marked read but never
delivered; after the seek, a message below the read offset is dropped, and the "gap"
bookkeeping records the offsets in between as acknowledged, so Faust's next commit can pass
messages that no stage has processed. The SIGKILL chaos test lost a whole by-customer message
(1,497 events) this way, and its numbers ended wrong.

So the gate, the facts and the aggregation do not rely on Faust's offsets. Their topics are
declared with ``acks=False``: Faust neither tracks nor commits them. :class:`Contiguous`
keeps, per input partition, the next offset its stage must process. A repeat is dropped. A
hole is read back from Kafka and processed before the message after it. A partition that
stalls below its high-water mark is sought back, which covers the last messages of a burst.
The stage commits the next offsets itself (:meth:`Contiguous.commit`), once the batch's
output is acknowledged by Kafka (:meth:`Contiguous.mark_done`). An offset is committed only when every message below it
has been processed and its output written.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from aiokafka.errors import CoordinatorLoadInProgressError, GroupCoordinatorNotAvailableError, NotCoordinatorError
from aiokafka.structs import OffsetAndMetadata
from faust.types import TP

from streams.connections import KafkaTarget, kafka_client_options
from streams.logs import get_logger
from streams.worker.log_reader import read_to_end

log = get_logger(__name__)

#: a partition whose next offset has stayed below its high-water mark this long is sought back
STALL_S = 2.0
#: the stage commits its positions at most this often (a crash reads at most this much again)
COMMIT_INTERVAL_S = 0.5
#: how often a stage deletes its input below its committed offsets (repartition topics only)
PURGE_INTERVAL_S = 30.0

#: one message of a stage's input: (partition, offset, value)
Message = tuple[int, int, bytes]


class Contiguous:
    """The next offset to process per partition of one stage input topic (see the module docstring)."""

    def __init__(self, app: Any, topic: Any, kafka: KafkaTarget, partitions: int, *, group_id: str | None) -> None:
        self.app = app
        self.topic = topic
        self.kafka = kafka
        self.partitions = partitions
        #: the consumer group whose committed offsets start a partition (``None``: the stage seeds them)
        self.group_id = group_id
        #: partition -> the next offset to process
        self.next: dict[int, int] = {}
        #: partition -> the next offset whose predecessors' output is all acknowledged (:meth:`mark_done`)
        self.done: dict[int, int] = {}
        #: partition -> the offset last committed by this stage
        self.committed: dict[int, int] = {}
        #: partition -> when the stage last advanced in it (monotonic seconds)
        self.advanced_at: dict[int, float] = {}
        #: the metadata of the commits each partition started from, since the last :meth:`take_started`
        self.started: dict[int, str] = {}
        self._last_commit = 0.0
        #: between :meth:`in_order` and :meth:`mark_done`: a batch is being processed (maybe blocked
        #: on Kafka), so a partition that does not advance is busy, not dropped
        self.busy = False
        self._last_purge = time.monotonic()
        #: partition -> the offset its input was last deleted below
        self.purged: dict[int, int] = {}
        #: whether this stage deletes its input below its commits (it is the only reader of the topic)
        self.purges = group_id is not None

    @property
    def name(self) -> str:
        return str(self.topic.get_topic_name())

    def forget(self) -> None:
        """A new partition assignment: positions are read again (from the group's commits, or seeded)."""
        self.next.clear()
        self.done.clear()
        self.committed.clear()
        self.advanced_at.clear()
        self.started.clear()
        self.purged.clear()

    def seed(self, positions: dict[int, int]) -> None:
        """Set the next offsets (the aggregation's, after it rebuilt its shards from the log)."""
        self.next = dict(positions)
        now = time.monotonic()
        self.advanced_at = {partition: now for partition in positions}

    async def in_order(self, events: Any) -> list[Message]:
        """The batch's messages to process, holes filled from Kafka, repeats left out, each partition in order."""
        out: list[Message] = []
        self.busy = True
        for event in events:
            message = event.message
            partition, offset = message.partition, message.offset
            expected = self.next.get(partition)
            if expected is None:
                expected = await self._start(partition, offset)
            if offset < expected:
                continue  # processed already: delivered again after Faust's seek
            if offset > expected:
                log.warning("stage.hole_filled", topic=self.name, partition=partition, start=expected, stop=offset)
                out.extend(await self._read(partition, expected, offset))
            out.append((partition, offset, event.value))
            self.next[partition] = offset + 1
            self.advanced_at[partition] = time.monotonic()
        return out

    def mark_done(self, positions: dict[int, int] | None = None) -> None:
        """Everything handed out by :meth:`in_order` so far is processed and its output acknowledged.

        With ``positions`` (from :meth:`end_batch`): everything below them is, and the batch under
        way, if any, goes on.
        """
        if positions is None:
            positions = self.next
            self.busy = False
        self.done.update(positions)

    def end_batch(self) -> dict[int, int]:
        """The batch handed out by :meth:`in_order` is processed, its output maybe still on its way:
        the next offsets to pass to :meth:`mark_done` once that output is acknowledged."""
        self.busy = False
        return dict(self.next)

    def take_started(self) -> dict[int, str]:
        """The commit metadata of the partitions started since the last call (see :meth:`commit`)."""
        started, self.started = self.started, {}
        return started

    async def commit(self, force: bool = False, metadata: str = "") -> None:
        """Commit the done offsets that moved (at most every ``COMMIT_INTERVAL_S`` unless ``force``).

        ``metadata`` goes with each offset; a partition's next start hands it back (:meth:`take_started`).
        """
        now = time.monotonic()
        if not force and now - self._last_commit < COMMIT_INTERVAL_S:
            return
        self._last_commit = now
        await self.commit_positions(self.done, metadata)

    async def commit_positions(self, positions: dict[int, int], metadata: str = "") -> None:
        """Commit these next offsets for the app's consumer group (those that moved, of assigned partitions)."""
        if self.app.rebalancing:
            # a commit in a rebalance fails with the old generation, and aiokafka then asks the group
            # to rebalance again: committed once the new assignment is in place
            return
        consumer = self.app.consumer
        assigned = {tp.partition for tp in consumer.assignment() if tp.topic == self.name}
        offsets = {
            TopicPartition(self.name, partition): OffsetAndMetadata(offset, metadata)
            for partition, offset in positions.items()
            if partition in assigned and self.committed.get(partition) != offset
        }
        if offsets:
            # through Faust's own group member (a commit from outside the group is refused), in its thread
            thread = consumer._thread
            try:
                await thread.call_thread(thread._ensure_consumer().commit, offsets)
            except Exception as error:  # a rebalance or an outage: the positions are committed next time
                log.warning("stage.commit_failed", topic=self.name, error=str(error) or type(error).__name__)
                return
            for tp, committed in offsets.items():
                self.committed[tp.partition] = committed.offset
        if self.purges and time.monotonic() - self._last_purge >= PURGE_INTERVAL_S:
            # every assigned partition committed past its last purge, also those idle since: a stage
            # that went quiet right after a commit would otherwise keep that input on disk
            below = {
                TopicPartition(self.name, partition): offset
                for partition, offset in self.committed.items()
                if partition in assigned and self.purged.get(partition) != offset
            }
            if below:
                self._last_purge = time.monotonic()
                if await self._purge(below):
                    self.purged.update({tp.partition: offset for tp, offset in below.items()})

    async def _purge(self, below: dict[TopicPartition, int]) -> bool:
        """Delete the input below the committed offsets: processed, and its output acknowledged.

        This keeps a repartition topic's disk near what is in flight, as Kafka Streams does.
        Returns whether Kafka deleted them.
        """
        admin = AIOKafkaAdminClient(**kafka_client_options(self.kafka))
        try:
            await admin.start()
            await admin.delete_records({tp: RecordsToDelete(before_offset=offset) for tp, offset in below.items()})
            return True
        except Exception as error:  # the next purge deletes up to a later commit
            log.warning("stage.purge_failed", topic=self.name, error=str(error) or type(error).__name__)
            return False
        finally:
            await admin.close()

    async def unstall(self) -> None:
        """Seek back a partition whose tail Faust dropped: it counts it read, but the stage never got it.

        Only when no batch is under way, no rebalance either, and the partition has not advanced for
        ``STALL_S``: a stage blocked on Kafka, or messages still on their way, are left alone.
        """
        app = self.app
        if self.busy or app.rebalancing:
            return
        consumer = app.consumer
        now = time.monotonic()
        assigned = {tp.partition for tp in consumer.assignment() if tp.topic == self.name}
        for partition, offset in list(self.next.items()):
            if partition not in assigned or now - self.advanced_at.get(partition, now) < STALL_S:
                continue
            tp = TP(self.name, partition)
            read = consumer._read_offset.get(tp)  # the last offset Faust's fetcher took in
            highwater = consumer.highwater(tp)
            if read is None or read < offset or highwater is None or highwater <= offset:
                continue
            log.warning("stage.stall_sought", topic=self.name, partition=partition, offset=offset, read=read,
                        highwater=highwater)
            self.advanced_at[partition] = now
            try:
                # in the consumer's own thread: Faust's ``seek`` calls aiokafka's from this one, and
                # its fetcher, iterating its fetched records there meanwhile, fails with a KeyError
                # that crashes the worker
                thread = consumer._thread
                await thread.call_thread(thread._ensure_consumer().seek, tp, offset)
                consumer._read_offset[tp] = offset if offset else None
            except Exception as error:  # the partition moved meanwhile: the new owner starts from the commit
                log.warning("stage.seek_failed", topic=self.name, partition=partition,
                            error=str(error) or type(error).__name__)

    async def _start(self, partition: int, first_offset: int) -> int:
        """Where a partition starts after an assignment: the group's committed offset, else its beginning.

        One request reads them for every partition of the topic.
        """
        if self.group_id is None:
            self.next[partition] = first_offset
            return first_offset
        tps = [TopicPartition(self.name, number) for number in range(self.partitions)]
        committed = await self._committed(tps)
        beginnings = await self._beginnings(tps)
        for tp in tps:
            if tp.partition in self.next and tp.partition != partition:
                continue  # already under way in this assignment
            found = committed.get(tp)
            start = found.offset if found is not None and found.offset >= 0 else beginnings[tp]
            self.next[tp.partition] = self.done[tp.partition] = self.committed[tp.partition] = start
            self.started[tp.partition] = found.metadata if found is not None and found.offset >= 0 else ""
        return self.next[partition]

    async def _committed(self, tps: list[TopicPartition]) -> dict[TopicPartition, OffsetAndMetadata]:
        """The group's committed offsets; retried while the group's coordinator is not ready yet."""
        delay = 0.1
        while True:
            admin = AIOKafkaAdminClient(**kafka_client_options(self.kafka))
            try:
                await admin.start()
                return dict(await admin.list_consumer_group_offsets(self.group_id, partitions=tps))
            except (GroupCoordinatorNotAvailableError, CoordinatorLoadInProgressError, NotCoordinatorError):
                # a new cluster creates its offsets topic on the first request: a moment later it answers
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
            finally:
                await admin.close()

    def _consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            **kafka_client_options(self.kafka),
            enable_auto_commit=False,
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )

    async def _beginnings(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        consumer = self._consumer()
        await consumer.start()
        try:
            return dict(await consumer.beginning_offsets(tps))
        finally:
            await consumer.stop()

    async def _read(self, partition: int, start: int, stop: int) -> list[Message]:
        """The messages of ``partition`` from ``start`` up to, not including, ``stop``, read from Kafka."""
        tp = TopicPartition(self.name, partition)
        consumer = self._consumer()
        await consumer.start()
        try:
            consumer.assign([tp])
            return [
                (partition, record.offset, record.value)
                async for record in read_to_end(consumer, {tp: start}, {tp: stop})
                if record.value is not None
            ]
        finally:
            await consumer.stop()
