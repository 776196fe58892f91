"""Hostile input through a real worker: nothing a producer sends may stop or bloat it (issue 14, SPEC 3 and 9).

``python -m bench.fuzz [--hostile N] [--customers N] [--seed S] [--redis-db D] [--out FILE]`` runs one
``loyalty worker`` (event clock, RocksDB, 4 partitions) on the Kafka and Redis of the settings (``loyalty
up``), on topics and a Redis database of its own, and feeds it a storefront history with N hostile messages
mixed in (:func:`hostile_messages`): random bytes, invalid UTF-8, truncated JSON, NaN and Infinity, lone
surrogate escapes, a BOM, duplicate keys, deep and wide nesting, huge numbers and strings, edge timestamps,
wrong topics, types and fields, oversized events and messages near and past 1 MiB (sent gzip-compressed), empty,
too long and mixed batches, the reserved store ``*``,
money in a store's wrong currency; some hostile events are valid (unicode edge ids, NUL, duplicate keys, year
0001) and must count. It then checks, and prints as JSON:

* the worker process is the one started (same pid, never exited) and its log has no traceback, crash or
  error line; the input reader's restarts (``ingest.failed``) are counted;
* every invalid element is dead-lettered exactly once with the reason validation gives it: the dead-letter
  topic is counted per (topic, partition, offset, index);
* Redis holds, for every store and window, the batch reference's numbers (``metrics.reference``) of the
  valid events, as of the largest event time.

The test suite runs a few thousand messages of it (``tests/test_hostile.py``); the figures of a 20,000-message
run are in the README.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from infra.local import exit_with_parent, free_port
from metrics.compare import metric_differences
from metrics.events import INPUT_TOPICS, TYPE_TOPIC, Event
from metrics.reference import ReferenceConfig, reference_all
from metrics.timegrid import parse_duration
from metrics.validation import Rejection, parse_message
from streams.sinks.redis_sink import metric_key, parse_redis_field, read_health
from streams.tools.demo import stop_worker, worker_command
from streams.tools.history import generate_history, wire_body
from streams.worker.topics import DEAD_LETTER_TOPIC, ensure_topics

PARTITIONS = 4
WINDOWS = ("1h", "24h", "7d", "30d")
HORIZON = "90d"
SKEW_MS = 300_000
#: "now" when the generator asks whether a spoiled event is still valid: every time it writes is either before
#: the wall clock or after this (year 2100 and later), so the answer is the worker's too
VALIDITY_NOW_MS = 4_000_000_000_000
#: a dead letter's identity: (topic, partition, offset, index in its batch or None)
Identity = tuple[str, int, int, int | None]

#: stores only hostile events use, each with its currency (no money event of theirs is ever in another)
HOSTILE_STORES = {"h-\x00nul": "EUR", "h-\ufeffbom": "USD", "h-\u202ertl-\u00fc": "EUR", "h-" + "x" * 62: "TRY",
                  "h-\U0001f600": "JPY"}
CUSTOMERS = ("c", "\x00", "\ufeff", "\U0010ffff", "e\u0301", "x" * 128)
CHANNELS = ("\x00", "other", "\u00fc", "x" * 64, "search")
#: years 0001 and 1969, the epoch, and strings at offsets: valid times, all before the history's end
VALID_TIMES: tuple[object, ...] = (-62_135_596_800_000, -1, 0, "0001-01-01T00:00:00Z", "1970-01-01T00:00:00.999999Z",
                                   "2000-02-29T23:59:59.5-23:59", "2023-12-01t00:00:00z")
#: invalid times, and valid ones in the far future (``future_event``)
BAD_TIMES: tuple[object, ...] = (-62_135_596_800_001, 253_402_300_800_000, 2**63, 2**64, 1.5e12, "",
                                 "2024-02-30T00:00:00Z", "2024-03-01T23:59:60Z", "10000-01-01T00:00:00Z",
                                 "2024-03-01T12:00:00", "2024-03-01T12:00:00+24:00", "9999-12-31T23:59:59.999Z",
                                 "2100-01-01T00:00:00Z", True)
#: values for a field that should hold something else
WRONG_VALUES: tuple[object, ...] = (None, True, 0, -1, 2**63, -(2**63), 1e308, "", "x" * 200, "x" * 70_000, [], {},
                                    [1, 2], {"a": None}, "NaN", "-0", "1e3", "19.999999999", "\x00")


@dataclass(frozen=True)
class Message:
    """One input message and the dead letters it must give: (index in its batch or None, reason)."""

    topic: str
    value: bytes | None
    kind: str
    rejections: tuple[tuple[int | None, str], ...] = ()


def ingest_rejections(topic: str, value: bytes | None, now_ms: int) -> tuple[tuple[int | None, str], ...]:
    """The dead letters the ingest stage gives a message: validation's, and the reserved store ``*``."""
    items = parse_message(value, topic, now_ms=now_ms, max_future_skew_ms=SKEW_MS)
    batch = len(items) > 1 or (bool(value) and (value or b"").lstrip()[:1] == b"[")
    found: list[tuple[int | None, str]] = []
    for position, item in enumerate(items):
        if isinstance(item, Rejection):
            found.append((item.index, item.reason))
        elif item.store_id == "*":
            found.append((position if batch else None, "reserved_store_id"))
    return tuple(found)


class Hostile:
    """Makes hostile messages; the same seed makes the same messages."""

    def __init__(self, seed: int, start_ms: int, end_ms: int) -> None:
        self.rng = random.Random(seed)
        self.start_ms, self.end_ms = start_ms, end_ms
        self.serial = 0
        self.sent_valid: list[dict[str, Any]] = []

    def event(self, valid_time: bool = True) -> dict[str, Any]:
        """A valid event of a hostile store (any type), with unicode edge ids."""
        rng = self.rng
        self.serial += 1
        kind = rng.choice(sorted(TYPE_TOPIC))
        store = rng.choice(sorted(HOSTILE_STORES))
        at: object = rng.randrange(self.start_ms, self.end_ms)
        if valid_time and rng.random() < 0.2:
            at = rng.choice(VALID_TIMES)
        body: dict[str, Any] = {"event_id": f"fz-{self.serial}-\u00e9", "type": kind, "occurred_at": at,
                                "store_id": store, "customer_id": rng.choice(CUSTOMERS)}
        if kind in ("order.placed", "order.refunded", "spend.recorded"):
            body.update(amount=rng.choice(("0", "19.99", 5, 0.1, "1000000000000", "0.000001")),
                        currency=HOSTILE_STORES[store])
            if kind != "spend.recorded":
                body["order_id"] = "o\x00"
        if kind in ("spend.recorded", "customer.signed_up") and rng.random() < 0.7:
            body["channel"] = rng.choice(CHANNELS)
        if kind == "survey.responded":
            survey = rng.choice(("nps", "csat", "ces", "cli"))
            body["survey"] = survey
            if survey == "cli":
                body["answers"] = {"recommend": rng.randint(1, 6), "repurchase": 6, "try_other": 1}
            else:
                body["score"] = {"nps": rng.randint(0, 10), "csat": rng.randint(1, 5), "ces": rng.randint(1, 7)}[survey]
        if kind in ("loyalty.reward_issued", "loyalty.reward_redeemed"):
            body.update(reward_id="r", points=rng.choice((0, 2**63 - 1, None)))
        return body

    def spoiled(self) -> dict[str, Any]:
        """An event with one field made wrong: a wrong value, a bad time, dropped, or the type of another topic."""
        rng = self.rng
        body = self.event()
        store = body["store_id"]
        choice = rng.random()
        name = rng.choice(sorted(body))
        if choice < 0.35:
            body[name] = rng.choice(WRONG_VALUES)
        elif choice < 0.6:
            body["occurred_at"] = rng.choice(BAD_TIMES)
        elif choice < 0.75:
            del body[name]
        elif choice < 0.85:
            body["type"] = rng.choice(("order.exploded", "", "ORDER.PLACED", "customer.signed_up\x00"))
        else:
            body["extra"] = nested(rng.choice((32, 33, 40, 200)), rng.random() < 0.5)
        kind = body.get("type")
        topic = TYPE_TOPIC.get(kind, "orders") if isinstance(kind, str) else "orders"
        (result,) = parse_message(write(body), topic, now_ms=VALIDITY_NOW_MS, max_future_skew_ms=SKEW_MS)
        if isinstance(result, Event):  # still valid: no id or store of its own that another event could share
            self.serial += 1
            body.update(event_id=f"fz-{self.serial}-v", store_id=store)
        return body

    def message(self, second_half: bool) -> tuple[str, bytes | None, str]:
        """(topic, value, kind) of one hostile message."""
        rng = self.rng
        roll = rng.random()
        topic = rng.choice(INPUT_TOPICS)
        good = write(self.event())
        if roll < 0.06:
            return topic, rng.randbytes(rng.randrange(0, 200)), "random_bytes"
        if roll < 0.10:
            cut = rng.randrange(1, len(good))
            return topic, good[:cut] + rng.choice((b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf")) + good[cut:], "utf8"
        if roll < 0.15:
            return topic, good[:rng.randrange(0, len(good))], "truncated"
        if roll < 0.22:
            piece = rng.choice((b"NaN", b"Infinity", b"-Infinity", b"1e400", b'"\\ud800"', b'"\\udc00x"'))
            return topic, good[:-1] + b',"amount":' + piece + b"}", "near_json"
        if roll < 0.25:
            return topic, rng.choice((b"\xef\xbb\xbf" + good, b"1", b'"x"', b"null", b"true", b"[]", b"{}", None)), \
                "odd_json"
        if roll < 0.45:
            body = self.spoiled()
            kind = body.get("type")
            return TYPE_TOPIC.get(kind, topic) if isinstance(kind, str) else topic, write(body), "wrong_field"
        if roll < 0.50:
            body = self.event()
            other = rng.choice([t for t in INPUT_TOPICS if t != TYPE_TOPIC[body["type"]]])
            return other, write(body), "wrong_topic"
        if roll < 0.55:
            depth = rng.choice((300, 2000, 33))
            return topic, rng.choice((b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth)), "deep"
        if roll < 0.57:
            return topic, write({**self.event(), "padding": "x" * 70_000}), "oversized"
        if roll < 0.575:
            return topic, b"[" + b",".join([b"{}"] * 10_001) + b"]", "too_many"
        if roll < 0.578:  # near or past 1 MiB (it came compressed): its dead letter must still fit a message
            size = rng.choice((900_000, 1_500_000))
            return topic, rng.choice((b"[", b"{", b"")) + good * (size // len(good)), "huge"
        if roll < 0.60:
            body = self.event()
            return TYPE_TOPIC[body["type"]], write({**body, "store_id": "*"}), "reserved_store"
        if roll < 0.85:  # a batch of one topic's events, valid and not, scalars and arrays among them
            topic = rng.choice(INPUT_TOPICS)
            elements: list[Any] = []
            for _ in range(rng.randint(1, 12)):
                pick = rng.random()
                body = self.event() if pick < 0.55 else self.spoiled()
                if pick < 0.55 and TYPE_TOPIC[body["type"]] != topic:
                    body["type"] = rng.choice(sorted(t for t, home in TYPE_TOPIC.items() if home == topic))
                    body = self.refit(body)
                elements.append(body if pick < 0.85 else rng.choice((1, None, "x", [], [[body]], {"a": [[[]]]})))
            return topic, b"[" + b",".join(write(e) for e in elements) + b"]", "mixed_batch"
        if roll < 0.90:  # duplicate keys: the last one counts, and it is a valid event
            body = self.event()
            text = write(body)
            return TYPE_TOPIC[body["type"]], b'{"store_id":"ignored","event_id":"first",' + text[1:], "duplicate_keys"
        if roll < 0.95 and self.sent_valid:  # the same valid event again: a duplicate, counted once
            body = rng.choice(self.sent_valid)
            return TYPE_TOPIC[body["type"]], write(body), "resent"
        if second_half and roll < 0.97:  # store-1's first money event (EUR) was long before
            body = {"event_id": f"fz-chf-{self.serial}", "type": "order.placed", "occurred_at": self.end_ms,
                    "store_id": "store-1", "customer_id": "c", "order_id": "o", "amount": "1", "currency": "CHF"}
            self.serial += 1
            return "orders", write(body), "wrong_currency"
        body = self.event()
        self.sent_valid.append(body)
        return TYPE_TOPIC[body["type"]], write(body), "valid_unicode"

    def refit(self, body: dict[str, Any]) -> dict[str, Any]:
        """A valid event of ``body``'s (new) type, keeping its ids and time."""
        while True:
            fresh = self.event()
            if fresh["type"] == body["type"]:
                return {**fresh, "event_id": body["event_id"], "occurred_at": body["occurred_at"]}


def nested(depth: int, arrays: bool) -> Any:
    """``depth`` levels of arrays or objects around a leaf (orjson writes up to 254)."""
    value: Any = 1
    for _ in range(depth):
        value = [value] if arrays else {"a": value}
    return value


def write(value: Any) -> bytes:
    """JSON text as a careless producer writes it: integers of any size in full (orjson stops at 64 bits)."""
    try:
        return orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):
        pass
    if isinstance(value, dict):
        return b"{" + b",".join(orjson.dumps(str(k)) + b":" + write(v) for k, v in value.items()) + b"}"
    if isinstance(value, list):
        return b"[" + b",".join(write(v) for v in value) + b"]"
    return str(value).encode() if isinstance(value, int) else b"null"


def hostile_messages(count: int, seed: int, start_ms: int, end_ms: int) -> list[tuple[str, bytes | None, str]]:
    """``count`` hostile messages (topic, value, kind); valid hostile events have times up to ``end_ms``."""
    maker = Hostile(seed, start_ms, end_ms)
    return [maker.message(second_half=number >= count // 2) for number in range(count)]


@dataclass
class Plan:
    """The messages in production order, with the valid events and what Redis must end with."""

    messages: list[Message]
    reference: dict[tuple[str, int], dict[str, object]]
    as_of_ms: int
    valid_events: int

    @property
    def expected_reasons(self) -> Counter[str]:
        return Counter(reason for message in self.messages for _, reason in message.rejections)


def build_plan(hostile: int, customers_per_store: int, seed: int, now_ms: int) -> Plan:
    """A storefront history with ``hostile`` hostile messages spread evenly through it."""
    history = generate_history(seed=seed, customers_per_store=customers_per_store, days=60)
    start_ms = min(event.occurred_at_ms for event in history)
    end_ms = max(event.occurred_at_ms for event in history)
    good = [Message(event.topic, orjson.dumps(wire_body(event)), "history") for event in history]
    bad = hostile_messages(hostile, seed, start_ms, end_ms)
    inserts: dict[int, list[Message]] = {}
    for number, (topic, value, kind) in enumerate(bad):  # evenly through the history
        message = Message(topic, value, kind, ingest_rejections(topic, value, now_ms))
        inserts.setdefault(number * len(good) // len(bad), []).append(message)
    messages: list[Message] = []
    for position, message in enumerate(good):
        messages.extend(inserts.get(position, []))
        messages.append(message)
    valid: list[Event] = []
    currencies: dict[str, str] = {}
    final: list[Message] = []
    for message in messages:
        events = [item for item in parse_message(message.value, message.topic, now_ms=now_ms,
                                                 max_future_skew_ms=SKEW_MS)
                  if isinstance(item, Event) and item.store_id != "*"]
        rejections = list(message.rejections)
        for event in events:  # the gate: a store keeps its first currency
            if event.currency is not None and currencies.setdefault(event.store_id, event.currency) != event.currency:
                if message.kind != "wrong_currency":
                    raise AssertionError(f"a {message.kind} message has money in a store's other currency")
                rejections.append((None, "currency_mismatch"))
        valid.extend(events)
        final.append(Message(message.topic, message.value, message.kind, tuple(rejections)))
    windows_ms = tuple(parse_duration(window) for window in WINDOWS)
    config = ReferenceConfig(bucket_ms=60_000, horizon_ms=parse_duration(HORIZON))
    accepted_times = [event.occurred_at_ms for event in valid]
    as_of_ms = max(accepted_times)
    reference = reference_all(valid, windows_ms=windows_ms, as_of_ms=as_of_ms, config=config)
    return Plan(final, reference, as_of_ms, len(valid))


# -- the run --------------------------------------------------------------------------------------


#: log lines that mean something went wrong inside the worker: a traceback, an agent crash, an error
TROUBLE = re.compile(r"Traceback|[Cc]rash|\"level\": ?\"(error|critical)\"|\[error|\[critical|ERROR|CRITICAL")
#: errors aiokafka logs while a new consumer group's coordinator is being elected (retried by itself)
TRANSIENT = re.compile(r"GroupCoordinatorNotAvailable|NotCoordinatorForGroup|CoordinatorLoadInProgress")


@dataclass
class FuzzWorker:
    """One ``loyalty worker`` (event clock, RocksDB, 4 partitions) on topics of its own, logging to a file."""

    process: subprocess.Popen[bytes]
    prefix: str
    log_path: Path

    @classmethod
    async def start(cls, bootstrap: str, redis_url: str, work_dir: Path) -> FuzzWorker:
        """Create its input topics and start it (its Redis database is the caller's to empty)."""
        name = f"fuzz{uuid.uuid4().hex[:8]}"
        prefix = f"{name}-"
        await ensure_topics(bootstrap, [prefix + topic for topic in INPUT_TOPICS], PARTITIONS)
        log_path = work_dir / f"{name}-worker.log"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("LOYALTY_")},
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "REDIS_URL": redis_url, "LOYALTY_APP_ID": name,
            "LOYALTY_TOPIC_PREFIX": prefix, "LOYALTY_PARTITIONS": str(PARTITIONS), "LOYALTY_CLOCK": "event",
            "LOYALTY_WINDOWS": ",".join(WINDOWS), "LOYALTY_ACTIVE_HORIZON": HORIZON, "LOYALTY_EMIT_INTERVAL": "200ms",
            "LOYALTY_STORE": "rocksdb", "LOYALTY_STATE_DIR": str(work_dir / f"{name}-state"),
            "LOYALTY_WEB_PORT": str(free_port()), "LOYALTY_LOG_LEVEL": "info",
        }
        with log_path.open("wb") as log:
            process = subprocess.Popen(worker_command(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL,
                                       preexec_fn=exit_with_parent)
        return cls(process, prefix, log_path)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def trouble(self) -> list[str]:
        """The log's tracebacks, crashes and errors (the coordinator's election aside)."""
        return [line[:300] for line in self.log_text().splitlines()
                if TROUBLE.search(line) and not TRANSIENT.search(line)][:20]

    def stop(self) -> None:
        stop_worker(self.process)


@dataclass
class Report:
    """What a fuzz run found (printed as JSON)."""

    messages: int = 0
    hostile_messages: int = 0
    hostile_kinds: dict[str, int] = field(default_factory=dict)
    valid_events: int = 0
    dead_letters_expected: int = 0
    dead_letters_by_reason: dict[str, int] = field(default_factory=dict)
    dead_letters_sent_again: int = 0
    dead_letters_missing: int = 0
    dead_letters_unexpected: int = 0
    snapshots_compared: int = 0
    elements_compared: int = 0
    differences: list[str] = field(default_factory=list)
    worker_exits: int = 0
    same_pid: bool = True
    reader_restarts: int = 0
    trouble_lines: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (self.dead_letters_missing == self.dead_letters_unexpected == self.dead_letters_sent_again == 0
                and not self.differences and self.worker_exits == 0 and self.same_pid and not self.trouble_lines)


async def produce(bootstrap: str, prefix: str, messages: list[Message]) -> dict[Identity, str]:
    """Send the messages in order; returns the dead letters they must give, by identity."""
    # gzip: a message past 1 MiB reaches the worker only compressed, as a producer may send it
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                                compression_type="gzip", max_request_size=4 * 1024 * 1024, linger_ms=5)
    await producer.start()
    expected: dict[Identity, str] = {}
    try:
        for start in range(0, len(messages), 2000):
            pending = []
            for message in messages[start:start + 2000]:
                key = None if message.value is not None else b"tombstone"
                future = await producer.send(prefix + message.topic, message.value, key=key)
                if message.rejections:
                    pending.append((message, future))
            await producer.flush()
            for message, future in pending:
                meta = await future
                for index, reason in message.rejections:
                    expected[(meta.topic, meta.partition, meta.offset, index)] = reason
    finally:
        await producer.stop()
    return expected


async def read_all(bootstrap: str, topic: str, done: Callable[[list[Any]], bool], timeout_s: float) -> list[Any]:
    """Every record of a topic from its start, until ``done(records)`` holds or the time is up."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"fuzz-{uuid.uuid4().hex}",
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    records: list[Any] = []
    try:
        deadline = time.monotonic() + timeout_s
        while not done(records) and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


async def topic_size(bootstrap: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            await consumer._client.force_metadata_update()  # a fresh client may not know the topic yet
            partitions = consumer.partitions_for_topic(topic) or set(range(PARTITIONS))
        ends = await consumer.end_offsets([TopicPartition(topic, partition) for partition in partitions])
        return sum(ends.values())
    finally:
        await consumer.stop()


async def check_dead_letters(bootstrap: str, prefix: str, expected: dict[Identity, str], report: Report) -> None:
    """Count the dead-letter topic per identity against ``expected`` (called once the valid events are all in)."""
    topic = prefix + DEAD_LETTER_TOPIC
    deadline = time.monotonic() + 60
    size = await topic_size(bootstrap, topic)
    while size < len(expected) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        size = await topic_size(bootstrap, topic)
    records = await read_all(bootstrap, topic, lambda found: len(found) >= size, timeout_s=60)
    found: dict[Identity, list[str]] = {}
    for record in records:
        body = orjson.loads(record.value)
        found.setdefault((body["topic"], body["partition"], body["offset"], body["index"]), []).append(body["reason"])
    report.dead_letters_expected = len(expected)
    report.dead_letters_by_reason = dict(sorted(Counter(r[0] for r in found.values()).items()))
    report.dead_letters_sent_again = sum(len(reasons) - 1 for reasons in found.values())
    report.dead_letters_missing = sum(1 for identity in expected if identity not in found)
    wrong = {i: (r, expected.get(i)) for i, r in found.items() if expected.get(i) != r[0] or len(set(r)) > 1}
    report.dead_letters_unexpected = len(wrong)
    report.differences.extend(f"dead letter {i}: {r}" for i, r in list(wrong.items())[:20])


async def redis_differences(client: aioredis.Redis, plan: Plan) -> tuple[list[str], int]:
    """How Redis differs from the reference, and how many metric values were compared."""
    names = {parse_duration(window): window for window in WINDOWS}
    problems: list[str] = []
    compared = 0
    for (store, window_ms), expected in plan.reference.items():
        key = metric_key(store, names[window_ms])
        stored = {str(k): str(v) for k, v in (await client.hgetall(key)).items()}  # decoded by the client
        if stored.get("as_of_ms") != str(plan.as_of_ms):
            problems.append(f"{key!r}: as_of_ms {stored.get('as_of_ms')} != {plan.as_of_ms}")
            continue
        actual = {name: parse_redis_field(name, stored.get(name, "")) for name in expected}
        compared += len(expected)
        problems.extend(f"{key!r} {problem}" for problem in metric_differences(actual, expected))
    return problems, compared


async def run_fuzz(bootstrap: str, redis_url: str, work_dir: Path, *, hostile: int, customers_per_store: int,
                   seed: int, timeout_s: float = 600, echo: Callable[[str], None] = print) -> Report:
    """One worker fed a history with ``hostile`` hostile messages; see the module docstring."""
    started = time.monotonic()
    report = Report()
    plan = build_plan(hostile, customers_per_store, seed, now_ms=time.time_ns() // 1_000_000)
    report.messages = len(plan.messages)
    kinds = Counter(message.kind for message in plan.messages if message.kind != "history")
    report.hostile_messages = sum(kinds.values())
    report.hostile_kinds = dict(sorted(kinds.items()))
    report.valid_events = plan.valid_events
    echo(f"plan: {report.messages} messages, {report.hostile_messages} hostile, {plan.valid_events} valid events, "
         f"{sum(plan.expected_reasons.values())} dead letters due ({time.monotonic() - started:.1f}s)")
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    await client.flushdb()
    worker = await FuzzWorker.start(bootstrap, redis_url, work_dir)
    process, pid = worker.process, worker.process.pid
    try:
        expected = await produce(bootstrap, worker.prefix, plan.messages)
        echo(f"sent in {time.monotonic() - started:.1f}s; waiting for Redis to equal the reference")
        deadline = time.monotonic() + timeout_s
        problems: list[str] = ["nothing compared yet"]
        while problems and time.monotonic() < deadline and process.poll() is None:
            problems, report.elements_compared = await redis_differences(client, plan)
            if problems:
                await asyncio.sleep(0.5)
        report.differences = problems[:30]
        report.snapshots_compared = len(plan.reference)
        await check_dead_letters(bootstrap, worker.prefix, expected, report)
        health = await read_health(client)
        echo(f"health: events_applied {health.get('events_applied')}, duplicates {health.get('duplicates')}")
    finally:
        report.worker_exits = 0 if process.poll() is None else 1
        report.same_pid = process.pid == pid and process.poll() is None
        worker.stop()
        await client.aclose()
    report.reader_restarts = worker.log_text().count("ingest.failed")
    report.trouble_lines = worker.trouble()
    report.seconds = round(time.monotonic() - started, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    """The command line (``python -m bench.fuzz --help``)."""
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--hostile", type=int, default=20_000, help="hostile messages (default 20,000)")
    parser.add_argument("--customers", type=int, default=400, help="history customers per store (3 stores)")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--redis-db", type=int, default=15, help="the Redis database the run empties and uses")
    parser.add_argument("--out", type=Path, help="also write the report as JSON to this file")
    args = parser.parse_args(argv)
    from streams.settings import load_settings

    settings = load_settings()
    redis_url = settings.redis_url.rsplit("/", 1)[0] + f"/{args.redis_db}"
    with tempfile.TemporaryDirectory(prefix="loyalty-fuzz-") as folder:
        report = asyncio.run(run_fuzz(settings.kafka_bootstrap_servers, redis_url, Path(folder), hostile=args.hostile,
                                      customers_per_store=args.customers, seed=args.seed))
    text = orjson.dumps({**report.__dict__, "ok": report.ok}, option=orjson.OPT_INDENT_2).decode()
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
