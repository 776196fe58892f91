"""The worker's tables: bytes -> bytes, keys routed by :func:`streams.worker.wire.route`, changelog written in bulk.

faust-streaming's RocksDB store keeps one database per changelog partition and
picks the database of a write from the partition of the event being processed
(``current_event()``): it asserts there is one (issue 497), so writes from a
``take`` batch or a timer crash, and a write would land in the database of the
*input* partition rather than of the key's changelog partition. Our tables
route every key themselves (``partition_for_key``), so :class:`RoutedRocksDBStore`
asks the table, for reads, writes and deletes alike: a key lives in exactly one
database, the one its changelog partition recovers into.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import faust
import rocksdict
from faust.stores.rocksdb import RocksDBOptions, Store

from streams.stages.facts import routing_key
from streams.worker.acks import acknowledged
from streams.worker.topics import COMPACTED_SEGMENT_CONFIG
from streams.worker.wire import kept, route

#: RocksDB sizes per database (one per table and partition): Faust's defaults (64 MiB write
#: buffers, a 2 GiB block cache each) add up to gigabytes over a few tables of 8 partitions
ROCKSDB_OPTIONS = {
    "write_buffer_size": 4 * 1024 * 1024,
    "max_write_buffer_number": 2,
    "target_file_size_base": 16 * 1024 * 1024,
}
#: the one block cache of every database of the worker (index and filter blocks included, so that
#: they do not grow with the data), and the bound on all their memtables together: per database,
#: a cache and memtables would multiply by tables times partitions. A write waits while the
#: memtables are over the bound (the manager's stall): unlogged writes outrun the background
#: flushes, and without the stall the bound is only a trigger to flush
SHARED_BLOCK_CACHE_BYTES = 32 * 1024 * 1024
SHARED_MEMTABLE_BYTES = 32 * 1024 * 1024


#: the worker's tables (their changelogs are ``<app id>-<name>-changelog``)
TABLE_NAMES = ("store-currency", "store-channels", "held-events", "customer-facts")


def make_table(app: faust.App, name: str, partitions: int) -> Any:
    """A bytes -> bytes table whose keys are routed by :func:`streams.worker.wire.route`.

    The changelog partition of a key must be the partition of the stage input
    that carries the key: a worker recovers (and keeps, with the memory store)
    only the changelog partitions of the input partitions assigned to it.
    """

    class RoutedTable(faust.Table):  # type: ignore[type-arg]
        #: changelog records sent but not yet acknowledged by Kafka (see :func:`changelog_written`)
        unconfirmed: list[asyncio.Future[Any]]

        def partition_for_key(self, key: Any) -> int:
            text = key.decode() if isinstance(key, bytes) else str(key)
            # a customer's pages live in the customer's partition
            return route(routing_key(text), partitions)

        def _new_store_by_url(self, url: Any) -> Any:
            if str(url).startswith("rocksdb:"):
                return RoutedRocksDBStore(
                    url,
                    self.app,
                    self,
                    table_name=self.name,
                    key_type=self.key_type,
                    key_serializer=self.key_serializer,
                    value_serializer=self.value_serializer,
                    value_type=self.value_type,
                    loop=self.loop,
                    options=self.options,
                )
            return super()._new_store_by_url(url)

        def get_raw(self, key: bytes) -> bytes | None:
            """The value of ``key`` (``None`` when missing) in one store lookup.

            ``table.get(key)`` asks the store whether it holds the key, then for its value, each time
            encoding the key through Faust's serializer registry: two RocksDB reads and most of the
            cost of a facts-stage load. The value is the same (bytes in, bytes out); Faust's sensors
            do not count these reads.
            """
            store = self.data
            if isinstance(store, RoutedRocksDBStore):
                return store._get(key)
            value: bytes | None = store.get(key)  # the memory store: a dict of bytes
            return value

        def get_many_raw(self, keys: list[bytes]) -> list[bytes | None]:
            """The values of ``keys`` (``None`` when missing), in one store lookup per changelog partition."""
            store = self.data
            if not isinstance(store, RoutedRocksDBStore):
                return [store.get(key) for key in keys]  # the memory store: a dict of bytes
            by_partition: dict[int, list[bytes]] = {}
            for key in keys:
                by_partition.setdefault(self.partition_for_key(key), []).append(key)
            found: dict[bytes, bytes | None] = {}
            for partition, partition_keys in by_partition.items():
                found.update(store.get_many(partition, partition_keys))
            return [found[key] for key in keys]

        def send_changelog(self, *args: Any, **kwargs: Any) -> Any:
            future = super().send_changelog(*args, **kwargs)
            self.unconfirmed.append(future)
            return future

        async def write_many(self, items: dict[bytes, bytes | None]) -> None:
            """Set (or, with ``None``, delete) many keys, in order; their changelog records go as
            one record batch per partition.

            ``table[key] = value`` queues one changelog record per key through Faust's
            producer buffer, callbacks and a RocksDB offset write each, which dominates a
            busy worker when every event touches a customer. Here the store is
            written directly, each partition's records are appended to one aiokafka
            record batch, and the changelog offset is persisted once per batch. The
            records are those Faust would send, so its recovery reads them alike.
            """
            # Faust's own aiokafka producer (the app does not use the threaded one)
            producer = app.producer._ensure_producer()  # type: ignore[attr-defined]
            topic = self.changelog_topic.get_topic_name()
            by_partition: dict[int, list[tuple[bytes, bytes | None]]] = {}
            for key, value in items.items():
                by_partition.setdefault(self.partition_for_key(key), []).append((key, value))
            store = self.data
            if isinstance(store, RoutedRocksDBStore):
                # bytes as they are (the raw codec's), without the serializer registry each time
                for partition, records in by_partition.items():
                    store.write_many(partition, records)
            else:
                for key, value in items.items():
                    if value is None:
                        store.pop(key, None)
                    else:
                        store[key] = kept(value)  # the memory store keeps the very object
            for partition, records in by_partition.items():
                batch = producer.create_batch()
                for key, value in records:
                    if batch.append(key=key, value=value, timestamp=None) is not None:
                        continue
                    if batch.record_count():  # full: send it and start another
                        self.unconfirmed.append(await self._send_batch(producer, batch, topic, partition))
                        batch = producer.create_batch()
                        if batch.append(key=key, value=value, timestamp=None) is not None:
                            continue
                    # larger than a whole batch: Faust's own path sends it
                    self.send_changelog(partition, key, value)
                if batch.record_count():
                    self.unconfirmed.append(await self._send_batch(producer, batch, topic, partition))

        async def _send_batch(self, producer: Any, batch: Any, topic: str, partition: int) -> asyncio.Future[Any]:
            sent: asyncio.Future[Any] = await producer.send_batch(batch, topic, partition=partition)

            def persist(future: asyncio.Future[Any]) -> None:
                # the batch's first offset: a recovery from it reads at most this batch again
                if not future.cancelled() and future.exception() is None:
                    metadata = future.result()
                    self.data.set_persisted_offset(metadata.topic_partition, metadata.offset)

            sent.add_done_callback(persist)
            return sent

    table = RoutedTable(
        app,
        name=name,
        default=None,
        beacon=app.tables.beacon,
        partitions=partitions,
        # key_type/value_type bytes make Faust use the raw codec for the changelog *and* its recovery
        key_type=bytes,
        value_type=bytes,
        schema=faust.Schema(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"),
        options=dict(ROCKSDB_OPTIONS),
        # compaction runs on closed segments only: with Kafka's 1 GiB default a changelog keeps up
        # to a gigabyte of superseded records per partition before the cleaner touches them
        extra_topic_configs=dict(COMPACTED_SEGMENT_CONFIG),
    )
    table.unconfirmed = []
    return app.tables.add(table)


def flush_idle(*tables: Any) -> None:
    """Flush the databases of each RocksDB table whose writes stopped a tick ago (see :class:`IdleFlush`)."""
    for table in tables:
        store = table.data
        if isinstance(store, RoutedRocksDBStore):
            store.idle_flush.tick(store.databases())


async def changelog_written(*tables: Any) -> None:
    """Wait until Kafka has every changelog record the tables sent so far.

    A table write only queues its changelog record in Faust's producer buffer,
    and Faust commits the source offsets of acked events after a producer
    flush that gives up on a buffer that does not drain within 0.1 s. So a
    stage awaits this before its batch is acked: an offset is never committed
    ahead of the table state it produced, and a worker that takes the
    partition over in a rebalance recovers that state from the changelog
    instead of skipping the events that made it.
    """
    for table in tables:
        while table.unconfirmed:
            # another agent or timer may await the same records: keep them listed until done
            await acknowledged(table.unconfirmed)
            table.unconfirmed = [future for future in table.unconfirmed if not future.done()]


def unlogged_writes() -> Any:
    """RocksDB write options without the write-ahead log (see :meth:`SharedMemoryOptions.open`)."""
    options = rocksdict.WriteOptions()
    # an attribute in the binding (its type stub declares a method)
    options.disable_wal = True  # type: ignore[method-assign, assignment]
    return options


def write_batch(database: Any, items: Iterable[tuple[bytes, bytes | None]]) -> None:
    """Write ``items`` (``None``: delete) to a table ``database`` in order, as one batch, without the log.

    A batch is applied whole or not at all: a customer's pages and head land together. Its write
    options are explicit: the binding does not document whether a batch takes the database's.
    """
    batch = rocksdict.WriteBatch(raw_mode=True)
    for key, value in items:
        if value is None:
            batch.delete(key)
        else:
            batch.put(key, value)
    database.write(batch, unlogged_writes())


class SharedMemoryOptions(RocksDBOptions):
    """Faust's RocksDB options, with one block cache and one memtable budget for every database of the process."""

    _shared: tuple[Any, Any] | None = None

    @classmethod
    def shared(cls) -> tuple[Any, Any]:
        """The process's block cache and write buffer manager (made at the first database opened)."""
        if cls._shared is None:
            cls._shared = (rocksdict.Cache(SHARED_BLOCK_CACHE_BYTES),
                           rocksdict.WriteBufferManager(SHARED_MEMTABLE_BYTES, True))
        return cls._shared

    def open(self, path: Any, *, read_only: bool = False) -> Any:
        """Open a database whose writes skip RocksDB's write-ahead log.

        The changelog topic, not the local database, is what a table recovers from: a worker
        replays it from the offset the database holds. Without the log, a killed worker loses
        the writes since the last memtable flush, the offset among them, and flushes are whole
        memtables in write order, so what survives is a prefix of the writes whose offset
        never claims more than it holds; recovery then replays a little more of the changelog.
        A database that is closed or dropped flushes first (RocksDB does for unlogged writes).
        The log cost a ``write`` system call per record.
        """
        db = super().open(path, read_only=read_only)
        if self.use_rocksdict:
            db.set_write_options(unlogged_writes())
        return db

    def as_options(self) -> Any:
        if not self.use_rocksdict:
            return super().as_options()
        cache, memtables = self.shared()
        options = rocksdict.Options(raw_mode=True)
        options.create_if_missing(True)
        if self.max_open_files is not None:
            options.set_max_open_files(self.max_open_files)
        options.set_write_buffer_size(self.write_buffer_size)
        options.set_target_file_size_base(self.target_file_size_base)
        options.set_max_write_buffer_number(self.max_write_buffer_number)
        options.set_write_buffer_manager(memtables)
        table = rocksdict.BlockBasedOptions()
        table.set_bloom_filter(self.bloom_filter_size, block_based=True)
        table.set_block_cache(cache)
        table.set_cache_index_and_filter_blocks(True)
        table.set_pin_l0_filter_and_index_blocks_in_cache(True)
        table.set_index_type(rocksdict.BlockBasedIndexType.binary_search())
        options.set_block_based_table_factory(table)
        return options


class IdleFlush:
    """Flushes a store's databases once its writes have stopped for a whole tick.

    The databases write without RocksDB's log (see :meth:`SharedMemoryOptions.open`): a worker
    killed with writes still in memtables replays the changelog written since the last flush at
    its restart. Under load the memtables fill and flush by themselves; a worker that goes quiet
    would keep its last writes unflushed for ever, so it flushes them (in the background) one
    quiet tick later, and a worker killed while idle replays nothing of them.
    """

    def __init__(self) -> None:
        #: writes so far (the store counts them)
        self.writes = 0
        self._seen = 0
        self._flushed = 0

    def tick(self, databases: Iterable[Any]) -> bool:
        """Called once a tick: flush if there were writes and none since the last tick; whether it flushed."""
        writes = self.writes
        if writes == self._flushed:
            return False
        if writes != self._seen:
            self._seen = writes
            return False
        for database in databases:
            database.flush(False)
        self._flushed = writes
        return True


class RoutedRocksDBStore(Store):
    """RocksDB store of a table with ``partition_for_key`` (one database per changelog partition).

    Its databases share one block cache and one memtable budget (:class:`SharedMemoryOptions`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rocksdb_options = SharedMemoryOptions(**(self.options or {}), use_rocksdict=self.use_rocksdict)
        self.idle_flush = IdleFlush()

    def databases(self) -> list[Any]:
        """The databases open now (one per changelog partition of this worker)."""
        return list(self._dbs.values())

    def _partition(self, key: bytes) -> int:
        partition: Any = self.table.partition_for_key(key)
        return int(partition)

    def _set(self, key: bytes, value: bytes | None) -> None:
        self._db_for_partition(self._partition(key)).put(key, value)
        self.idle_flush.writes += 1

    def _get(self, key: bytes) -> bytes | None:
        value: Any = self._db_for_partition(self._partition(key)).get(key)
        return None if value is None else bytes(value)

    def _del(self, key: bytes) -> None:
        self._db_for_partition(self._partition(key)).delete(key)
        self.idle_flush.writes += 1

    def _contains(self, key: bytes) -> bool:
        return self._get(key) is not None

    def get_many(self, partition: int, keys: Iterable[bytes]) -> dict[bytes, bytes | None]:
        """The value of each of ``keys``, all of changelog ``partition``, in one lookup (``None`` when missing).

        RocksDB's batched read, on keys in sorted order: it walks the index blocks once for all.
        """
        ordered = sorted(set(keys))
        found: list[Any] = self._db_for_partition(partition).get(ordered)
        return {key: None if value is None else bytes(value) for key, value in zip(ordered, found, strict=True)}

    def write_many(self, partition: int, items: list[tuple[bytes, bytes | None]]) -> None:
        """Set (``None``: delete) ``items``, all of changelog ``partition``, in order, as one write batch.

        A batch is applied whole or not at all: a customer's pages and head land together.
        """
        write_batch(self._db_for_partition(partition), items)
        self.idle_flush.writes += len(items)
