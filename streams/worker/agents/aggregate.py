"""The aggregation: the deltas agent folding store shards, their checkpoints, and their restore after an assignment.

``*`` is the sum of every store: each deltas partition keeps a partial ``*`` (the sum of its
stores, read from them in place; its alert state is checkpointed with them under the store id
``*``), and the publisher sums the partials' read points (:mod:`streams.worker.agents.publish`),
so no partition carries the rows of every store.

A worker that gets deltas partitions restores their shards from the latest checkpoints
(:mod:`streams.worker.checkpoints`) and folds the deltas from the checkpoint's offset on.
Every ``LOYALTY_CHECKPOINT_INTERVAL`` it checkpoints the shards of its partitions and then
deletes the deltas below the checkpoint (and, where ``*``'s alerts are evaluated, the star
samples below the offset its checkpoint reads them from), so a restart reads live state plus a
short tail. A
deltas partition whose log no longer reaches back to the checkpoint (or, without one, to its
first message) is refused loudly: its stores are not published rather than published wrong.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

from metrics.catalog import ALL_STORES
from streams.connections import kafka_client_options
from streams.logs import get_logger
from streams.stages.aggregate import StoreShard, apply_message, join_partials
from streams.stages.watermarks import MARKS, MarkMerger, is_marks, low_watermark
from streams.worker.checkpoints import CheckpointError, Checkpoints
from streams.worker.log_reader import read_to_end
from streams.worker.topology import BATCH_MAX, BATCH_WITHIN_S, Topology
from streams.worker.wire import route, unpack

log = get_logger(__name__)

#: boundaries one store samples before the aggregation lets the event loop run
SAMPLE_SLICE = 64


class TruncatedLog(Exception):
    """The deltas log no longer holds what a restore needs: refused, never folded into wrong numbers."""


class Aggregation:
    """The store shards of this worker's deltas partitions, folded from the deltas topic."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.shards: dict[str, StoreShard] = {}
        self.needs_restore = True
        #: incremented on every partition assignment: a rebuild that overlapped one must run again
        self.assignment_generation = 0
        #: deltas partition -> the offset after the last message applied
        self.positions: dict[int, int] = {}
        #: store -> its shard's version at its last checkpoint
        self.checkpointed: dict[str, int] = {}
        self.checkpoints = Checkpoints(
            topology.app.producer._ensure_producer,  # type: ignore[attr-defined]
            topology.settings,
            topology.checkpoints_topic,
        )
        #: deltas partition -> its partial ``*``: the sum of the partition's stores
        self.partials: dict[int, StoreShard] = {}
        self._admin: AIOKafkaAdminClient | None = None
        #: (topic, partition) -> the offset below which Kafka last deleted its records for us
        self._deleted_below: dict[tuple[str, int], int] = {}
        self._rebuild_lock = asyncio.Lock()
        #: the deltas after the rebuild, each once and in order (Faust's own offsets are not used)
        self.input = topology.contiguous(topology.deltas, committed=False)
        #: alerts (None: off): the marks of every facts partition, and the low watermark of each deltas partition
        self.alert_config = topology.settings.alert_config()
        self.marks = MarkMerger(topology.partitions)
        self.low_watermarks: dict[int, int] = {}
        #: deltas partitions that got marks since the last update, and those whose stores have boundaries due
        self.marked_partitions: set[int] = set()
        self.due_partitions: set[int] = set()

    def on_assigned(self) -> None:
        """A new partition assignment: the shards must be rebuilt for it."""
        self.assignment_generation += 1
        self.needs_restore = True
        self.input.forget()

    def my_partitions(self) -> set[int]:
        """The deltas partitions assigned to this worker."""
        deltas_topic = self.topology.deltas.get_topic_name()
        return {tp.partition for tp in self.topology.app.assignor.assigned_actives() if tp.topic == deltas_topic}

    def partial(self, partition: int) -> StoreShard:
        """The partial ``*`` of a deltas partition, made empty when it has none yet."""
        partial = self.partials.get(partition)
        if partial is None:
            partial = self.partials[partition] = StoreShard(ALL_STORES)
        return partial

    def apply_deltas(self, message: dict[str, Any] | list[dict[str, Any]], partition: int, offset: int) -> None:
        """Apply a deltas message: a watermark, or parts (each with its own source) for stores and the partial."""
        clock = self.topology.clock
        if isinstance(message, list):
            for part in message:
                clock.advance(part.get("t"))
            apply_message(self.shards, self.partial(partition), message)
        elif is_marks(message):
            self.receive_marks(partition, message)
        else:
            clock.advance(message["wm"])
        if offset + 1 > self.positions.get(partition, 0):
            self.positions[partition] = offset + 1

    def receive_marks(self, partition: int, message: dict[str, Any]) -> None:
        """Marks of a facts partition, merged into the partition's low watermark after the batch (:meth:`sample_due`).

        The marks are in the deltas log, after the deltas they speak for, so a boundary is sampled
        with every event up to the grace late in it, however batches form, and a rebuild that reads
        the log again samples the same boundaries to the same values. Marks from before the
        checkpoint are gone: a rebuilt partition samples nothing until every facts partition has
        sent marks again (later, never earlier).
        """
        if self.alert_config is None:
            return
        self.marks.receive(partition, int(message["from"]), message[MARKS])
        self.marked_partitions.add(partition)

    def update_watermarks(self) -> None:
        """The low watermark of each partition that got marks (once per batch: merging costs)."""
        config = self.alert_config
        if config is None:
            return
        while self.marked_partitions:
            partition = self.marked_partitions.pop()
            watermark = low_watermark(self.marks.merged(partition))
            if watermark is None:
                continue
            previous = self.low_watermarks.get(partition)
            if previous is not None and (watermark - config.grace_ms) // config.step_ms <= (
                previous - config.grace_ms
            ) // config.step_ms:
                continue  # no new boundary is due (or the watermark went back, after an upstream restart)
            self.low_watermarks[partition] = watermark
            self.due_partitions.add(partition)

    async def sample_due(self) -> None:
        """Sample the stores of the partitions whose watermark made boundaries due, in slices.

        Called after each batch: a replay can make thousands of boundaries due at
        once, and the worker's other parts (commits, emits, heartbeats) must go on meanwhile.
        """
        config = self.alert_config
        if config is None:
            return
        self.update_watermarks()
        partitions = self.topology.partitions
        while self.due_partitions:
            partition = self.due_partitions.pop()
            watermark = self.low_watermarks.get(partition)
            if watermark is None:
                continue
            shards = [shard for store_id, shard in list(self.shards.items())
                      if route(store_id, partitions) == partition]
            partial = self.partials.get(partition)
            if partial is not None:
                shards.append(partial)  # its samples go to the ``*`` owner (StarSampler)
            self._report_behind(partition, shards, watermark)
            for shard in shards:
                sampled = SAMPLE_SLICE
                while sampled == SAMPLE_SLICE:
                    sampled = shard.sample(watermark, config, SAMPLE_SLICE)
                    await asyncio.sleep(0)
            self._report_behind(partition, shards, watermark)

    def _report_behind(self, partition: int, shards: list[StoreShard], watermark: int) -> None:
        """The health gauge ``alert_sampling_behind_ms:{partition}``: how far its slowest store's sampling lags."""
        config = self.alert_config
        assert config is not None
        behind = max((shard.sampling_behind_ms(watermark, config) for shard in shards), default=0)
        self.topology.health.gauge(f"alert_sampling_behind_ms:{partition}", behind)

    async def rebuild(self) -> None:
        """The shards of this worker's deltas partitions: their checkpoints, then the deltas after them."""
        topology = self.topology
        generation = self.assignment_generation
        mine = sorted(self.my_partitions())
        self.shards = {}
        self.partials = {partition: StoreShard(ALL_STORES) for partition in mine}
        self.positions = {}
        self.marks.forget()
        self.low_watermarks = {}
        self.marked_partitions = set()
        self.due_partitions = set()
        self.checkpointed = {}
        started = time.monotonic()
        deltas_topic = topology.deltas.get_topic_name()
        try:
            restored = await self.checkpoints.read(mine)
            broken: set[int] = set()
        except CheckpointError as error:
            log.error("aggregate.checkpoint_unreadable", error=str(error))
            restored, broken = {}, set(mine)
        starts: dict[int, int] = {}
        for partition in mine:
            checkpoint = restored.get(partition)
            if checkpoint is None or partition in broken:
                starts[partition] = 0  # no usable checkpoint: the whole log, which must still be there
                continue
            for store_id, (_, data) in checkpoint.shards.items():
                shard = StoreShard.from_bytes(data)
                if store_id == ALL_STORES:
                    self.partials[partition] = shard
                else:
                    self.shards[store_id] = shard
                self.checkpointed[self._checkpoint_name(partition, store_id)] = shard.version
            topology.clock.advance(checkpoint.clock_ms)
            starts[partition] = checkpoint.upto if checkpoint.upto is not None else 0
        join_partials(self.shards.items(), lambda store_id: self.partial(route(store_id, topology.partitions)))
        applied = 0
        partitions_read = [TopicPartition(deltas_topic, p) for p in mine]
        if partitions_read:
            consumer = AIOKafkaConsumer(
                **kafka_client_options(topology.settings),
                enable_auto_commit=False,
                max_partition_fetch_bytes=8 * 1024 * 1024,
                fetch_max_bytes=64 * 1024 * 1024,
            )
            await consumer.start()
            try:
                consumer.assign(partitions_read)
                ends = await consumer.end_offsets(partitions_read)
                beginnings = await consumer.beginning_offsets(partitions_read)
                for tp in partitions_read:
                    if beginnings[tp] > starts[tp.partition]:
                        raise TruncatedLog(
                            f"deltas partition {tp.partition} begins at offset {beginnings[tp]}, but restoring its "
                            f"stores needs it from offset {starts[tp.partition]}"
                        )
                    self.positions[tp.partition] = max(starts[tp.partition], beginnings[tp])
                offsets = {tp: starts[tp.partition] for tp in partitions_read}
                async for record in read_to_end(consumer, offsets, ends, max_records=2000):
                    self.apply_deltas(unpack(record.value), record.partition, record.offset)
                    applied += 1
            finally:
                await consumer.stop()
        self.needs_restore = self.assignment_generation != generation
        self.input.seed(self.positions)
        # no sampling here: a replay's backlog of due boundaries is sampled after the next batch, in
        # slices, so the emit publishes the rebuilt stores first (ingest sends marks every few seconds)
        log.info("aggregate.rebuilt", stores=len(self.shards), partitions=mine, messages=applied,
                 checkpointed=sum(len(c.shards) for c in restored.values()),
                 seconds=round(time.monotonic() - started, 3))

    async def ensure_rebuilt(self) -> None:
        """Rebuild the shards after an assignment, once, whoever asks first (the agent or the emit timer)."""
        async with self._rebuild_lock:
            while self.needs_restore and not self.topology.app.rebalancing:
                try:
                    await self.rebuild()
                except TruncatedLog as error:
                    # loud, and nothing of these partitions is published; tried again at the next call
                    log.error("aggregate.log_truncated", error=str(error))
                    self.shards = {}
                    return
                except Exception as error:  # Kafka unreachable: tried again at the next call
                    log.warning("aggregate.rebuild_failed", error=str(error) or type(error).__name__)
                    self.shards = {}
                    return

    @property
    def ready(self) -> bool:
        """Whether the shards are those of the current assignment (none pending, no rebalance under way)."""
        return not self.needs_restore and not self.topology.app.rebalancing

    async def run(self, stream: Any) -> None:
        """The agent: each batch of deltas messages applied to the shards (after any pending rebuild)."""
        async for batch in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            await self.ensure_rebuilt()
            if not self.ready:
                continue  # a refused or pending restore: the log is read again when it succeeds
            for partition, offset, value in await self.input.in_order(batch):
                self.apply_deltas(unpack(value), partition, offset)
            self.input.mark_done()
            await self.sample_due()

    async def checkpoint(self) -> None:
        """Checkpoint the shards of every deltas partition of this worker, then delete the deltas below."""
        if not self.ready:
            return
        generation = self.assignment_generation
        partitions = self.topology.partitions
        home = route(ALL_STORES, partitions)  # the partition whose partial also evaluates ``*``'s alerts
        for partition in sorted(self.my_partitions()):
            upto = self.positions.get(partition)
            if upto is None:
                continue
            star_samples_from: int | None = None
            stores = sorted(store_id for store_id in self.shards if route(store_id, partitions) == partition)
            for store_id in [*stores, ALL_STORES]:
                if not self.ready or self.assignment_generation != generation:
                    return  # the partitions moved: the round is dropped, its manifest never written
                shard = self.partials.get(partition) if store_id == ALL_STORES else self.shards.get(store_id)
                if shard is None:
                    continue
                # the shard and its offset are read together, with no await in between
                version, position, sampled = shard.version, self.positions[partition], shard.sampled_ms
                if store_id == ALL_STORES and partition == home:
                    star_samples_from = shard.star_samples_offset
                name = self._checkpoint_name(partition, store_id)
                unchanged = self.checkpointed.get(name) == version and (partition, store_id) in self.checkpoints.records
                data = None if unchanged else shard.to_bytes()
                await self.checkpoints.write_store(partition, store_id, data, position)
                self.checkpointed[name] = version
                shard.durable_sampled_ms = sampled  # a restore samples on from here: its stores may fold to it
            if not self.ready or self.assignment_generation != generation:
                return
            # the clock now, not at the round's start: the shards were folded as of the clock when they
            # were written, and a restore must not read them as of an earlier "now"
            await self.checkpoints.write_manifest(partition, upto, self.topology.clock.clock_ms, stores)
            # every shard's checkpoint holds the deltas below ``upto``
            await self._delete_records(self.topology.deltas.get_topic_name(), partition, upto)
            if star_samples_from is not None:
                # a restore of ``*`` reads the star samples from its checkpoint's offset on, never below
                await self._delete_records(self.topology.star_samples_topic, 0, star_samples_from)
            # where Faust's stream starts after a restart (the rebuild reads from the checkpoint anyway)
            await self.input.commit_positions({partition: upto})

    @staticmethod
    def _checkpoint_name(partition: int, store_id: str) -> str:
        """Stores are in one partition each; the partial ``*`` is in every one."""
        return f"{partition}|{store_id}" if store_id == ALL_STORES else store_id

    async def _delete_records(self, topic: str, partition: int, offset: int) -> None:
        """Delete the records of a partition below ``offset`` (Kafka's delete-records), unless done already.

        A quiet partition's checkpoint rounds repeat the same offset: asking again changes nothing.
        """
        if self._deleted_below.get((topic, partition)) == offset:
            return
        if self._admin is None:
            self._admin = AIOKafkaAdminClient(**kafka_client_options(self.topology.settings))
            await self._admin.start()
        tp = TopicPartition(topic, partition)
        await self._admin.delete_records({tp: RecordsToDelete(before_offset=offset)})
        self._deleted_below[(topic, partition)] = offset


def register(topology: Topology) -> Aggregation:
    """The aggregate agent on the deltas topic and its checkpoint timer."""
    aggregation = Aggregation(topology)
    app = topology.app

    @app.agent(topology.deltas, name=topology.internal + "aggregate")
    async def aggregate_agent(stream: Any) -> None:
        await aggregation.run(stream)

    interval_s = topology.settings.checkpoint_interval_ms / 1000

    async def checkpoint_round() -> None:
        await aggregation.checkpoint()
        await aggregation.input.unstall()

    topology.timer(interval_s, "checkpoint", checkpoint_round)

    return aggregation
