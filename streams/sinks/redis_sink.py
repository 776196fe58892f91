"""Snapshots, health counters and the list of stores in Redis: the layout of SPEC section 6."""

from __future__ import annotations

import json
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import redis.asyncio as aioredis

from metrics.catalog import MAP, METRIC_KINDS
from streams.connections import RedisTarget, async_redis
from streams.sinks.snapshots import COHORTS, decimal_text, dumps

HISTORY_MAXLEN = 10_000
STORES_KEY = "loyalty:stores"
#: the workers' health counters (a hash of counts)
HEALTH_KEY = "loyalty:health"
UPDATES_CHANNEL = "loyalty:updates"
#: the alerts (SPEC 7): a capped stream (field ``json``) and a pub/sub channel of the same name
ALERTS_KEY = "loyalty:alerts"
ALERTS_MAXLEN = 10_000
#: seconds a Redis connection attempt or command may take: a black-holed Redis raises a timeout
#: instead of hanging the emit step, and publishing retries later
REDIS_TIMEOUT_S = 5.0


def metric_key(store_id: str, window: str) -> str:
    """Redis hash of a store and window.

    >>> metric_key("s1", "24h")
    'loyalty:s1:24h'
    """
    return f"loyalty:{store_id}:{window}"


def redis_field(value: object) -> str:
    """A metric as a Redis hash field: decimal string, ``""`` for null, JSON for maps.

    >>> redis_field(None), redis_field(3), redis_field(0.5), redis_field({"ads": 2.0})
    ('', '3', '0.5', '{"ads":2.0}')
    """
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return decimal_text(value)
    if isinstance(value, dict):
        return dumps(value).decode()
    if isinstance(value, bool):
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def parse_redis_field(name: str, text: str) -> object:
    """The inverse of :func:`redis_field` for a metric (numbers come back as Decimal).

    >>> parse_redis_field("nps", ""), parse_redis_field("orders", "3")
    (None, Decimal('3'))
    >>> parse_redis_field("net_revenue_by_nps_segment", '{"promoter":12345678901234.123456,"none":0}')
    {'promoter': Decimal('12345678901234.123456'), 'none': Decimal('0')}
    """
    if text == "":
        return None
    if METRIC_KINDS.get(name) == MAP:
        # decimals, not floats: a map of money (net revenue by NPS segment) stays exact
        return json.loads(text, parse_float=Decimal, parse_int=Decimal)
    return Decimal(text)


class RedisSink:
    """Writes snapshots to Redis, one MULTI/EXEC each, never moving ``as_of_ms`` back."""

    def __init__(self, target: RedisTarget) -> None:
        self.client = async_redis(target, timeout=REDIS_TIMEOUT_S, connect_timeout=REDIS_TIMEOUT_S)
        self._last_as_of: dict[str, int] = {}

    async def server_run_id(self) -> str:
        """The Redis server's run id, which changes whenever the server restarts (its data may be gone)."""
        info = await self.client.info("server")
        return str(info.get("run_id", ""))

    def forget_written(self) -> None:
        """Forget the ``as_of_ms`` of the snapshots written so far (Redis may have lost them)."""
        self._last_as_of.clear()

    async def _older_than_written(self, key: str, as_of_ms: int) -> bool:
        """Whether the hash ``key`` holds a later ``as_of_ms`` (read once, then remembered)."""
        last = self._last_as_of.get(key)
        if last is None:
            stored = await self.client.hget(key, "as_of_ms")
            last = int(stored) if stored else -(2**62)
        if as_of_ms < last:
            self._last_as_of[key] = last
            return True
        return False

    async def write(self, payload: dict[str, Any], encoded: bytes) -> bool:
        """Write one snapshot; False when an older or equal-time newer one is already there."""
        return await self.write_store([(payload, encoded)]) == 1

    async def write_cohorts(self, payload: dict[str, Any], encoded: bytes) -> bool:
        """Write a store's cohort matrix (``loyalty:{store}:cohorts``: ``as_of_ms`` and ``json``) and publish it.

        One MULTI/EXEC, never moving ``as_of_ms`` back; False when a later one is there.
        """
        return await self.write_store([], (payload, encoded)) == 1

    async def write_store(
        self, snapshots: list[tuple[dict[str, Any], bytes]], cohorts: tuple[dict[str, Any], bytes] | None = None
    ) -> int:
        """Write a store's snapshots (and its cohort matrix) in one MULTI/EXEC; returns how many were written.

        A reader sees the windows of one state together. A snapshot older than the one its key
        holds is left out (``as_of_ms`` never moves back).
        """
        return await self.write_stores([(snapshots, cohorts)])

    async def write_stores(
        self, stores: Sequence[tuple[list[tuple[dict[str, Any], bytes]], tuple[dict[str, Any], bytes] | None]]
    ) -> int:
        """Write several stores' snapshots and cohort matrices (as :meth:`write_store`) in one
        MULTI/EXEC; returns how many were written.

        One round trip for a group of stores: an emit awaits Redis once per group, not once per
        store, and on a busy worker each await also waits for the other stages' turns.
        """
        writes: list[tuple[str, dict[str, Any], bytes, bool]] = []
        for snapshots, cohorts in stores:
            for payload, encoded in snapshots:
                key = metric_key(payload["store_id"], payload["window"])
                if not await self._older_than_written(key, payload["as_of_ms"]):
                    writes.append((key, payload, encoded, False))
            if cohorts is not None:
                payload, encoded = cohorts
                key = metric_key(payload["store_id"], COHORTS)
                if not await self._older_than_written(key, payload["as_of_ms"]):
                    writes.append((key, payload, encoded, True))
        if not writes:
            return 0
        async with self.client.pipeline(transaction=True) as pipe:
            for key, payload, encoded, is_cohorts in writes:
                as_of = str(payload["as_of_ms"])
                if is_cohorts:
                    pipe.hset(key, mapping={"as_of_ms": as_of, "json": encoded})
                else:
                    fields = {name: redis_field(value) for name, value in payload["metrics"].items()}
                    fields["as_of_ms"] = as_of
                    fields["currency"] = payload["currency"] or ""
                    pipe.hset(key, mapping=fields)
                    history: dict[Any, Any] = {"as_of_ms": as_of, "json": encoded}
                    pipe.xadd(key + ":history", history, maxlen=HISTORY_MAXLEN, approximate=True)
                    pipe.sadd(STORES_KEY, payload["store_id"])
                pipe.publish(UPDATES_CHANNEL, encoded)
            await pipe.execute()
        for key, payload, _, _ in writes:
            self._last_as_of[key] = payload["as_of_ms"]
        return len(writes)

    async def write_alert(self, encoded: bytes) -> None:
        """Add one alert to the alerts stream and publish it on the alerts channel (one MULTI/EXEC)."""
        async with self.client.pipeline(transaction=True) as pipe:
            entry: dict[Any, Any] = {"json": encoded}
            pipe.xadd(ALERTS_KEY, entry, maxlen=ALERTS_MAXLEN, approximate=True)
            pipe.publish(ALERTS_KEY, encoded)
            await pipe.execute()

    async def count(self, counters: dict[str, int], gauges: dict[str, int] | None = None) -> None:
        """Add to the worker health counters (``loyalty:health``) and set its gauges, all or none (one MULTI/EXEC)."""
        async with self.client.pipeline(transaction=True) as pipe:
            for field, amount in counters.items():
                pipe.hincrby(HEALTH_KEY, field, amount)
            if gauges:
                pipe.hset(HEALTH_KEY, mapping={field: str(value) for field, value in gauges.items()})
            await pipe.execute()

    async def close(self) -> None:
        """Close the connection pool."""
        await self.client.aclose()


async def read_health(client: aioredis.Redis) -> dict[str, int]:
    """The workers' health counters (``events_received``, ``events_applied``, ...), decoded or not."""
    raw = await client.hgetall(HEALTH_KEY)
    return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}
