"""Per-customer state is bounded: paged facts round-trip exactly, and a hot "guest" id stays small and exact."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metrics import events as ev
from metrics.customer import SEEN_CHUNK_IDS, CustomerFacts, MissingPageError
from metrics.intervals import MINUS_INFINITY, PLUS_INFINITY
from metrics.reference import accepted_events
from metrics.timegrid import DAY_MS, Grid
from streams.stages.facts import (
    CustomerOutput,
    CustomerStage,
    apply_records,
    customer_records,
    delta_messages,
    load_customer,
)
from streams.worker.wire import customer_route_key, event_to_list
from tests.test_stages import GRID, PARTITIONS, DeltasLog, _assert_equal_to_reference

#: the SPEC's bound on any one record of a customer
RECORD_LIMIT = 256 * 1024
MINUTE_MS = 60_000
KEY = customer_route_key("s", "c")
KINDS = (ev.ORDER_PLACED, ev.ORDER_REFUNDED, ev.CUSTOMER_SIGNED_UP, ev.CUSTOMER_CLOSED, ev.LOYALTY_ENROLLED,
         ev.LOYALTY_LEFT, ev.REWARD_ISSUED, ev.REWARD_REDEEMED, ev.SURVEY_RESPONDED)


def _state(facts: CustomerFacts) -> tuple[Any, ...]:
    """Everything a customer's metrics and deduplication depend on (paging bookkeeping left out)."""
    return (facts.first_activity_ms, facts.signup_key, facts.signup_channel, dict(sorted(facts.activity.items())),
            facts.closes, facts.order_count, facts.first_orders, dict(sorted(facts.orders.items())),
            dict(sorted(facts.revenue.items())), facts.member_before, facts.member_before_key, facts.membership,
            dict(sorted(facts.rewards.items())), facts.nps_answers, facts.nps_before,
            list(facts.seen.items()))


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32), unpage_entries=st.sampled_from((0, 40)), out_of_order=st.booleans())
def test_paged_facts_reload_equal_the_facts_in_memory(seed: int, unpage_entries: int, out_of_order: bool) -> None:
    """Written paged (only changed pages each time) and read back, facts equal the live ones and a never-paged twin."""
    rng = random.Random(seed)
    grid = Grid(MINUTE_MS, 40 * MINUTE_MS, (10 * MINUTE_MS,), dedupe_ttl_ms=30 * MINUTE_MS)
    live, twin = CustomerFacts(), CustomerFacts()
    table: dict[bytes, bytes] = {}
    clock = 0
    for step in range(rng.randrange(1, 40)):
        clock += rng.randrange(0, 20 * MINUTE_MS)
        horizon_start = grid.bucket(clock) - grid.fact_retention
        for facts in (live, twin):
            facts.prune(grid, horizon_start, clock - grid.dedupe_ttl_ms)
        for index in range(rng.randrange(1, 30)):
            time = clock - (rng.randrange(3 * grid.fact_retention * MINUTE_MS) if out_of_order else 0)
            kind = rng.choice(KINDS)
            survey = {"survey": ev.SURVEY_NPS, "score": rng.randrange(11)} if kind == ev.SURVEY_RESPONDED else {}
            event = ev.Event(f"e{step}-{index}", kind, max(0, time), "s", "c",  # type: ignore[arg-type]
                             amount_micros=rng.randrange(10**7), channel=rng.choice((None, "ads")), **survey)
            for facts in (live, twin):
                facts.remember(event.event_id, clock)
                facts.apply(event, grid, horizon_start)
        apply_records(table, customer_records(KEY, live, grid, inline_bytes=0, unpage_entries=unpage_entries))
        loaded = load_customer(KEY, table.get)
        assert loaded is not None and _state(loaded) == _state(live) == _state(twin)
        live = loaded  # the next batch starts from the table, as after a restart
    # nothing is left behind but the head and the pages it names
    pages = {key for key in table if b"\x00" in key}
    named = {f"{name}.{version}" for name, version in (live.paging.pages if live.paging else {}).items()}
    assert {key.split(b"\x00")[1].decode() for key in pages} == named


def _record_as_lists(facts: CustomerFacts) -> list[Any]:
    """A whole customer's stored record written out plainly, every entry a list (the format on disk)."""
    return [facts.first_activity_ms, list(facts.signup_key) if facts.signup_key else None, facts.signup_channel,
            [[b, t] for b, t in facts.activity.items()], list(facts.closes), facts.order_count,
            list(facts.first_orders), [[b, t] for b, t in facts.orders.items()],
            [[b, r] for b, r in facts.revenue.items()], facts.member_before,
            list(facts.member_before_key) if facts.member_before_key else None,
            [list(m) for m in facts.membership], [[b, c] for b, c in facts.rewards.items()], dict(facts.seen), None,
            [list(a) for a in facts.nps_answers],
            None if facts.nps_before is None else [facts.nps_before[2], facts.nps_before[0], facts.nps_before[1]],
            [[month, None if a == MINUS_INFINITY else a, None if c == MINUS_INFINITY else c,
              None if o == PLUS_INFINITY else o] for month, (a, c, o) in facts.months.items()]]


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_a_whole_record_is_the_json_of_its_lists(seed: int) -> None:
    """A whole customer's stored bytes are exactly the JSON of its fields as lists, and read back equal."""
    rng = random.Random(seed)
    grid = Grid(MINUTE_MS, 40 * MINUTE_MS, (10 * MINUTE_MS,), dedupe_ttl_ms=30 * MINUTE_MS)
    facts = CustomerFacts()
    clock = 0
    for index in range(rng.randrange(1, 60)):
        clock += rng.randrange(0, 5 * MINUTE_MS)
        kind = rng.choice(KINDS)
        survey = {"survey": ev.SURVEY_NPS, "score": rng.randrange(11)} if kind == ev.SURVEY_RESPONDED else {}
        event = ev.Event(f"e{index}", kind, clock, "s", "c",  # type: ignore[arg-type]
                         amount_micros=rng.randrange(10**7), channel=rng.choice((None, "ads")), **survey)
        facts.remember(event.event_id, clock)
        facts.apply(event, grid, grid.bucket(clock) - grid.fact_retention)
    (value,) = customer_records(KEY, facts, grid).values()
    assert value == orjson.dumps(_record_as_lists(facts))
    loaded = load_customer(KEY, {KEY.encode(): value}.get)
    assert loaded is not None and _state(loaded) == _state(facts)


def test_a_head_whose_page_is_missing_is_refused() -> None:
    """A truncated table (a page the head names is gone) raises instead of giving facts without it."""
    grid = Grid(MINUTE_MS, 40 * MINUTE_MS, (10 * MINUTE_MS,))
    facts = CustomerFacts()
    for minute in range(3):
        facts.apply(ev.Event(f"e{minute}", ev.ORDER_PLACED, minute * MINUTE_MS, "s", "c", amount_micros=1), grid, 0)
    table: dict[bytes, bytes] = {}
    apply_records(table, customer_records(KEY, facts, grid, inline_bytes=0))
    del table[next(key for key in table if b"\x00" in key)]
    with pytest.raises(MissingPageError):
        load_customer(KEY, table.get)


def test_ids_expire_by_whole_chunks_without_rewriting_the_later_ones() -> None:
    """Expiring the oldest ids deletes their chunks and rewrites at most one: the others are untouched."""
    grid = Grid(MINUTE_MS, 40 * MINUTE_MS, (10 * MINUTE_MS,))
    facts = CustomerFacts()
    for index in range(5 * SEEN_CHUNK_IDS):
        facts.remember(f"id{index}", index)
    customer_records(KEY, facts, grid, inline_bytes=0)
    facts.prune(grid, 0, 2 * SEEN_CHUNK_IDS + 10)
    writes = customer_records(KEY, facts, grid, inline_bytes=0)
    written = sorted(key.split(b"\x00")[1].decode() for key, value in writes.items() if value and b"\x00" in key)
    deleted = sorted(key.split(b"\x00")[1].decode() for key, value in writes.items() if value is None)
    assert written == ["s2.2"] and deleted == ["s0.1", "s1.1", "s2.1"]
    assert len(facts.seen) == 3 * SEEN_CHUNK_IDS - 10


def _guest_history(days: int) -> list[ev.Event]:
    """A shared "guest" id ordering every minute (with refunds and surveys) beside a few ordinary customers."""
    rng = random.Random(4)
    start = 1_700_000_000_000 - 1_700_000_000_000 % DAY_MS
    events: list[ev.Event] = []
    for minute in range(days * 24 * 60):
        time = start + minute * MINUTE_MS + rng.randrange(MINUTE_MS)
        events.append(ev.Event(f"g{minute}", ev.ORDER_PLACED, time, "s", "guest", order_id=f"o{minute}",
                               amount_micros=rng.randrange(1, 10**8), currency="EUR"))
        if minute % 97 == 0:
            events.append(ev.Event(f"r{minute}", ev.ORDER_REFUNDED, time, "s", "guest", order_id=f"o{minute}",
                                   amount_micros=1_000_000, currency="EUR"))
        if minute % 7 == 0:  # and answers NPS surveys: its segment changes every few minutes
            events.append(ev.Event(f"q{minute}", ev.SURVEY_RESPONDED, time, "s", "guest", survey="nps",
                                   score=rng.randrange(11)))
        if minute % 1440 == 5:
            customer = f"c{rng.randrange(30)}"
            events.append(ev.Event(f"c{minute}", rng.choice((ev.ORDER_PLACED, ev.CUSTOMER_SIGNED_UP)), time, "s",
                                   customer, order_id="x", amount_micros=5_000_000, currency="EUR"))
            events.append(ev.Event(f"n{minute}", ev.SURVEY_RESPONDED, time, "s", customer, survey="nps",
                                   score=rng.randrange(11)))
    return events


def test_a_guest_ordering_every_minute_for_400_days_keeps_every_record_small_and_exact() -> None:
    """SPEC 3: one id ordering every minute for 400 days: no record past 256 KiB, metrics equal the reference."""
    _run_guest(400, cache_size=100)


def test_a_paged_guest_read_again_at_every_message_stays_exact() -> None:
    """Without the memory cache, the paged guest is read with each message's reads at once, pages and all: exact."""
    _run_guest(45, cache_size=0)


def _run_guest(days: int, cache_size: int) -> None:
    """The guest history of ``days`` through the stage, a week per message, as the worker reads: checked."""
    events = _guest_history(days)
    # the stage of the worker, with ids remembered for the default 30 days of the (here: event) clock
    stage = CustomerStage(Grid(GRID.bucket_ms, GRID.horizon_ms, GRID.windows_ms), cache_size=cache_size)
    reads: list[str] = []

    def read_many(keys: list[str]) -> dict[str, bytes | None]:
        reads.extend(keys)
        return {key: table.get(key.encode()) for key in keys}

    table: dict[bytes, bytes] = {}
    shards: dict[str, Any] = {}
    log = DeltasLog()
    largest = 0
    day = 24 * 60
    week = 7 * day  # a message per week of events: the facts stage takes batches of up to 20,000
    for offset, start in enumerate(range(0, len(events), week)):
        message = [event_to_list(event) for event in events[start:start + week]]
        clock = max(fields[2] for fields in message)
        output = CustomerOutput()
        stage.process(orjson.loads(orjson.dumps(message)), table.get, clock, output, clock, read_many)
        for target, parts in delta_messages(output, (0, offset), PARTITIONS).items():
            log.send(shards, target, parts)
        writes = stage.table_writes(output.customers)
        largest = max(largest, *(len(value) for value in writes.values() if value is not None))
        apply_records(table, writes)
    assert largest < RECORD_LIMIT
    guest_key = customer_route_key("s", "guest")
    # the guest is read at the first message (a new customer), then kept in memory; without the memory
    # cache it is read again, pages and all, at every message
    assert reads.count(guest_key) == (1 if cache_size else len(range(0, len(events), week)))
    guest = load_customer(guest_key, table.get)
    assert guest is not None and guest.paging is not None  # paged: a whole record would be megabytes
    # ids expire 30 days after they were seen (stamped once per message here, a week of events)
    assert 30 * day <= len(guest.seen) <= 30 * day + 2 * week
    _assert_equal_to_reference(shards, accepted_events(events), clock)
