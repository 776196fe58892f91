"""Bounded recovery and scale-out (SPEC section 9): restart time at two history lengths, disk, two workers.

Parts of ``loyalty bench``:

- restart: a worker takes N events of storefront traffic (same stores and customers, the same
  events per day: a longer history spans more days), checkpoints, and is SIGKILLed; Redis is
  emptied and the worker started again; the restart time is until every key (every store and
  ``*``, every window) is published again as of the last event. Beside it, the bytes the
  internal topics (repartition topics, deltas, checkpoints, changelogs) hold on disk at the
  kill, and the deltas topic's bytes per input event. Both should depend on the live state, not
  on N. The disk is read once the broker's log cleaner has nothing left to compact by its own
  rule (see :func:`compaction_settled`), so two runs compare state rather than cleaner timing;
  and the workers remember event ids for ``DEDUPE_TTL`` instead of 30 days: the bench folds years
  of history in minutes of wall time, and a worker that lived through them would have forgotten
  all but the last 30 days' ids.
- scale-out: one worker, then two workers in one group, on the same pre-filled topics; events
  per second from the first event received to the last applied, and over the second half of
  the events (after the join; the events done each second are kept as ``progress``, where a
  join or a slow partition shows), and each internal topic's
  largest partition share of its bytes on disk (no partition should carry more than 2/P), alone,
  for the three topics every event crosses together, and for all internal topics together.

Disk figures read the local Kafka's data folder (``loyalty up``); with another Kafka they are
left out.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from bench.run import POLL_S, BenchError, BenchOptions, Worker, _text, prefill
from infra.local import exit_with_parent
from metrics.catalog import ALL_STORES
from metrics.timegrid import DAY_MS
from streams.connections import kafka_client_options
from streams.settings import Settings
from streams.sinks.redis_sink import metric_key, read_health
from streams.tools.storefront import Storefronts
from streams.worker.contiguous import PURGE_INTERVAL_S
from streams.worker.topics import MIN_CLEANABLE_DIRTY_RATIO
from streams.worker.wire import pack_kept

#: events per simulated day of the restart histories (a longer history spans more days)
EVENTS_PER_DAY = 1_500
#: checkpoint interval of the bench's workers in the restart part (the restart reads at most this much log)
CHECKPOINT_INTERVAL = "5s"
#: LOYALTY_DEDUPE_TTL of the restart part's workers (wall time: it stands for the default 30 days,
#: a small part of the years the history spans)
DEDUPE_TTL = "60s"
#: how often the scale-out part notes the events done (its ``progress`` lists)
PROGRESS_S = 1.0
#: the topics every event crosses: the scale-out part's "all three" share
THREE_TOPICS = ("events-by-store", "events-by-customer", "deltas")


def storefront_bodies(events: int, stores: int, customers: int, seed: int) -> Iterator[tuple[str, bytes]]:
    """``events`` of storefront traffic at ``EVENTS_PER_DAY``, ending a day ago."""
    span_ms = max(1, events // EVENTS_PER_DAY) * DAY_MS
    start_ms = time.time_ns() // 1_000_000 - DAY_MS - span_ms
    step = span_ms / max(events, 1)
    counter = iter(range(events))

    def clock() -> int:
        return int(start_ms + next(counter) * step)

    generator = Storefronts(seed=seed, stores=stores, customers=customers, clock=clock)
    for _ in range(events):
        topic, body = next(generator)
        yield topic, pack_kept(body)  # listed by the caller: see pack_kept


def kafka_data_dir(settings: Settings) -> Path | None:
    """The local Kafka's data folder (``loyalty up``), if this run uses it."""
    folder = settings.state_dir / "kafka" / "data"
    return folder if folder.is_dir() else None


def topic_bytes(data_dir: Path | None, names: dict[str, str],
                log_starts: dict[tuple[str, int], int] | None = None) -> dict[str, dict[int, int]]:
    """Bytes on disk per partition of each topic (``label -> topic name``), from the Kafka data folder.

    With ``log_starts`` ((topic, partition) -> the log's first offset), only the segments that
    still hold a record at or after it count: those wholly below it (deleted records) wait for
    the broker's next retention check (``log.retention.check.interval.ms``, 5 minutes by
    default) to leave the disk, and files already marked ``.deleted`` for their removal.
    """
    if data_dir is None:
        return {}
    sizes: dict[str, dict[int, int]] = {}
    for label, topic in names.items():
        for folder in data_dir.glob(f"{topic}-*"):
            number = folder.name[len(topic) + 1:]
            if not number.isdigit():
                continue
            files = [entry for entry in folder.iterdir() if entry.is_file()]
            if log_starts is not None:
                start = log_starts.get((topic, int(number)), 0)
                # a segment's files are named by its base offset; it holds the offsets up to the next one's
                bases = sorted(base for entry in files if entry.suffix == ".log"
                               and (base := _segment_base(entry)) is not None)
                gone = {base for base, following in pairwise(bases) if following <= start}
                files = [entry for entry in files
                         if entry.suffix != ".deleted" and _segment_base(entry) not in gone]
            # blocks, not sizes: Kafka preallocates its index files sparse (10 MiB each, mostly holes)
            sizes.setdefault(label, {})[int(number)] = sum(entry.stat().st_blocks * 512 for entry in files)
    return sizes


def _segment_base(entry: Path) -> int | None:
    """The base offset in a Kafka segment file's name (``00000000000000000135.log``), else ``None``."""
    stem = entry.name.split(".")[0]
    return int(stem) if stem.isdigit() else None


def compaction_settled(data_dir: Path | None, topics: list[str]) -> bool:
    """Whether the broker's log cleaner has nothing left to compact in ``topics``, by its own rule.

    The cleaner compacts a partition when the bytes of its closed segments from the cleaned
    offset on (Kafka's ``cleaner-offset-checkpoint``) exceed the topics' ``min.cleanable.dirty.ratio`` of all
    its closed segments' bytes; the active (last) segment is never compacted.
    """
    if data_dir is None:
        return True
    cleaned: dict[tuple[str, int], int] = {}
    checkpoint = data_dir / "cleaner-offset-checkpoint"
    if checkpoint.is_file():
        for line in checkpoint.read_text().splitlines()[2:]:
            topic, partition, offset = line.rsplit(" ", 2)
            cleaned[(topic, int(partition))] = int(offset)
    for topic in topics:
        for folder in data_dir.glob(f"{topic}-*"):
            number = folder.name[len(topic) + 1:]
            if not number.isdigit():
                continue
            segments = sorted((base, entry.stat().st_size) for entry in folder.glob("*.log")
                              if (base := _segment_base(entry)) is not None)
            first_dirty = cleaned.get((topic, int(number)), 0)
            # a closed segment ends where the next begins; like Kafka, count whole segments that
            # hold any offset from the first dirty one on
            closed = [(following, size) for (_, size), (following, _) in pairwise(segments)]
            total = sum(size for _, size in closed)
            dirty = sum(size for end, size in closed if end > first_dirty)
            if total and dirty / total > float(MIN_CLEANABLE_DIRTY_RATIO):
                return False
    return True


async def _wait_compacted(settings: Settings, topics: list[str], deadline: float) -> float:
    """Wait until :func:`compaction_settled`; returns the seconds waited."""
    started = time.monotonic()
    while not compaction_settled(kafka_data_dir(settings), topics):
        if time.monotonic() > deadline:
            raise BenchError(f"the broker's log cleaner still behind on {topics}")
        await asyncio.sleep(1)
    return time.monotonic() - started


async def log_starts(settings: Settings, topics: list[str]) -> dict[tuple[str, int], int]:
    """The first offset of every partition of ``topics`` (Kafka's log start, moved by deletions)."""
    admin = AIOKafkaAdminClient(**kafka_client_options(settings))
    await admin.start()
    try:  # each topic's own partitions: the star topics have one
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    tps = [TopicPartition(topic["topic"], partition["partition"])
           for topic in described for partition in topic["partitions"]]
    missing = set(topics) - {tp.topic for tp in tps}
    if missing:
        raise BenchError(f"no partitions found for {sorted(missing)}")
    consumer = AIOKafkaConsumer(**kafka_client_options(settings), enable_auto_commit=False)
    await consumer.start()
    try:
        return {(tp.topic, tp.partition): offset for tp, offset in (await consumer.beginning_offsets(tps)).items()}
    finally:
        await consumer.stop()


def internal_topics(settings: Settings, prefix: str, app_id: str) -> dict[str, str]:
    """The internal topics of a bench worker (Faust names its changelogs by app id alone)."""
    internal = f"{prefix}{app_id}-"
    return {
        "events-by-store": internal + "events-by-store",
        "events-by-customer": internal + "events-by-customer",
        "deltas": internal + "deltas",
        "checkpoints": internal + "checkpoints",
        "customer-facts-changelog": f"{app_id}-customer-facts-changelog",
        "store-currency-changelog": f"{app_id}-store-currency-changelog",
        "store-channels-changelog": f"{app_id}-store-channels-changelog",
        "star-partials": internal + "star-partials",
        "star-samples": internal + "star-samples",
    }


async def _wait_applied(worker: Worker, client: aioredis.Redis, events: int, timeout_s: float,
                        progress: list[tuple[float, int]] | None = None) -> float:
    """Wait until the worker applied (or found duplicate) ``events``; returns when its first event arrived.

    With ``progress``, appends ``(seconds since the first event arrived, events done)`` at most every
    ``PROGRESS_S``, and at the end.
    """
    deadline = time.monotonic() + timeout_s
    first_seen: float | None = None
    noted = 0.0
    while True:
        worker.check_alive()
        health = await read_health(client)
        now = time.perf_counter()
        if first_seen is None and health.get("events_received"):
            first_seen = now
        done = health.get("events_applied", 0) + health.get("duplicates", 0)
        if progress is not None and first_seen is not None and (now - noted >= PROGRESS_S or done >= events):
            progress.append((round(now - first_seen, 2), done))
            noted = now
        if done >= events:
            return first_seen or worker.started
        if time.monotonic() > deadline:
            raise BenchError(f"{worker.name}: {health} after {timeout_s:.0f}s, {events} expected")
        await asyncio.sleep(POLL_S)


async def _wait_sampled(worker: Worker, client: aioredis.Redis, deadline: float) -> None:
    """Wait until every deltas partition's alert sampling has caught up with its watermark, and ``*``'s
    evaluation with the partitions.

    A replay folds years of events in minutes, and the alert boundaries they make due (one per
    store every ``LOYALTY_ALERT_STEP``) are sampled after them; a worker that lived through that
    history sampled each as it came. The kill waits for the same state, so the restart measures
    restoring a worker, not finishing its first pass. A partition's gauge is as of its own
    watermark, which may still be behind the others' (its deltas not all read): the gauge of
    ``*`` is 0 only once every partition has sampled as far as the furthest.
    """
    star = f"alert_sampling_behind_ms:{ALL_STORES}"
    while True:
        worker.check_alive()
        health = await read_health(client)
        behind = [value for name, value in health.items() if name.startswith("alert_sampling_behind_ms:")]
        if star in health and not any(behind):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{worker.name}: alert sampling still behind: {behind}")
        await asyncio.sleep(POLL_S)


async def _published_as_of(client: aioredis.Redis, keys: list[str]) -> set[str]:
    """The keys whose snapshot is there, with their ``as_of_ms``."""
    found = set()
    for key in keys:
        value = await client.hget(key, "as_of_ms")
        if value is not None:
            found.add(f"{key}@{_text(value)}")
    return found


async def restart_time(settings: Settings, options: BenchOptions, work_dir: Path, database: int,
                       events: int) -> dict[str, Any]:
    """Restart time and internal-topic disk after ``events`` of history (see the module docstring)."""
    prefix = f"bench-{uuid.uuid4().hex[:6]}-r{events}-"
    started = time.perf_counter()
    dataset = await prefill(settings, prefix, list(storefront_bodies(events, options.stores, options.customers,
                                                                    options.seed)), options.batch)
    prefill_s = time.perf_counter() - started
    env = {"LOYALTY_CLOCK": "event", "LOYALTY_EMIT_INTERVAL": f"{options.emit_interval_ms}ms",
           "LOYALTY_CHECKPOINT_INTERVAL": CHECKPOINT_INTERVAL, "LOYALTY_DEDUPE_TTL": DEDUPE_TTL}
    worker = Worker(settings, work_dir, prefix, database, **env)
    app_id = worker.env["LOYALTY_APP_ID"]
    client = await worker.start()
    try:
        await _wait_applied(worker, client, dataset.events, options.timeout_s)
        first_pass_s = time.perf_counter() - worker.started
        stores = Storefronts(seed=options.seed, stores=options.stores, customers=options.customers,
                             clock=lambda: 0).store_ids
        keys = [metric_key(store, window) for store in [*stores, ALL_STORES] for window in settings.windows]
        # every key published as of one time, the alert sampling caught up, then a checkpoint that
        # holds it all (two intervals), and the same keys still as of that time: then the kill
        # (the deltas of the last events may still be on their way when the keys first agree)
        deadline = time.monotonic() + options.timeout_s
        published_s = sampled_s = 0.0
        final: set[str] = set()
        while True:
            published = await _published_as_of(client, keys)
            if len(published) == len(keys) and len({entry.split("@")[1] for entry in published}) == 1:
                if published == final:
                    break
                final = published
                published_s = time.perf_counter() - worker.started
                if settings.alert_config() is not None:
                    await _wait_sampled(worker, client, deadline)
                sampled_s = time.perf_counter() - worker.started
                # two checkpoint intervals (the bench's own setting), and one purge of the repartition
                # topics: the disk is measured as of a worker idle since its last events
                await asyncio.sleep(max(2 * 5, PURGE_INTERVAL_S) + 1)
                continue
            worker.check_alive()
            if time.monotonic() > deadline:
                times: dict[str, list[str]] = {}
                for entry in published:
                    key, as_of = entry.split("@")
                    times.setdefault(as_of, []).append(key)
                missing = sorted(set(keys) - {entry.split("@")[0] for entry in published})
                raise BenchError(f"{prefix}: not every key published as of one time: missing {missing}, "
                                 f"by as_of {{{', '.join(f'{t}: {len(k)} keys' for t, k in times.items())}}}")
            await asyncio.sleep(POLL_S)
        topics = internal_topics(settings, prefix, app_id)
        compacted = [topics["checkpoints"], *(name for label, name in topics.items() if label.endswith("-changelog"))]
        compaction_wait_s = await _wait_compacted(settings, compacted, deadline)
        disk = topic_bytes(kafka_data_dir(settings), topics)
        live = topic_bytes(kafka_data_dir(settings), topics, await log_starts(settings, list(topics.values())))
        assert worker.process is not None
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.wait(timeout=30)
        await client.flushdb()
        restarted = Worker(settings, work_dir, prefix, database, **env)
        restarted.env["LOYALTY_WEB_PORT"] = worker.env["LOYALTY_WEB_PORT"]  # the same local state folder
        await (await restarted.start()).aclose()
        worker = restarted
        while (await _published_as_of(client, keys)) != final:
            worker.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{prefix}: after the restart, keys not published again as before the kill")
            await asyncio.sleep(POLL_S)
        restart_s = time.perf_counter() - worker.started
    finally:
        worker.stop()
        await client.aclose()
    totals = {label: sum(parts.values()) for label, parts in disk.items()}
    live_totals = {label: sum(parts.values()) for label, parts in live.items()}
    return {
        "events": dataset.events,
        "days": max(1, events // EVENTS_PER_DAY),
        "prefill_seconds": prefill_s,
        "first_pass_seconds": first_pass_s,
        "published_seconds": published_s,
        "alerts_sampled_seconds": sampled_s,
        # after the kill's wait: until the broker's cleaner had nothing left to compact
        "compaction_wait_seconds": compaction_wait_s,
        "restart_seconds": restart_s,
        "keys": len(keys),
        "internal_bytes": totals,
        "internal_bytes_total": sum(totals.values()) if totals else None,
        # without the segments wholly below each log's start, which the broker removes at its next retention check
        "internal_live_bytes": live_totals,
        "internal_live_bytes_total": sum(live_totals.values()) if live_totals else None,
        "deltas_bytes_per_event": totals["deltas"] / dataset.events if "deltas" in totals else None,
    }


async def scale_out(settings: Settings, options: BenchOptions, work_dir: Path, database: int,
                    events: int) -> dict[str, Any]:
    """One worker, then two in one group, on the same pre-filled topics (see the module docstring)."""
    prefix = f"bench-{uuid.uuid4().hex[:6]}-x-"
    dataset = await prefill(settings, prefix, list(storefront_bodies(events, options.stores, options.customers,
                                                                    options.seed + 7)), options.batch)
    results: dict[str, Any] = {"events": dataset.events, "messages": dataset.messages}
    for count in (1, 2):
        group = f"bench-{uuid.uuid4().hex[:6]}-g{count}"
        env = {"LOYALTY_CLOCK": "event", "LOYALTY_EMIT_INTERVAL": f"{options.emit_interval_ms}ms",
               "LOYALTY_CHECKPOINT_INTERVAL": "1h",  # nothing deleted: the bytes per partition are all there
               "LOYALTY_APP_ID": group}
        workers = []
        for instance in range(count):
            worker = Worker(settings, work_dir, f"{prefix}{count}{instance}-", database, **env)
            worker.env["LOYALTY_TOPIC_PREFIX"] = prefix  # the same topics, the same group
            workers.append(worker)
        clients = [await worker.start() for worker in workers[:1]]
        for worker in workers[1:]:
            worker.process = None
            await _start_keeping_redis(worker)
        progress: list[tuple[float, int]] = []
        try:
            first = await _wait_applied(workers[0], clients[0], dataset.events, options.timeout_s, progress)
            for worker in workers:
                worker.check_alive()
            seconds = time.perf_counter() - first
            shares = {}
            combined: dict[str, dict[int, int]] = {"all three": {}, "all internal": {}}
            for label, parts in topic_bytes(kafka_data_dir(settings), internal_topics(settings, prefix, group)).items():
                total = sum(parts.values())
                if not total:
                    continue
                shares[label] = {"bytes": total, "largest_partition_share": max(parts.values()) / total}
                for partition, size in parts.items():
                    combined["all internal"][partition] = combined["all internal"].get(partition, 0) + size
                    if label in THREE_TOPICS:
                        combined["all three"][partition] = combined["all three"].get(partition, 0) + size
            # topics together: what one partition number's owner holds of them (Faust gives the
            # co-partitioned topics' partitions of one number to one worker)
            for label, parts in combined.items():
                if parts:
                    total = sum(parts.values())
                    shares[label] = {"bytes": total, "largest_partition_share": max(parts.values()) / total}
        finally:
            for worker in workers:
                worker.stop()
            for client in clients:
                await client.flushdb()
                await client.aclose()
        results[f"{count}_workers"] = {"seconds": seconds, "events_per_s": dataset.events / seconds,
                                       "partition_bytes": shares, "progress": progress}
    results["ratio"] = results["2_workers"]["events_per_s"] / results["1_workers"]["events_per_s"]
    for count in (1, 2):
        run = results[f"{count}_workers"]
        run["second_half_events_per_s"] = second_half_rate(run["progress"], dataset.events)
    one, two = (results[f"{count}_workers"]["second_half_events_per_s"] for count in (1, 2))
    results["second_half_ratio"] = None if one is None or two is None else two / one
    results["partitions"] = settings.partitions
    return results


def second_half_rate(progress: list[tuple[float, int]], events: int) -> float | None:
    """Events per second over the second half of the events (the time of the half read between notes).

    The same events for one worker and two, after the second worker's join: how the two compare
    once both work, beside the whole run's rate, which pays for the join. ``None`` when the first
    note is past the half already (a run shorter than a note's interval).

    >>> second_half_rate([(0.0, 0), (1.0, 40), (2.0, 60), (4.0, 100)], 100), second_half_rate([(0.0, 100)], 100)
    (20.0, None)
    """
    half = events / 2
    for (before_s, before), (after_s, after) in pairwise(progress):
        if before <= half <= after and after > before:
            half_s = before_s + (after_s - before_s) * (half - before) / (after - before)
            end_s, done = progress[-1]
            return (done - half) / (end_s - half_s)
    return None


async def _start_keeping_redis(worker: Worker) -> None:
    """Start a worker process without emptying its Redis database (the group's first worker did)."""
    import subprocess

    from streams.tools.demo import worker_command

    with worker.log_path.open("wb") as log:
        worker.process = subprocess.Popen(worker_command(), env=worker.env, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          preexec_fn=exit_with_parent)
    worker.started = time.perf_counter()
