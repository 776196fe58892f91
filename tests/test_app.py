"""streams.worker.app: the Faust app factory, without a broker."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from smoke_worker import SMOKE_TOPIC, parse_smoke, register_smoke
from streams.settings import Settings
from streams.worker.acks import acknowledged
from streams.worker.app import FETCH_MAX_WAIT_MS, create_app, faust_options
from streams.worker.run import MALLOC_ARENAS
from streams.worker.topology import run_fixed_rate


def settings(**values: str) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_app_is_configured_from_settings(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = settings(
        KAFKA_BOOTSTRAP_SERVERS="k1:9092,k2:9092",
        LOYALTY_APP_ID="my-app",
        LOYALTY_STORE="memory",
        LOYALTY_PARTITIONS="3",
        LOYALTY_WEB_PORT="7001",
        LOYALTY_STATE_DIR=str(tmp_path),
    )
    app = create_app(s)
    assert app.conf.id == "my-app"
    assert [str(url) for url in app.conf.broker] == ["kafka://k1:9092", "kafka://k2:9092"]
    assert str(app.conf.store) == "memory:"
    assert app.conf.topic_partitions == 3
    assert app.conf.topic_replication_factor == 1
    assert app.conf.web_port == 7001
    assert app.conf.broker_session_timeout == 10  # a dead worker's partitions move within seconds
    assert str(app.conf.datadir).startswith(str(tmp_path))


@pytest.mark.parametrize(("variable", "replicas"), [(None, 0), ("0", 0), ("2", 2)])
def test_standby_replicas_reach_faust(variable: str | None, replicas: int) -> None:
    """Faust keeps as many standby table copies as LOYALTY_STANDBY_REPLICAS says, none by default."""
    env = {} if variable is None else {"LOYALTY_STANDBY_REPLICAS": variable}
    app = create_app(settings(LOYALTY_APP_ID="standby", LOYALTY_STORE="memory", **env))
    assert app.conf.table_standby_replicas == replicas


@pytest.mark.parametrize(("store", "url"), [("rocksdb", "rocksdb://"), ("memory", "memory://")])
def test_store_choice(store: str, url: str) -> None:
    assert faust_options(settings(LOYALTY_STORE=store))["store"] == url


def test_the_product_worker_runs_only_the_pipeline_agents() -> None:
    """The production app has the four stage agents (gate, facts, aggregate) and no test agent."""
    app = create_app(settings(LOYALTY_APP_ID="a1", LOYALTY_STORE="memory"))
    assert sorted(agent.name for agent in app.agents.values()) == ["a1-aggregate", "a1-facts", "a1-gate"]


@pytest.mark.parametrize(("tick_s", "starts"), [
    (0.06, [0.25, 0.5, 0.75, 1.0]),  # Faust's timer: 0.25, 0.56, 0.87, 1.18
    (0.6, [0.25, 1.0, 1.75, 2.5]),  # each run outlasts two grid points: both skipped, none run at once
    (0.25, [0.25, 0.75, 1.25, 1.75]),  # a run ending on a grid point is not followed by a tick at that point
])
async def test_the_emit_timer_ticks_on_its_interval_whatever_each_tick_takes(
    tick_s: float, starts: list[float]
) -> None:
    """The emit starts at every point of its interval's grid, one run at a time, skipping those a long run covered."""
    now = [0.0]
    started: list[float] = []

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    async def tick() -> None:
        started.append(now[0])
        now[0] += tick_s

    await run_fixed_rate(0.25, tick, stopping=lambda: len(started) == 4, clock=lambda: now[0], sleep=sleep)
    assert started == pytest.approx(starts)


def test_smoke_agent_consumes_the_prefixed_topic() -> None:
    """The tests' smoke agent, registered on a product app, reads the prefixed smoke topic."""
    s = settings(LOYALTY_TOPIC_PREFIX="p1-", LOYALTY_STORE="memory")
    app = create_app(s)
    register_smoke(app, s.topic(SMOKE_TOPIC), s.redis_url)
    topics = {topic for agent in app.agents.values() for topic in agent.channel.topics}
    assert f"p1-{SMOKE_TOPIC}" in topics


def test_smoke_messages_parse_or_are_refused() -> None:
    """A smoke message is ``{"key", "n"}`` with an integer n; anything else is refused."""
    assert parse_smoke(b'{"key": "a", "n": 3}') == ("a", 3)
    assert parse_smoke(b"nope") is None
    assert parse_smoke(b'{"key": "a", "n": "x"}') is None
    assert parse_smoke(b'{"key": "a", "n": true}') is None


def test_the_worker_producer_is_idempotent() -> None:
    """Every stage sends through one idempotent producer: a send retried after a broker restart is written once."""
    producer = create_app(Settings()).producer
    options = {**producer._settings_default(), **producer._settings_extra()}
    assert (options["acks"], options["enable_idempotence"]) == ("all", True)


async def test_the_worker_consumer_fetches_with_a_short_wait() -> None:
    """The stages' consumer lets the broker hold a fetch 20 ms, not Faust's 1,500 ms (live events stood idle)."""
    app = create_app(settings(LOYALTY_STORE="memory"))
    consumer = app.consumer._thread._create_worker_consumer(app.transport)
    try:
        assert consumer._fetch_max_wait_ms == FETCH_MAX_WAIT_MS == 20
    finally:
        await consumer.stop()  # never started: closes its client


async def test_a_cancelled_wait_for_acknowledgements_leaves_the_sends_alone() -> None:
    """A stopping agent's wait is cancelled, not its sends: Faust's callbacks on them must not see a cancel."""
    sends = [asyncio.get_running_loop().create_future() for _ in range(3)]
    waiter = asyncio.ensure_future(acknowledged(sends))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not any(send.cancelled() for send in sends)
    sends[0].set_exception(KeyError("lost"))
    for send in sends[1:]:
        send.set_result("acked")
    with pytest.raises(KeyError):
        await acknowledged(sends)
    assert await acknowledged(sends[1:]) == ["acked", "acked"]


def test_the_rocksdb_databases_share_one_memory_budget(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Eight databases written twice the memtable budget stay within it, and read back what was written."""
    from streams.worker.tables import (
        ROCKSDB_OPTIONS,
        SHARED_BLOCK_CACHE_BYTES,
        SHARED_MEMTABLE_BYTES,
        SharedMemoryOptions,
    )

    options = SharedMemoryOptions(**ROCKSDB_OPTIONS, use_rocksdict=True)
    databases = [options.open(tmp_path / f"db-{number}") for number in range(8)]
    cache, memtables = SharedMemoryOptions.shared()
    value_bytes = 1000
    keys = 2 * SHARED_MEMTABLE_BYTES // value_bytes // len(databases)
    for key in range(keys):
        for number, database in enumerate(databases):
            database[b"%d-%d" % (key, number)] = bytes([number]) * value_bytes
    # on their own, eight databases of two 4 MiB write buffers each would hold the whole 64 MiB
    assert 0 < memtables.get_usage() <= SHARED_MEMTABLE_BYTES
    for key in range(0, keys, 97):
        for number, database in enumerate(databases):
            assert database[b"%d-%d" % (key, number)] == bytes([number]) * value_bytes
    # the reads that reached table files went through the one block cache
    assert 0 < cache.get_usage() <= SHARED_BLOCK_CACHE_BYTES
    for database in databases:
        database.close()


UNLOGGED_WRITER = """
import os, signal, sys
from pathlib import Path
from streams.worker.tables import ROCKSDB_OPTIONS, SharedMemoryOptions, write_batch
database = SharedMemoryOptions(**ROCKSDB_OPTIONS, use_rocksdict=True).open(Path(sys.argv[1]))
for first in range(0, int(sys.argv[2]), 100):
    records = [(b"record-%06d" % record, bytes(1000)) for record in range(first, first + 100)]
    if sys.argv[4] == "batch":  # as the facts stage writes its customers
        write_batch(database, records)
    else:
        for key, value in records:
            database[key] = value
    database[b"offset"] = b"%d" % (first + 99)  # as Faust persists a changelog offset after its records
if sys.argv[3] == "close":
    database.close()
else:
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("writes", ["put", "batch"])
@pytest.mark.parametrize("ending", ["kill", "close"])
def test_a_killed_table_database_keeps_a_prefix_of_its_writes_and_an_offset_within_it(tmp_path, ending, writes) -> None:  # type: ignore[no-untyped-def]
    """Unlogged table writes, put or batched: a SIGKILL keeps a prefix with a true offset; a close keeps all."""
    import subprocess
    import sys

    import rocksdict

    records = 18_500  # 18.5 MB: several 4 MiB memtables flushed, the last one not
    subprocess.run([sys.executable, "-c", UNLOGGED_WRITER, str(tmp_path / "db"), str(records), ending, writes],
                   check=False, timeout=120)
    database = rocksdict.Rdict(str(tmp_path / "db"), options=rocksdict.Options(raw_mode=True))
    # keys() in raw mode: iterating the database itself asks for str keys
    present = [key for key in database.keys() if key.startswith(b"record-")]  # noqa: SIM118
    offset = database.get(b"offset")
    database.close()
    kept = len(present)
    assert present == [b"record-%06d" % record for record in range(kept)]  # a prefix, in order
    if ending == "close":
        assert kept == records and offset == b"%d" % (records - 1)
    else:
        assert 0 < kept < records  # the last memtable died with the process
        assert offset is not None and int(offset) < kept


def test_a_table_store_reads_and_writes_a_partition_in_one_call(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Batched table writes apply in order (deletes too); a batched read answers for every key asked."""
    import random

    from streams.worker.tables import ROCKSDB_OPTIONS, IdleFlush, RoutedRocksDBStore, SharedMemoryOptions

    store = RoutedRocksDBStore.__new__(RoutedRocksDBStore)  # its databases alone, without a Faust table
    store._dbs = {3: SharedMemoryOptions(**ROCKSDB_OPTIONS, use_rocksdict=True).open(tmp_path / "db")}
    store.idle_flush = IdleFlush()
    expected: dict[bytes, bytes] = {}
    rng = random.Random(7)
    for round_number in range(5):
        writes: list[tuple[bytes, bytes | None]] = []
        for _ in range(200):
            key = b"k%d" % rng.randrange(300)
            value = None if rng.random() < 0.2 else b"v%d" % rng.randrange(10**6)
            writes.append((key, value))  # a key may come twice in one batch: the later write wins
            if value is None:
                expected.pop(key, None)
            else:
                expected[key] = value
        store.write_many(3, writes)
        assert store.idle_flush.writes == 200 * (round_number + 1)
        keys = [b"k%d" % rng.randrange(400) for _ in range(150)]  # repeated, some never written
        assert store.get_many(3, keys) == {key: expected.get(key) for key in keys}
        assert [store._dbs[3].get(key) for key in keys] == [expected.get(key) for key in keys]
    store._dbs[3].close()


def test_a_table_store_flushes_once_its_writes_stop_for_a_tick() -> None:
    """IdleFlush flushes every database after a tick without writes, once per burst of writes."""
    from streams.worker.tables import IdleFlush

    class Database:
        def __init__(self) -> None:
            self.flushes: list[bool] = []

        def flush(self, wait: bool) -> None:
            self.flushes.append(wait)

    databases = [Database(), Database()]
    idle = IdleFlush()
    assert not idle.tick(databases)  # nothing written
    idle.writes += 3
    assert not idle.tick(databases)  # written during this tick: still busy
    idle.writes += 1
    assert not idle.tick(databases)
    assert idle.tick(databases)  # a whole tick without writes
    assert not idle.tick(databases)  # flushed already
    assert [database.flushes for database in databases] == [[False], [False]]  # in the background
    idle.writes += 1
    assert not idle.tick(databases) and idle.tick(databases)
    assert [len(database.flushes) for database in databases] == [2, 2]


IDLE_WRITER = """
import os, signal, sys, time
from pathlib import Path
from streams.worker.tables import ROCKSDB_OPTIONS, IdleFlush, SharedMemoryOptions
database = SharedMemoryOptions(**ROCKSDB_OPTIONS, use_rocksdict=True).open(Path(sys.argv[1]))
idle = IdleFlush()
for record in range(1000):
    database[b"record-%06d" % record] = bytes(100)
    idle.writes += 1
idle.tick([database])
assert idle.tick([database])
deadline = time.monotonic() + 60
while database.property_int_value("rocksdb.num-entries-active-mem-table") or database.property_int_value(
        "rocksdb.num-entries-imm-mem-tables"):
    assert time.monotonic() < deadline, "the background flush did not finish"
    time.sleep(0.01)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_table_database_killed_after_its_idle_flush_keeps_every_write(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Writes, a quiet tick, the background flush, then a SIGKILL: every record survives."""
    import subprocess
    import sys

    import rocksdict

    subprocess.run([sys.executable, "-c", IDLE_WRITER, str(tmp_path / "db")], check=False, timeout=120)
    database = rocksdict.Rdict(str(tmp_path / "db"), options=rocksdict.Options(raw_mode=True))
    present = [key for key in database.keys() if key.startswith(b"record-")]  # noqa: SIM118
    database.close()
    assert present == [b"record-%06d" % record for record in range(1000)]


ARENA_PROBE = """
import ctypes, sys, threading
from streams.worker.run import limit_malloc_arenas
if sys.argv[1] == "limit":
    assert limit_malloc_arenas()
barrier = threading.Barrier(8)
kept = []
def allocate():
    barrier.wait()  # eight threads allocating at once: each gets an arena of its own unless limited
    kept.append([bytes(200_000) for _ in range(20)])
    barrier.wait()
threads = [threading.Thread(target=allocate) for _ in range(8)]
for thread in threads: thread.start()
for thread in threads: thread.join()
ctypes.CDLL("libc.so.6").malloc_stats()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize(("mode", "most", "fewest"), [("limit", MALLOC_ARENAS, 1), ("default", 99, MALLOC_ARENAS + 1)])
def test_the_worker_limits_malloc_arenas(mode: str, most: int, fewest: int) -> None:
    """With the worker's limit, eight threads allocating at once share its two arenas; without, they take more."""
    env = {key: value for key, value in os.environ.items() if key != "MALLOC_ARENA_MAX"}
    done = subprocess.run([sys.executable, "-c", ARENA_PROBE, mode], env=env, capture_output=True, text=True,
                          timeout=60, check=True)
    arenas = sum(1 for line in done.stderr.splitlines() if line.startswith("Arena "))
    assert fewest <= arenas <= most, done.stderr
