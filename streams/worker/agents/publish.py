"""Publication: the emit timer sends every changed store's snapshots to the output topic and Redis.

``*`` is published from partial sums: every worker publishes, for each of its deltas
partitions, the read points of the partition's partial ``*`` (the sum of its stores,
:meth:`metrics.store.StoreAggregate.read_points`) to the one-partition ``star-partials``
topic; the worker that owns the ``*`` store's deltas partition reads them all, and once every
partition's latest partial is as of the same bucket it publishes their sum as ``*``. Read
points add up over disjoint stores, so the sum is exactly the metrics of all stores together.

Redis (or Kafka) may go away at any moment. A failed write pauses publishing (retried with a growing
delay, never stopping the worker), and once Redis answers again every store is published
again, changed or not, so a Redis that came back empty holds every key again. A Redis that
restarted between two emits is noticed by its server run id changing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from faust.exceptions import NotReady

from metrics.catalog import ALL_STORES
from metrics.store import ReadPoints
from streams.connections import kafka_client_options
from streams.logs import get_logger
from streams.sinks.redis_sink import RedisSink
from streams.sinks.snapshots import COHORTS, cohorts_payload, dumps, snapshot_payload
from streams.sinks.webhook import Webhook
from streams.stages.aggregate import StarSampler, StoreShard
from streams.worker.acks import acknowledged
from streams.worker.agents.aggregate import Aggregation
from streams.worker.topology import Topology, run_fixed_rate
from streams.worker.wire import route

log = get_logger(__name__)

#: the first and the longest wait before publishing is tried again after a Redis failure
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 10.0
#: partial ``*`` samples per message to the ``*`` owner (about 300 bytes each)
STAR_SAMPLES_PER_MESSAGE = 500
#: stores whose snapshots an emit computes together and writes to Redis in one round trip: one
#: await for a few stores, and a worker with 10,000 stores still lets the other stages run between
STORES_PER_WRITE = 20


@dataclass(frozen=True)
class StoreSnapshots:
    """A store's snapshots of every window and its cohort matrix, as of one state."""

    store_id: str
    as_of_ms: int
    currency: str | None
    #: (window name, metrics)
    snapshots: list[tuple[str, dict[str, object]]]
    cohorts: dict[str, Any]


def emit_failure(error: Exception, *, stopping: bool) -> str:
    """What an emit that failed with ``error`` does: ``"retry"``, ``"stopping"`` or ``"raise"``.

    Redis or Kafka unreachable, timing out or failing: retry later (the worker goes on). A Kafka
    send refused because the worker is shutting down (Faust stops the producer before it cancels
    the timers, so an emit in flight may meet it stopped): stop quietly, what was not sent is
    still in the outboxes and checkpoints. Anything else is a fault in the worker: raise.
    """
    kafka = isinstance(error, KafkaError | NotReady)
    if kafka and stopping:
        return "stopping"
    if kafka or type(error).__module__.startswith("redis") or isinstance(error, OSError | TimeoutError):
        return "retry"
    return "raise"


class Publisher:
    """Snapshots of the shards that changed (or whose "now" moved to a new bucket), every emit interval."""

    def __init__(self, topology: Topology, aggregation: Aggregation) -> None:
        self.topology = topology
        self.aggregation = aggregation
        self.window_names = list(topology.settings.window_ms)
        #: store -> the bucket of its last published snapshots
        self.last_emitted_bucket: dict[str, int] = {}
        self.redis: RedisSink | None = None
        #: the run id of the Redis server written to; another one means its data may be gone
        self.redis_run_id: str | None = None
        #: after a failure: every store is published again at the next success
        self.republish = False
        self.retry_delay_s = 0.0
        self.retry_at = 0.0
        #: deltas partition -> the bucket of its last published partial ``*``
        self.last_partial_bucket: dict[int, int] = {}
        self.star = StarPartials(topology)
        #: ``*`` alerts: what each partition has announced (upto), and the owner's reader of the samples
        self.samples_announced: dict[int, int] = {}
        self.star_samples = StarSamples(topology)
        settings = topology.settings
        #: the alert webhook's sender (None: no webhook); its task is started by :func:`register`
        self.webhook = (
            Webhook(settings.alert_webhook, settings.alert_webhook_format, topology.health)
            if settings.alert_webhook and settings.alert_config() is not None
            else None
        )

    async def tick(self) -> None:
        """One emit interval: rebuild if needed, publish, flush the health counters."""
        aggregation = self.aggregation
        # a worker that got partitions whose deltas stopped flowing must still rebuild and publish them
        await aggregation.ensure_rebuilt()
        if not aggregation.ready:
            return
        now = self.topology.clock.now_ms()
        if now is None or time.monotonic() < self.retry_at:
            return
        if self.redis is None:
            self.redis = RedisSink(self.topology.settings)
        try:
            await self.check_redis(self.redis)
            await self.emit(now, self.redis)
            try:
                await self.publish_star_samples()
                await self.sample_star()
            except Exception as error:  # `*` alerts must never stop the worker: tried again at the next emit
                log.warning("alerts.star_failed", error=str(error) or type(error).__name__)
            await self.publish_alerts(self.redis)
            await self.publish_partials(now)
            await self.publish_star(now, self.redis)
            await self.topology.health.flush(self.redis)
        except Exception as error:
            outcome = emit_failure(error, stopping=self.topology.app.should_stop)
            if outcome == "raise":
                raise
            if outcome == "stopping":
                log.info("emit.stopped", error=str(error) or type(error).__name__)
                return
            self.retry_delay_s = min(RETRY_MAX_S, max(RETRY_FIRST_S, 2 * self.retry_delay_s))
            self.retry_at = time.monotonic() + self.retry_delay_s
            self.republish = True
            log.warning("emit.failed", error=str(error) or type(error).__name__, retry_in_s=self.retry_delay_s)
            return
        if self.retry_delay_s:
            log.info("emit.resumed")
        self.retry_delay_s = 0.0

    async def check_redis(self, redis: RedisSink) -> None:
        """Publish every store again when the last emit failed or Redis restarted since (its data may be gone)."""
        run_id = await redis.server_run_id()
        if self.redis_run_id is not None and run_id != self.redis_run_id:
            self.republish = True
        self.redis_run_id = run_id
        if self.republish:
            redis.forget_written()
            self.last_emitted_bucket.clear()
            for shard in self.aggregation.shards.values():
                shard.changed = True
            self.star.published = None
            self.republish = False

    async def emit(self, now: int, redis: RedisSink) -> None:
        """Publish the snapshots of every store whose shard changed or whose bucket moved, then fold.

        Stores go in groups of ``STORES_PER_WRITE``, each group's snapshots computed with no await
        in between and written to Redis in one round trip. Each store's snapshot is as of the clock
        read with its state, not as of ``now`` (the tick's): the aggregation applies deltas, moving
        the clock first, while this emit awaits Kafka and Redis, so a snapshot is never labelled
        older than an event it includes.
        """
        topology = self.topology
        grid = topology.grid
        await topology.outputs.declare()
        shards = self.aggregation.shards
        group: list[tuple[StoreShard, int, StoreSnapshots]] = []
        for store_id, shard in list(shards.items()):
            now = max(now, topology.clock.now_ms() or now)
            as_of_bucket = grid.bucket(now)
            if not shard.changed and self.last_emitted_bucket.get(store_id) == as_of_bucket:
                continue
            # every window from one state, computed before any await; deltas that the aggregate
            # applies while this emit awaits Kafka and Redis mark the shard changed again
            shard.changed = False
            snapshots = [
                (window_name, shard.metrics(grid, window, as_of_bucket))
                for window_name, window in zip(self.window_names, grid.windows, strict=True)
            ]
            cohorts = cohorts_payload(store_id, now, shard.cohorts(grid, as_of_bucket))
            group.append((shard, as_of_bucket, StoreSnapshots(store_id, now, shard.currency(), snapshots, cohorts)))
            if len(group) >= STORES_PER_WRITE:
                await self.publish_group(group, redis)
                group = []
        if group:
            await self.publish_group(group, redis)
        as_of_bucket = grid.bucket(now)
        partials = self.aggregation.partials
        for store_id, shard in list(shards.items()):
            fold_bucket = self.fold_bucket(shard, as_of_bucket, partials.get(route(store_id, topology.partitions)))
            if fold_bucket is not None:
                shard.fold(fold_bucket, grid.longest, grid.cohort_reach)

    async def publish_group(self, group: list[tuple[StoreShard, int, StoreSnapshots]], redis: RedisSink) -> None:
        """Publish a group of stores' snapshots (:meth:`publish_stores`) and note them emitted."""
        try:
            await self.publish_stores([snapshots for _, _, snapshots in group], redis)
        except BaseException:
            for shard, _, _ in group:
                shard.changed = True  # published again once Redis answers
            raise
        for _, as_of_bucket, snapshots in group:
            self.last_emitted_bucket[snapshots.store_id] = as_of_bucket
        self.topology.health.count("snapshots", len(group) * len(self.topology.grid.windows))

    async def publish_stores(self, stores: list[StoreSnapshots], redis: RedisSink) -> None:
        """Publish stores' snapshots of every window and their cohort matrices: the output topic, then Redis.

        The output topic gets each (``store|window``, ``store|cohorts``), queued; Redis all of them
        in one transaction (:meth:`streams.sinks.redis_sink.RedisSink.write_stores`).
        """
        outputs = self.topology.outputs
        written = []
        for store in stores:
            store_written: list[tuple[dict[str, Any], bytes]] = []
            for window_name, metrics in store.snapshots:
                payload = snapshot_payload(store.store_id, window_name, store.as_of_ms, store.currency, metrics)
                encoded = dumps(payload)
                await outputs.send_snapshot(store.store_id, window_name, encoded)
                store_written.append((payload, encoded))
            encoded_cohorts = dumps(store.cohorts)
            await outputs.send_snapshot(store.store_id, COHORTS, encoded_cohorts)
            written.append((store_written, (store.cohorts, encoded_cohorts)))
        await redis.write_stores(written)

    def fold_bucket(self, shard: StoreShard, as_of_bucket: int, partial: StoreShard | None) -> int | None:
        """How far a shard may fold: to now, but never past the bucket its next alert sample reads (None: not yet).

        A store also never folds past what its partition's partial ``*``, which reads it in place, samples
        next as of the partial's latest checkpoint: a restore may bring the store's latest checkpoint
        with a partial's older one, which samples those buckets again.
        """
        config = self.aggregation.alert_config
        if config is None:
            return as_of_bucket
        next_sample = shard.next_sample_bucket(config)
        if next_sample is None:
            return None
        if partial is not None:
            partial_next = partial.next_durable_sample_bucket(config)
            if partial_next is None:
                return None
            next_sample = min(next_sample, partial_next)
        return min(as_of_bucket, next_sample)

    async def publish_star_samples(self) -> None:
        """Send each partition's partial ``*`` samples (and how far it sampled) to the ``*`` owner."""
        if self.aggregation.alert_config is None:
            return
        producer = self.topology.app.producer._ensure_producer()  # type: ignore[attr-defined]
        for partition, partial in list(self.aggregation.partials.items()):
            upto = partial.sampled_ms
            if upto is None or (not partial.outbox and self.samples_announced.get(partition) == upto):
                continue
            samples = list(partial.outbox)
            # in messages of a bounded size (a replay makes thousands of boundaries due at once); each
            # says it has sampled up to its last boundary only, so the owner never waits on a gap
            for start in range(0, max(len(samples), 1), STAR_SAMPLES_PER_MESSAGE):
                chunk = samples[start:start + STAR_SAMPLES_PER_MESSAGE]
                last = start + STAR_SAMPLES_PER_MESSAGE >= len(samples)
                chunk_upto = upto if last else chunk[-1]["b"]
                value = orjson.dumps({"p": partition, "upto": chunk_upto, "samples": chunk})
                await (await producer.send(self.topology.star_samples_topic, value=value, partition=0))
                del partial.outbox[:len(chunk)]
                partial.version += 1
            self.samples_announced[partition] = upto

    async def sample_star(self) -> None:
        """On the worker that owns the ``*`` store's partition: evaluate the boundaries every partition sampled."""
        aggregation = self.aggregation
        config = aggregation.alert_config
        if config is None:
            return
        home = route(ALL_STORES, self.topology.partitions)
        star = aggregation.partials.get(home) if home in aggregation.my_partitions() else None
        if star is None:
            await self.star_samples.stop()
            return
        sampler = await self.star_samples.poll(aggregation.assignment_generation, star)
        sampler.evaluate(star, config)
        self.topology.health.gauge(f"alert_sampling_behind_ms:{ALL_STORES}", sampler.behind_ms(star, config))

    async def publish_alerts(self, redis: RedisSink) -> None:
        """Send the alerts waiting in the shards' outboxes: Kafka, Redis (stream and channel), health, webhook.

        An alert leaves its outbox only once Kafka acknowledged it and Redis has it; a failure
        leaves it there, sent again at the next try with the same id (a checkpoint keeps outboxes).
        """
        topology = self.topology
        outboxes = [(shard, shard.outbox) for shard in list(self.aggregation.shards.values())]
        outboxes += [(partial, partial.star_outbox) for partial in list(self.aggregation.partials.values())]
        for shard, outbox in outboxes:
            if not outbox:
                continue
            alerts = list(outbox)
            acks = []
            for alert in alerts:
                encoded = dumps(alert)
                acks.append(await topology.outputs.send_alert(alert, encoded))
                await redis.write_alert(encoded)
            try:
                await acknowledged(acks)
            except KafkaError as error:  # a broker away: the alerts stay, sent again (same ids) at the next emit
                log.warning("alerts.kafka_failed", error=str(error) or type(error).__name__)
                return
            # the aggregation may have added alerts meanwhile: only those sent leave
            del outbox[:len(alerts)]
            shard.version += 1
            for alert in alerts:
                topology.health.count(f"alerts:{alert['kind']}:{alert['state']}")
                log.info("alert.sent", alert_id=alert["alert_id"], kind=alert["kind"], state=alert["state"],
                         store=alert["store_id"], as_of_ms=alert["as_of_ms"])
                if self.webhook is not None:
                    self.webhook.submit(alert)


    async def publish_partials(self, now: int) -> None:
        """Send the read points of every partial ``*`` that changed, or whose bucket moved.

        Each as of the clock read with its state (see :meth:`emit`). A partial holds no series of its
        own (its stores, folded by :meth:`emit`, are read in place), so there is nothing to fold here.
        """
        grid = self.topology.grid
        producer = self.topology.app.producer._ensure_producer()  # type: ignore[attr-defined]
        for partition, partial in list(self.aggregation.partials.items()):
            now = max(now, self.topology.clock.now_ms() or now)
            as_of_bucket = grid.bucket(now)
            if not partial.changed and self.last_partial_bucket.get(partition) == as_of_bucket:
                continue
            partial.changed = False
            points = partial.read_points(grid, as_of_bucket)
            value = orjson.dumps(
                {"k": as_of_bucket, "as_of_ms": now, "cur": partial.currencies, "points": points.to_record()}
            )
            try:
                await producer.send(self.topology.star_partials_topic, value=value, key=str(partition).encode(),
                                    partition=0)
            except BaseException:
                partial.changed = True
                raise
            self.last_partial_bucket[partition] = as_of_bucket

    async def publish_star(self, now: int, redis: RedisSink) -> None:
        """On the worker that owns the ``*`` store's partition: publish the sum of the partials once they agree."""
        topology = self.topology
        if route(ALL_STORES, topology.partitions) not in self.aggregation.my_partitions():
            await self.star.stop()
            return
        if not await self.star.poll():
            return
        partials = self.star.latest
        if len(partials) < topology.partitions:
            return  # a partition has published no partial yet
        buckets = {partial["k"] for partial in partials.values()}
        if len(buckets) != 1:
            return  # the partitions are not as of the same bucket yet
        (as_of_bucket,) = buckets
        total = ReadPoints()
        currencies: dict[str, str] = {}
        for partial in partials.values():
            total.merge(ReadPoints.from_record(partial["points"]))
            currencies.update(partial["cur"])
        distinct = set(currencies.values())
        currency = next(iter(distinct)) if len(distinct) == 1 else None
        # the latest: a partial that has not changed since its own as_of is the same now (a quiet
        # partition republishes only when the bucket moves), so the sum holds as of the latest one
        as_of_ms = max(partial["as_of_ms"] for partial in partials.values())
        grid = topology.grid
        snapshots = [(window_name, total.metrics(grid, window, as_of_bucket, len(distinct) <= 1))
                     for window_name, window in zip(self.window_names, grid.windows, strict=True)]
        cohorts = cohorts_payload(ALL_STORES, as_of_ms, total.cohorts(grid, as_of_bucket))
        await self.publish_stores([StoreSnapshots(ALL_STORES, as_of_ms, currency, snapshots, cohorts)], redis)
        self.star.published = self.star.received
        topology.health.count("snapshots", len(grid.windows))


async def read_partition(topology: Topology, tp: TopicPartition, offset: int | None = None) -> AIOKafkaConsumer:
    """A started consumer of one partition (of a one-partition topic of the worker), from its beginning
    (or from ``offset``: from the beginning when that offset is no longer, or not yet, in the log)."""
    consumer = AIOKafkaConsumer(**kafka_client_options(topology.settings), enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    consumer.assign([tp])
    if offset is None:
        await consumer.seek_to_beginning(tp)
    else:
        consumer.seek(tp, offset)
    return consumer


class StarSamples:
    """The owner's reader of the ``star-samples`` topic, feeding a :class:`StarSampler`.

    Read again whenever the aggregation was rebuilt: the ``*`` state restored from a checkpoint
    may need samples the sampler had already let go. It names where they start
    (``star_samples_offset``); a state without one (new, or checkpointed before it was kept) reads
    the topic from its start.
    """

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self._consumer: AIOKafkaConsumer | None = None
        self._generation: int | None = None
        self.sampler = StarSampler(topology.partitions)

    async def poll(self, generation: int, star: StoreShard) -> StarSampler:
        """Read what arrived; the sampler with every partition's samples ``star`` has not evaluated yet."""
        tp = TopicPartition(self.topology.star_samples_topic, 0)
        if self._consumer is not None and self._generation != generation:
            await self.stop()
        if self._consumer is None:
            consumer = await read_partition(self.topology, tp, star.star_samples_offset)
            self._consumer, self._generation = consumer, generation
            self.sampler = StarSampler(self.topology.partitions, star.star_upto)
        while True:
            batches = await self._consumer.getmany(tp, timeout_ms=0, max_records=10_000)
            records = [record for batch in batches.values() for record in batch]
            for record in records:
                if record.value is not None:
                    self.sampler.receive(orjson.loads(record.value), record.offset)
            if not records:
                return self.sampler

    async def stop(self) -> None:
        """This worker no longer evaluates ``*``."""
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()


class StarPartials:
    """The latest partial ``*`` of every deltas partition, read from the star-partials topic."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self._consumer: AIOKafkaConsumer | None = None
        #: deltas partition -> its latest partial: ``{"k", "as_of_ms", "cur", "points"}``
        self.latest: dict[int, dict[str, Any]] = {}
        #: partials read so far, and how many of them the last publication of ``*`` had seen
        self.received = 0
        self.published: int | None = None

    async def poll(self) -> bool:
        """Read what arrived (from the start on the first call); whether anything is new since the last ``*``."""
        tp = TopicPartition(self.topology.star_partials_topic, 0)
        if self._consumer is None:
            consumer = await read_partition(self.topology, tp)
            self._consumer, self.latest, self.received, self.published = consumer, {}, 0, None
        batches = await self._consumer.getmany(tp, timeout_ms=0, max_records=10_000)
        for records in batches.values():
            for record in records:
                if record.key is not None and record.value is not None:
                    self.latest[int(record.key)] = orjson.loads(record.value)
                    self.received += 1
        return self.published != self.received

    async def stop(self) -> None:
        """This worker no longer publishes ``*``."""
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()


def register(topology: Topology, aggregation: Aggregation) -> Publisher:
    """The emit timer, every ``LOYALTY_EMIT_INTERVAL`` (at a fixed rate: see ``run_fixed_rate``)."""
    publisher = Publisher(topology, aggregation)
    interval_s = topology.settings.emit_interval_ms / 1000
    app = topology.app

    @app.task  # type: ignore[untyped-decorator]
    async def emit_timer() -> None:
        # an emit waits for Redis and Kafka: with Faust's timer its time would add to every interval,
        # and to the latency of every event it publishes
        await run_fixed_rate(interval_s, publisher.tick, stopping=lambda: bool(app.should_stop))

    webhook = publisher.webhook
    if webhook is not None:

        @topology.app.task  # type: ignore[untyped-decorator]
        async def alert_webhook() -> None:
            await webhook.run()

    return publisher
