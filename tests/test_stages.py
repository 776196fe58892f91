"""The pipeline's stages without Kafka: routing, gate, idempotent aggregation, and the chain equals the reference."""

from __future__ import annotations

import base64
import random
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metrics.catalog import ALL_STORES
from metrics.compare import metric_differences
from metrics.customer import CustomerFacts
from metrics.engine import customer_key
from metrics.events import Event
from metrics.reference import ReferenceConfig, accepted_events, reference_all
from metrics.store import ReadPoints
from metrics.timegrid import DAY_MS, Grid
from metrics.validation import parse_message
from streams.stages import facts as facts_stage
from streams.stages import routed as routed_stage
from streams.stages.aggregate import StoreShard, apply_message, join_partials
from streams.stages.facts import (
    INLINE_BYTES,
    PAGE_SEPARATOR,
    SMALL_ENTRIES,
    BatchCustomers,
    CustomerOutput,
    CustomerStage,
    apply_records,
    customer_records,
    delta_messages,
)
from streams.stages.gate import GateStage
from streams.stages.ingest import IngestStage
from streams.stages.routed import Routed
from streams.tools.history import generate_history, wire_body
from streams.worker.wire import customer_route_key, event_from_list, pack_chunks, route, unpack

GRID = Grid(60_000, 90 * DAY_MS, (3_600_000, DAY_MS, 7 * DAY_MS, 30 * DAY_MS), dedupe_ttl_ms=10**13)
PARTITIONS = 3
SOURCE = ("orders", 2, 41)
#: the wall clock of the ingest tests: after every event they send
NOW = 1_800_000_000_000


def spend(event_id: str, **changes: Any) -> dict[str, Any]:
    body = {"event_id": event_id, "type": "spend.recorded", "occurred_at": 1_700_000_000_000, "store_id": "s1",
            "amount": "10.50", "currency": "EUR"}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def test_ingest_dead_letters_a_bad_batch_element_with_its_own_text_and_index() -> None:
    """An invalid element of a batch becomes one dead letter with its index; the others go on."""
    value = orjson.dumps([spend("a"), spend("b", store_id=None), spend("c")])
    routed = Routed()
    IngestStage(PARTITIONS, 300_000).process("marketing-spend", ("p-marketing-spend", 2, 41), value, NOW, routed)
    assert routed.accepted == 2
    (letter,) = routed.dead_letters
    assert (letter["reason"], letter["index"], letter["offset"]) == ("missing_field", 1, 41)
    assert orjson.loads(base64.b64decode(letter["raw_base64"]))["event_id"] == "b"


def test_ingest_rejects_the_reserved_store_id() -> None:
    """``*`` names all stores together, so no event may use it as its store."""
    routed = Routed()
    IngestStage(PARTITIONS, 300_000).process("marketing-spend", SOURCE, orjson.dumps(spend("a", store_id="*")), NOW,
                                             routed)
    assert [letter["reason"] for letter in routed.dead_letters] == ["reserved_store_id"]
    assert routed.accepted == 0


def test_ingest_dead_letters_a_message_whose_validation_fails_instead_of_raising(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Should validation itself fail (a bug), the message is one ``unprocessable`` dead letter and ingest goes on."""
    from streams.stages import ingest

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(ingest, "parse_message", broken)
    routed = Routed()
    IngestStage(PARTITIONS, 300_000).process("marketing-spend", SOURCE, b"[[[]]]", NOW, routed)
    (letter,) = routed.dead_letters
    assert letter["reason"] == "unprocessable" and "RecursionError" in letter["detail"]
    assert base64.b64decode(letter["raw_base64"]) == b"[[[]]]" and routed.accepted == 0


def test_ingest_turns_a_300_deep_array_into_one_dead_letter() -> None:
    """The 602-byte message that used to stop the worker is one ``not_an_event`` dead letter."""
    routed = Routed()
    IngestStage(PARTITIONS, 300_000).process("orders", SOURCE, b"[" * 301 + b"]" * 301, NOW, routed)
    assert [(letter["reason"], letter["index"]) for letter in routed.dead_letters] == [("not_an_event", 0)]


@pytest.mark.parametrize(("value", "reason"), [
    (b"[" + b"x" * 999_999, "invalid_json"), (b"x" * 1_000_000, "message_too_large"),
    (b"[" + b"1," * 1_000_000 + b"1]", "message_too_large"),  # 2 MiB: it came compressed
])
def test_a_dead_letter_of_a_huge_message_fits_a_kafka_message(value: bytes, reason: str) -> None:
    """A message of ~1 MiB (2 MiB if it came compressed) is dead-lettered with its first 512 KiB, under 1 MiB."""
    routed = Routed()
    size = len(value)
    IngestStage(PARTITIONS, 300_000).process("orders", SOURCE, value, NOW, routed)
    (letter,) = routed.dead_letters
    assert letter["reason"] == reason
    assert (letter["raw_bytes"], letter["raw_truncated"]) == (size, True)
    assert base64.b64decode(letter["raw_base64"]) == value[:512 * 1024]
    assert len(orjson.dumps(letter)) < 1024 * 1024 - 1024


def test_gate_rejects_another_currency_with_the_original_text() -> None:
    """A store keeps its first currency; money in another one is dead-lettered with its original bytes."""
    routed = Routed()
    ingest = IngestStage(PARTITIONS, 300_000)
    first = orjson.dumps(spend("a"))
    second = orjson.dumps(spend("b", currency="USD"))
    ingest.process("marketing-spend", SOURCE, first, NOW, routed)
    ingest.process("marketing-spend", ("orders", 2, 42), second, NOW, routed)
    items = [item for chunk in routed.by_partition.values() for item in chunk]
    out = Routed()
    currencies: dict[str, str] = {}
    GateStage(PARTITIONS).process(items, currencies, None, [], out, {})
    assert currencies == {"s1": "EUR"}
    (letter,) = out.dead_letters
    assert letter["reason"] == "currency_mismatch" and letter["offset"] == 42
    assert base64.b64decode(letter["raw_base64"]) == second


def test_gate_holds_events_later_than_the_wall_clock_until_it_reaches_them() -> None:
    """With the wall clock, an event from the near future waits, then is released."""
    routed = Routed()
    IngestStage(PARTITIONS, 300_000).process("marketing-spend", SOURCE, orjson.dumps(spend("a")), NOW, routed)
    items = [item for chunk in routed.by_partition.values() for item in chunk]
    held: list[Any] = []
    out = Routed()
    gate = GateStage(PARTITIONS)
    gate.process(items, {}, 1_700_000_000_000 - 1, held, out, {})
    assert out.accepted == 0 and len(held) == 1
    still = gate.release(held, 1_700_000_000_000, out)
    assert still == [] and out.accepted == 1


def _parsed(history: list[Any]) -> list[Event]:
    events = []
    for item in history:
        (event,) = parse_message(orjson.dumps(wire_body(item)), item.topic, now_ms=2 * 10**12, max_future_skew_ms=0)
        assert isinstance(event, Event)
        events.append(event)
    return events


class DeltasLog:
    """The deltas topic in memory: each message is applied as the aggregation applies it, to its stores and to
    its partition's partial ``*``."""

    def __init__(self) -> None:
        self.messages: list[tuple[int, list[dict[str, Any]]]] = []

    def send(self, shards: dict[str, StoreShard], partition: int, parts: list[dict[str, Any]]) -> None:
        parts = orjson.loads(orjson.dumps(parts))  # as on the wire
        self.messages.append((partition, parts))
        apply_message(shards, _partial(shards, partition), parts)


def _partial(shards: dict[str, StoreShard], partition: int) -> StoreShard:
    """The partial ``*`` of a deltas partition, kept in the shards dict under a key no store can have."""
    return shards.setdefault(f"*{partition}", StoreShard(ALL_STORES))  # "*3": a test-only key


def _star(shards: dict[str, StoreShard], clock: int) -> ReadPoints:
    """``*`` as its publisher makes it: the partials' read points, as on the wire, summed."""
    total = ReadPoints()
    for key, shard in shards.items():
        if key.startswith("*"):
            record = orjson.dumps(shard.read_points(GRID, GRID.bucket(clock)).to_record())
            total.merge(ReadPoints.from_record(orjson.loads(record)))
    return total


def _metrics(shards: dict[str, StoreShard], store: str, window: int, clock: int) -> dict[str, object]:
    if store == ALL_STORES:
        currencies = {c for key, shard in shards.items() if key.startswith("*") for c in shard.currencies.values()}
        return _star(shards, clock).metrics(GRID, window, GRID.bucket(clock), len(currencies) <= 1)
    return shards[store].metrics(GRID, window, GRID.bucket(clock))


def _write_facts(
    table: dict[bytes, bytes], stage: CustomerStage, customers: BatchCustomers, cut: int | None = None
) -> None:
    """Store a batch's customers as the facts agent does (pages, heads, deletes, in order); ``cut``: crash
    after that many writes."""
    writes = list(stage.table_writes(customers).items())
    apply_records(table, dict(writes[:cut]))


def _run_chain(
    events: list[Event], seed: int, replays: float, log: DeltasLog | None = None, cache_size: int = 0,
    message_size: int = 25, inline_bytes: int = INLINE_BYTES,
) -> tuple[dict[str, StoreShard], int]:
    """Gate, facts and aggregation in memory, messages replayed at random as Kafka may after a crash.

    ``log`` receives every deltas message sent, in order: the deltas topic. A "crash" before the
    facts are written may also have written part of them (the table write is not atomic).
    """
    log = log if log is not None else DeltasLog()
    rng = random.Random(seed)
    gate_routed = Routed()
    GateStage(PARTITIONS).process([[list(_fields(e)), None] for e in events], {}, None, [], gate_routed, {})
    facts: dict[bytes, bytes] = {}  # the table: encoded records, as in the pipeline
    shards: dict[str, StoreShard] = {}
    stage = CustomerStage(GRID, cache_size=cache_size, inline_bytes=inline_bytes)
    clock = 0
    offsets = dict.fromkeys(gate_routed.by_partition, 0)
    for partition, items in gate_routed.by_partition.items():
        for start in range(0, len(items), message_size):
            message = items[start:start + message_size]
            offset = offsets[partition]
            offsets[partition] += 1
            clock = max([clock, *(fields[2] for fields in message)])
            replayed = rng.random() < replays
            for attempt in range(2 if replayed else 1):
                output = CustomerOutput()
                stage.process(message, facts.get, clock, output, 0)
                for target, parts in delta_messages(output, (partition, offset), PARTITIONS).items():
                    log.send(shards, target, parts)
                if replayed and attempt == 0 and rng.random() < 0.5:
                    # "crashed" before the facts were all written: the replay recomputes the same deltas
                    _write_facts(facts, stage, output.customers, cut=rng.randrange(len(output.customers) * 3 + 1))
                    stage.forget()  # a crash loses the memory too
                    continue
                _write_facts(facts, stage, output.customers)
    return shards, clock


def _fields(event: Event) -> list[Any]:
    from streams.worker.wire import event_to_list

    return event_to_list(event)


def _assert_equal_to_reference(shards: dict[str, StoreShard], events: list[Event], clock: int) -> None:
    reference = reference_all(events, windows_ms=GRID.windows_ms, as_of_ms=clock,
                              config=ReferenceConfig(bucket_ms=GRID.bucket_ms, horizon_ms=GRID.horizon_ms))
    for (store, window_ms), expected in reference.items():
        window = GRID.windows[GRID.windows_ms.index(window_ms)]
        actual = _metrics(shards, store, window, clock)
        assert not metric_differences(actual, expected), (store, window_ms)


@pytest.mark.parametrize(
    ("replays", "cache_size", "inline_bytes", "small_entries"),
    [(0.0, 0, INLINE_BYTES, SMALL_ENTRIES), (0.3, 0, INLINE_BYTES, SMALL_ENTRIES),
     (0.3, 7, INLINE_BYTES, SMALL_ENTRIES), (0.3, 10_000, INLINE_BYTES, SMALL_ENTRIES),
     (0.3, 7, 0, SMALL_ENTRIES), (0.3, 0, 1500, SMALL_ENTRIES),
     (0.3, 7, INLINE_BYTES, 0), (0.3, 10_000, INLINE_BYTES, 0), (0.3, 7, 1500, 10**9)],
)
def test_stage_chain_with_replays_equals_the_reference(
    replays: float, cache_size: int, inline_bytes: int, small_entries: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Facts and aggregation stages, with replays, parts, encoded, kept and paged customers, equal the reference."""
    monkeypatch.setattr(routed_stage, "MAX_DELTA_ROWS", 50)
    monkeypatch.setattr(facts_stage, "SMALL_ENTRIES", small_entries)
    history = generate_history(stores=2, customers_per_store=60, days=50, seed=3)
    events = accepted_events(_parsed(history))
    shards, clock = _run_chain(events, seed=5, replays=replays, cache_size=cache_size, inline_bytes=inline_bytes)
    _assert_equal_to_reference(shards, events, clock)


def test_many_events_of_a_customer_in_one_message_in_any_order_equal_the_reference() -> None:
    """Large messages holding several events per customer, shuffled and with duplicates, equal the batch reference."""
    history = generate_history(stores=2, customers_per_store=40, days=20, seed=11)
    events = accepted_events(_parsed(history))
    rng = random.Random(7)
    shuffled = [*events, *rng.sample(events, 60)]  # duplicates: the same event ids again
    rng.shuffle(shuffled)
    repeated = 400 - len({(e.store_id, e.customer_id) for e in shuffled[:400]})
    assert repeated > 100  # the first message alone has many events per customer
    shards, clock = _run_chain(shuffled, seed=5, replays=0.2, message_size=400)
    _assert_equal_to_reference(shards, shuffled, clock)


def _fold_log(log: DeltasLog, messages: int | None = None) -> dict[str, StoreShard]:
    """Shards and partials folded from the log's first ``messages`` messages."""
    shards: dict[str, StoreShard] = {}
    for partition, parts in log.messages[:messages]:
        apply_message(shards, _partial(shards, partition), parts)
    return shards


def test_shards_rebuilt_from_the_deltas_log_and_read_again_equal_the_live_ones() -> None:
    """Shards folded from the deltas log, then fed its tail again (the agent after a rebuild), read the same."""
    history = generate_history(stores=2, customers_per_store=40, days=40, seed=11)
    events = accepted_events(_parsed(history))
    log = DeltasLog()
    live, clock = _run_chain(events, seed=1, replays=0.3, log=log)
    rebuilt = _fold_log(log)
    versions = {key: shard.version for key, shard in rebuilt.items()}
    for partition, parts in log.messages[len(log.messages) * 2 // 3:]:
        apply_message(rebuilt, _partial(rebuilt, partition), parts)
    assert {key: shard.version for key, shard in rebuilt.items()} == versions  # nothing applied twice
    assert set(rebuilt) == set(live)
    for store_id in [*(key for key in rebuilt if not key.startswith("*")), ALL_STORES]:
        for shard in rebuilt.values():
            # folding what no window reads changes nothing
            shard.fold(GRID.bucket(clock), GRID.longest, GRID.cohort_reach)
        for window in GRID.windows:
            expected = _metrics(live, store_id, window, clock)
            assert not metric_differences(_metrics(rebuilt, store_id, window, clock), expected)


def test_a_shard_restored_from_its_checkpoint_folds_the_tail_to_the_live_numbers() -> None:
    """Shards and partials checkpointed mid-log (bytes round trip) plus the log from before it equal the live ones."""
    history = generate_history(stores=2, customers_per_store=40, days=40, seed=13)
    events = accepted_events(_parsed(history))
    log = DeltasLog()
    live, clock = _run_chain(events, seed=2, replays=0.3, log=log)
    middle = len(log.messages) // 2
    restored = {key: StoreShard.from_bytes(shard.to_bytes()) for key, shard in _fold_log(log, middle).items()}
    # as the agent's restore does: each partial reads the restored stores of its partition
    join_partials([(key, shard) for key, shard in list(restored.items()) if not key.startswith("*")],
                  lambda store_id: _partial(restored, route(store_id, PARTITIONS)))
    for partition, parts in log.messages[middle // 2:]:  # from before the checkpoint: skipped as applied
        apply_message(restored, _partial(restored, partition), parts)
    for store_id in [*(key for key in live if not key.startswith("*")), ALL_STORES]:
        for window in GRID.windows:
            expected = _metrics(live, store_id, window, clock)
            assert not metric_differences(_metrics(restored, store_id, window, clock), expected)


def test_a_partial_star_sums_its_partitions_stores_once() -> None:
    """A partition's partial ``*`` adds every store of a part once; the part sent again adds nothing."""
    shards: dict[str, StoreShard] = {}
    partial = StoreShard(ALL_STORES)
    part = {"src": [1, 7, 0], "t": 600_000, "stores": {"s1": {"g": ["orders", [10, 1]], "cur": {"s1": "EUR"}},
                                                        "s2": {"g": ["orders", [10, 2]]}}}
    apply_message(shards, partial, [part])
    apply_message(shards, partial, [part])  # the facts stage sent it again after a crash
    grid = Grid(60_000, 180_000, (180_000,))
    assert partial.read_points(grid, 12).metrics(grid, 3, 12)["orders"] == 3 and partial.currency() == "EUR"
    assert shards["s1"].aggregate.metrics(grid, 3, 12)["orders"] == 1
    assert not partial.aggregate.series  # read from the stores in place, never copied


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["s1", "s2", "s3"]), st.integers(0, 40), st.integers(-3, 3),
                          st.sampled_from([20, 30, 45])), min_size=1, max_size=40))
def test_a_partial_star_kept_between_reads_equals_its_stores_summed_afresh(
    steps: list[tuple[str, int, int, int]],
) -> None:
    """Parts to any store, read as of moving buckets: the partial's kept sum equals its stores' read points summed."""
    grid = Grid(60_000, 600_000, (600_000,))
    shards: dict[str, StoreShard] = {}
    partial = StoreShard(ALL_STORES)
    for offset, (store, bucket, delta, as_of) in enumerate(steps):
        part = {"src": [0, offset, 0], "t": bucket * 60_000, "stores": {store: {"g": ["orders", [bucket, delta]]}}}
        apply_message(shards, partial, [part])
        expected = ReadPoints()
        for shard in shards.values():
            expected.merge(shard.aggregate.read_points(grid, as_of))
        kept = partial.read_points(grid, as_of)
        assert {name: {b: v for b, v in values.items() if v} for name, values in kept.values.items()} == {
            name: {b: v for b, v in values.items() if v} for name, values in expected.values.items()}


def test_a_replayed_delta_part_is_applied_once() -> None:
    """The same (partition, offset, part) applied twice counts once; an older part of that partition too."""
    shard = StoreShard("s1")
    entry = {"g": ["orders", [10, 1, 11, 1], "gross", [10, 5_000_000]]}
    assert shard.apply((0, 7, 0), entry, 600_000)
    assert not shard.apply((0, 7, 0), entry, 600_000)
    assert not shard.apply((0, 6, 3), entry, 600_000)
    assert shard.apply((1, 2, 0), {"g": ["orders", [11, 1]]}, 660_000)
    assert shard.apply((1, 3, 0), {"g": ["orders", [11, 2], "gross", [12, 7_000_000]]}, 700_000)
    metrics = shard.aggregate.metrics(Grid(60_000, 180_000, (180_000,)), 3, 12)
    assert (metrics["orders"], metrics["gross_revenue"]) == (5, Decimal("12"))
    assert shard.latest_event_ms == 700_000


def test_small_customers_are_encoded_at_once_and_larger_ones_kept_in_memory() -> None:
    """A customer under SMALL_ENTRIES is held encoded and not cached, a larger one as objects and cached; the
    batch's writes are their records."""
    hour = 3_600_000
    start = 1_700_000_000_000
    small = [Event(f"a{i}", "order.placed", start + i * hour, "s", "a", f"oa{i}", 1_000_000, "EUR") for i in range(2)]
    large = [Event(f"b{i}", "order.placed", start + i * hour, "s", "b", f"ob{i}", 2_000_000, "EUR")
             for i in range(SMALL_ENTRIES)]
    clock = start + SMALL_ENTRIES * hour
    stage = CustomerStage(GRID, cache_size=10)
    batch = BatchCustomers()
    stage.process([_fields(event) for event in small + large], lambda key: None, clock,
                  CustomerOutput(customers=batch), 0)
    key_a, key_b = customer_route_key("s", "a"), customer_route_key("s", "b")
    assert set(batch.encoded) == {key_a} and set(batch.kept) == {key_b}
    assert list(stage._recent) == [key_b]
    horizon_start = GRID.bucket(clock) - GRID.fact_retention
    expected_a, expected_b = CustomerFacts(), CustomerFacts()
    expected_a.apply_events(small, GRID, horizon_start, 0, {})
    expected_b.apply_events(large, GRID, horizon_start, 0, {})
    assert stage.table_writes(batch) == {key_a.encode(): orjson.dumps(expected_a.to_record()),
                                         **customer_records(key_b, expected_b, GRID)}


def _batch_keys(customers: BatchCustomers) -> set[str]:
    """The customer keys a batch holds, encoded or kept."""
    return set(customers.kept) | set(customers.encoded)


@pytest.mark.parametrize("small_entries", [0, SMALL_ENTRIES, 10**9])
@pytest.mark.parametrize("batched_reads", [False, True])
@pytest.mark.parametrize("cache_size", [0, 3, 10_000])
def test_messages_of_one_batch_share_facts_whatever_the_cache_keeps(
    cache_size: int, batched_reads: bool, small_entries: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several messages per batch, table written after the batch, customers encoded or kept, evicted mid-batch
    (read one by one or all of a message at once): the reference."""
    monkeypatch.setattr(facts_stage, "SMALL_ENTRIES", small_entries)
    history = generate_history(stores=2, customers_per_store=60, days=50, seed=3)
    events = accepted_events(_parsed(history))
    gate_routed = Routed()
    GateStage(PARTITIONS).process([[list(_fields(e)), None] for e in events], {}, None, [], gate_routed, {})
    table: dict[bytes, bytes] = {}
    shards: dict[str, StoreShard] = {}
    deltas_log = DeltasLog()
    stage = CustomerStage(GRID, cache_size=cache_size)
    clock = 0

    loads: list[str] = []
    batch = BatchCustomers()

    def read_one(stored_key: bytes) -> bytes | None:
        if PAGE_SEPARATOR.encode() not in stored_key:  # a customer's record, not one of its pages
            loads.append(stored_key.decode())
        return table.get(stored_key)

    def read_many(keys: list[str]) -> dict[str, bytes | None]:
        assert keys and len(set(keys)) == len(keys) and not set(keys) & _batch_keys(batch), keys
        loads.extend(keys)
        return {key: table.get(key.encode()) for key in keys}

    for partition, items in gate_routed.by_partition.items():
        messages = [items[start:start + 5] for start in range(0, len(items), 5)]
        for first in range(0, len(messages), 8):  # a batch: 8 messages, one BatchCustomers, one table write
            batch = BatchCustomers()
            for offset, message in enumerate(messages[first:first + 8], start=first):
                clock = max([clock, *(fields[2] for fields in message)])
                output = CustomerOutput(customers=batch)
                before, known = len(loads), _batch_keys(batch)
                if batched_reads:
                    stage.process(message, read_one, clock, output, 0, read_many)
                else:
                    stage.process(message, read_one, clock, output, 0)
                # each customer the message names is read from the table at most once, and only when
                # neither the batch nor the cache has it
                read = loads[before:]
                assert len(set(read)) == len(read)
                if cache_size == 0:
                    customers = {customer_route_key(*customer_key(event_from_list(fields))) for fields in message}
                    assert set(read) == customers - known, read
                assert not set(batch.kept) & set(batch.encoded)
                for target, parts in delta_messages(output, (partition, offset), PARTITIONS).items():
                    deltas_log.send(shards, target, parts)
            _write_facts(table, stage, batch)
    reference = reference_all(events, windows_ms=GRID.windows_ms, as_of_ms=clock,
                              config=ReferenceConfig(bucket_ms=GRID.bucket_ms, horizon_ms=GRID.horizon_ms))
    for (store, window_ms), expected in reference.items():
        window = GRID.windows[GRID.windows_ms.index(window_ms)]
        assert not metric_differences(_metrics(shards, store, window, clock), expected), store


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=300), max_size=400), st.integers(min_value=40, max_value=5000))
def test_pack_chunks_keeps_every_item_in_order_within_the_size_limit(items: list[str], max_bytes: int) -> None:
    """Packed chunks hold the items in order, each chunk within the limit unless it is one item alone."""
    chunks = pack_chunks(items, max_bytes)
    assert [item for chunk in chunks for item in unpack(chunk)] == items
    assert all(len(chunk) <= max_bytes or len(unpack(chunk)) == 1 for chunk in chunks)
