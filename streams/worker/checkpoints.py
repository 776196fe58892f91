"""Checkpoints of the store shards in a compacted topic, so that a restart reads live state, not all history.

The aggregation's state is a fold of the deltas topic. Without checkpoints a worker that
gets a deltas partition folds it from its first message, which costs as much as the
history is long. With them, it restores the partition's shards from their latest
checkpoint and folds only the deltas after it, and the deltas below the checkpoint are
deleted, so both the restart time and the disk follow the live state.

Records of the checkpoint topic (``<app id>-checkpoints``, compacted, one partition per
deltas partition; keys are JSON lists, so any store id is safe in them):

* ``["c", partition, store, id, i]``: chunk ``i`` of checkpoint ``id`` of a store's shard
  (:meth:`streams.stages.aggregate.StoreShard.to_bytes`, cut into messages under the limit);
* ``["s", partition, store]``: ``{"id", "chunks", "upto"}``, the store's current checkpoint,
  written once Kafka has all its chunks: the shard holds every delta of the partition below
  offset ``upto`` (and, through its high-water marks, knows which parts after it it has);
* ``["m", partition]``: ``{"upto", "clock", "stores"}``, written after a round that
  checkpointed every store of the partition, as of the offset ``upto`` where the round began:
  every store with a delta below ``upto`` has a store record, so reading the deltas from
  ``upto`` on restores every shard exactly; ``clock`` is the event clock at that offset.

A crash between records leaves the previous store record pointing at chunks that are still
there (chunks of an older checkpoint are deleted, with tombstones, only after the store record
that replaces it); chunks that no store record names are deleted when the partition is next
read. A store record whose chunks are missing is an error: that partition is refused.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.connections import KafkaTarget, kafka_client_options
from streams.logs import get_logger
from streams.worker.acks import acknowledged
from streams.worker.log_reader import read_to_end

log = get_logger(__name__)

#: the largest chunk of a checkpoint (Kafka's default message limit is 1 MiB)
CHUNK_BYTES = 900_000


class CheckpointError(Exception):
    """A checkpoint cannot be read back whole: its partition is refused, never folded into wrong numbers."""


@dataclass
class Restored:
    """What the checkpoint topic holds for one deltas partition."""

    #: the manifest's offset: the deltas from there on restore every shard (``None``: no manifest)
    upto: int | None = None
    #: the event clock as of ``upto``
    clock_ms: int | None = None
    #: store -> (its checkpoint's offset, the shard's bytes)
    shards: dict[str, tuple[int, bytes]] = field(default_factory=dict)


def _key(*parts: object) -> bytes:
    return orjson.dumps(list(parts))


class Checkpoints:
    """Writes and reads the checkpoints of one worker's deltas partitions."""

    def __init__(self, producer: Any, kafka: KafkaTarget, topic: str) -> None:
        #: an aiokafka producer (the worker's own); tombstones need a value of ``None``, which it sends as is
        self._producer = producer
        self.kafka = kafka
        self.topic = topic
        #: (partition, store) -> its store record as last written or read
        self.records: dict[tuple[int, str], dict[str, Any]] = {}

    async def _send(self, key: bytes, value: bytes | None, partition: int) -> asyncio.Future[Any]:
        producer = self._producer() if callable(self._producer) else self._producer
        future: asyncio.Future[Any] = await producer.send(self.topic, value=value, key=key, partition=partition)
        return future

    async def write_store(self, partition: int, store_id: str, data: bytes | None, upto: int) -> None:
        """Checkpoint a store's shard as of deltas offset ``upto``.

        ``data`` ``None``: the shard has not changed since its last checkpoint, which is made to
        stand for ``upto`` too (only the store record is written).
        """
        previous = self.records.get((partition, store_id))
        if data is None and previous is not None:
            record = {**previous, "upto": upto}
            await (await self._send(_key("s", partition, store_id), orjson.dumps(record), partition))
            self.records[(partition, store_id)] = record
            return
        if data is None:
            raise ValueError(f"store {store_id!r} has no checkpoint to stand for offset {upto}")
        checkpoint_id = f"{upto}-{uuid.uuid4().hex[:12]}"
        pieces = [data[start:start + CHUNK_BYTES] for start in range(0, len(data), CHUNK_BYTES)] or [b""]
        sent = [
            await self._send(_key("c", partition, store_id, checkpoint_id, index), piece, partition)
            for index, piece in enumerate(pieces)
        ]
        await acknowledged(sent)
        record = {"id": checkpoint_id, "chunks": len(pieces), "upto": upto}
        await (await self._send(_key("s", partition, store_id), orjson.dumps(record), partition))
        self.records[(partition, store_id)] = record
        if previous is not None:
            for index in range(previous["chunks"]):
                await self._send(_key("c", partition, store_id, previous["id"], index), None, partition)

    async def write_manifest(self, partition: int, upto: int, clock_ms: int | None, stores: list[str]) -> None:
        """Declare that every store of the partition has a checkpoint at or after ``upto``."""
        value = orjson.dumps({"upto": upto, "clock": clock_ms, "stores": stores})
        await (await self._send(_key("m", partition), value, partition))

    async def read(self, partitions: list[int]) -> dict[int, Restored]:
        """The checkpoints of ``partitions``; chunks no store record names are deleted.

        Raises :class:`CheckpointError` when a store record names chunks that are not there.
        """
        latest: dict[bytes, bytes] = {}
        tps = [TopicPartition(self.topic, partition) for partition in partitions]
        if tps:
            consumer = AIOKafkaConsumer(
                **kafka_client_options(self.kafka),
                enable_auto_commit=False,
                max_partition_fetch_bytes=8 * 1024 * 1024,
                fetch_max_bytes=64 * 1024 * 1024,
            )
            await consumer.start()
            try:
                consumer.assign(tps)
                ends = await consumer.end_offsets(tps)
                starts = await consumer.beginning_offsets(tps)
                async for record in read_to_end(consumer, starts, ends, max_records=1000):
                    if record.key is None:
                        continue
                    if record.value is None:
                        latest.pop(record.key, None)
                    else:
                        latest[record.key] = record.value
            finally:
                await consumer.stop()
        return await self._assemble(partitions, latest)

    async def _assemble(self, partitions: list[int], latest: dict[bytes, bytes]) -> dict[int, Restored]:
        restored = {partition: Restored() for partition in partitions}
        chunks: dict[tuple[int, str, str], dict[int, bytes]] = {}
        for key, value in latest.items():
            parts = orjson.loads(key)
            kind, partition = parts[0], parts[1]
            if partition not in restored:
                continue
            if kind == "m":
                manifest = orjson.loads(value)
                restored[partition].upto = manifest["upto"]
                restored[partition].clock_ms = manifest["clock"]
            elif kind == "s":
                self.records[(partition, parts[2])] = orjson.loads(value)
            elif kind == "c":
                chunks.setdefault((partition, parts[2], parts[3]), {})[parts[4]] = value
        for (partition, store_id), record in list(self.records.items()):
            if partition not in restored:
                continue
            pieces = chunks.pop((partition, store_id, record["id"]), {})
            if len(pieces) != record["chunks"]:
                raise CheckpointError(
                    f"checkpoint {record['id']} of store {store_id!r} (deltas partition {partition}) has "
                    f"{len(pieces)} of its {record['chunks']} chunks"
                )
            data = b"".join(pieces[index] for index in range(record["chunks"]))
            restored[partition].shards[store_id] = (record["upto"], data)
        for (partition, store_id, checkpoint_id), pieces in chunks.items():  # named by no store record
            for index in pieces:
                await self._send(_key("c", partition, store_id, checkpoint_id, index), None, partition)
        return restored
