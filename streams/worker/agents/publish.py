"""Publication: the emit timer sends every changed store's snapshots to the output topic and Redis."""

from __future__ import annotations

from streams.logs import get_logger
from streams.sinks.redis_sink import RedisSink
from streams.sinks.snapshots import dumps, snapshot_payload
from streams.worker.agents.aggregate import Aggregation
from streams.worker.topology import Topology

log = get_logger(__name__)


class Publisher:
    """Snapshots of the shards that changed (or whose "now" moved to a new bucket), every emit interval."""

    def __init__(self, topology: Topology, aggregation: Aggregation) -> None:
        self.topology = topology
        self.aggregation = aggregation
        self.window_names = list(topology.settings.window_ms)
        #: store -> the bucket of its last published snapshots
        self.last_emitted_bucket: dict[str, int] = {}
        self.redis: RedisSink | None = None

    async def tick(self) -> None:
        """One emit interval: rebuild if needed, publish, flush the health counters."""
        aggregation = self.aggregation
        # a worker that got partitions whose deltas stopped flowing must still rebuild and publish them
        await aggregation.ensure_rebuilt()
        if not aggregation.ready:
            return
        now = self.topology.clock.now_ms()
        if now is None:
            return
        await self.emit(now)
        if self.redis is not None:
            await self.topology.health.flush(self.redis)

    async def emit(self, now: int) -> None:
        """Publish the snapshots of every store whose shard changed or whose bucket moved, then fold."""
        topology = self.topology
        grid = topology.grid
        as_of_bucket = grid.bucket(now)
        await topology.outputs.declare()
        if self.redis is None:
            self.redis = RedisSink(topology.settings.redis_url)
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
                    await self.redis.write(payload, encoded)
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
