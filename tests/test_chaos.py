"""Chaos: the real worker processes on the real Kafka and Redis, killed, replaced, cut off, still equal the reference.

Every case runs ``loyalty worker`` processes (event clock, RocksDB, 4 partitions, 200 ms emits)
against a real Kafka and a real redis-server, injects one kind of failure while the input is
flowing, and ends with every published metric in Redis equal to the batch reference
(``metrics/reference.py``) for every store and window, ``as_of_ms`` at the largest event time,
and the dead letters being exactly the invalid input elements (by topic, partition, offset and
index) with their reasons. Run them alone with ``pytest -m chaos -s``; each prints what it
did (kills, restarts, outages) and how long Redis took to converge.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from infra import local
from metrics.compare import metric_differences
from metrics.events import INPUT_TOPICS, Event
from metrics.reference import ReferenceConfig, accepted_events, reference_all
from metrics.timegrid import DAY_MS, parse_duration
from metrics.validation import Rejection, parse_message
from streams.sinks.redis_sink import HEALTH_KEY, metric_key, parse_redis_field
from streams.tools.history import generate_history
from streams.worker.run import SHUTDOWN_TIMEOUT_EXIT
from streams.worker.topics import DEAD_LETTER_TOPIC, ensure_topics
from support import async_wait_for, clean_env, group_is_stable, loyalty_command, stop_process, tail
from test_pipeline import (
    FUTURE_MS,
    HORIZON,
    PARTITIONS,
    WINDOWS,
    cohort_problems,
    cohorts_reference_of,
    invalid_messages,
    mixed_batch,
    packed_history,
    read_topic,
)

#: The product promises each invalid input element dead-lettered exactly once: the ingest and the
#: gate each read back, after a restart, what they sent since their last commit (their ledgers).
DEAD_LETTERS_EXACTLY_ONCE = True

#: Redis databases of the session's redis-server used here (taken elsewhere: 2, 3, 5, 9, 11-14)
DATABASES = {"sigkill": 6, "replace": 7, "kafka_outage": 8}

#: a dead letter's identity: (topic, partition, offset, index in its batch or None)
Identity = tuple[str, int, int, int | None]


# -- the input ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One input message and the dead letters it must give: (index in its batch or None, reason)."""

    topic: str
    value: bytes | None
    rejections: tuple[tuple[int | None, str], ...] = ()


@dataclass(frozen=True)
class Plan:
    """Messages in production order, the valid events among them, and what Redis must end with."""

    messages: list[Message]
    valid: list[Event]
    reference: dict[tuple[str, int], dict[str, object]]
    as_of_ms: int
    #: the cohort matrix of every store and ``*``
    cohorts: dict[str, dict[str, Any]]

    @property
    def expected_reasons(self) -> Counter[str]:
        return Counter(reason for message in self.messages for _, reason in message.rejections)


def ingest_rejections(topic: str, value: bytes | None) -> tuple[tuple[int | None, str], ...]:
    """The dead letters the ingest stage gives for a message: validation failures and the reserved store ``*``."""
    items = parse_message(value, topic, now_ms=FUTURE_MS - DAY_MS, max_future_skew_ms=300_000)
    try:
        is_batch = value is not None and type(orjson.loads(value)) is list
    except orjson.JSONDecodeError:
        is_batch = False
    found: list[tuple[int | None, str]] = []
    for position, item in enumerate(items):
        if isinstance(item, Rejection):
            found.append((item.index, item.reason))
        elif item.store_id == "*":
            found.append((position if is_batch else None, "reserved_store_id"))
    return tuple(found)


def build_plan(customers_per_store: int, seed: int = 7) -> Plan:
    """A storefront history (late events, duplicates, runs packed in JSON-array batches) with every kind
    of invalid message spread through it, and money in a wrong currency in its second half."""
    history = generate_history(seed=seed, customers_per_store=customers_per_store, days=120)
    good = [Message(topic, value) for topic, value in packed_history(history)]
    for message in good[:: max(1, len(good) // 500)]:  # the history itself is valid (a check of this plan)
        assert ingest_rejections(message.topic, message.value) == ()

    bad: list[Message] = []
    kinds = [*invalid_messages(), *(("marketing-spend", *mixed_batch(copy)) for copy in range(2))]
    for topic, value, reasons in kinds:
        rejections = ingest_rejections(topic, value)
        assert sorted(reason for _, reason in rejections) == sorted(reasons), (topic, value, rejections)
        bad.append(Message(topic, value, rejections))
    # money in another currency than the store's (EUR, fixed by its first orders): the gate rejects it
    wrong_currency = [
        Message("orders", orjson.dumps({
            "event_id": f"wrong-currency-{copy}", "type": "order.placed", "occurred_at": 1_700_300_000_000,
            "store_id": "store-1", "customer_id": "c", "order_id": "o", "amount": "1", "currency": "JPY",
        }), ((None, "currency_mismatch"),))
        for copy in range(3)
    ]
    inserts: dict[int, list[Message]] = {}
    for number, message in enumerate(bad):  # from 2 % to 98 % of the stream
        position = int(len(good) * (0.02 + 0.96 * number / (len(bad) - 1)))
        inserts.setdefault(position, []).append(message)
    for number, message in enumerate(wrong_currency):  # at 55 %, 75 %, 95 %
        inserts.setdefault(int(len(good) * (0.55 + 0.2 * number)), []).append(message)
    messages: list[Message] = []
    for position, message in enumerate(good):
        messages.extend(inserts.get(position, []))
        messages.append(message)

    valid = events_of(messages)
    accepted = accepted_events(valid)
    as_of_ms = max(event.occurred_at_ms for event in accepted)
    reference = reference_all(
        accepted,
        windows_ms=tuple(parse_duration(window) for window in WINDOWS),
        as_of_ms=as_of_ms,
        config=ReferenceConfig(bucket_ms=60_000, horizon_ms=parse_duration(HORIZON)),
    )
    return Plan(messages, valid, reference, as_of_ms, cohorts_reference_of(valid, as_of_ms))


def events_of(messages: list[Message]) -> list[Event]:
    """The valid events of ``messages``, in order (the reserved store ``*`` is not valid)."""
    valid: list[Event] = []
    for message in messages:
        for item in parse_message(message.value, message.topic, now_ms=FUTURE_MS - DAY_MS, max_future_skew_ms=300_000):
            if isinstance(item, Event) and item.store_id != "*":
                valid.append(item)
    return valid


def split(messages: list[Message], parts: int) -> list[list[Message]]:
    """``messages`` in ``parts`` consecutive slices of (nearly) equal length."""
    bounds = [len(messages) * part // parts for part in range(parts + 1)]
    return [messages[bounds[part]:bounds[part + 1]] for part in range(parts)]


class Feed:
    """Produces plan messages to the input topics and records where each invalid one landed."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        self.bootstrap = bootstrap
        self.prefix = prefix
        self.producer: AIOKafkaProducer | None = None
        #: the dead letters the messages sent so far must give, by identity
        self.expected: dict[Identity, str] = {}
        self.sent = 0
        self.trickles: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        # idempotent: a retried send never puts a message (and so a dead letter) in twice
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True,
                                         max_request_size=2 * 1024 * 1024, linger_ms=5)
        await self.producer.start()

    async def stop(self) -> None:
        for task in self.trickles:
            task.cancel()
        await asyncio.gather(*self.trickles, return_exceptions=True)
        self.trickles.clear()
        if self.producer is not None:
            await self.producer.stop()
            self.producer = None

    async def send(self, messages: list[Message], *, chunk: int = 2000, pause: float = 0.0) -> None:
        """Send and flush ``chunk`` messages at a time, ``pause`` seconds apart (input arriving over time)."""
        assert self.producer is not None
        for start in range(0, len(messages), chunk):
            part = messages[start:start + chunk]
            invalid = []
            for message in part:
                # a tombstone needs a key; the key is free otherwise
                key = None if message.value is not None else b"tombstone"
                future = await self.producer.send(self.prefix + message.topic, message.value, key=key)
                if message.rejections:
                    invalid.append((message, future))
            await self.producer.flush()
            for message, future in invalid:
                meta = await future
                for index, reason in message.rejections:
                    self.expected[(meta.topic, meta.partition, meta.offset, index)] = reason
            self.sent += len(part)
            if pause and start + chunk < len(messages):
                await asyncio.sleep(pause)  # pacing, not a wait: the input trickles in

    def trickle(self, messages: list[Message]) -> asyncio.Task[None]:
        """Send ``messages`` in the background, 100 at a time, 80 ms apart: input arriving for a few seconds."""
        task = asyncio.create_task(self.send(messages, chunk=100, pause=0.08))
        self.trickles.append(task)
        return task


# -- the workers --------------------------------------------------------------------------------


@dataclass
class Worker:
    """One worker process (an incarnation of a slot: a restarted slot keeps its web port and state folder)."""

    slot: int
    process: subprocess.Popen[bytes]
    log: Path


@dataclass
class Workers:
    """Starts, kills and watches the ``loyalty worker`` processes of one test."""

    env: dict[str, str]
    folder: Path
    ports: dict[int, int] = field(default_factory=dict)
    started: list[Worker] = field(default_factory=list)
    killed: list[Worker] = field(default_factory=list)

    def start(self, slot: int) -> Worker:
        port = self.ports.setdefault(slot, local.free_port())
        log = self.folder / f"worker-{slot}-{len(self.started)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [*loyalty_command(), "worker"],
                env={**self.env, "LOYALTY_WEB_PORT": str(port)},
                cwd=self.folder,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=local.exit_with_parent,
            )
        worker = Worker(slot, process, log)
        self.started.append(worker)
        return worker

    def datadir(self, slot: int) -> Path:
        """The slot's local table state (``faust_options``' datadir: ``<state>/worker/<app id>-<web port>``)."""
        return Path(self.env["LOYALTY_STATE_DIR"]) / "worker" / f"{self.env['LOYALTY_APP_ID']}-{self.ports[slot]}"

    def kill(self, worker: Worker) -> None:
        """SIGKILL: no shutdown, no commit, no leaving the group."""
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.wait(timeout=30)
        self.killed.append(worker)

    @property
    def alive(self) -> list[Worker]:
        return [worker for worker in self.started if worker not in self.killed]

    def check_alive(self) -> None:
        """Fail when a worker the test did not kill has exited."""
        for worker in self.alive:
            if worker.process.poll() is not None:
                raise AssertionError(f"worker {worker.log.name} exited with {worker.process.returncode}\n{self.logs()}")

    def logs(self, lines: int = 40) -> str:
        return "\n".join(f"--- {worker.log.name}\n{tail(worker.log, lines)}" for worker in self.started)

    def stop(self) -> None:
        for worker in self.alive:
            stop_process(worker.process, timeout=60)


def worker_env(bootstrap: str, redis_url: str, prefix: str, app_id: str, state: Path) -> dict[str, str]:
    return clean_env(
        KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        REDIS_URL=redis_url,
        LOYALTY_APP_ID=app_id,
        LOYALTY_TOPIC_PREFIX=prefix,
        LOYALTY_STORE="rocksdb",
        LOYALTY_PARTITIONS=str(PARTITIONS),
        LOYALTY_CLOCK="event",
        LOYALTY_WINDOWS=",".join(WINDOWS),
        LOYALTY_ACTIVE_HORIZON=HORIZON,
        LOYALTY_EMIT_INTERVAL="200ms",
        LOYALTY_STATE_DIR=str(state),
        LOYALTY_LOG_LEVEL="info",  # rebalances, recoveries and rebuilds in the logs that failures show
    )


# -- checks -------------------------------------------------------------------------------------


async def events_applied(redis: aioredis.Redis) -> int:
    """The workers' ``events_applied`` health counter (0 when Redis has none)."""
    return int(await redis.hget(HEALTH_KEY, "events_applied") or 0)


async def wait_progress(redis: aioredis.Redis, workers: Workers, above: int, timeout: float = 120) -> int:
    """Wait until ``events_applied`` exceeds ``above`` (the workers are applying events); returns it."""
    async def grown() -> int:
        workers.check_alive()
        applied = await events_applied(redis)
        return applied if applied > above else 0

    return await async_wait_for(grown, timeout=timeout, interval=0.05,
                                message=lambda: f"events_applied never exceeded {above}\n{workers.logs()}")


async def redis_problems(redis: aioredis.Redis, plan: Plan) -> list[str]:
    """How Redis differs from the reference (every store and window, ``as_of_ms``); empty when equal."""
    window_name = {parse_duration(window): window for window in WINDOWS}
    problems = []
    for (store, window_ms), expected in plan.reference.items():
        key = metric_key(store, window_name[window_ms])
        stored = await redis.hgetall(key)
        if stored.get("as_of_ms") != str(plan.as_of_ms):
            problems.append(f"{key}: as_of_ms {stored.get('as_of_ms')} != {plan.as_of_ms}")
            continue
        actual = {name: parse_redis_field(name, stored.get(name, "")) for name in expected}
        problems.extend(f"{key} {problem}" for problem in metric_differences(actual, expected))
    return problems + await cohort_problems(redis, plan.cohorts, plan.as_of_ms)


async def converge(redis: aioredis.Redis, plan: Plan, workers: Workers, timeout: float) -> float:
    """Wait until Redis equals the reference everywhere, failing at once if a worker exits; returns the seconds."""
    started = time.monotonic()
    last: list[str] = []

    async def equal() -> bool:
        workers.check_alive()
        last[:] = await redis_problems(redis, plan)
        return not last

    await async_wait_for(equal, timeout=timeout, interval=0.5,
                         message=lambda: f"{len(last)} differences:\n" + "\n".join(last[:30]) + "\n" + workers.logs())
    return time.monotonic() - started


async def topic_size(bootstrap: str, topic: str) -> int:
    """How many records a topic of the pipeline (``PARTITIONS`` partitions, nothing deleted) holds now."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, partition) for partition in range(PARTITIONS)])
        return sum(ends.values())
    finally:
        await consumer.stop()


async def check_dead_letters(bootstrap: str, prefix: str, plan: Plan, feed: Feed) -> int:
    """The distinct dead letters are exactly the invalid elements sent (identities and reasons); returns how many
    were sent again."""
    topic = prefix + DEAD_LETTER_TOPIC
    expected = feed.expected
    assert Counter(expected.values()) == plan.expected_reasons, "every invalid message of the plan was sent"

    def identity_of(body: dict[str, Any]) -> Identity:
        return (body["topic"], body["partition"], body["offset"], body["index"])

    def distinct(records: list[Any]) -> dict[Identity, list[str]]:
        found: dict[Identity, list[str]] = {}
        for record in records:
            body = orjson.loads(record.value)
            found.setdefault(identity_of(body), []).append(body["reason"])
        return found

    def copies(records: list[Any], identity: Identity) -> list[str]:
        """Where each copy of a dead letter is in the topic, and when it was made (which worker sent it)."""
        bodies = [(record, orjson.loads(record.value)) for record in records]
        return [f"partition {record.partition} offset {record.offset} "
                f"rejected_at_ms {body['rejected_at_ms']} record timestamp {record.timestamp}"
                for record, body in bodies if identity_of(body) == identity]

    # read until every expected one is in, and all that the topic held by then: or until 30 s passed,
    # and the comparison below says what is missing
    size = await topic_size(bootstrap, topic)
    give_up_at = time.monotonic() + 30

    def complete(records: list[Any]) -> bool:
        return time.monotonic() > give_up_at or (len(records) >= size and set(expected) <= set(distinct(records)))

    read = await read_topic(bootstrap, topic, complete, timeout=60)
    # a record the test's reader got twice is one dead letter in the topic
    letters = list({(record.partition, record.offset): record for record in read}.values())
    if len(letters) < len(read):
        print(f"the reader got {len(read) - len(letters)} dead-letter records twice")
    found = distinct(letters)
    for identity, reasons in found.items():
        assert len(set(reasons)) == 1, f"dead letter {identity} sent with different reasons {reasons}"
    reasons = {identity: reasons[0] for identity, reasons in found.items()}
    missing = {identity: reason for identity, reason in expected.items() if identity not in reasons}
    unexpected = {identity: reason for identity, reason in reasons.items() if identity not in expected}
    assert not missing and not unexpected, f"dead letters missing: {missing}; unexpected: {unexpected}"
    assert reasons == expected, {i: (reasons[i], expected[i]) for i in expected if reasons[i] != expected[i]}
    assert Counter(reasons.values()) == plan.expected_reasons
    duplicates = len(letters) - len(found)
    again = {identity: len(sent) for identity, sent in found.items() if len(sent) > 1}
    print(f"dead letters: {len(found)} distinct, exactly the invalid input with its reasons; {duplicates} sent again"
          + "".join(f"\n  {reasons[identity]} {identity}: {count} times: " + "; ".join(copies(letters, identity))
                    for identity, count in again.items()))
    if DEAD_LETTERS_EXACTLY_ONCE:
        assert duplicates == 0, f"dead letters exactly once: {duplicates} sent again: {again}"
    return duplicates


# -- the cases ----------------------------------------------------------------------------------

#: one line per test: what it injected and how long Redis took to converge (printed at the end)
SUMMARY: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def chaos_summary() -> Iterator[None]:
    """Print what each chaos case did once they have all run."""
    yield
    if SUMMARY:
        print("\n== chaos summary ==\n" + "\n".join(SUMMARY))


class Run:
    """One case's log: prints its steps with the seconds since it started, and its summary line."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.start = time.monotonic()
        self.injected = ""  # the faults, e.g. "6 SIGKILLs, 6 restarts"
        self.converged_s: float | None = None  # seconds from the faults and the last input to Redis = reference
        self.duplicates: int | None = None  # dead letters sent again
        self.passed = False

    def __call__(self, text: str) -> None:
        print(f"[{self.name} {self.elapsed():6.1f}s] {text}", flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def summary(self) -> str:
        converged = ("Redis never equal to the reference" if self.converged_s is None
                     else f"Redis equal to the reference {self.converged_s:.1f}s after the faults and the last input")
        duplicates = "" if self.duplicates is None else f"; {self.duplicates} dead letters sent again"
        return (f"{self.name}: {'passed' if self.passed else 'FAILED'}; {self.injected}; {converged}{duplicates}; "
                f"{self.elapsed():.0f}s in all")


def database_url(redis_url: str, database: int) -> str:
    return redis_url.rsplit("/", 1)[0] + f"/{database}"


async def wait_group(bootstrap: str, app_id: str, members: int, workers: Workers) -> None:
    """Wait until the Faust consumer group is Stable with ``members`` members."""
    async def stable() -> bool:
        workers.check_alive()
        return await group_is_stable(bootstrap, app_id, members)

    await async_wait_for(stable, timeout=120, interval=0.5,
                         message=lambda: f"group {app_id} never had {members} stable members\n{workers.logs()}")


async def outage(seconds: float, workers: Workers) -> None:
    """Let an injected outage last ``seconds`` (its length is the fault, not a wait), failing if a worker exits."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        workers.check_alive()
        await asyncio.sleep(min(0.5, max(0.0, end - time.monotonic())))
    workers.check_alive()


#: SIGKILLs of case 1, and the seed of its kill moments
KILLS = 6
SIGKILL_SEED = 20261203


@pytest.mark.chaos
@pytest.mark.timeout(300)
async def test_sigkilled_worker_restarted(services, topic_prefix, app_id, tmp_path: Path) -> None:
    """A worker SIGKILLed 6 times mid-stream, restarted each time (once without local state), equals the reference."""
    say = Run("sigkill")
    plan = build_plan(customers_per_store=3400)
    assert len(plan.valid) >= 50_000
    rng = random.Random(SIGKILL_SEED)
    wipe_at = rng.randrange(KILLS)  # the restart after this kill starts without the local state folder
    say(f"{len(plan.valid)} valid events in {len(plan.messages)} messages; seed {SIGKILL_SEED}, "
        f"local state deleted after kill {wipe_at + 1}; topics {topic_prefix}*, group {app_id}")
    bootstrap = services.kafka_bootstrap
    redis_url = database_url(services.redis_url, DATABASES["sigkill"])
    await ensure_topics(bootstrap, [topic_prefix + name for name in INPUT_TOPICS], PARTITIONS)
    workers = Workers(worker_env(bootstrap, redis_url, topic_prefix, app_id, tmp_path / "state"), tmp_path)
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    await redis.flushdb()
    feed = Feed(bootstrap, topic_prefix)
    await feed.start()
    try:
        worker = workers.start(0)
        await wait_group(bootstrap, app_id, 1, workers)
        segments = split(plan.messages, KILLS + 1)
        applied = 0
        for kill in range(KILLS):
            head, rest = split(segments[kill], 2)
            await feed.send(head)
            applied = await wait_progress(redis, workers, above=applied)
            trickle = feed.trickle(rest)
            delay = rng.uniform(0.2, 1.5)
            await asyncio.sleep(delay)  # a random kill moment
            workers.check_alive()
            assert not trickle.done(), "the kill must land while input is still arriving"
            workers.kill(worker)
            # the next incarnation must apply events beyond what this one got to
            applied = await events_applied(redis)
            say(f"kill {kill + 1}: SIGKILL pid {worker.process.pid} {delay:.2f}s after it applied events "
                f"(events_applied {applied}, {feed.sent}/{len(plan.messages)} messages sent)")
            await trickle  # the rest of the segment arrives while no worker runs
            if kill == wipe_at:
                datadir = workers.datadir(0)
                assert datadir.is_dir(), f"no local state at {datadir}"
                shutil.rmtree(datadir)
                say(f"deleted the local state {datadir}")
            worker = workers.start(0)
            say.injected = (f"{len(workers.killed)} SIGKILLs, {len(workers.started) - 1} restarts"
                            f"{' (1 without local state)' if kill >= wipe_at else ''}")
        await feed.send(segments[-1])
        say(f"all {feed.sent} messages sent; {len(workers.killed)} kills, {len(workers.started) - 1} restarts")
        say.converged_s = seconds = await converge(redis, plan, workers, timeout=180)
        say(f"Redis equals the reference {seconds:.1f}s after the last restart and message")
        say.duplicates = await check_dead_letters(bootstrap, topic_prefix, plan, feed)
        say.passed = True
    finally:
        SUMMARY.append(say.summary())
        await feed.stop()
        await redis.aclose()
        workers.stop()


@pytest.mark.chaos
@pytest.mark.timeout(240)
async def test_worker_killed_and_replaced(services, topic_prefix, app_id, tmp_path: Path) -> None:
    """Two workers, one SIGKILLed mid-stream and never restarted, a third joining mid-stream: equal to the reference."""
    say = Run("replace")
    plan = build_plan(customers_per_store=1400)
    rng = random.Random(SIGKILL_SEED + 1)
    bootstrap = services.kafka_bootstrap
    redis_url = database_url(services.redis_url, DATABASES["replace"])
    await ensure_topics(bootstrap, [topic_prefix + name for name in INPUT_TOPICS], PARTITIONS)
    workers = Workers(worker_env(bootstrap, redis_url, topic_prefix, app_id, tmp_path / "state"), tmp_path)
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    await redis.flushdb()
    feed = Feed(bootstrap, topic_prefix)
    await feed.start()
    try:
        workers.start(0)
        victim = workers.start(1)
        await wait_group(bootstrap, app_id, 2, workers)
        first, middle, last = split(plan.messages, 3)
        await feed.send(first)
        await wait_progress(redis, workers, above=0)
        trickle = feed.trickle(middle)
        delay = rng.uniform(0.2, 1.2)
        await asyncio.sleep(delay)  # a random kill moment
        assert not trickle.done(), "the kill must land while input is still arriving"
        workers.kill(victim)
        say.injected = "1 of 2 workers SIGKILLed (not restarted)"
        say(f"SIGKILL worker 1 (pid {victim.process.pid}) {delay:.2f}s after the workers applied events")
        delay = rng.uniform(0.5, 1.5)
        await asyncio.sleep(delay)  # a random moment for the third worker
        assert not trickle.done(), "the third worker must join while input is still arriving"
        workers.start(2)
        say.injected += ", a third worker joined"
        say(f"worker 2 started {delay:.2f}s after the kill ({feed.sent}/{len(plan.messages)} messages sent)")
        await trickle
        await feed.send(last)
        say.converged_s = seconds = await converge(redis, plan, workers, timeout=180)
        say(f"Redis equals the reference {seconds:.1f}s after the last message")
        say.duplicates = await check_dead_letters(bootstrap, topic_prefix, plan, feed)
        say.passed = True
    finally:
        SUMMARY.append(say.summary())
        await feed.stop()
        await redis.aclose()
        workers.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[local.LocalRedis, int]]:
    """A redis-server of this test alone (free port, own state folder), to stop and start at will."""
    service = local.LocalRedis(tmp_path / "own-redis")
    port = local.free_port()
    service.start(port, die_with_parent=True)
    try:
        yield service, port
    finally:
        service.stop()


REDIS_OUTAGE_S = 30.0


@pytest.mark.chaos
@pytest.mark.timeout(240)
async def test_redis_restarted_empty(services, own_redis, topic_prefix, app_id, tmp_path: Path) -> None:
    """Redis stopped for 30 s mid-stream and restarted empty: the worker stays up and republishes every key."""
    say = Run("redis")
    service, port = own_redis
    plan = build_plan(customers_per_store=1400)
    bootstrap = services.kafka_bootstrap
    redis_url = f"redis://{local.LOOPBACK}:{port}/0"
    await ensure_topics(bootstrap, [topic_prefix + name for name in INPUT_TOPICS], PARTITIONS)
    workers = Workers(worker_env(bootstrap, redis_url, topic_prefix, app_id, tmp_path / "state"), tmp_path)
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    feed = Feed(bootstrap, topic_prefix)
    await feed.start()
    try:
        worker = workers.start(0)
        await wait_group(bootstrap, app_id, 1, workers)
        before, during = split(plan.messages, 2)
        await feed.send(before)
        await wait_progress(redis, workers, above=0)
        await async_wait_for(lambda: redis.exists(metric_key("*", WINDOWS[0])), timeout=60,
                             message=lambda: f"nothing published\n{workers.logs()}")
        run_id = (await redis.info("server"))["run_id"]
        # the rest of the input arrives while Redis is down, and nothing after it comes back: every
        # key must be published again from the worker's state
        trickle = feed.trickle(during)
        await redis.aclose()
        await asyncio.to_thread(service.stop)
        say.injected = f"Redis down {REDIS_OUTAGE_S:.0f}s, restarted empty; 0 worker restarts"
        say(f"Redis stopped ({feed.sent}/{len(plan.messages)} messages sent)")
        await outage(REDIS_OUTAGE_S, workers)
        assert trickle.done(), "the input took longer than the outage"
        await trickle
        for leftover in service.dir.glob("*"):  # it runs without persistence; make sure nothing is reloaded
            if leftover.suffix in {".rdb", ".aof"} or leftover.name.startswith("appendonly"):
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        service.start(port, die_with_parent=True)
        redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
        server, persistence = await redis.info("server"), await redis.info("persistence")
        assert server["run_id"] != run_id, "Redis must have restarted"
        assert persistence["rdb_last_load_keys_loaded"] == 0 and persistence["aof_enabled"] == 0, "and come back empty"
        say(f"Redis started again, empty, after {REDIS_OUTAGE_S:.0f}s")
        say.converged_s = seconds = await converge(redis, plan, workers, timeout=120)
        say(f"Redis equals the reference {seconds:.1f}s after it came back")
        assert worker.process.poll() is None, "the worker exited"
        assert workers.started == [worker], "one worker process from start to end"
        say.duplicates = await check_dead_letters(bootstrap, topic_prefix, plan, feed)
        say.passed = True
    finally:
        SUMMARY.append(say.summary())
        await feed.stop()
        await redis.aclose()
        workers.stop()


@dataclass(frozen=True)
class OwnKafka:
    """A Kafka broker of one test: its service, and the ports it keeps across restarts."""

    service: local.LocalKafka
    port: int
    controller_port: int

    @property
    def bootstrap(self) -> str:
        return f"{local.LOOPBACK}:{self.port}"

    def start(self) -> None:
        self.service.start(self.port, self.controller_port, timeout=180, echo=lambda _: None, die_with_parent=True)


@pytest.fixture
def own_kafka(tmp_path: Path) -> Iterator[OwnKafka]:
    """A Kafka broker of this test alone (free ports, own state folder), to stop and start at will."""
    kafka = OwnKafka(local.LocalKafka(tmp_path / "own-kafka"), local.free_port(), local.free_port())
    kafka.start()
    try:
        yield kafka
    finally:
        kafka.service.stop()


KAFKA_OUTAGE_S = 15.0
#: case 4's worker, stopped with the broker down at the end, exits this long after its SIGTERM
SHUTDOWN_TIMEOUT_S = 5.0
#: lines the worker may log during case 4's outage: the Kafka clients' messages once per 30 s each
#: (without the RepeatFilter and the metadata backoff they logged 94,397 lines in one run's 15 s)
#: and its own failed reads of the gate's commits, once per streak and then every 30 s
KAFKA_OUTAGE_LOG_LINES = 40


def log_lines(log: Path, skip: int = 0) -> list[str]:
    """The worker log's lines after its first ``skip`` lines."""
    return log.read_text(errors="replace").splitlines()[skip:]


@pytest.mark.chaos
@pytest.mark.timeout(300)
async def test_kafka_restarted(services, own_kafka, topic_prefix, app_id, tmp_path: Path) -> None:
    """The Kafka broker stopped for 15 s mid-stream and restarted: the same worker process resumes and converges."""
    say = Run("kafka")
    plan = build_plan(customers_per_store=1400)
    rng = random.Random(SIGKILL_SEED + 3)
    bootstrap = own_kafka.bootstrap
    redis_url = database_url(services.redis_url, DATABASES["kafka_outage"])
    await ensure_topics(bootstrap, [topic_prefix + name for name in INPUT_TOPICS], PARTITIONS)
    env = worker_env(bootstrap, redis_url, topic_prefix, app_id, tmp_path / "state")
    workers = Workers({**env, "LOYALTY_SHUTDOWN_TIMEOUT": f"{SHUTDOWN_TIMEOUT_S:.0f}s"}, tmp_path)
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    await redis.flushdb()
    feed = Feed(bootstrap, topic_prefix)
    await feed.start()
    try:
        worker = workers.start(0)
        await wait_group(bootstrap, app_id, 1, workers)
        cut = len(plan.messages) * 2 // 3
        before, after = plan.messages[:cut], plan.messages[cut:]
        head, tail = split(before, 2)
        await feed.send(head)
        await wait_progress(redis, workers, above=0)
        # the second half lands just before the stop: a worker as fast as the feed cannot be done with
        # it (with the whole backlog sent first, a fast worker had applied it all before the stop)
        await feed.send(tail)
        delay = rng.uniform(0.0, 0.2)
        await asyncio.sleep(delay)  # a random moment in the backlog
        await feed.stop()
        # read before the stop: what the worker applies of its fetched backlog during the outage does
        # not matter, only that the broker went away mid-stream (the rest of the input comes after)
        applied = await events_applied(redis)
        await asyncio.to_thread(own_kafka.service.stop)
        logged_before = len(log_lines(worker.log))
        say.injected = f"Kafka broker down {KAFKA_OUTAGE_S:.0f}s; 0 worker restarts"
        say(f"Kafka stopped {delay:.2f}s after the worker applied events")
        backlog = len(accepted_events(events_of(before)))
        say(f"the worker had applied {applied} of the {backlog} events sent when Kafka stopped")
        assert applied < backlog, "Kafka must stop while the worker still has input to apply"
        await outage(KAFKA_OUTAGE_S, workers)
        outage_lines = log_lines(worker.log, logged_before)
        say(f"the worker logged {len(outage_lines)} lines during the outage")
        assert len(outage_lines) <= KAFKA_OUTAGE_LOG_LINES, "\n".join(outage_lines[:20])
        await asyncio.to_thread(own_kafka.start)
        say(f"Kafka started again after {KAFKA_OUTAGE_S:.0f}s")
        await feed.start()
        await feed.send(after)
        say.converged_s = seconds = await converge(redis, plan, workers, timeout=180)
        say(f"Redis equals the reference {seconds:.1f}s after the last message")
        assert worker.process.poll() is None, "the worker exited"
        assert workers.started == [worker], "one worker process from start to end"
        say.duplicates = await check_dead_letters(bootstrap, topic_prefix, plan, feed)
        # stopped while the broker is down again, the worker cannot send its last commits: it exits
        # after LOYALTY_SHUTDOWN_TIMEOUT rather than waiting for ever (the SIGKILL after 60 s fails this)
        await feed.stop()
        await asyncio.to_thread(own_kafka.service.stop)
        stopped_at = time.monotonic()
        code = await asyncio.to_thread(stop_process, worker.process, 60)
        took = time.monotonic() - stopped_at
        say(f"stopped with Kafka down: exit code {code} after {took:.1f}s")
        assert code in (0, SHUTDOWN_TIMEOUT_EXIT) and took < SHUTDOWN_TIMEOUT_S + 30, workers.logs(30)
        say.passed = True
    finally:
        SUMMARY.append(say.summary())
        await feed.stop()
        await redis.aclose()
        workers.stop()
