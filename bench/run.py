"""``loyalty bench``: throughput beside the two ceilings, latency, memory, and a correctness check (SPEC section 9).

One run, against the Kafka and Redis of the settings (``loyalty up``):

1. prefill: simulated storefront traffic (``streams.tools.storefront.Storefronts``,
   historical times) written twice, to topics of its own per message shape:
   one event per message, and batches of ``--batch`` events per message;
2. ceilings, per shape: a raw aiokafka consumer that fetches in batches and
   decodes every message with orjson, and an empty Faust agent that only
   decodes (``bench.faust_ceiling``), each timed from its first message to its last;
   and the Python peer a user would compare with, Quix Streams doing one keyed state
   update per event (``bench.quix_peer``), timed the same way;
3. throughput, per shape: one ``loyalty worker`` (RocksDB state, every metric
   and window, event clock) from the pre-filled topics until the snapshots in
   Redis equal the batch reference (``metrics.reference``) on a sample of stores;
4. latency, ``--latency-runs`` times (a fresh worker each, measured once it
   publishes what it is sent): a live worker (wall clock) under a steady ``--rate`` for
   ``--duration``, in percentiles and by second of sending; an order's latency is from just before it is produced to
   the first Redis poll (every 10 ms) whose ``orders`` count of its store
   includes it (counts are compared, so it is exact when a store's orders are
   applied in send order and otherwise a close estimate);
5. memory: peak RSS (``VmHWM``) of a worker that takes ``--memory-customers``
   customers over 120 days (a signup, an NPS answer and one to three orders each,
   batched messages), and of one that takes
   ``--small-stores`` stores of 5 customers each (a signup, two orders and an NPS answer per
   customer): memory must follow activity, not the number of stores.

Each part deletes the topics it made when it ends (``drop_topics``), and the latency part starts once
the broker has removed their files: the log cleaner would otherwise go on compacting a finished
part's changelogs while the next part is measured.

It prints a table and writes ``bench/results/<date>.json`` with the machine's facts, and
beside it ``<date>.png`` (``bench.plot``): throughput against the ceilings and the peer, and
latency over time.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import heapq
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from infra.local import exit_with_parent, free_port
from metrics.compare import metric_differences
from metrics.events import INPUT_TOPICS, Event
from metrics.reference import ReferenceConfig, reference_all
from metrics.timegrid import DAY_MS, parse_duration
from metrics.validation import parse_message
from streams.connections import KafkaTarget, async_redis, kafka_client_options
from streams.settings import Settings
from streams.sinks.redis_sink import metric_key, parse_redis_field, read_health
from streams.tools.demo import stop_worker, worker_command
from streams.tools.simulate import TokenBucket
from streams.tools.storefront import Storefronts
from streams.worker.topics import ensure_topics, internal_topic
from streams.worker.wire import pack_kept

#: how often the bench polls Redis while it waits
POLL_S = 0.05
LATENCY_POLL_S = 0.01
#: the latency runs' generator sleeps at least this long between its bursts of sends
LATENCY_PACE_S = 0.005
#: before a latency run: the broker acknowledges every burst of sends within this, for a whole span
QUIET_ACK_S = 0.05
#: longer than the broker's log cleaner's passes apart (``log.cleaner.backoff.ms``, 15 s), so that no
#: pass of it falls between the prompt bursts unseen (see broker_quiet for what this does not catch)
QUIET_SPAN_S = 16.0
QUIET_TIMEOUT_S = 120.0
#: Kafka's default ``file.delete.delay.ms``, for a broker that does not say its own
FILE_DELETE_DELAY_MS = 60_000
#: in the name of every topic the bench makes (its prefixes and app ids), and of the peer's and ceiling's
BENCH_TOPIC_MARK = "bench-"
#: the latency part starts this long after the broker's delay for removing the dropped topics' files
DROPPED_MARGIN_S = 5.0


@dataclass(frozen=True)
class BenchOptions:
    """What to run; the defaults are the SPEC's targets."""

    events: int = 1_000_000
    batch: int = 500
    stores: int = 5
    customers: int = 200_000
    seed: int = 1
    sample_stores: int = 2
    rate: float = 2_000.0
    duration_s: float = 60.0
    memory_customers: int = 1_000_000
    small_stores: int = 10_000
    restart_events: tuple[int, ...] = (200_000, 2_000_000)
    scale_events: int = 300_000
    emit_interval_ms: int = 250
    timeout_s: float = 3_600.0
    output_dir: Path = Path("bench/results")
    shapes: tuple[int, ...] = field(default=(1, 500))
    #: run the Quix Streams peer beside the worker on each shape
    peer: bool = True
    #: how many times the latency part runs (each with a worker of its own), to show its spread
    latency_runs: int = 3


@dataclass
class Dataset:
    """A pre-filled topic set: its prefix, what it holds and the reference's inputs."""

    prefix: str
    batch: int
    messages: int
    events: int


@dataclass
class Workload:
    """The events of the throughput runs (the same for both shapes)."""

    bodies: list[tuple[str, bytes]]
    #: store -> its events (what the peer must have counted)
    store_events: dict[str, int]
    sample_stores: list[str]
    sample_events: list[Event]
    as_of_ms: int


class BenchError(Exception):
    """The bench could not finish (a worker died, a wait timed out, a number was wrong)."""


# -- data -------------------------------------------------------------------------------------


def make_workload(options: BenchOptions, settings: Settings) -> Workload:
    """Historical storefront traffic ending a day ago, encoded once; the sample stores' events parsed."""
    span_ms = 60 * DAY_MS
    start_ms = (time.time_ns() // 1_000_000) - DAY_MS - span_ms
    step = span_ms / max(options.events, 1)
    counter = iter(range(options.events))

    def clock() -> int:
        return int(start_ms + next(counter) * step)

    generator = Storefronts(seed=options.seed, stores=options.stores, customers=options.customers, clock=clock)
    # the smallest stores are the sample: the reference is a plain (slow) computation
    sample = generator.store_ids[-options.sample_stores:] if options.sample_stores else []
    wanted = set(sample)
    bodies: list[tuple[str, bytes]] = []
    store_events: dict[str, int] = {}
    sample_events: list[Event] = []
    now_ms = time.time_ns() // 1_000_000
    as_of_ms = 0
    for _ in range(options.events):
        topic, body = next(generator)
        encoded = pack_kept(body)  # a million of them are kept: see pack_kept
        bodies.append((topic, encoded))
        store_events[body["store_id"]] = store_events.get(body["store_id"], 0) + 1
        as_of_ms = max(as_of_ms, generator.last_ms or 0)
        if body["store_id"] in wanted:
            for item in parse_message(encoded, topic, now_ms=now_ms, max_future_skew_ms=settings.max_future_skew_ms):
                if not isinstance(item, Event):
                    raise BenchError(f"the simulator made an invalid event: {item}")
                sample_events.append(item)
    return Workload(bodies, store_events, sample, sample_events, as_of_ms)


async def prefill(settings: Settings, prefix: str, bodies: list[tuple[str, bytes]], batch: int) -> Dataset:
    """Write the bodies to the prefixed input topics, ``batch`` per message (a JSON array when > 1)."""
    topics = {name: prefix + name for name in INPUT_TOPICS}
    await ensure_topics(settings, list(topics.values()), settings.partitions)
    producer = AIOKafkaProducer(
        **kafka_client_options(settings),
        linger_ms=20,
        max_batch_size=1024 * 1024,
        max_request_size=4 * 1024 * 1024,
        acks=1,
    )
    await producer.start()
    messages = 0
    pending: list[asyncio.Future[Any]] = []
    buffers: dict[str, list[bytes]] = {name: [] for name in INPUT_TOPICS}

    async def send(name: str, value: bytes) -> None:
        nonlocal messages, pending
        pending.append(await producer.send(topics[name], value))
        messages += 1
        if len(pending) >= 20_000:
            await asyncio.gather(*pending)
            pending = []

    try:
        for name, body in bodies:
            if batch == 1:
                await send(name, body)
                continue
            buffer = buffers[name]
            buffer.append(body)
            if len(buffer) >= batch:
                await send(name, b"[" + b",".join(buffer) + b"]")
                buffer.clear()
        for name, buffer in buffers.items():
            if buffer:
                await send(name, b"[" + b",".join(buffer) + b"]")
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return Dataset(prefix, batch, messages, len(bodies))


# -- ceilings ---------------------------------------------------------------------------------


async def raw_ceiling(settings: Settings, dataset: Dataset, timeout_s: float) -> dict[str, float]:
    """aiokafka ``getmany`` in batches plus orjson on every message: first message to last."""
    consumer = AIOKafkaConsumer(
        **kafka_client_options(settings),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    await consumer.start()
    try:
        partitions = [
            TopicPartition(dataset.prefix + name, p) for name in INPUT_TOPICS for p in range(settings.partitions)
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        messages = events = 0
        first: float | None = None
        deadline = time.monotonic() + timeout_s
        while messages < dataset.messages:
            if time.monotonic() > deadline:
                raise BenchError(f"raw consumer read {messages} of {dataset.messages} messages")
            batches = await consumer.getmany(timeout_ms=500, max_records=20_000)
            for records in batches.values():
                if first is None:
                    first = time.perf_counter()
                for record in records:
                    decoded = orjson.loads(record.value)
                    events += len(decoded) if isinstance(decoded, list) else 1
                messages += len(records)
        seconds = time.perf_counter() - (first or time.perf_counter())
    finally:
        await consumer.stop()
    return {"messages": messages, "events": events, "seconds": seconds, "events_per_s": events / seconds}


async def _until_result(module: str, label: str, name: str, work_dir: Path, env: dict[str, str],
                        timeout_s: float) -> dict[str, Any]:
    """Run ``python -m module`` (the BENCH_* variables in ``env``) until it writes its result file; the result."""
    result = work_dir / f"{name}json"
    log_path = work_dir / f"{name}log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", module],
                                   env={**os.environ, **env, "BENCH_RESULT": str(result)},
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   preexec_fn=exit_with_parent)
    try:
        deadline = time.monotonic() + timeout_s
        while not result.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                # the log's end goes in the error: the bench's work folder is removed when it stops
                exited = process.poll() is not None
                what = f"exited with {process.returncode}" if exited else f"did not finish in {timeout_s:.0f}s"
                raise BenchError(f"{label} {what}: {log_path.read_text(errors='replace')[-2000:]}")
            await asyncio.sleep(POLL_S)
    finally:
        stop_worker(process)
    values: dict[str, Any] = orjson.loads(result.read_bytes())
    values["events_per_s"] = values["events"] / values["seconds"]
    return values


async def faust_ceiling(settings: Settings, dataset: Dataset, work_dir: Path, timeout_s: float) -> dict[str, Any]:
    """An empty Faust agent (``bench.faust_ceiling``) in its own process: first message to last."""
    env = {
        "BENCH_TOPICS": ",".join(dataset.prefix + name for name in INPUT_TOPICS),
        "BENCH_MESSAGES": str(dataset.messages),
        "BENCH_APP_ID": f"bench-ceiling-{uuid.uuid4().hex[:8]}",
        "BENCH_BROKER": ";".join(settings.broker_urls),
        "BENCH_PARTITIONS": str(settings.partitions),
        "BENCH_DATADIR": str(work_dir / "ceiling-state"),
    }
    return await _until_result("bench.faust_ceiling", "the Faust ceiling worker", f"ceiling-{dataset.prefix}",
                               work_dir, env, timeout_s)


async def quix_peer(settings: Settings, dataset: Dataset, store_events: dict[str, int], work_dir: Path,
                    timeout_s: float) -> dict[str, Any]:
    """The Quix Streams peer (``bench.quix_peer``) in its own process: first message to last.

    Its counts by store must be the workload's, or the peer's figure would not be of the same work.
    """
    env = {
        "BENCH_TOPICS": ",".join(dataset.prefix + name for name in INPUT_TOPICS),
        "BENCH_EVENTS": str(dataset.events),
        "BENCH_APP_ID": f"bench-peer-{uuid.uuid4().hex[:8]}",
        "BENCH_DATADIR": str(work_dir / f"peer-state-{dataset.prefix}"),
    }
    values = await _until_result("bench.quix_peer", "the Quix Streams peer", f"peer-{dataset.prefix}", work_dir,
                                 env, timeout_s)
    if values["stores"] != dict(sorted(store_events.items())):
        raise BenchError(f"the Quix Streams peer counted {values['stores']}, the workload has {store_events}")
    return values


# -- workers ------------------------------------------------------------------------------------


class Worker:
    """One ``loyalty worker`` process with its own app id, topics, state and Redis database."""

    def __init__(self, settings: Settings, work_dir: Path, prefix: str, database: int, **env: str) -> None:
        self.name = prefix.rstrip("-")
        self.redis_url = settings.redis_url.rsplit("/", 1)[0] + f"/{database}"
        self.redis_settings = settings.model_copy(update={"redis_url": self.redis_url})
        self.log_path = work_dir / f"worker-{self.name}.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("LOYALTY_")},
            "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
            "REDIS_URL": self.redis_url,
            "LOYALTY_APP_ID": f"bench-{self.name}",
            "LOYALTY_TOPIC_PREFIX": prefix,
            "LOYALTY_PARTITIONS": str(settings.partitions),
            "LOYALTY_WINDOWS": ",".join(settings.windows),
            "LOYALTY_STORE": "rocksdb",
            "LOYALTY_STATE_DIR": str(work_dir / f"state-{self.name}"),
            "LOYALTY_WEB_PORT": str(free_port()),
            "LOYALTY_LOG_LEVEL": "warning",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    async def start(self) -> aioredis.Redis:
        """Empty its Redis database, start the process; returns a Redis client on that database."""
        client = async_redis(self.redis_settings, decode_responses=True)
        await client.flushdb()
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                worker_command(), env=self.env, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=exit_with_parent,
            )
        self.started = time.perf_counter()
        return client

    def check_alive(self) -> None:
        """Raise when the worker process has exited."""
        if self.process is not None and self.process.poll() is not None:
            # the log's end goes in the error: the bench's work folder is removed when it stops
            try:
                tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])
            except OSError:
                tail = "(no log)"
            raise BenchError(f"worker {self.name} exited with {self.process.returncode}; the end of its log:\n{tail}")

    def peak_rss_bytes(self) -> int | None:
        """The process's peak resident set size so far (Linux ``VmHWM``), else ``None``."""
        if self.process is None:
            return None
        try:
            text = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return None

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL)."""
        if self.process is not None:
            stop_worker(self.process)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _decoded(mapping: dict[Any, Any]) -> dict[str, str]:
    return {_text(key): _text(value) for key, value in mapping.items()}


async def throughput(
    settings: Settings, options: BenchOptions, workload: Workload, dataset: Dataset, work_dir: Path, database: int
) -> dict[str, Any]:
    """One worker from the pre-filled topics until Redis equals the reference on the sample stores."""
    windows_ms = [parse_duration(w) for w in settings.windows]
    config = ReferenceConfig(bucket_ms=settings.bucket_ms, horizon_ms=settings.active_horizon_ms)
    reference = reference_all(workload.sample_events, windows_ms=windows_ms, as_of_ms=workload.as_of_ms,
                              config=config)
    expected = {key: value for key, value in reference.items() if key[0] in workload.sample_stores}
    last_event_ms: dict[str, int] = {}
    for event in workload.sample_events:
        last_event_ms[event.store_id] = max(last_event_ms.get(event.store_id, 0), event.occurred_at_ms)
    worker = Worker(settings, work_dir, dataset.prefix, database, LOYALTY_CLOCK="event",
                    LOYALTY_EMIT_INTERVAL=f"{options.emit_interval_ms}ms")
    client = await worker.start()
    first_seen: float | None = None
    problems: list[str] = ["no snapshot yet"]
    try:
        deadline = time.monotonic() + options.timeout_s
        while True:
            worker.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{dataset.prefix}: no match with the reference in time: {problems[:5]}")
            health = await read_health(client)
            if first_seen is None and health.get("events_received"):
                first_seen = time.perf_counter()
            if health.get("events_applied", 0) + health.get("duplicates", 0) >= dataset.events:
                problems = await _compare(client, expected, settings, workload.as_of_ms, last_event_ms)
                if not problems:
                    break
            await asyncio.sleep(POLL_S)
        finished = time.perf_counter()
        peak = worker.peak_rss_bytes()
    finally:
        worker.stop()
        await client.aclose()
    consuming_s = finished - (first_seen or worker.started)
    return {
        "events": dataset.events,
        "messages": dataset.messages,
        "seconds_from_start": finished - worker.started,
        "seconds": consuming_s,
        "events_per_s": dataset.events / consuming_s,
        "peak_rss_bytes": peak,
        "checked_stores": workload.sample_stores,
        "checked_snapshots": len(expected),
    }


async def _compare(
    client: aioredis.Redis, expected: dict[tuple[str, int], dict[str, object]], settings: Settings, as_of_ms: int,
    last_event_ms: dict[str, int],
) -> list[str]:
    """How the sample stores' hashes differ from the reference as of ``as_of_ms`` (empty: equal).

    A store is published again when it changes or the clock crosses a bucket: one without
    events since its last snapshot may stay as of an earlier time of the last bucket, whose
    numbers are those as of ``as_of_ms`` (same bucket, no event of the store in between).
    """
    names = dict(zip((parse_duration(w) for w in settings.windows), settings.windows, strict=True))
    problems: list[str] = []
    bucket_ms = settings.bucket_ms
    for (store, window_ms), metrics in expected.items():
        key = metric_key(store, names[window_ms])
        stored = _decoded(await client.hgetall(key))
        stored_as_of = int(stored.get("as_of_ms") or -1)
        if stored_as_of // bucket_ms != as_of_ms // bucket_ms or stored_as_of < last_event_ms.get(store, 0):
            problems.append(f"{key}: as_of_ms {stored.get('as_of_ms')}, not in the bucket of {as_of_ms} "
                            f"after the store's last event")
            continue
        actual = {name: parse_redis_field(name, stored.get(name, "")) for name in metrics}
        problems.extend(f"{key} {p}" for p in metric_differences(actual, metrics))
    return problems


# -- latency ------------------------------------------------------------------------------------


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def latency_over_time(sent_at: list[float], latencies: list[float]) -> list[dict[str, float]]:
    """Latency by second of sending: the orders sent in each second, their p50, p99 and max.

    >>> [(p["second"], p["orders"], p["max_s"]) for p in latency_over_time([0.1, 0.5, 1.2], [0.2, 0.4, 0.3])]
    [(0, 2, 0.4), (1, 1, 0.3)]
    """
    by_second: dict[int, list[float]] = {}
    for stamp, value in zip(sent_at, latencies, strict=True):
        by_second.setdefault(int(stamp), []).append(value)
    return [
        {"second": second, "orders": len(values), "p50_s": _percentile(values, 0.50),
         "p99_s": _percentile(values, 0.99), "max_s": max(values)}
        for second, values in sorted(by_second.items())
    ]


async def latency(settings: Settings, options: BenchOptions, work_dir: Path, database: int) -> dict[str, Any]:
    """The latency part ``options.latency_runs`` times, each with a fresh worker; every run and their spread."""
    runs = []
    for _ in range(max(1, options.latency_runs)):
        runs.append(await latency_run(settings, options, work_dir, database))
    return {
        "runs": runs,
        "p99_s_worst": max(run["p99_s"] for run in runs),
        "p99_s_best": min(run["p99_s"] for run in runs),
        "max_s": max(run["max_s"] for run in runs),
    }


async def broker_quiet(settings: Settings, topic: str) -> float:
    """Wait until the broker acknowledges promptly again; returns the seconds waited.

    The latency part follows the throughput parts, which leave the broker gigabytes to write back
    and compact: in the runs before this wait, the broker took up to a second to acknowledge the
    load generator's sends for the first seconds of the first latency run (its ``ack_over_time``),
    a delay of the bench's own previous parts that no worker can shorten. So the page cache is
    written back first, then bursts of 50 sends are timed, 0.2 s apart, until every one for
    :data:`QUIET_SPAN_S` was acknowledged within :data:`QUIET_ACK_S` (it was three prompt bursts in
    a row, after which the broker took 0.7 s to acknowledge for two seconds while its log cleaner
    compacted the throughput part's changelogs). It does not catch everything: in a later run the
    wait ended at its minimum, quiet throughout, and the broker still took 0.84 s in the first two
    seconds of the first latency run, a stall that came after the wait, at that run's start. A
    broker that never settles ends the wait at :data:`QUIET_TIMEOUT_S`, and the run measures it as
    it is (its ``ack_over_time`` shows it).
    """
    started = time.monotonic()
    await asyncio.to_thread(os.sync)
    await ensure_topics(settings, [topic], 1)
    producer = live_producer(settings)

    def burst() -> float:
        """The slowest acknowledgement of 50 sends (infinite when one failed)."""
        slowest = 0.0
        sent = time.perf_counter()

        def acked(error: Any, _message: Any) -> None:
            nonlocal slowest
            slowest = max(slowest, time.perf_counter() - sent if error is None else float("inf"))

        for _ in range(50):
            producer.produce(topic, b"{}", on_delivery=acked)
        producer.flush(QUIET_TIMEOUT_S)
        return slowest

    quiet_since: float | None = None
    while time.monotonic() - started < QUIET_TIMEOUT_S:
        if await asyncio.to_thread(burst) >= QUIET_ACK_S:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= QUIET_SPAN_S:
            break
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def topic_names(kafka: KafkaTarget) -> set[str]:
    """Every topic of the broker (``kafka``: the settings or a bootstrap address)."""
    admin = AIOKafkaAdminClient(**kafka_client_options(kafka))
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def drop_topics(settings: Settings, kept: set[str]) -> float:
    """Delete the bench's topics that are not in ``kept`` (the topics before a part): the part's input,
    internal, changelog, ceiling and peer topics, all named with ``bench-``; a topic of anything else
    that shares the broker is left alone. Returns the seconds after which the broker removes their
    files (its ``file.delete.delay.ms``).

    A part leaves gigabytes of compacted changelogs behind, which the broker's log cleaner goes on
    compacting after the part has ended: in the runs that kept them, the broker took 0.7 to 0.84 s to
    acknowledge sends at the start of the first latency run, the one after the batched part. Deleted,
    they leave the cleaner nothing to do; their files go once the broker's delay has passed.
    """
    admin = AIOKafkaAdminClient(**kafka_client_options(settings))
    await admin.start()
    try:
        made = sorted(name for name in set(await admin.list_topics()) - kept if BENCH_TOPIC_MARK in name)
        if made:
            response = await admin.delete_topics(made)
            failed = [(topic, code) for topic, code, *_ in response.topic_error_codes if code]
            if failed:
                raise BenchError(f"the broker did not delete the bench's topics: {failed} (topic, error code)")
        cluster = await admin.describe_cluster()
        broker = str(cluster["brokers"][0]["node_id"])
        resource = ConfigResource(ConfigResourceType.BROKER, broker, configs={"file.delete.delay.ms": None})
        (response,) = await admin.describe_configs([resource])
        ((_, _, _, _, entries),) = response.resources
        delay_ms = next((int(entry[1]) for entry in entries if entry[0] == "file.delete.delay.ms"),
                        FILE_DELETE_DELAY_MS)
    finally:
        await admin.close()
    return delay_ms / 1000 if made else 0.0


def live_producer(settings: Settings) -> Any:
    """The latency runs' load generator: librdkafka (the bench group's ``confluent-kafka``), not aiokafka.

    On two cores the generator shares the CPU with the worker it measures: aiokafka took about three
    quarters of a core to send 2,000 messages a second, one request a millisecond, where librdkafka's
    threads batch them in C (5 ms linger, as a shop's producer would). Acknowledged by the leader.
    """
    try:
        from confluent_kafka import Producer
    except ImportError as error:  # pragma: no cover - the bench group is a default group
        raise BenchError("the latency runs need the bench dependency group (uv sync installs it)") from error
    from bench.quix_peer import librdkafka_security

    return Producer({"bootstrap.servers": settings.kafka_bootstrap_servers, "linger.ms": 5, "acks": 1,
                     **librdkafka_security(settings)})


async def latency_run(settings: Settings, options: BenchOptions, work_dir: Path, database: int) -> dict[str, Any]:
    """Produce live traffic at ``options.rate`` for ``options.duration_s`` to a worker that is publishing already;
    order latencies to Redis, in percentiles and by second of sending."""
    prefix = f"bench-{uuid.uuid4().hex[:6]}-live-"
    quiet_s = await broker_quiet(settings, prefix + "probe")
    await ensure_topics(settings, [prefix + n for n in INPUT_TOPICS], settings.partitions)
    worker = Worker(settings, work_dir, prefix, database, LOYALTY_CLOCK="wall",
                    LOYALTY_EMIT_INTERVAL=f"{options.emit_interval_ms}ms")
    client = await worker.start()
    producer = live_producer(settings)
    generator = Storefronts(seed=options.seed + 1, stores=options.stores, customers=options.customers,
                            clock=lambda: time.time_ns() // 1_000_000)
    stores = generator.store_ids
    window = settings.windows[-1]
    keys = [metric_key(store, window) for store in stores]
    sent = 0

    #: per second of sending: how long the broker took to acknowledge the sends (the load generator's and
    #: the broker's share of a latency, which the worker cannot shorten)
    acked_in: dict[int, list[float]] = {}
    sending_from = float("inf")  # set when the measured sending starts: the warm-up's acks are left out

    def acked(stamp: float, error: Any) -> None:
        if stamp >= sending_from and error is None:
            acked_in.setdefault(int(stamp - sending_from), []).append(time.perf_counter() - stamp)

    async def send_one() -> tuple[str | None, str, float]:
        nonlocal sent
        topic, body = next(generator)
        stamp = time.perf_counter()
        while True:
            try:
                producer.produce(prefix + topic, orjson.dumps(body),
                                 on_delivery=lambda error, _message, stamp=stamp: acked(stamp, error))
                break
            except BufferError:  # the client's queue is full: let it deliver
                producer.poll(0.01)
                await asyncio.sleep(0)
        producer.poll(0)  # delivery callbacks of earlier sends
        sent += 1
        return (body["store_id"] if body["type"] == "order.placed" else None), body["event_id"], stamp

    async def orders_now() -> list[int]:
        async with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hget(key, "orders")
            replies = await pipe.execute()
        return [int(value or 0) for value in replies]

    try:
        # warm up until the worker publishes what it is sent: the group is formed, the topics read
        warm_deadline = time.monotonic() + 120
        while True:
            worker.check_alive()
            for _ in range(20):
                await send_one()
            await asyncio.sleep(0.2)
            health = await read_health(client)
            if health.get("events_applied", 0) >= sent and sum(await orders_now()) > 0:
                break
            if time.monotonic() > warm_deadline:
                raise BenchError(f"the live worker did not start publishing: see {worker.log_path}")
        await asyncio.sleep(3 * options.emit_interval_ms / 1000)
        baseline = await orders_now()
        # per store: send times of its orders, in order, and their event ids; and when each count was first seen
        order_times: dict[int, list[float]] = {i: [] for i in range(len(stores))}
        order_ids: dict[int, list[str]] = {i: [] for i in range(len(stores))}
        index_of = {store: i for i, store in enumerate(stores)}
        seen_counts: list[list[tuple[float, int]]] = [[] for _ in stores]
        done = asyncio.Event()

        async def poll() -> None:
            last = list(baseline)
            while not done.is_set():
                counts = await orders_now()
                stamp = time.perf_counter()
                for i, count in enumerate(counts):
                    if count > last[i]:
                        seen_counts[i].append((stamp, count - baseline[i]))
                        last[i] = count
                await asyncio.sleep(LATENCY_POLL_S)

        poller = asyncio.create_task(poll())
        bucket = TokenBucket(options.rate, burst=max(1.0, options.rate / 100))
        started = time.monotonic()
        sending_from = time.perf_counter()
        # the wall-clock start, to lay the run beside the broker's logs (its server and GC logs)
        sending_from_utc = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        produced = 0
        while time.monotonic() - started < options.duration_s:
            granted, wait = bucket.take(64)
            if not granted:
                # sends go out every few milliseconds, a handful at a time: waking for each single token
                # (every 0.5 ms at 2,000/s) took the generator most of a core, which the worker then lacked
                await asyncio.sleep(max(wait, LATENCY_PACE_S))
                continue
            for _ in range(granted):
                store, event_id, stamp = await send_one()
                produced += 1
                if store is not None:
                    order_times[index_of[store]].append(stamp)
                    order_ids[index_of[store]].append(event_id)
        await asyncio.to_thread(producer.flush, options.timeout_s)
        sending_s = time.monotonic() - started
        # wait until every order sent is counted
        # (a worker slower than the rate has a backlog to clear: its latency grows, and is measured)
        drain_deadline = time.monotonic() + options.timeout_s
        while any((seen_counts[i][-1][1] if seen_counts[i] else 0) < len(order_times[i]) for i in order_times):
            worker.check_alive()
            if time.monotonic() > drain_deadline:
                raise BenchError(f"the live worker did not publish every order within {options.timeout_s:.0f}s")
            await asyncio.sleep(POLL_S)
        done.set()
        await poller
        peak = worker.peak_rss_bytes()
    finally:
        producer.flush(0)
        worker.stop()
        await client.aclose()
    latencies: list[float] = []
    sent_at: list[float] = []
    latency_of: dict[str, float] = {}
    for i, times in order_times.items():
        seen = seen_counts[i]
        cursor = 0
        for k, stamp in enumerate(times, start=1):
            while seen[cursor][1] < k:
                cursor += 1
            latencies.append(seen[cursor][0] - stamp)
            sent_at.append(stamp - sending_from)
            latency_of[order_ids[i][k - 1]] = latencies[-1]
    hops = await live_hops(settings, prefix, worker.env["LOYALTY_APP_ID"], latency_of)
    return {
        "rate_target": options.rate,
        "broker_quiet_after_s": quiet_s,
        "sending_from_utc": sending_from_utc,
        "rate_sent": produced / sending_s,
        "seconds": sending_s,
        "orders_measured": len(latencies),
        "p50_s": _percentile(latencies, 0.50),
        "p99_s": _percentile(latencies, 0.99),
        "max_s": max(latencies),
        "mean_s": statistics.fmean(latencies),
        "peak_rss_bytes": peak,
        "over_time": latency_over_time(sent_at, latencies),
        # every send's time to the broker's ack (orders and the rest), by second of sending: when it
        # grows with the latency, the load generator or the broker is what is behind, not the worker
        "ack_over_time": [{"second": second, "sends": len(values), "p99_s": _percentile(values, 0.99)}
                          for second, values in sorted(acked_in.items())],
        # the orders' time per hop, for those the worker had not purged yet (see bench.latency_hops)
        "hops": hops,
    }


async def live_hops(settings: Settings, prefix: str, app_id: str, latency_of: dict[str, float]) -> dict[str, Any]:
    """The live run's orders' time per hop, from the records its input and internal topics still hold."""
    from bench.latency_hops import hop_breakdown, read_records  # it imports this module
    worker_settings = settings.model_copy(update={"topic_prefix": prefix, "app_id": app_id})
    inputs = [prefix + name for name in INPUT_TOPICS]
    by_customer = internal_topic(worker_settings, "events-by-customer")
    deltas = internal_topic(worker_settings, "deltas")
    records = await read_records(settings, [*inputs, by_customer, deltas])
    sent_ms = {}
    for topic in inputs:
        for _partition, _offset, stamp, value in records[topic]:
            sent_ms[orjson.loads(value)["event_id"]] = stamp
    return hop_breakdown(sent_ms, latency_of, records[by_customer], records[deltas])


# -- memory ----------------------------------------------------------------------------------------


def customer_bodies(customers: int, stores: int) -> Iterator[tuple[str, bytes]]:
    """Customers as a store has them, over 120 days, in time order: per customer a signup, an NPS answer and
    one to three orders (about four events each), spread over the stores.

    Customer ``i`` of ``N`` (``u = i / N``) signs up on day ``60 u`` and answers on day ``60 u + 3``; its
    last order is on day ``60 + 60 u``, and customers with two or three orders order on day ``60 u + 7``
    (and ``60 u + 30``) as well. Every customer is therefore active at the end (its last order lies within
    the 90-day horizon before the last event), which the memory part checks against ``*``.
    """
    end_ms = time.time_ns() // 1_000_000 - DAY_MS
    start_ms = end_ms - 120 * DAY_MS
    step = 60 * DAY_MS / max(customers, 1)

    def stream(kind: str, offset_ms: int, fewest_orders: int) -> Iterator[tuple[int, int, str]]:
        # one kind of event for every customer with at least ``fewest_orders`` orders: in time order
        for number in range(customers):
            if 1 + number % 3 >= fewest_orders:
                yield int(start_ms + offset_ms + number * step), number, kind

    streams = [stream("signup", 0, 0), stream("nps", 3 * DAY_MS, 0), stream("order-first", 7 * DAY_MS, 2),
               stream("order-middle", 30 * DAY_MS, 3), stream("order-last", 60 * DAY_MS, 1)]
    for at, number, kind in heapq.merge(*streams):
        common = {"event_id": f"mem-{kind}-{number}", "occurred_at": at, "store_id": f"store-{number % stores + 1}",
                  "customer_id": f"m{number}"}
        if kind == "signup":
            yield "signups", pack_kept({"type": "customer.signed_up", "channel": "organic", **common})
        elif kind == "nps":
            yield "survey-responses", pack_kept({"type": "survey.responded", "survey": "nps",
                                                 "score": number % 11, **common})
        else:
            yield "orders", pack_kept({"type": "order.placed", "order_id": f"{kind}-{number}",
                                       "amount": f"{10 + number % 90}.90", "currency": "EUR", **common})


def small_store_bodies(stores: int) -> Iterator[tuple[str, bytes]]:
    """Stores of 5 customers each over the last 30 days: a signup, two orders and an NPS answer per customer."""
    now_ms = time.time_ns() // 1_000_000
    start_ms = now_ms - 31 * DAY_MS
    step = 30 * DAY_MS / max(stores * 5, 1)
    for number in range(stores * 5):
        at = int(start_ms + number * step)
        common = {"store_id": f"small-{number // 5 + 1}", "customer_id": f"c{number % 5}"}
        yield "signups", pack_kept({"event_id": f"s{number}", "type": "customer.signed_up", "occurred_at": at,
                                    "channel": "organic", **common})
        for order in range(2):
            yield "orders", pack_kept({"event_id": f"o{number}-{order}", "type": "order.placed",
                                       "occurred_at": at + (order + 1) * DAY_MS // 4, "order_id": f"o{order}",
                                       "amount": "19.90", "currency": "EUR", **common})
        yield "survey-responses", pack_kept({"event_id": f"n{number}", "type": "survey.responded",
                                             "occurred_at": at + DAY_MS // 2, "survey": "nps",
                                             "score": number % 11, **common})


async def memory(settings: Settings, options: BenchOptions, work_dir: Path, database: int) -> dict[str, Any]:
    """Peak RSS of a worker that takes ``memory_customers`` customers with a signup, orders and a survey each."""
    bodies = list(customer_bodies(options.memory_customers, options.stores))
    events = len(bodies)
    result = await _peak_rss(settings, options, work_dir, database, bodies, options.memory_customers, "mem")
    return {"customers": options.memory_customers, "events": events, **result}


async def small_stores(settings: Settings, options: BenchOptions, work_dir: Path, database: int) -> dict[str, Any]:
    """Peak RSS of a worker that takes ``small_stores`` stores of 5 customers each (SPEC: 10,000 fit one worker)."""
    bodies = list(small_store_bodies(options.small_stores))
    result = await _peak_rss(settings, options, work_dir, database, bodies, options.small_stores * 5, "small")
    return {"stores": options.small_stores, "customers": options.small_stores * 5, **result}


async def _peak_rss(settings: Settings, options: BenchOptions, work_dir: Path, database: int,
                    bodies: list[tuple[str, bytes]], customers: int, label: str) -> dict[str, Any]:
    """Peak RSS of a worker that takes ``bodies``, once ``*`` counts every one of ``customers``."""
    prefix = f"bench-{uuid.uuid4().hex[:6]}-{label}-"
    dataset = await prefill(settings, prefix, bodies, options.batch)
    del bodies
    worker = Worker(settings, work_dir, prefix, database, LOYALTY_CLOCK="event",
                    LOYALTY_EMIT_INTERVAL=f"{options.emit_interval_ms}ms")
    client = await worker.start()
    try:
        deadline = time.monotonic() + options.timeout_s
        while True:
            worker.check_alive()
            health = await read_health(client)
            if health.get("events_applied", 0) >= dataset.events:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{label} run: {health.get('events_applied', 0)} of {dataset.events} applied")
            await asyncio.sleep(POLL_S)
        # the customers_end of all stores together must be every customer (a cheap correctness check)
        names = settings.windows
        while True:
            worker.check_alive()
            reply = await client.hget(metric_key("*", names[-1]), "customers_end")
            stored = None if reply is None else _text(reply)
            if stored is not None and int(stored) == customers:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{label} run: customers_end {stored} != {customers}")
            await asyncio.sleep(POLL_S)
        seconds = time.perf_counter() - worker.started
        peak = worker.peak_rss_bytes()
    finally:
        worker.stop()
        await client.aclose()
    return {"peak_rss_bytes": peak, "seconds_from_start": seconds}


# -- the whole run ------------------------------------------------------------------------------------


def machine_facts(settings: Settings) -> dict[str, Any]:
    """Cores, Python, Kafka and library versions of this run."""
    import aiokafka
    import faust

    import metrics
    from infra.local import kafka_version

    return {
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "system": platform.platform(),
        "python": platform.python_version(),
        # the workers inherit this process's environment, so they load the same build (metrics/__init__.py)
        "metrics_implementation": metrics.IMPLEMENTATION,
        "kafka": kafka_version(),
        "faust": faust.__version__,
        "aiokafka": aiokafka.__version__,
        "partitions": settings.partitions,
        "windows": list(settings.windows),
        "bucket_ms": settings.bucket_ms,
    }


async def run_bench(settings: Settings, options: BenchOptions, echo: Any = print) -> dict[str, Any]:
    """Every part of the bench; returns the results (also written to ``options.output_dir``)."""
    run_id = uuid.uuid4().hex[:6]
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_facts(settings),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "shapes": {},
    }
    options.output_dir.mkdir(parents=True, exist_ok=True)
    path = options.output_dir / f"{dt.date.today().isoformat()}.json"

    def save() -> None:
        # after every part, so a long run that is stopped keeps what it measured
        path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))

    with tempfile.TemporaryDirectory(prefix="loyalty-bench-") as tmp:
        work_dir = Path(tmp)
        database = 1
        shapes = options.shapes if options.events > 0 else ()
        if shapes:
            echo(f"generating {options.events:,} events ...")
            workload = make_workload(options, settings)
        files_gone_at = 0.0  # by when the broker has removed the files of the topics dropped so far

        @contextlib.asynccontextmanager
        async def part() -> AsyncIterator[None]:
            """One part of the bench: the topics it made are dropped when it has ended well."""
            nonlocal files_gone_at
            kept = await topic_names(settings)
            yield
            delay_s = await drop_topics(settings, kept)
            if delay_s:
                files_gone_at = time.monotonic() + delay_s + DROPPED_MARGIN_S

        for batch in shapes:
            async with part():
                prefix = f"bench-{run_id}-b{batch}-"
                echo(f"[{batch} per message] prefill ...")
                dataset = await prefill(settings, prefix, workload.bodies, batch)
                echo(f"[{batch} per message] raw aiokafka ceiling ...")
                raw = await raw_ceiling(settings, dataset, options.timeout_s)
                echo(f"[{batch} per message] empty Faust agent ceiling ...")
                empty = await faust_ceiling(settings, dataset, work_dir, options.timeout_s)
                shape: dict[str, Any] = {"raw_aiokafka": raw, "empty_faust_agent": empty}
                if options.peer:
                    echo(f"[{batch} per message] Quix Streams peer ...")
                    shape["quix_streams_peer"] = await quix_peer(settings, dataset, workload.store_events,
                                                                 work_dir, options.timeout_s)
                echo(f"[{batch} per message] worker ...")
                worker = await throughput(settings, options, workload, dataset, work_dir, database)
                database += 1
                worker["ratio_to_raw"] = worker["events_per_s"] / raw["events_per_s"]
                worker["ratio_to_empty_agent"] = worker["events_per_s"] / empty["events_per_s"]
                if "quix_streams_peer" in shape:
                    worker["ratio_to_peer"] = worker["events_per_s"] / shape["quix_streams_peer"]["events_per_s"]
                shape["worker"] = worker
                results["shapes"][str(batch)] = shape
                save()
        if shapes:
            del workload
        if options.duration_s > 0:
            echo(f"latency at {options.rate:,.0f} events/s for {options.duration_s:.0f}s, "
                 f"{options.latency_runs} run(s) ...")
            async with part():
                # the latency is the worker's, not the broker's removing the files of the parts before
                dropped_wait_s = max(0.0, files_gone_at - time.monotonic())
                await asyncio.sleep(dropped_wait_s)
                results["latency"] = await latency(settings, options, work_dir, database)
                results["latency"]["waited_for_dropped_topics_s"] = dropped_wait_s
                database += 1
                save()
        if options.memory_customers > 0:
            echo(f"memory with {options.memory_customers:,} customers ...")
            async with part():
                results["memory"] = await memory(settings, options, work_dir, database)
                database += 1
                save()
        if options.small_stores > 0:
            echo(f"memory with {options.small_stores:,} stores of 5 customers ...")
            async with part():
                results["small_stores"] = await small_stores(settings, options, work_dir, database)
                database += 1
                save()
        from bench.recovery import restart_time, scale_out

        for events in options.restart_events:
            echo(f"restart time after {events:,} events ...")
            async with part():
                results.setdefault("restart", {})[str(events)] = await restart_time(
                    settings, options, work_dir, database, events
                )
                database += 1
                save()
        if len(options.restart_events) >= 2:
            runs = results["restart"]
            short, long = runs[str(min(options.restart_events))], runs[str(max(options.restart_events))]
            runs["ratio_longest_to_shortest"] = long["restart_seconds"] / short["restart_seconds"]
        if options.scale_events > 0:
            echo(f"one worker, then two, on {options.scale_events:,} events ...")
            async with part():
                results["scale_out"] = await scale_out(settings, options, work_dir, database, options.scale_events)
    save()
    from bench.plot import plot

    results["path"] = str(path)
    results["plot"] = str(plot(results, path.with_suffix(".png")))
    return results


def render_table(results: dict[str, Any]) -> Any:
    """The results as a rich table."""
    from rich.table import Table

    table = Table(title="loyalty bench")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("beside", justify="right")
    for batch, shape in results["shapes"].items():
        raw, empty, worker = shape["raw_aiokafka"], shape["empty_faust_agent"], shape["worker"]
        label = f"{batch} event(s)/message"
        table.add_row(f"{label}: raw aiokafka + orjson", f"{raw['events_per_s']:,.0f} ev/s", "")
        table.add_row(f"{label}: empty Faust agent", f"{empty['events_per_s']:,.0f} ev/s", "")
        if "quix_streams_peer" in shape:
            table.add_row(f"{label}: Quix Streams peer (1 state update/event)",
                          f"{shape['quix_streams_peer']['events_per_s']:,.0f} ev/s", "")
        table.add_row(
            f"{label}: worker ({worker['events']:,} events)",
            f"{worker['events_per_s']:,.0f} ev/s",
            f"{worker['ratio_to_empty_agent']:.1%} of empty agent, {worker['ratio_to_raw']:.2%} of raw"
            + (f", {worker['ratio_to_peer']:.1%} of the peer" if "ratio_to_peer" in worker else ""),
        )
    for number, lat in enumerate(results.get("latency", {}).get("runs", []), start=1):
        table.add_row(f"latency run {number} at {lat['rate_sent']:,.0f} ev/s: p50 / p99",
                      f"{lat['p50_s'] * 1000:,.0f} / {lat['p99_s'] * 1000:,.0f} ms",
                      f"max {lat['max_s'] * 1000:,.0f} ms, {lat['orders_measured']:,} orders")
        from bench.latency_hops import HOPS

        hops = lat.get("hops") or {}
        if all(hops.get(hop) for hop in HOPS):
            table.add_row(f"  its last {hops['orders']:,} orders by hop: p50 / p99",
                          ", ".join(f"{hops[hop]['p50_s'] * 1000:,.0f} / {hops[hop]['p99_s'] * 1000:,.0f}"
                                    for hop in HOPS) + " ms",
                          " + ".join(HOPS))
    if "memory" in results:
        mem = results["memory"]
        peak = mem["peak_rss_bytes"]
        table.add_row(f"peak RSS, {mem['customers']:,} customers",
                      "n/a" if peak is None else f"{peak / 2**20:,.0f} MiB", "")
    if "small_stores" in results:
        small = results["small_stores"]
        peak = small["peak_rss_bytes"]
        table.add_row(f"peak RSS, {small['stores']:,} stores of 5 customers",
                      "n/a" if peak is None else f"{peak / 2**20:,.0f} MiB",
                      "" if peak is None else f"{peak / small['stores'] / 1024:,.0f} KiB a store")
    for events, run in results.get("restart", {}).items():
        if not isinstance(run, dict):
            continue
        disk, live = run["internal_bytes_total"], run.get("internal_live_bytes_total")
        table.add_row(f"restart after {int(events):,} events ({run['days']} days)", f"{run['restart_seconds']:,.1f} s",
                      "" if disk is None else f"internal topics {disk / 2**20:,.0f} MiB"
                      + ("" if live is None else f" ({live / 2**20:,.0f} MiB in the logs)")
                      + f", deltas {run['deltas_bytes_per_event']:,.0f} B/event")
    if "ratio_longest_to_shortest" in results.get("restart", {}):
        ratio = results["restart"]["ratio_longest_to_shortest"]
        table.add_row("restart time, longest / shortest history", f"{ratio:.2f}", "")
    if "scale_out" in results:
        from bench.recovery import THREE_TOPICS

        scale = results["scale_out"]
        two = scale["2_workers"]
        shares = ", ".join(  # one-partition topics (the star ones) only in the JSON and "all internal"
            f"{label} {part['largest_partition_share']:.0%}" for label, part in two["partition_bytes"].items()
            if label in (*THREE_TOPICS, "all three", "all internal")
        )
        second_half = ("" if scale["second_half_ratio"] is None
                       else f" ({scale['second_half_ratio']:.2f}x over the second half of the events)")
        table.add_row("one worker", f"{scale['1_workers']['events_per_s']:,.0f} ev/s", "")
        table.add_row("two workers", f"{two['events_per_s']:,.0f} ev/s",
                      f"{scale['ratio']:.2f}x{second_half}; "
                      f"largest partition: {shares} (P={scale['partitions']})")
    return table
