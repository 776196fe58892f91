"""Properties of the incremental engine: it equals the batch reference, whatever the order."""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metrics import events as ev
from metrics import store as metrics_store
from metrics.catalog import ALL_STORES
from metrics.compare import metric_differences
from metrics.customer import CustomerFacts, diff, families_of
from metrics.engine import WALL_CLOCK, CurrencyGate, LoyaltyEngine, customer_key
from metrics.reference import ReferenceConfig, reference_all
from metrics.store import PrefixSeries, ReadPoints, StoreAggregate
from metrics.timegrid import Grid

BUCKET_MS = 60_000
HORIZON_MS = 6 * BUCKET_MS
WINDOWS_MS = (2 * BUCKET_MS, 5 * BUCKET_MS)
SPAN_BUCKETS = 40
GRID = Grid(BUCKET_MS, HORIZON_MS, WINDOWS_MS, dedupe_ttl_ms=10**12)
#: a tight grid where horizons, windows and closes collide at bucket edges often
TIGHT_GRID = Grid(BUCKET_MS, 2 * BUCKET_MS, (BUCKET_MS, 3 * BUCKET_MS), dedupe_ttl_ms=10**12)
GRIDS = st.sampled_from((GRID, TIGHT_GRID))
PROPERTY_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))

TYPES = (
    ev.ORDER_PLACED,
    ev.ORDER_PLACED,
    ev.ORDER_PLACED,
    ev.ORDER_REFUNDED,
    ev.CUSTOMER_SIGNED_UP,
    ev.CUSTOMER_SIGNED_UP,
    ev.CUSTOMER_CLOSED,
    ev.SURVEY_RESPONDED,
    ev.SPEND_RECORDED,
    ev.LOYALTY_ENROLLED,
    ev.LOYALTY_LEFT,
    ev.REWARD_ISSUED,
    ev.REWARD_REDEEMED,
)
#: events that move customers between NPS segments, and the statuses the segments split
SEGMENT_TYPES = (
    ev.ORDER_PLACED,
    ev.ORDER_PLACED,
    ev.ORDER_REFUNDED,
    ev.CUSTOMER_SIGNED_UP,
    ev.CUSTOMER_CLOSED,
    ev.SURVEY_RESPONDED,
    ev.SURVEY_RESPONDED,
    ev.SURVEY_RESPONDED,
)
ALL_SURVEYS = (ev.SURVEY_NPS, ev.SURVEY_CSAT, ev.SURVEY_CES, ev.SURVEY_CLI)
CHANNELS = (None, "ads", "social")
#: more channels than the small caps of the channel property, and the overflow bucket's own name
MANY_CHANNELS = (None, "ads", "social", "tv", "radio", "mail", ev.OTHER_CHANNEL)


@st.composite
def event_logs(draw: st.DrawFn, channels: tuple[str | None, ...] = CHANNELS, types: tuple[str, ...] = TYPES,
               surveys: tuple[str, ...] = ALL_SURVEYS) -> list[ev.Event]:
    """Random events of every type over a few stores, with duplicates, in random arrival order."""
    store_count = draw(st.integers(1, 3))
    currencies = {f"s{i}": draw(st.sampled_from(("EUR", "USD"))) for i in range(store_count)}
    count = draw(st.integers(1, 60))
    rng = random.Random(draw(st.integers(0, 2**32)))
    produced: list[ev.Event] = []
    for index in range(count):
        store = rng.choice(sorted(currencies))
        bucket = rng.randrange(SPAN_BUCKETS)
        # offsets that hit bucket edges and exact ties often
        offset = rng.choice((0, 1, BUCKET_MS // 2, BUCKET_MS - 1, rng.randrange(BUCKET_MS)))
        time = bucket * BUCKET_MS + offset
        kind = rng.choice(types)
        customer = f"c{rng.randrange(4)}"
        fields: dict[str, object] = {}
        if kind in (ev.ORDER_PLACED, ev.ORDER_REFUNDED, ev.SPEND_RECORDED):
            wrong = rng.random() < 0.05
            currency = currencies[store]
            if wrong:
                currency = "USD" if currency == "EUR" else "EUR"
            fields = {"amount_micros": rng.choice((0, 1, 10_500_000, rng.randrange(10**9))), "currency": currency}
            if kind != ev.SPEND_RECORDED:
                fields["order_id"] = f"o{index}"
            else:
                fields["channel"] = rng.choice(channels)
        elif kind == ev.CUSTOMER_SIGNED_UP:
            fields = {"channel": rng.choice(channels)}
        elif kind == ev.SURVEY_RESPONDED:
            survey = rng.choice(surveys)
            fields = {"survey": survey}
            if survey == ev.SURVEY_NPS:
                fields["score"] = rng.randint(0, 10)
            elif survey == ev.SURVEY_CSAT:
                scale = rng.choice((5, 7, 10))
                fields.update(scale=scale, score=rng.randint(1, scale))
            elif survey == ev.SURVEY_CES:
                fields["score"] = rng.randint(1, 7)
            else:
                fields["answers"] = (rng.randint(1, 6), rng.randint(1, 6), rng.randint(1, 6))
        elif kind in (ev.REWARD_ISSUED, ev.REWARD_REDEEMED):
            fields = {"reward_id": f"r{index}", "points": rng.randrange(100)}
        customer_id = None if kind == ev.SPEND_RECORDED else customer
        # ids repeat across customers and stores (another event, SPEC 3) and within one (a duplicate)
        event_id = f"e{rng.randrange(index)}" if index and rng.random() < 0.15 else f"e{index}"
        produced.append(ev.Event(event_id, kind, time, store, customer_id, **fields))  # type: ignore[arg-type]
    duplicates = [rng.choice(produced) for _ in range(draw(st.integers(0, 5)))]
    arrival = produced + duplicates
    rng.shuffle(arrival)
    return arrival


def _compare(engine: LoyaltyEngine, events: list[ev.Event], as_of_ms: int, max_channels: int = 100) -> None:
    grid = engine.grid
    config = ReferenceConfig(bucket_ms=grid.bucket_ms, horizon_ms=grid.horizon_ms)
    expected = reference_all(events, windows_ms=grid.windows_ms, as_of_ms=as_of_ms, config=config,
                             max_channels=max_channels)
    stores = {store for store, _ in expected}
    assert set(engine.store_ids()) == stores | {ALL_STORES}
    for (store, window_ms), metrics in expected.items():
        differences = metric_differences(engine.snapshot(store, window_ms), metrics)
        assert not differences, f"{store} {window_ms}: {differences}"


@PROPERTY_SETTINGS
@given(events=event_logs(), grid=GRIDS)
def test_event_clock_equals_reference(events: list[ev.Event], grid: Grid) -> None:
    """With the event clock, the engine as of the latest event equals the batch reference."""
    check_event_clock(events, grid)


def check_event_clock(events: list[ev.Event], grid: Grid,
                      compare: Callable[[LoyaltyEngine, list[ev.Event], int], None] | None = None) -> None:
    """Ingest the events with the event clock and compare the engine as of the latest (``compare`` as in
    :func:`check_as_of_ticks`)."""
    engine = LoyaltyEngine(grid)
    for event in events:
        engine.ingest(event)
    if engine.now_ms is not None:
        (compare or _compare)(engine, events, engine.now_ms)


#: NPS answers often, several per customer, ties in a bucket: customers change segment back and forth
NPS_HEAVY_LOGS = event_logs(types=SEGMENT_TYPES, surveys=(ev.SURVEY_NPS,))


@PROPERTY_SETTINGS
@given(events=NPS_HEAVY_LOGS, grid=GRIDS)
def test_nps_segments_equal_reference(events: list[ev.Event], grid: Grid) -> None:
    """With NPS answers on every third event, churn, repeat purchase and net revenue by segment equal the reference."""
    check_event_clock(events, grid)


@PROPERTY_SETTINGS
@given(events=NPS_HEAVY_LOGS, data=st.data(), grid=GRIDS)
def test_nps_segments_as_of_any_time_equal_reference(events: list[ev.Event], data: st.DataObject,
                                                      grid: Grid) -> None:
    """With a moving wall clock, the segment numbers as of any T equal the reference (late answers included)."""
    check_as_of_ticks(events, data, grid, st.integers(0, (SPAN_BUCKETS + 8) * BUCKET_MS))


@PROPERTY_SETTINGS
@given(events=event_logs(channels=MANY_CHANNELS), limit=st.integers(0, 3), grid=GRIDS)
def test_channel_cap_equals_reference(events: list[ev.Event], limit: int, grid: Grid) -> None:
    """With a cap of 0 to 3 channels per store, the engine counts the same channels under ``other`` as the reference."""
    engine = LoyaltyEngine(grid, max_channels=limit)
    for event in events:
        engine.ingest(event)
    if engine.now_ms is None:
        return
    _compare(engine, events, engine.now_ms, max_channels=limit)


@PROPERTY_SETTINGS
@given(events=event_logs(), data=st.data(), grid=GRIDS)
def test_wall_clock_as_of_any_time_equals_reference(events: list[ev.Event], data: st.DataObject, grid: Grid) -> None:
    """With a moving wall clock, the numbers as of each grid-aligned or mid-bucket T equal the reference."""
    span_ms = SPAN_BUCKETS * BUCKET_MS
    any_time = st.one_of(
        st.integers(0, SPAN_BUCKETS + 8).map(lambda b: b * BUCKET_MS + data.draw(st.sampled_from((0, BUCKET_MS - 1)))),
        st.integers(0, span_ms + 8 * BUCKET_MS),
    )
    check_as_of_ticks(events, data, grid, any_time)


def check_as_of_ticks(events: list[ev.Event], data: st.DataObject, grid: Grid,
                      any_time: st.SearchStrategy[int],
                      compare: Callable[[LoyaltyEngine, list[ev.Event], int], None] | None = None) -> None:
    """Ingest the events with a wall clock moved to a few drawn times in between, each compared with the reference.

    ``compare(engine, events so far, T)`` checks the engine (by default every metric of every store).
    """
    compare = compare or _compare
    ticks = sorted(data.draw(st.lists(any_time, min_size=1, max_size=5)))
    positions = sorted(data.draw(st.integers(0, len(events))) for _ in ticks)
    engine = LoyaltyEngine(grid, clock=WALL_CLOCK)
    for index in range(len(events) + 1):
        while positions and positions[0] == index:
            positions.pop(0)
            engine.advance(ticks[0])
            compare(engine, events[:index], ticks.pop(0))
        if index < len(events):
            engine.ingest(events[index])


def by_customer(event: ev.Event, groups: int) -> int:
    """The part of an event when customers are split over partitions."""
    return zlib.crc32("|".join(customer_key(event)).encode()) % groups


def by_store(event: ev.Event, groups: int) -> int:
    """The part of an event when stores are split over partitions (as the deltas partitions hold them)."""
    return zlib.crc32(event.store_id.encode()) % groups


def split_engines(events: list[ev.Event], grid: Grid, groups: int, part_of: Callable[[ev.Event, int], int]
                  ) -> tuple[LoyaltyEngine, list[LoyaltyEngine], int]:
    """The admitted events in one engine and split over ``groups`` engines, all advanced to the latest event.

    Returns the whole engine, the parts and the latest event time.
    """
    gate = CurrencyGate()
    admitted = [e for e in events if e.type not in ev.MONEY_TYPES or gate.admit(e.store_id, e.currency)]
    final = max((e.occurred_at_ms for e in admitted), default=0)
    whole = LoyaltyEngine(grid, clock=WALL_CLOCK)
    parts = [LoyaltyEngine(grid, clock=WALL_CLOCK) for _ in range(groups)]
    for event in admitted:
        whole.ingest(event)
        parts[part_of(event, groups)].ingest(event)
    whole.advance(final)
    for part in parts:
        part.advance(final)
    return whole, parts, final


def merged_in_any_grouping(parts: list[LoyaltyEngine], rng: random.Random) -> StoreAggregate:
    """The parts' ``*`` aggregates merged two by two, in an order and grouping drawn from ``rng``."""
    pool = [part.all_stores for part in parts]
    while len(pool) > 1:
        left = pool.pop(rng.randrange(len(pool)))
        right = pool.pop(rng.randrange(len(pool)))
        merged = StoreAggregate()
        merged.merge(left)
        merged.merge(right)
        pool.append(merged)
    return pool[0]


def summed_read_points(parts: list[LoyaltyEngine], grid: Grid, k: int, rng: random.Random) -> ReadPoints:
    """The parts' ``*`` read points as of K, folded and serialised as the worker sends them, summed in any order."""
    points = []
    for part in parts:
        # partial states are folded as the worker folds them
        part.all_stores.fold_read(k, grid.longest, grid.cohort_reach)
        record = orjson.dumps(part.all_stores.read_points(grid, k).to_record())  # as on the wire
        points.append(ReadPoints.from_record(orjson.loads(record)))
    rng.shuffle(points)
    total = ReadPoints()
    for point in points:
        total.merge(point)
    return total


@PROPERTY_SETTINGS
@given(events=st.one_of(event_logs(), NPS_HEAVY_LOGS), groups=st.integers(2, 4), seed=st.integers(0, 2**16))
def test_merging_partial_states_in_any_grouping_equals_one_state(
    events: list[ev.Event], groups: int, seed: int
) -> None:
    """Customers split over partitions, their aggregates merged in any order and grouping, give the same result."""
    whole, parts, final = split_engines(events, GRID, groups, by_customer)
    merged = merged_in_any_grouping(parts, random.Random(seed))
    monetary = whole.gate.common_currency()[0]
    for window in GRID.windows:
        expected = whole.all_stores.metrics(GRID, window, GRID.bucket(final), monetary)
        assert not metric_differences(merged.metrics(GRID, window, GRID.bucket(final), monetary), expected)


@PROPERTY_SETTINGS
@given(events=st.one_of(event_logs(), NPS_HEAVY_LOGS), groups=st.integers(2, 4), seed=st.integers(0, 2**16))
def test_summed_read_points_of_partial_states_equal_the_metrics_of_one_state(
    events: list[ev.Event], groups: int, seed: int
) -> None:
    """Partial aggregates' read points, serialised and summed in any order, read as the whole (how ``*`` is made)."""
    whole, parts, final = split_engines(events, GRID, groups, by_store)
    k = GRID.bucket(final)
    total = summed_read_points(parts, GRID, k, random.Random(seed))
    monetary = whole.gate.common_currency()[0]
    for window in GRID.windows:
        expected = whole.all_stores.metrics(GRID, window, k, monetary)
        assert not metric_differences(total.metrics(GRID, window, k, monetary), expected)


@PROPERTY_SETTINGS
@given(events=st.one_of(event_logs(), NPS_HEAVY_LOGS), grid=GRIDS)
def test_contributions_clipped_at_the_events_bucket_change_exactly_as_the_whole_ones(
    events: list[ev.Event], grid: Grid
) -> None:
    """Per event, the difference of contributions clipped at its bucket equals that of the unclipped ones."""
    customers: dict[tuple[str, str], CustomerFacts] = {}
    for event in events:
        families = families_of(event.type, event.survey)
        if not families:
            continue
        facts = customers.setdefault(customer_key(event), CustomerFacts())
        if facts.is_duplicate(event.event_id):
            continue
        facts.remember(event.event_id, 0)
        bucket = grid.bucket(event.occurred_at_ms)
        whole_before = facts.contributions(grid, families)
        clipped_before = facts.contributions(grid, families, since=bucket)
        facts.apply(event, grid, horizon_start=0)
        whole = diff(facts.contributions(grid, families), whole_before)
        clipped = diff(facts.contributions(grid, families, since=bucket), clipped_before)
        assert clipped == whole, event


#: operations on one series, over buckets that span several storage blocks and their edges
SERIES_OPERATIONS = st.one_of(
    # spread over many blocks: blocks stay sparse (dicts)
    st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(-3000, 5000), st.integers(-10**20, 10**20)),
            st.tuples(st.just("read"), st.integers(-3000, 5000), st.just(0)),
            st.tuples(st.just("fold"), st.integers(-3000, 5000), st.just(0)),
        ),
        max_size=60,
    ),
    # crowded into two blocks: they fill past the sparse limit and become int64 arrays, or lists past int64
    st.lists(
        st.one_of(
            st.tuples(
                st.just("add"), st.integers(1000, 1100), st.integers(-(10**6), 10**6) | st.integers(-(10**20), 10**20)
            ),
            st.tuples(st.just("read"), st.integers(990, 1110), st.just(0)),
            st.tuples(st.just("fold"), st.integers(990, 1030), st.just(0)),
        ),
        min_size=150,
        max_size=300,
    ),
)


@PROPERTY_SETTINGS
@given(SERIES_OPERATIONS)
def test_prefix_series_equals_plain_sums_through_adds_folds_and_reads(operations: list[tuple[str, int, int]]) -> None:
    """Any mix of adds (any size, any bucket), folds and reads gives the plain prefix sum at every readable bucket."""
    series = PrefixSeries()
    deltas: list[tuple[int, int]] = []
    floor: int | None = None
    for operation, bucket, delta in operations:
        if operation == "add":
            series.add(bucket, delta)
            deltas.append((bucket, delta))
        elif operation == "fold":
            series.fold_before(bucket)
            floor = bucket if floor is None else max(floor, bucket)
        elif floor is None or bucket >= floor - 1:
            assert series.prefix(bucket) == sum(d for b, d in deltas if b <= bucket)
        else:
            with pytest.raises(ValueError, match="folded floor"):
                series.prefix(bucket)
    # the kept deltas (a small series' pairs or its blocks) are the net deltas at or above the floor, and the
    # next delta after a bucket is never past the first net change (a block may keep a bucket that summed to 0)
    net: dict[int, int] = {}
    for bucket, delta in deltas:
        if floor is None or bucket >= floor:
            net[bucket] = net.get(bucket, 0) + delta
    changes = sorted(bucket for bucket, total in net.items() if total)
    assert list(series.items()) == [(bucket, net[bucket]) for bucket in changes]
    for after in (-3001, *changes[:3], *(bucket - 1 for bucket in changes[:3])):
        upcoming = [bucket for bucket in changes if bucket > after]
        found = series.next_delta(after)
        if found is None:
            assert not upcoming
        else:
            assert found > after and (not upcoming or found <= upcoming[0])
    # add_all and the aggregation's inline copy of add (add_groups) agree with add, also after a fold
    half = len(deltas) // 2
    aggregate = StoreAggregate()
    aggregate.add_all([("s", b, d) for b, d in deltas[:half]])
    aggregate.fold_before(-100)
    groups = [["s", [item for b, d in part for item in (b, d)]] for part in (deltas[:half], deltas[half:])]
    aggregate.add_groups([item for group in groups for item in group])
    applied = deltas[:half] + deltas
    folded = aggregate.series.get("s", PrefixSeries())
    for bucket in (-101, 0, 1023, 1024, 5000):
        assert folded.prefix(bucket) == sum(d for b, d in applied if b <= bucket)
    # a checkpoint (to_bytes) restores the same sums, and adds on the restored series still agree
    restored = StoreAggregate.from_bytes(aggregate.to_bytes())
    again = restored.series.get("s", PrefixSeries())
    assert (again.base, again.floor) == (folded.base, folded.floor)
    restored.add_groups(groups[0])
    aggregate.add_groups(groups[0])
    for bucket in (-101, 0, 1023, 1024, 5000):
        assert restored.series.get("s", PrefixSeries()).prefix(bucket) == aggregate.series.get(
            "s", PrefixSeries()).prefix(bucket)
    # the blocks that small series share stay empty: no path wrote into them
    assert metrics_store._NO_BLOCKS == {} and metrics_store._NO_SUMS == {}


def test_add_groups_refuses_an_odd_group_before_adding_any_of_it() -> None:
    """A series group with a bucket and no delta is an error, and none of that group is added."""
    aggregate = StoreAggregate()
    aggregate.add_groups(["s", [3, 1]])
    with pytest.raises(ValueError, match="odd number"):
        aggregate.add_groups(["s", [4, 2, 5]])
    assert [aggregate.series["s"].prefix(bucket) for bucket in (3, 4, 5)] == [1, 1, 1]
