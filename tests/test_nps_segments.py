"""Churn, repeat purchase and net revenue by NPS segment (a customer's latest answer): hand-counted cases."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest

from metrics import customer
from metrics import events as ev
from metrics.engine import WALL_CLOCK, LoyaltyEngine
from metrics.reference import ReferenceConfig, reference_metrics
from metrics.timegrid import Grid

MINUTE = 60_000
GRID = Grid(MINUTE, 10 * MINUTE, (5 * MINUTE,), dedupe_ttl_ms=10**12)
#: as of the middle of bucket 12: the window is buckets 8..12, its start bucket 7
T = 12 * MINUTE + 30_000


def _events() -> list[ev.Event]:
    def at(bucket: int) -> int:
        return bucket * MINUTE

    def nps(event_id: str, bucket: int, customer: str, score: int, offset: int = 0) -> ev.Event:
        return ev.Event(event_id, ev.SURVEY_RESPONDED, at(bucket) + offset, "s", customer, survey="nps", score=score)

    def order(event_id: str, bucket: int, customer: str, units: int, kind: str = ev.ORDER_PLACED) -> ev.Event:
        return ev.Event(event_id, kind, at(bucket), "s", customer, order_id="o" + event_id,
                        amount_micros=units * 1_000_000, currency="EUR")

    return [
        # ann, a promoter, last active at 0: gone by 12 (horizon 10 buckets)
        ev.Event("a0", ev.CUSTOMER_SIGNED_UP, at(0), "s", "ann"), nps("a1", 1, "ann", 10),
        # bob was a detractor, answers 9 later: a promoter who ordered in W (once in his life)
        ev.Event("b0", ev.CUSTOMER_SIGNED_UP, at(0), "s", "bob"), nps("b1", 2, "bob", 3),
        order("b2", 8, "bob", 10), nps("b3", 11, "bob", 9),
        # cat, a detractor, closed at 9
        ev.Event("c0", ev.CUSTOMER_SIGNED_UP, at(0), "s", "cat"), nps("c1", 3, "cat", 4),
        ev.Event("c2", ev.CUSTOMER_CLOSED, at(9), "s", "cat"),
        # dan never answered: orders at 6 and 9 (returning), 2 refunded at 10: 3 net in W
        order("d0", 6, "dan", 10), order("d1", 9, "dan", 5), order("d2", 10, "dan", 2, ev.ORDER_REFUNDED),
        # eve answered 8 but never bought or signed up: a passive counted nowhere
        nps("e0", 5, "eve", 8),
        # fay answered 10 and 0 at the same instant: the greater event id (0) decides, a detractor
        ev.Event("f0", ev.CUSTOMER_SIGNED_UP, at(0), "s", "fay"), nps("f1", 4, "fay", 10, 7), nps("f2", 4, "fay", 0, 7),
    ]


EXPECTED = {
    # promoters ann (churned) and bob; detractors cat and fay (both churned); dan (none) stayed
    "churn_rate_by_nps_segment": {"promoter": 50.0, "passive": None, "detractor": 100.0, "none": 0.0},
    # buyers in W: bob (promoter, one lifetime order) and dan (none, two)
    "repeat_purchase_rate_by_nps_segment": {"promoter": 0.0, "passive": None, "detractor": None, "none": 100.0},
    "net_revenue_by_nps_segment": {"promoter": Decimal(10), "passive": Decimal(0), "detractor": Decimal(0),
                                   "none": Decimal(3)},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segment_metrics_equal_the_hand_count_in_any_arrival_order(name: str, seed: int) -> None:
    """The engine and the batch reference both give the hand-counted map, whatever the arrival order."""
    events = _events()
    random.Random(seed).shuffle(events)
    engine = LoyaltyEngine(GRID, clock=WALL_CLOCK)
    for event in events:
        engine.ingest(event)
    engine.advance(T)
    reference = reference_metrics(events, store_id="s", window_ms=5 * MINUTE, as_of_ms=T,
                                  config=ReferenceConfig(bucket_ms=MINUTE, horizon_ms=10 * MINUTE))
    assert reference[name] == EXPECTED[name]
    assert engine.snapshot("s", 5 * MINUTE)[name] == EXPECTED[name]
    assert customer._NO_ANSWERS == []  # the empty list customers without an answer share was never filled


def test_segments_partition_the_store_totals() -> None:
    """Churn and net revenue of the four segments add up to the store's (the ``none`` segment is the rest)."""
    engine = LoyaltyEngine(GRID, clock=WALL_CLOCK)
    for event in _events():
        engine.ingest(event)
    engine.advance(T)
    snapshot = engine.snapshot("s", 5 * MINUTE)
    assert snapshot["net_revenue"] == sum(snapshot["net_revenue_by_nps_segment"].values()) == Decimal(13)
    assert (snapshot["churned_customers"], snapshot["customers_start"]) == (3, 5)
