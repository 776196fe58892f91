"""Golden values of SPEC section 10 and the formulas' edges, through the formulas and the incremental engine."""

from __future__ import annotations

from decimal import Decimal

import pytest

from metrics import events as ev
from metrics import formulas as f
from metrics.engine import WALL_CLOCK, LoyaltyEngine
from metrics.timegrid import DAY_MS, YEAR_MS, Grid

HOUR = 3_600_000


@pytest.mark.parametrize(
    ("promoters", "passives", "detractors", "expected"),
    [
        (90, 70, 40, 25.0),  # SPEC 10: 45% - 20% (the article's 20 is an arithmetic slip)
        (10, 0, 0, 100.0),
        (0, 0, 10, -100.0),
        (0, 10, 0, 0.0),
        (0, 0, 0, None),
    ],
)
def test_nps_table(promoters: int, passives: int, detractors: int, expected: float | None) -> None:
    """NPS from promoter, passive and detractor counts."""
    assert f.nps(promoters, detractors, promoters + passives + detractors) == expected


@pytest.mark.parametrize(
    ("score", "scale", "satisfied"),
    [(5, 5, True), (4, 5, True), (3, 5, False), (1, 5, False), (7, 7, True), (6, 7, True), (5, 7, False),
     (10, 10, True), (9, 10, True), (8, 10, False)],
)
def test_csat_scale_edges(score: int, scale: int, satisfied: bool) -> None:
    """Satisfied means the top two points of the 5-, 7- or 10-point scale."""
    assert f.csat_satisfied(score, scale) is satisfied


@pytest.mark.parametrize(
    ("answers", "points"),
    [((1, 1, 1), 300), ((6, 6, 6), 0), ((1, 6, 3), 160), ((2, 4, 5), 140)],
)
def test_cli_points(answers: tuple[int, int, int], points: int) -> None:
    """CLI answers map 1 -> 100 ... 6 -> 0; a response's points are the mean of three."""
    assert f.cli_points_sum(answers) == points


def test_clv_worked_example() -> None:
    """SPEC 10: 400 orders, 20,000 revenue, 180 customers, 5 years -> aov 50, CLV 555.56."""
    aov = f.ratio(20_000, 400)
    frequency = f.ratio(400, 180)
    assert aov == 50.0 and frequency is not None
    clv = f.clv(aov * frequency, int(YEAR_MS), 5.0)
    assert clv is not None and round(clv, 2) == 555.56


def test_retention_and_churn_without_reactivations() -> None:
    """SPEC 10: retention 22.5% means churn 77.5% when nobody comes back."""
    retention = f.retention_rate(customers_end=95, new_customers=50, customers_start=200)
    assert retention == 22.5
    assert f.percent(200 - (95 - 50), 200) == 77.5


@pytest.mark.parametrize("value", [0, 1, 5])
def test_rates_with_zero_denominator_are_none(value: int) -> None:
    """A rate or ratio over zero is None, never 0 or NaN."""
    assert f.percent(value, 0) is None and f.ratio(value, 0) is None
    assert f.nps_interval(value, 0, 0) == (None, None)


def _engine() -> LoyaltyEngine:
    return LoyaltyEngine(Grid(HOUR, 2 * DAY_MS, (DAY_MS,)), clock=WALL_CLOCK)


def test_engine_churn_77_5_from_retention_22_5() -> None:
    """200 customers active at the window start, 45 of them still active and 50 new: retention 22.5, churn 77.5."""
    engine = _engine()
    start = 10 * DAY_MS
    for index in range(200):
        engine.ingest(ev.Event(f"s{index}", ev.CUSTOMER_SIGNED_UP, start - HOUR, "shop", f"c{index}"))
    for index in range(200):
        if index >= 45:
            engine.ingest(ev.Event(f"x{index}", ev.CUSTOMER_CLOSED, start + HOUR, "shop", f"c{index}"))
    for index in range(50):
        engine.ingest(ev.Event(f"n{index}", ev.CUSTOMER_SIGNED_UP, start + 2 * HOUR, "shop", f"new{index}"))
    engine.advance(start + DAY_MS - HOUR)
    metrics = engine.snapshot("shop", DAY_MS)
    assert (metrics["customers_start"], metrics["customers_end"], metrics["new_customers"]) == (200, 95, 50)
    assert metrics["retention_rate"] == 22.5 and metrics["churn_rate"] == 77.5
    assert metrics["reactivated_customers"] == 0


def test_engine_one_order_has_lifespan_zero_and_no_surveys_are_none() -> None:
    """A single order gives lifespan 0 (so CLV 0); no survey responses give None for every survey metric."""
    engine = _engine()
    engine.ingest(ev.Event("o1", ev.ORDER_PLACED, DAY_MS, "shop", "c1", "o1", 12_500_000, "EUR"))
    engine.advance(DAY_MS + HOUR)
    metrics = engine.snapshot("shop", DAY_MS)
    assert metrics["avg_lifespan_years"] == 0.0 and metrics["clv"] == 0.0
    assert metrics["gross_revenue"] == Decimal("12.5") and metrics["aov"] == 12.5
    for name in ("nps", "nps_ci_low", "nps_ci_high", "csat", "ces", "cli", "cli_raw"):
        assert metrics[name] is None, name


def test_engine_close_at_the_same_instant_does_not_end_activity() -> None:
    """A close at the same instant as an activity leaves the customer active; a later one ends it."""
    engine = _engine()
    engine.ingest(ev.Event("a", ev.CUSTOMER_SIGNED_UP, DAY_MS, "shop", "same"))
    engine.ingest(ev.Event("b", ev.CUSTOMER_CLOSED, DAY_MS, "shop", "same"))
    engine.ingest(ev.Event("c", ev.CUSTOMER_SIGNED_UP, DAY_MS, "shop", "later"))
    engine.ingest(ev.Event("d", ev.CUSTOMER_CLOSED, DAY_MS + 1, "shop", "later"))
    engine.advance(DAY_MS + HOUR)
    assert engine.snapshot("shop", DAY_MS)["customers_end"] == 1
