"""Publication: the emit timer sends every changed store's snapshots to the output topic and Redis.

Redis may go away at any moment. A failed write pauses publishing (retried with a growing
delay, never stopping the worker), and once Redis answers again every store is published
again, changed or not, so a Redis that came back empty holds every key again. A Redis that
restarted between two emits is noticed by its server run id changing.
"""

from __future__ import annotations

import time

from streams.logs import get_logger
from streams.sinks.redis_sink import RedisSink
from streams.sinks.snapshots import dumps, snapshot_payload
from streams.worker.agents.aggregate import Aggregation
from streams.worker.topology import Topology

log = get_logger(__name__)

#: the first and the longest wait before publishing is tried again after a Redis failure
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 10.0


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
            self.redis = RedisSink(self.topology.settings.redis_url)
        try:
            await self.check_redis(self.redis)
            await self.emit(now, self.redis)
            await self.topology.health.flush(self.redis)
        except Exception as error:  # Redis unreachable, timing out, or failing: retry later
            if not type(error).__module__.startswith("redis") and not isinstance(error, OSError | TimeoutError):
                raise
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
            self.republish = False

    async def emit(self, now: int, redis: RedisSink) -> None:
        """Publish the snapshots of every store whose shard changed or whose bucket moved, then fold."""
        topology = self.topology
        grid = topology.grid
        as_of_bucket = grid.bucket(now)
        await topology.outputs.declare()
        shards = self.aggregation.shards
        for store_id, shard in list(shards.items()):
            if not shard.changed and self.last_emitted_bucket.get(store_id) == as_of_bucket:
                continue
            # every window from one state, computed before any await; deltas that the aggregate
            # applies while this emit awaits Kafka and Redis mark the shard changed again
            shard.changed = False
            currency = shard.currency()
            snapshots = [
                (window_name, shard.metrics(grid, window, as_of_bucket))
                for window_name, window in zip(self.window_names, grid.windows, strict=True)
            ]
            try:
                for window_name, metrics in snapshots:
                    payload = snapshot_payload(store_id, window_name, now, currency, metrics)
                    encoded = dumps(payload)
                    await topology.outputs.send_snapshot(store_id, window_name, encoded)
                    await redis.write(payload, encoded)
            except BaseException:
                shard.changed = True  # published again once Redis answers
                raise
            self.last_emitted_bucket[store_id] = as_of_bucket
            topology.health.count("snapshots", len(grid.windows))
        for shard in shards.values():
            shard.fold(as_of_bucket, grid.longest)


def register(topology: Topology, aggregation: Aggregation) -> Publisher:
    """The emit timer, every ``LOYALTY_EMIT_INTERVAL``."""
    publisher = Publisher(topology, aggregation)
    interval_s = topology.settings.emit_interval_ms / 1000

    @topology.app.timer(interval_s, name=topology.internal + "emit")  # type: ignore[untyped-decorator]
    async def emit_timer() -> None:
        await publisher.tick()

    return publisher
