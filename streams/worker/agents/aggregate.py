"""The aggregation: the deltas agent folding store shards, and their rebuild from the deltas log."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.logs import get_logger
from streams.stages.aggregate import StoreShard, apply_part
from streams.worker.topology import BATCH_MAX, BATCH_WITHIN_S, Topology
from streams.worker.wire import unpack

log = get_logger(__name__)


class Aggregation:
    """The store shards of this worker's deltas partitions, folded from the deltas topic."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.shards: dict[str, StoreShard] = {}
        self.needs_restore = True
        #: incremented on every partition assignment: a rebuild that overlapped one must run again
        self.assignment_generation = 0
        self._rebuild_lock = asyncio.Lock()

    def on_assigned(self) -> None:
        """A new partition assignment: the shards must be rebuilt for it."""
        self.assignment_generation += 1
        self.needs_restore = True

    def my_partitions(self) -> set[int]:
        """The deltas partitions assigned to this worker."""
        deltas_topic = self.topology.deltas.get_topic_name()
        return {tp.partition for tp in self.topology.app.assignor.assigned_actives() if tp.topic == deltas_topic}

    def apply_deltas(self, message: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Apply a deltas message: a watermark, or a list of parts (each with its own source)."""
        clock = self.topology.clock
        if isinstance(message, list):
            for part in message:
                clock.advance(part.get("t"))
                apply_part(self.shards, part)
        else:
            clock.advance(message["wm"])

    async def rebuild(self) -> None:
        """The shards of this worker's deltas partitions, folded from the start of each partition."""
        topology = self.topology
        generation = self.assignment_generation
        mine = sorted(self.my_partitions())
        self.shards = {}
        started = time.monotonic()
        applied = 0
        partitions_read = [TopicPartition(topology.deltas.get_topic_name(), p) for p in mine]
        if partitions_read:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=topology.settings.kafka_bootstrap_servers,
                enable_auto_commit=False,
                max_partition_fetch_bytes=8 * 1024 * 1024,
                fetch_max_bytes=64 * 1024 * 1024,
            )
            await consumer.start()
            try:
                consumer.assign(partitions_read)
                ends = await consumer.end_offsets(partitions_read)
                starts = await consumer.beginning_offsets(partitions_read)
                remaining = {tp for tp in partitions_read if ends[tp] > starts[tp]}
                for tp in remaining:
                    consumer.seek(tp, starts[tp])
                while remaining:
                    batches = await consumer.getmany(*remaining, timeout_ms=1000, max_records=2000)
                    for tp, records in batches.items():
                        for record in records:
                            if record.offset < ends[tp]:
                                self.apply_deltas(unpack(record.value))
                                applied += 1
                        if records and records[-1].offset + 1 >= ends[tp]:
                            remaining.discard(tp)
            finally:
                await consumer.stop()
        self.needs_restore = self.assignment_generation != generation
        log.info("aggregate.rebuilt", stores=len(self.shards), partitions=mine, messages=applied,
                 seconds=round(time.monotonic() - started, 3))

    async def ensure_rebuilt(self) -> None:
        """Rebuild the shards after an assignment, once, whoever asks first (the agent or the emit timer)."""
        async with self._rebuild_lock:
            while self.needs_restore and not self.topology.app.rebalancing:
                await self.rebuild()

    @property
    def ready(self) -> bool:
        """Whether the shards are those of the current assignment (none pending, no rebalance under way)."""
        return not self.needs_restore and not self.topology.app.rebalancing

    async def run(self, stream: Any) -> None:
        """The agent: each batch of deltas messages applied to the shards (after any pending rebuild)."""
        async for batch in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            await self.ensure_rebuilt()
            for event in batch:
                self.apply_deltas(unpack(event.value))


def register(topology: Topology) -> Aggregation:
    """The aggregate agent on the deltas topic."""
    aggregation = Aggregation(topology)

    @topology.app.agent(topology.deltas, name=topology.internal + "aggregate")
    async def aggregate_agent(stream: Any) -> None:
        await aggregation.run(stream)

    return aggregation
