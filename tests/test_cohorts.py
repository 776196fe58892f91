"""Cohort retention (customers by month of first activity): hand-counted matrix and properties against the reference."""

from __future__ import annotations

import random

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metrics import customer
from metrics import events as ev
from metrics.catalog import ALL_STORES
from metrics.compare import cohort_differences
from metrics.customer import CustomerFacts, diff, families_of
from metrics.engine import WALL_CLOCK, LoyaltyEngine, customer_key
from metrics.reference import ReferenceConfig, reference_cohorts
from metrics.timegrid import DAY_MS, Grid, month_start_ms
from test_metrics_properties import (
    by_store,
    check_as_of_ticks,
    check_event_clock,
    merged_in_any_grouping,
    split_engines,
    summed_read_points,
)

HOUR = 3_600_000
#: month numbers counted from January 1970
JAN_2026 = (2026 - 1970) * 12
HAND_GRID = Grid(HOUR, 30 * DAY_MS, (7 * DAY_MS,), dedupe_ttl_ms=10**15)
#: day buckets, a two-month horizon: statuses change at month ends often
DAY_GRID = Grid(DAY_MS, 60 * DAY_MS, (7 * DAY_MS, 30 * DAY_MS), dedupe_ttl_ms=10**15)
#: five-hour buckets: a bucket that holds a month's end starts in the month before (its month)
STRADDLING_GRID = Grid(5 * HOUR, 200 * 5 * HOUR, (34 * 5 * HOUR,), dedupe_ttl_ms=10**15)
GRIDS = st.sampled_from((DAY_GRID, STRADDLING_GRID))
PROPERTY_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
#: the first month of the generated logs (January 2025), and how many months they span
FIRST_MONTH = JAN_2026 - 12
SPAN_MONTHS = 17


def _day(month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    return month_start_ms(month) + (day - 1) * DAY_MS + hour * HOUR + minute * 60_000


def _hand_events() -> list[ev.Event]:
    jan, feb, mar, dec = JAN_2026, JAN_2026 + 1, JAN_2026 + 2, JAN_2026 - 1

    def order(event_id: str, time: int, who: str) -> ev.Event:
        return ev.Event(event_id, ev.ORDER_PLACED, time, "s", who, "o" + event_id, 5_000_000, "EUR")

    return [
        # ann: cohort January, active at the end of January and February (an order on Feb 20, horizon 30 days)
        ev.Event("a0", ev.CUSTOMER_SIGNED_UP, _day(jan, 10), "s", "ann"), order("a1", _day(feb, 20), "ann"),
        # bob: signed up in January's last bucket, closed in February
        ev.Event("b0", ev.CUSTOMER_SIGNED_UP, _day(jan, 31, 23, 30), "s", "bob"),
        ev.Event("b1", ev.CUSTOMER_CLOSED, _day(feb, 5), "s", "bob"),
        # cat: an order at March's first instant, the current month
        order("c0", month_start_ms(mar), "cat"),
        # dan: signed up in February, but a late order of December makes him December's
        ev.Event("d0", ev.CUSTOMER_SIGNED_UP, _day(feb, 3), "s", "dan"), order("d1", _day(dec, 20), "dan"),
        # eve only closed: in no cohort
        ev.Event("e0", ev.CUSTOMER_CLOSED, _day(jan, 2), "s", "eve"),
    ]


#: as of March 15, 2026, noon: the cohorts are April 2025 .. March 2026
HAND_T = _day(JAN_2026 + 2, 15, 12)
HAND_ROWS = {
    "2025-12": (1, [1, 0, 1, 0], [1, 0, 0, 0]),
    "2026-01": (2, [2, 1, 1], [0, 1, 0]),
    "2026-03": (1, [1], [1]),
}


def _check_hand_matrix(matrix: dict[str, object]) -> None:
    rows = matrix["cohorts"]
    assert isinstance(rows, list)
    assert [row["cohort"] for row in rows] == [f"2025-{m:02d}" for m in range(4, 13)] + ["2026-01", "2026-02",
                                                                                          "2026-03"]
    for index, row in enumerate(rows):
        known = 12 - index  # periods up to March 2026
        size, active, buyers = HAND_ROWS.get(row["cohort"], (0, [0] * known, [0] * known))
        assert row["customers"] == size, row
        assert row["active_customers"] == active + [None] * (12 - known), row
        assert row["purchasers"] == buyers + [None] * (12 - known), row
        assert row["active_rate"][:known] == [None if not size else 100 * a / size for a in active], row


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cohort_matrix_equals_the_hand_count_in_any_arrival_order(seed: int) -> None:
    """Engine and reference give the hand-counted matrix (late order, close, month-edge buckets), in any order."""
    events = _hand_events()
    random.Random(seed).shuffle(events)
    engine = LoyaltyEngine(HAND_GRID, clock=WALL_CLOCK)
    for event in events:
        engine.ingest(event)
    engine.advance(HAND_T)
    _check_hand_matrix(engine.cohorts("s"))
    _check_hand_matrix(engine.cohorts(ALL_STORES))
    config = ReferenceConfig(bucket_ms=HOUR, horizon_ms=30 * DAY_MS)
    _check_hand_matrix(reference_cohorts(events, store_id="s", as_of_ms=HAND_T, config=config))
    assert customer._NO_MONTHS == {}  # the summaries customers without one share were never filled


def test_month_summaries_survive_the_record_and_follow_the_cohort() -> None:
    """A record round trip keeps the month summaries; a late earlier first activity drops months past its year."""
    grid = DAY_GRID
    facts = CustomerFacts()
    start = month_start_ms(JAN_2026)
    facts.apply(ev.Event("a", ev.CUSTOMER_SIGNED_UP, start + DAY_MS, "s", "c"), grid, 0)
    facts.apply(ev.Event("b", ev.CUSTOMER_CLOSED, start + 40 * DAY_MS, "s", "c"), grid, 0)
    facts.apply(ev.Event("c", ev.ORDER_PLACED, start + 300 * DAY_MS, "s", "c", "o", 1, "EUR"), grid, 0)
    restored = CustomerFacts.from_record(orjson.loads(orjson.dumps(facts.to_record())))
    assert restored.months == facts.months and len(facts.months) == 3
    assert restored.contributions(grid, customer.ACTIVITY_FAMILY) == facts.contributions(grid, customer.ACTIVITY_FAMILY)
    # an activity a year earlier: the cohort moves to January 2025, whose periods end in December 2025
    facts.apply(ev.Event("d", ev.CUSTOMER_SIGNED_UP, month_start_ms(JAN_2026 - 12), "s", "c"), grid, 0)
    assert sorted(facts.months) == [JAN_2026 - 12]


@st.composite
def cohort_logs(draw: st.DrawFn) -> list[ev.Event]:
    """Random activity, closes and orders over 17 months, often at month and bucket edges, in random arrival order."""
    stores = [f"s{i}" for i in range(draw(st.integers(1, 3)))]
    rng = random.Random(draw(st.integers(0, 2**32)))
    kinds = (ev.CUSTOMER_SIGNED_UP, ev.CUSTOMER_SIGNED_UP, ev.ORDER_PLACED, ev.ORDER_PLACED, ev.ORDER_PLACED,
             ev.CUSTOMER_CLOSED, ev.CUSTOMER_CLOSED, ev.ORDER_REFUNDED, ev.LOYALTY_ENROLLED)
    produced: list[ev.Event] = []
    for index in range(draw(st.integers(1, 50))):
        month = FIRST_MONTH + rng.randrange(SPAN_MONTHS)
        start = month_start_ms(month)
        time = rng.choice((start, start - 1, start + 1, start + 5 * HOUR - 1,
                           start + rng.randrange(month_start_ms(month + 1) - start)))
        kind = rng.choice(kinds)
        money = {"order_id": f"o{index}", "amount_micros": 1_000_000, "currency": "EUR"}
        fields = money if kind in (ev.ORDER_PLACED, ev.ORDER_REFUNDED) else {}
        event_id = f"e{rng.randrange(index)}" if index and rng.random() < 0.1 else f"e{index}"
        produced.append(ev.Event(event_id, kind, time, rng.choice(stores), f"c{rng.randrange(5)}",
                                 **fields))  # type: ignore[arg-type]
    arrival = produced + [rng.choice(produced) for _ in range(draw(st.integers(0, 3)))]
    rng.shuffle(arrival)
    return arrival


def _compare(engine: LoyaltyEngine, events: list[ev.Event], as_of_ms: int) -> None:
    grid = engine.grid
    config = ReferenceConfig(bucket_ms=grid.bucket_ms, horizon_ms=grid.horizon_ms)
    for store in {event.store_id for event in events} | {ALL_STORES}:
        expected = reference_cohorts(events, store_id=store, as_of_ms=as_of_ms, config=config)
        differences = cohort_differences(engine.cohorts(store), expected)
        assert not differences, f"{store}: {differences}"


@PROPERTY_SETTINGS
@given(events=cohort_logs(), grid=GRIDS)
def test_cohorts_with_the_event_clock_equal_reference(events: list[ev.Event], grid: Grid) -> None:
    """With the event clock, the matrix of every store and of ``*`` as of the latest event equals the reference."""
    check_event_clock(events, grid, compare=_compare)


@PROPERTY_SETTINGS
@given(events=cohort_logs(), data=st.data(), grid=GRIDS)
def test_cohorts_as_of_any_time_equal_reference(events: list[ev.Event], data: st.DataObject, grid: Grid) -> None:
    """With a wall clock moved between arrivals (late events, month ends crossed), every matrix equals the reference."""
    first, last = month_start_ms(FIRST_MONTH), month_start_ms(FIRST_MONTH + SPAN_MONTHS + 2)
    check_as_of_ticks(events, data, grid, st.integers(first, last), compare=_compare)


@PROPERTY_SETTINGS
@given(events=cohort_logs(), groups=st.integers(2, 4), seed=st.integers(0, 2**16), grid=GRIDS)
def test_cohorts_of_merged_and_of_summed_partial_states_equal_one_state(
    events: list[ev.Event], groups: int, seed: int, grid: Grid
) -> None:
    """Partial states merged in any grouping, or their folded read points summed (``*``), give the whole matrix."""
    whole, parts, final = split_engines(events, grid, groups, by_store)
    k = grid.bucket(final)
    expected = whole.all_stores.cohorts(grid, k)
    rng = random.Random(seed)
    assert not cohort_differences(summed_read_points(parts, grid, k, rng).cohorts(grid, k), expected)
    assert not cohort_differences(merged_in_any_grouping(parts, rng).cohorts(grid, k), expected)


@PROPERTY_SETTINGS
@given(events=cohort_logs(), grid=GRIDS)
def test_cohort_contributions_clipped_at_the_events_bucket_change_exactly_as_the_whole_ones(
    events: list[ev.Event], grid: Grid
) -> None:
    """Per event, the clipped difference of contributions (cohort series included) equals the unclipped one."""
    customers: dict[tuple[str, str], CustomerFacts] = {}
    for event in events:
        families = families_of(event.type, event.survey)
        facts = customers.setdefault(customer_key(event), CustomerFacts())
        if not families or facts.is_duplicate(event.event_id):
            continue
        facts.remember(event.event_id, 0)
        bucket = grid.bucket(event.occurred_at_ms)
        whole_before = facts.contributions(grid, families)
        clipped_before = facts.contributions(grid, families, since=bucket)
        facts.apply(event, grid, horizon_start=grid.bucket(month_start_ms(FIRST_MONTH)) - grid.fact_retention)
        whole = diff(facts.contributions(grid, families), whole_before)
        clipped = diff(facts.contributions(grid, families, since=bucket), clipped_before)
        assert clipped == whole, event
