"""The sinks and the publisher on the real Redis: health counters added once, timeouts, emit failures, as_of labels."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from types import SimpleNamespace

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka.errors import KafkaTimeoutError
from faust.exceptions import NotReady
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from infra.local import free_port
from streams.settings import Settings
from streams.sinks.dead_letters import REFORWARD_WINDOW_S, StageLedger
from streams.sinks.health import HealthCounters
from streams.sinks.redis_sink import HEALTH_KEY, REDIS_TIMEOUT_S, RedisSink, metric_key
from streams.sinks.snapshots import dumps, snapshot_payload
from streams.stages.aggregate import StoreShard
from streams.worker.agents.publish import Publisher, emit_failure
from streams.worker.app import create_app
from streams.worker.topology import PipelineClock, grid_of

#: a Redis database of this module's own
DATABASE = 5


def database_url(services) -> str:  # type: ignore[no-untyped-def]
    return services.redis_url.rsplit("/", 1)[0] + f"/{DATABASE}"


async def test_health_counts_survive_a_failed_flush_and_are_added_once(services) -> None:
    """Counts that Redis refused stay pending; the next flush adds every count exactly once."""
    url = database_url(services)
    client = aioredis.Redis.from_url(url, decode_responses=True)
    await client.delete(HEALTH_KEY)
    health = HealthCounters()
    health.count("events_applied", 7)
    health.count("dead_letters", 2)
    health.gauge("consumer_lag:orders:0", 40)
    unreachable = RedisSink(f"redis://127.0.0.1:{free_port()}/0")
    await health.flush(unreachable)
    assert health.pending == {"events_applied": 7, "dead_letters": 2}
    assert health.gauges == {"consumer_lag:orders:0": 40}
    health.count("events_applied", 1)
    health.gauge("consumer_lag:orders:0", 3)  # a newer value replaces the one Redis refused
    sink = RedisSink(url)
    try:
        await health.flush(sink)
        assert health.pending == {} and health.gauges == {}
        await health.flush(sink)  # nothing pending: nothing added
        assert await client.hgetall(HEALTH_KEY) == {
            "events_applied": "8", "dead_letters": "2", "consumer_lag:orders:0": "3"
        }
    finally:
        await sink.close()
        await unreachable.close()
        await client.aclose()


async def test_a_redis_that_never_answers_times_out_instead_of_hanging() -> None:
    """A black-holed Redis (accepts, never replies) makes a write fail within the timeout, not hang."""
    connections: list[asyncio.StreamWriter] = []

    async def accept_and_stay_silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)

    server = await asyncio.start_server(accept_and_stay_silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sink = RedisSink(f"redis://127.0.0.1:{port}/0")
    payload = snapshot_payload("s1", "24h", 1_700_000_000_000, "EUR", {"orders": 3, "gross_revenue": Decimal("1.5")})
    started = time.monotonic()
    try:
        with pytest.raises((RedisTimeoutError, RedisConnectionError, TimeoutError)):
            await sink.write(payload, dumps(payload))
        assert time.monotonic() - started < 3 * REDIS_TIMEOUT_S
        assert connections, "the client never connected to the silent server"
    finally:
        for writer in connections:
            writer.close()
        server.close()
        await server.wait_closed()
        await sink.close()


async def test_forgotten_writes_are_written_again_after_redis_lost_them(services) -> None:
    """After a flush of Redis, forget_written lets the same snapshot be written again (the republish path)."""
    url = database_url(services)
    client = aioredis.Redis.from_url(url, decode_responses=True)
    sink = RedisSink(url)
    key = metric_key("republished", "24h")
    payload = snapshot_payload("republished", "24h", 1_700_000_000_000, None, {"orders": 3})
    try:
        await client.delete(key)
        assert await sink.write(payload, dumps(payload))
        run_id = await sink.server_run_id()
        assert run_id and run_id == await sink.server_run_id()
        await client.delete(key)
        sink.forget_written()
        assert await sink.write(payload, dumps(payload))
        assert (await client.hgetall(key))["orders"] == "3"
        older = snapshot_payload("republished", "24h", 1_699_000_000_000, None, {"orders": 1})
        assert not await sink.write(older, dumps(older))  # as_of_ms never moves back
        assert (await client.hgetall(key))["orders"] == "3"
    finally:
        await sink.close()
        await client.aclose()


async def test_several_stores_are_written_in_one_transaction(services) -> None:
    """write_stores writes a group of stores with one EXEC, leaving out a window Redis holds newer."""
    url = database_url(services)
    client = aioredis.Redis.from_url(url, decode_responses=True)
    sink = RedisSink(url)
    stores, now = ["group-a", "group-b"], 1_700_000_000_000
    keys = [metric_key(store, window) for store in stores for window in ("24h", "7d", "cohorts")]
    try:
        await client.delete(*keys, *(key + ":history" for key in keys))
        newer = snapshot_payload("group-b", "7d", now + 1, None, {"orders": 99})
        assert await sink.write(newer, dumps(newer))
        group = []
        for number, store in enumerate(stores):
            snapshots = [snapshot_payload(store, window, now, "EUR", {"orders": 10 * number + days})
                         for window, days in (("24h", 1), ("7d", 7))]
            cohorts = {"store_id": store, "as_of_ms": now, "cohorts": []}
            group.append(([(payload, dumps(payload)) for payload in snapshots], (cohorts, dumps(cohorts))))
        execs_before = (await client.info("commandstats")).get("cmdstat_exec", {}).get("calls", 0)
        assert await sink.write_stores(group) == 5  # not group-b's 7d
        execs_after = (await client.info("commandstats")).get("cmdstat_exec", {}).get("calls", 0)
        assert execs_after - execs_before == 1
        orders = [(await client.hgetall(key)).get("orders") for key in keys]
        assert orders == ["1", "7", None, "11", "99", None]
        assert [(await client.hgetall(key))["as_of_ms"] for key in (keys[2], keys[5])] == [str(now)] * 2
    finally:
        await client.delete(*keys, *(key + ":history" for key in keys))
        await sink.close()
        await client.aclose()


async def test_a_store_is_written_in_one_transaction_leaving_older_snapshots_out(services) -> None:
    """write_store writes every window and the cohorts of a store at once, except a window Redis holds newer."""
    url = database_url(services)
    client = aioredis.Redis.from_url(url, decode_responses=True)
    sink = RedisSink(url)
    store, t1, t2 = "one-round-trip", 1_700_000_000_000, 1_700_000_060_000
    windows = {"24h": 3, "7d": 5, "30d": 8}
    keys = [metric_key(store, window) for window in windows] + [metric_key(store, "cohorts")]
    try:
        await client.delete(*keys)
        newer = snapshot_payload(store, "7d", t2 + 1, None, {"orders": 99})
        assert await sink.write(newer, dumps(newer))  # the 7d key already holds a later state
        snapshots = [snapshot_payload(store, window, t2, "EUR", {"orders": orders})
                     for window, orders in windows.items()]
        cohorts = {"store_id": store, "as_of_ms": t2, "cohorts": []}
        encoded = [(payload, dumps(payload)) for payload in snapshots]
        written = await sink.write_store(encoded, (cohorts, dumps(cohorts)))
        assert written == 3  # 24h, 30d and the cohorts; not 7d
        assert [(await client.hgetall(key)).get("orders") for key in keys[:3]] == ["3", "99", "8"]
        assert (await client.hgetall(keys[3]))["as_of_ms"] == str(t2)
        assert await client.xlen(keys[0] + ":history") == 1
        stale = snapshot_payload(store, "24h", t1, "EUR", {"orders": 1})
        assert await sink.write_store([(stale, dumps(stale))]) == 0
        assert (await client.hgetall(keys[0]))["orders"] == "3"
    finally:
        await client.delete(*keys, keys[0] + ":history", keys[1] + ":history", keys[2] + ":history")
        await sink.close()
        await client.aclose()


def test_stage_ledger_commits_positions_a_window_old_and_forgets_after_it() -> None:
    """The gate's commit metadata lags its dead-letter positions by the re-forward window, and so does its memory."""
    now = [0.0]
    ledger = StageLedger(Settings(), "dead", 2, {"currency_mismatch"}, clock=lambda: now[0])
    letter = {"topic": "orders", "partition": 3, "offset": 4613, "index": None}
    ledger.record(0, 9)
    ledger.remember([letter])
    assert orjson.loads(ledger.commit_metadata()) == {"0": 10}
    now[0] = 30.0
    ledger.record(0, 19)
    ledger.record(1, 4)
    assert orjson.loads(ledger.commit_metadata()) == {"0": 10}  # a copy of the letter at 9 may still come
    assert ledger.already_sent(dict(letter))
    now[0] = REFORWARD_WINDOW_S - 1
    assert orjson.loads(ledger.commit_metadata()) == {"0": 10}
    assert ledger.already_sent(dict(letter))
    now[0] = 30.0 + REFORWARD_WINDOW_S
    assert orjson.loads(ledger.commit_metadata()) == {"0": 20, "1": 5}
    assert not ledger.already_sent(dict(letter))


async def test_emit_failures_retry_stop_quietly_at_shutdown_or_raise(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A Redis or Kafka failure is retried, a producer stopped at shutdown ends the emit quietly, a bug raises."""
    app = create_app(Settings(_env_file=None, LOYALTY_STORE="memory",  # type: ignore[call-arg]
                              LOYALTY_STATE_DIR=str(tmp_path)))
    with pytest.raises(NotReady) as stopped_producer:  # what an emit in flight meets once Faust stopped it
        app.producer._ensure_producer()
    unreachable = RedisSink(f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(RedisConnectionError) as redis_away:
            await unreachable.server_run_id()
    finally:
        await unreachable.close()
    cases = [(stopped_producer.value, True, "stopping"), (stopped_producer.value, False, "retry"),
             (KafkaTimeoutError(), True, "stopping"), (KafkaTimeoutError(), False, "retry"),
             (redis_away.value, False, "retry"), (redis_away.value, True, "retry"),
             (ConnectionRefusedError(), False, "retry"), (KeyError("store"), False, "raise"),
             (KeyError("store"), True, "raise")]
    assert [emit_failure(error, stopping=stopping) for error, stopping, _ in cases] == [want for *_, want in cases]


async def test_a_snapshot_is_as_of_the_clock_read_with_its_state(services) -> None:
    """Deltas applied while an emit awaits Redis are published as of a clock that includes them, not the tick's."""
    settings = Settings(_env_file=None, REDIS_URL=database_url(services), LOYALTY_CLOCK="event")  # type: ignore[call-arg]
    grid = grid_of(settings)
    clock = PipelineClock(event_clock=True)
    bucket = grid.bucket(1_800_000_000_000)
    tick_ms, later_ms = bucket * grid.bucket_ms + 1_000, bucket * grid.bucket_ms + 40_000  # one bucket
    shards = {store: StoreShard(store) for store in ("early", "late")}
    for number, shard in enumerate(shards.values()):
        shard.apply((0, number, 0), {"g": ["orders", [bucket, 1]], "cur": {shard.store_id: "EUR"}}, tick_ms)
    clock.advance(tick_ms)

    class Outputs:
        """Kafka's side of the emit; while the first store's snapshots are sent, the aggregation goes on."""

        async def declare(self) -> None:
            return None

        async def send_snapshot(self, store_id: str, window: str, encoded: bytes) -> None:
            if store_id == "early" and shards["late"].hwm[0] == [1, 0]:
                clock.advance(later_ms)  # as the aggregation does: the clock first, then the deltas
                shards["late"].apply((0, 2, 0), {"g": ["orders", [bucket, 1]]}, later_ms)

    topology = SimpleNamespace(grid=grid, clock=clock, outputs=Outputs(), health=HealthCounters(), partitions=1)
    publisher = Publisher.__new__(Publisher)
    publisher.topology = topology  # type: ignore[assignment]
    publisher.aggregation = SimpleNamespace(shards=shards, partials={}, alert_config=None)  # type: ignore[assignment]
    publisher.window_names = list(settings.window_ms)
    publisher.last_emitted_bucket = {}
    sink = RedisSink(settings)
    client = aioredis.Redis.from_url(database_url(services), decode_responses=True)
    try:
        await client.flushdb()
        await publisher.emit(clock.now_ms() or 0, sink)  # the tick read the clock before any await
        await publisher.emit(clock.now_ms() or 0, sink)  # the next tick: nothing changed, same bucket
        late = await client.hgetall(metric_key("late", "24h"))
        early = await client.hgetall(metric_key("early", "24h"))
        assert (late["orders"], late["as_of_ms"]) == ("2", str(later_ms))
        assert (early["orders"], early["as_of_ms"]) == ("1", str(tick_ms))
    finally:
        await client.flushdb()
        await client.aclose()
        await sink.close()
