"""Faust wiring of the metric pipeline: topics, tables, agents, timers. Thin: the logic is in ``streams.stages``.

::

    input topics --ingest--> by-store --gate--> by-customer --facts--> deltas --aggregate--> loyalty-metrics + Redis
         \\____________________\\_______________________________________________________--> loyalty-dead-letters

Ingest is not a Faust agent: the input topics, the only ones that may carry
one event per message, are read in bulk by ``streams.input_reader`` (its own
consumer group; offsets committed once the routed messages are acknowledged).
Every internal message is a packed batch (Faust costs per message). Each
Faust stage reads batches with ``take_events`` and writes each table key once
per batch. Tables route keys with our own partitioner (``streams.wire.route``),
the same that routes the stage's input, so they never need Faust's "current
event" (faust-streaming issue 497) and recover where their input lives: a
worker keeps only the changelog partitions of its input partitions after a
rebalance.

Idempotency, so that at-least-once delivery counts nothing twice:

* the facts stage remembers applied event ids in the customer's own record;
  it sends its deltas and waits for Kafka's acknowledgement *before* writing
  the facts, so facts are never ahead of the deltas they caused;
* every delta message part carries (input partition, offset, part); the
  aggregation has no table: the deltas topic (kept for ever) is its log, and
  a worker that gets a deltas partition folds it from the start
  (``rebuild_shards``); each store shard keeps, per input partition, the
  last part applied, so a part sent or read again is skipped. Writing state
  per touched bucket instead cost a changelog record per bucket and batch;
* a stage waits for Kafka to acknowledge its table writes before its batch
  is acked (``changelog_written``), so no committed offset is ahead of the
  table state that a worker taking the partition over recovers.

The clock (``LOYALTY_CLOCK``): ``wall`` is the wall clock; ``event`` is the
latest event time seen, which the facts stage broadcasts as a watermark to
every aggregation partition, so that a store whose partition sees no new
events still advances to the global "now".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import faust
import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from metrics.customer import CustomerFacts
from metrics.events import INPUT_TOPICS
from metrics.timegrid import Grid
from streams.admin import KEPT_FOREVER
from streams.input_reader import read_inputs
from streams.logging import get_logger
from streams.rocks import RoutedRocksDBStore
from streams.settings import Settings
from streams.sinks import RedisSink, dumps, snapshot_payload
from streams.stages import (
    CustomerOutput,
    CustomerStage,
    GateStage,
    IngestStage,
    Routed,
    StoreShard,
    apply_part,
    delta_messages,
)
from streams.wire import pack, pack_chunks, route, unpack

log = get_logger(__name__)

#: customers the facts stage keeps in memory between batches (see ``CustomerStage``)
CUSTOMER_CACHE_SIZE = 20_000

#: messages per processing batch, and how long a batch may wait to fill
BATCH_MAX = 4000
BATCH_WITHIN_S = 0.01
#: the facts stage writes a batch in slices of about this many events (the customers it holds
#: in memory until the write); internal messages are packed, so a batch of messages can hold many
FACTS_FLUSH_EVENTS = 20_000


def wall_ms() -> int:
    """The wall clock in epoch milliseconds."""
    return time.time_ns() // 1_000_000


def grid_of(settings: Settings) -> Grid:
    """The time grid of the settings."""
    windows = tuple(settings.window_ms.values())
    return Grid(settings.bucket_ms, settings.active_horizon_ms, windows, settings.dedupe_ttl_ms)


#: RocksDB sizes per database (one per table and partition): Faust's defaults (64 MiB write
#: buffers, a 2 GiB block cache each) add up to gigabytes over a few tables of 8 partitions
ROCKSDB_OPTIONS = {
    "write_buffer_size": 4 * 1024 * 1024,
    "max_write_buffer_number": 2,
    "target_file_size_base": 16 * 1024 * 1024,
    "block_cache_size": 8 * 1024 * 1024,
    "block_cache_compressed_size": 1024 * 1024,
}


def make_table(app: faust.App, name: str, partitions: int) -> Any:
    """A bytes -> bytes table whose keys are routed by :func:`streams.wire.route`.

    The changelog partition of a key must be the partition of the stage input
    that carries the key: a worker recovers (and keeps, with the memory store)
    only the changelog partitions of the input partitions assigned to it.
    """

    class RoutedTable(faust.Table):  # type: ignore[type-arg]
        #: changelog records sent but not yet acknowledged by Kafka (see :func:`changelog_written`)
        unconfirmed: list[asyncio.Future[Any]]

        def partition_for_key(self, key: Any) -> int:
            text = key.decode() if isinstance(key, bytes) else str(key)
            return route(text, partitions)

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

        def send_changelog(self, *args: Any, **kwargs: Any) -> Any:
            future = super().send_changelog(*args, **kwargs)
            self.unconfirmed.append(future)
            return future

        async def write_many(self, items: dict[bytes, bytes]) -> None:
            """Set many keys; their changelog records go as one record batch per partition.

            ``table[key] = value`` queues one changelog record per key through Faust's
            producer buffer, callbacks and a RocksDB offset write each: a fifth of a
            live worker's time when every event touches a customer. Here the store is
            written directly, each partition's records are appended to one aiokafka
            record batch, and the changelog offset is persisted once per batch. The
            records are those Faust would send, so its recovery reads them alike.
            """
            # Faust's own aiokafka producer (the app does not use the threaded one)
            producer = app.producer._ensure_producer()  # type: ignore[attr-defined]
            topic = self.changelog_topic.get_topic_name()
            by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
            for key, value in items.items():
                self.data[key] = value
                by_partition.setdefault(self.partition_for_key(key), []).append((key, value))
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
    )
    table.unconfirmed = []
    return app.tables.add(table)


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
            await asyncio.gather(*table.unconfirmed)
            table.unconfirmed = [future for future in table.unconfirmed if not future.done()]


class Pipeline:
    """State shared by the agents and timers of one worker."""

    def __init__(self, app: faust.App, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.grid = grid_of(settings)
        self.partitions = settings.partitions
        self.event_clock = settings.clock == "event"
        self.clock_ms: int | None = None
        self.wall_high_ms = 0
        self.broadcast_ms: int | None = None
        self.shards: dict[str, StoreShard] = {}
        self.needs_restore = True
        #: incremented on every partition assignment: a rebuild that overlapped one must run again
        self.assignment_generation = 0
        self.last_emitted_bucket: dict[str, int] = {}
        self.counters: dict[str, int] = {}
        self.sink: RedisSink | None = None
        self.window_names = list(settings.window_ms)

    def count(self, name: str, amount: int = 1) -> None:
        """Add to a health counter (flushed to Redis every second)."""
        if amount:
            self.counters[name] = self.counters.get(name, 0) + amount

    def now_ms(self) -> int | None:
        """The clock: wall time, or the latest event time seen (``None`` before any); never back.

        The shards fold what no read as of "now" or later needs, so "now" must
        not step back, not even when the system clock does.
        """
        if self.event_clock:
            return self.clock_ms
        self.wall_high_ms = max(self.wall_high_ms, wall_ms())
        return self.wall_high_ms

    def advance(self, time_ms: int | None) -> None:
        """Move the event clock forward."""
        if time_ms is not None and (self.clock_ms is None or time_ms > self.clock_ms):
            self.clock_ms = time_ms


def register_metrics_pipeline(app: faust.App, settings: Settings) -> Pipeline:
    """Declare the topics, tables, agents and timers of the metric pipeline on ``app``."""
    pipeline = Pipeline(app, settings)
    partitions = settings.partitions
    prefix = settings.topic_prefix
    internal = f"{settings.app_id}-"

    def topic(name: str, **options: Any) -> Any:
        return app.topic(
            settings.topic(name),
            key_serializer="raw",
            value_serializer="raw",
            partitions=partitions,
            internal=True,
            **options,
        )

    by_store = topic(internal + "events-by-store")
    by_customer = topic(internal + "events-by-customer")
    # the deltas are the aggregation's log (it rebuilds from them): kept for ever
    deltas = topic(internal + "deltas", config=dict(KEPT_FOREVER["deltas"]))
    output = topic("loyalty-metrics", compacting=True)
    dead_letters = topic("loyalty-dead-letters")

    # Faust creates only the topics it consumes; a topic the broker auto-creates on the first send
    # has one partition and no compaction, and a send racing that creation can wait for its
    # metadata for the whole producer request timeout, stalling the agent and every commit.
    declared: list[asyncio.Task[None]] = []

    async def declare_outputs() -> None:
        if not declared:
            async def declare() -> None:
                for sink_topic in (output, dead_letters):
                    await sink_topic.maybe_declare()

            declared.append(asyncio.ensure_future(declare()))
        await asyncio.shield(declared[0])

    currencies = make_table(app, "store-currency", partitions)
    held = make_table(app, "held-events", partitions)
    facts_table = make_table(app, "customer-facts", partitions)

    ingest_stage = IngestStage(partitions, settings.max_future_skew_ms)
    gate_stage = GateStage(partitions)
    customer_stage = CustomerStage(pipeline.grid, cache_size=CUSTOMER_CACHE_SIZE)

    async def send_routed(target: Any, routed: Routed, wait: bool = False) -> None:
        """Send packed items and dead letters; with ``wait``, until Kafka has acknowledged them all."""
        sent = []
        for partition, items in routed.by_partition.items():
            for chunk in pack_chunks(items):
                sent.append(await target.send(value=chunk, partition=partition))
        for letter in routed.dead_letters:
            sent.append(await dead_letters.send(value=orjson.dumps(letter)))
        pipeline.count("dead_letters", len(routed.dead_letters))
        if wait and sent:
            await asyncio.gather(*sent)

    input_topics = [settings.topic(name) for name in INPUT_TOPICS]

    async def ingest(records: Sequence[ConsumerRecord]) -> None:
        """Validate one fetch of input records and route its events by store (acknowledged by Kafka)."""
        await declare_outputs()
        routed = Routed()
        now = wall_ms()
        for record in records:
            topic_name = record.topic
            name = topic_name[len(prefix):] if topic_name.startswith(prefix) else topic_name
            ingest_stage.process(name, (topic_name, record.partition, record.offset), record.value, now, routed)
        pipeline.count("events_received", routed.accepted + len(routed.dead_letters))
        await send_routed(by_store, routed, wait=True)

    @app.task  # type: ignore[untyped-decorator]
    async def read_input_topics() -> None:
        # after the worker is ready; Faust cancels it on shutdown
        await read_inputs(settings.kafka_bootstrap_servers, input_topics, internal + "ingest", ingest)

    class CurrencyView:
        """The currency table as ``store -> currency`` strings."""

        def get(self, store_id: str) -> str | None:
            value = currencies.get(store_id.encode())
            return None if value is None else bytes(value).decode()

        def __setitem__(self, store_id: str, currency: str) -> None:
            currencies[store_id.encode()] = currency.encode()

    currency_view = CurrencyView()

    @app.agent(by_store, name=internal + "gate")
    async def gate(stream: Any) -> None:
        await declare_outputs()
        async for batch in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            routed = Routed()
            now = None if pipeline.event_clock else wall_ms()
            newly_held: dict[str, list[Any]] = {}
            for event in batch:
                pending: list[Any] = []
                gate_stage.process(unpack(event.value), currency_view, now, pending, routed)  # type: ignore[arg-type]
                for item in pending:
                    newly_held.setdefault(item[0][3], []).append(item)
            for store_id, items in newly_held.items():
                key = store_id.encode()
                previous = held.get(key)
                held[key] = pack((unpack(previous) if previous else []) + items)
            await send_routed(by_customer, routed)
            await changelog_written(currencies, held)

    @app.timer(1.0, name=internal + "release-held")  # type: ignore[untyped-decorator]
    async def release_held() -> None:
        if pipeline.event_clock:
            return
        await declare_outputs()
        now = wall_ms()
        routed = Routed()
        for key in list(held.keys()):
            value = held.get(key)
            if not value:
                continue
            keep = gate_stage.release(unpack(value), now, routed)
            if keep:
                held[key] = pack(keep)
            else:
                del held[key]
        await send_routed(by_customer, routed)
        await changelog_written(held)

    def load_facts(key: str) -> CustomerFacts | None:
        value = facts_table.get(key.encode())
        return None if value is None else CustomerFacts.from_record(orjson.loads(value))

    @app.agent(by_customer, name=internal + "facts")
    async def facts(stream: Any) -> None:
        async for batch in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            cache: dict[str, CustomerFacts] = {}
            outgoing: dict[int, list[dict[str, Any]]] = {}
            held_events = 0
            for event in batch:
                items = unpack(event.value)
                if pipeline.event_clock:
                    pipeline.advance(max((item[2] for item in items), default=None))
                now = pipeline.now_ms()
                if now is None:
                    continue
                output = CustomerOutput(facts=cache)
                customer_stage.process(items, load_facts, now, output, wall_ms())
                pipeline.count("events_applied", output.applied)
                pipeline.count("duplicates", output.duplicates)
                source = (event.message.partition, event.message.offset)
                for partition, parts in delta_messages(output, source, partitions).items():
                    outgoing.setdefault(partition, []).extend(parts)
                held_events += len(items)
                if held_events >= FACTS_FLUSH_EVENTS:
                    # a long batch is written in slices: the customers it holds bound the worker's memory
                    await write_facts(outgoing, cache)
                    outgoing, cache, held_events = {}, {}, 0
            await write_facts(outgoing, cache)

    async def write_facts(outgoing: dict[int, list[dict[str, Any]]], cache: dict[str, CustomerFacts]) -> None:
        """Send the deltas, then write the facts that caused them, then broadcast the event clock."""
        acks = []
        # one message per partition carries the parts of the whole batch (Faust costs per message);
        # each part keeps its own source, so idempotency does not depend on how batches formed
        for partition, parts in outgoing.items():
            for chunk in pack_chunks(parts):
                acks.append(await deltas.send(value=chunk, partition=partition))
        # facts only after Kafka has the deltas: a crash may replay, never lose
        if acks:
            await asyncio.gather(*acks)
        await facts_table.write_many(
            {key.encode(): orjson.dumps(customer.to_record()) for key, customer in cache.items()}
        )
        await changelog_written(facts_table)
        clock = pipeline.clock_ms
        if pipeline.event_clock and clock is not None and (
            pipeline.broadcast_ms is None or clock > pipeline.broadcast_ms
        ):
            pipeline.broadcast_ms = clock
            watermark = pack({"wm": clock})
            for partition in range(partitions):
                await deltas.send(value=watermark, partition=partition)

    def my_partitions() -> set[int]:
        return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == deltas.get_topic_name()}

    def apply_deltas(message: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Apply a deltas message: a watermark, or a list of parts (each with its own source)."""
        if isinstance(message, list):
            for part in message:
                pipeline.advance(part.get("t"))
                apply_part(pipeline.shards, part)
        else:
            pipeline.advance(message["wm"])

    async def rebuild_shards() -> None:
        """The shards of this worker's deltas partitions, folded from the start of each partition."""
        generation = pipeline.assignment_generation
        mine = sorted(my_partitions())
        pipeline.shards = {}
        pipeline.last_emitted_bucket = {}
        started = time.monotonic()
        applied = 0
        partitions_read = [TopicPartition(deltas.get_topic_name(), p) for p in mine]
        if partitions_read:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=settings.kafka_bootstrap_servers,
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
                                apply_deltas(unpack(record.value))
                                applied += 1
                        if records and records[-1].offset + 1 >= ends[tp]:
                            remaining.discard(tp)
            finally:
                await consumer.stop()
        pipeline.needs_restore = pipeline.assignment_generation != generation
        log.info("aggregate.rebuilt", stores=len(pipeline.shards), partitions=mine, messages=applied,
                 seconds=round(time.monotonic() - started, 3))

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def on_assigned(app: faust.App, assigned: Any, **_: Any) -> None:
        pipeline.assignment_generation += 1
        pipeline.needs_restore = True
        # another worker may have changed customers' facts while their partitions were elsewhere
        customer_stage.forget()

    @app.agent(deltas, name=internal + "aggregate")
    async def aggregate(stream: Any) -> None:
        async for batch in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            await ensure_rebuilt()
            for event in batch:
                apply_deltas(unpack(event.value))

    rebuild_lock = asyncio.Lock()

    async def ensure_rebuilt() -> None:
        """Rebuild the shards after an assignment, once, whoever asks first (the agent or the emit timer)."""
        async with rebuild_lock:
            while pipeline.needs_restore and not app.rebalancing:
                await rebuild_shards()

    async def emit(now: int) -> None:
        grid = pipeline.grid
        as_of_bucket = grid.bucket(now)
        await declare_outputs()
        if pipeline.sink is None:
            pipeline.sink = RedisSink(settings.redis_url)
        for store_id, shard in list(pipeline.shards.items()):
            if not shard.changed and pipeline.last_emitted_bucket.get(store_id) == as_of_bucket:
                continue
            # every window from one state, computed before any await; deltas that the aggregate
            # applies while this emit awaits Kafka and Redis mark the shard changed again
            shard.changed = False
            currency = shard.currency()
            snapshots = [
                (window_name, shard.metrics(grid, window, as_of_bucket))
                for window_name, window in zip(pipeline.window_names, grid.windows, strict=True)
            ]
            try:
                for window_name, metrics in snapshots:
                    payload = snapshot_payload(store_id, window_name, now, currency, metrics)
                    encoded = dumps(payload)
                    await output.send(key=f"{store_id}|{window_name}".encode(), value=encoded)
                    await pipeline.sink.write(payload, encoded)
            except (TimeoutError, OSError, ConnectionError) as error:  # Redis down: retry next tick
                shard.changed = True
                log.warning("emit.failed", store=store_id, error=str(error))
                return
            except Exception as error:  # a Redis error of any kind pauses publishing
                shard.changed = True
                if type(error).__module__.startswith("redis"):
                    log.warning("emit.failed", store=store_id, error=str(error))
                    return
                raise
            pipeline.last_emitted_bucket[store_id] = as_of_bucket
            pipeline.count("snapshots", len(grid.windows))
        for shard in pipeline.shards.values():
            shard.fold(as_of_bucket, grid.longest)

    @app.timer(settings.emit_interval_ms / 1000, name=internal + "emit")  # type: ignore[untyped-decorator]
    async def emit_timer() -> None:
        # a worker that got partitions whose deltas stopped flowing must still rebuild and publish them
        await ensure_rebuilt()
        if pipeline.needs_restore or app.rebalancing:
            return
        now = pipeline.now_ms()
        if now is None:
            return
        await emit(now)
        await flush_counters()

    async def flush_counters() -> None:
        if pipeline.sink is None or not pipeline.counters:
            return
        counters, pipeline.counters = pipeline.counters, {}
        try:
            for name, amount in counters.items():
                await pipeline.sink.count(name, amount)
        except Exception:  # health counters are best effort; kept for the next flush
            for name, amount in counters.items():
                pipeline.count(name, amount)

    app.pipeline = pipeline  # type: ignore[attr-defined]
    return pipeline
