"""Tests of the batch reference (metrics.reference) with hand-computed values."""

from __future__ import annotations

import itertools
import random
from decimal import Decimal

import pytest

from metrics.catalog import METRIC_KINDS, METRIC_NAMES, MONETARY_METRICS
from metrics.events import (
    CUSTOMER_CLOSED,
    CUSTOMER_SIGNED_UP,
    LOYALTY_ENROLLED,
    LOYALTY_LEFT,
    ORDER_PLACED,
    ORDER_REFUNDED,
    REWARD_ISSUED,
    REWARD_REDEEMED,
    SPEND_RECORDED,
    SURVEY_RESPONDED,
    Event,
)
from metrics.reference import (
    ReferenceConfig,
    accepted_events,
    reference_all,
    reference_currency,
    reference_metrics,
)

HOUR = 3_600_000
DAY = 24 * HOUR
YEAR = 31_557_600_000  # 365.25 days = 8766 hours
T = 100 * DAY  # as_of; bucket K = 2400 with one-hour buckets
CFG = ReferenceConfig(bucket_ms=HOUR, horizon_ms=30 * DAY)
# with a one-day window as of T: W = [T - 23h, T], previous period = [T - 47h, T - 23h)
IN_W = T - HOUR
IN_PREV = T - 30 * HOUR

_ids = itertools.count()


def _id(event_id: str | None) -> str:
    return event_id if event_id is not None else f"e{next(_ids)}"


def _micros(amount: str | int) -> int:
    return int(Decimal(amount) * 1_000_000)


def signup(t: int, customer: str, channel: str | None = None, *, store: str = "s",
           event_id: str | None = None) -> Event:
    return Event(_id(event_id), CUSTOMER_SIGNED_UP, t, store, customer, channel=channel)


def close(t: int, customer: str, *, store: str = "s") -> Event:
    return Event(_id(None), CUSTOMER_CLOSED, t, store, customer)


def order(t: int, customer: str, amount: str | int, *, store: str = "s", currency: str = "EUR",
          event_id: str | None = None) -> Event:
    return Event(_id(event_id), ORDER_PLACED, t, store, customer, order_id="o",
                 amount_micros=_micros(amount), currency=currency)


def refund(t: int, customer: str, amount: str | int, *, store: str = "s",
           currency: str = "EUR") -> Event:
    return Event(_id(None), ORDER_REFUNDED, t, store, customer, order_id="o",
                 amount_micros=_micros(amount), currency=currency)


def spend(t: int, amount: str | int, channel: str | None = None, *, store: str = "s",
          currency: str = "EUR", event_id: str | None = None) -> Event:
    return Event(_id(event_id), SPEND_RECORDED, t, store, amount_micros=_micros(amount),
                 currency=currency, channel=channel)


def survey(t: int, kind: str, score: int | None = None, *, scale: int | None = None,
           answers: tuple[int, int, int] | None = None, store: str = "s",
           event_id: str | None = None) -> Event:
    return Event(_id(event_id), SURVEY_RESPONDED, t, store, "c", survey=kind, score=score,
                 scale=scale, answers=answers)


def loyalty(t: int, type_: str, customer: str, *, event_id: str | None = None) -> Event:
    return Event(_id(event_id), type_, t, "s", customer, reward_id="r")


def metrics(events: list[Event], *, store: str = "s", window: int = DAY, as_of: int = T,
            config: ReferenceConfig = CFG) -> dict[str, object]:
    return reference_metrics(events, store_id=store, window_ms=window, as_of_ms=as_of,
                             config=config)


# --- shape and types ---------------------------------------------------------------


def test_result_has_exactly_the_catalog_keys_in_order() -> None:
    """The result dict has exactly the catalog's metric names."""
    assert tuple(metrics([])) == METRIC_NAMES


def test_empty_input_counts_zero_and_rates_none() -> None:
    """Without events counts are 0, money sums are 0 and every ratio is None."""
    m = metrics([])
    for name, kind in METRIC_KINDS.items():
        if kind == "count":
            assert m[name] == 0 and type(m[name]) is int, name
        elif kind == "money":
            assert m[name] == Decimal(0) and isinstance(m[name], Decimal), name
        elif name.endswith("_by_nps_segment"):
            # every segment is there, empty: no rate, no revenue
            empty = Decimal(0) if name == "net_revenue_by_nps_segment" else None
            assert m[name] == dict.fromkeys(("promoter", "passive", "detractor", "none"), empty), name
        elif kind == "map":
            assert m[name] == {}, name
        else:
            assert m[name] is None, name


def test_value_types() -> None:
    """Money sums are exact Decimals, ratios floats, counts ints."""
    m = metrics([signup(IN_W, "a"), order(IN_W, "a", "0.10"), order(IN_W, "a", "0.20")])
    assert m["gross_revenue"] == Decimal("0.30") and isinstance(m["gross_revenue"], Decimal)
    assert type(m["aov"]) is float and m["aov"] == 0.15
    assert type(m["orders"]) is int and type(m["customers_end"]) is int


# --- surveys -----------------------------------------------------------------------


def _nps_responses(promoters: int, passives: int, detractors: int) -> list[Event]:
    scores = [10, 9] * promoters
    return ([survey(IN_W, "nps", scores[i]) for i in range(promoters)]
            + [survey(IN_W, "nps", 7 + i % 2) for i in range(passives)]
            + [survey(IN_W, "nps", i % 7) for i in range(detractors)])


@pytest.mark.parametrize(
    ("promoters", "passives", "detractors", "nps", "ci_low", "ci_high"),
    [
        # SPEC 10 golden: 45% - 20% = 25; n'=203, p'=90.75/203, d'=40.75/203
        (90, 70, 40, 25.0, 14.0898203384, 35.1712634054),
        # n'=4, p'=0.4375, d'=0.1875: 100*(0.25 -/+ 1.96*0.375)
        (1, 0, 0, 100.0, -48.5, 98.5),
        # upper bound 101.08 clamped to 100
        (100, 0, 0, 100.0, 93.0900746415, 100.0),
        (0, 0, 100, -100.0, -100.0, -93.0900746415),
        # n'=7, p'=d'=0.75/7: 0 -/+ 1.96*sqrt(1.5/49)
        (0, 4, 0, 0.0, -34.2928564, 34.2928564),
    ],
)
def test_nps_and_interval(promoters: int, passives: int, detractors: int, nps: float,
                          ci_low: float, ci_high: float) -> None:
    """NPS, its counts and the clamped adjusted-Wald interval."""
    m = metrics(_nps_responses(promoters, passives, detractors))
    assert m["nps"] == pytest.approx(nps)
    assert (m["nps_responses"], m["nps_promoters"], m["nps_passives"], m["nps_detractors"]) == (
        promoters + passives + detractors, promoters, passives, detractors)
    assert m["nps_ci_low"] == pytest.approx(ci_low)
    assert m["nps_ci_high"] == pytest.approx(ci_high)


def test_no_responses_gives_none() -> None:
    """With no survey response in W every survey score and the NPS interval are None."""
    m = metrics([survey(T - 2 * DAY, "nps", 10), survey(T - 2 * DAY, "csat", 5)])
    for name in ("nps", "nps_ci_low", "nps_ci_high", "csat", "ces", "cli", "cli_raw"):
        assert m[name] is None, name
    for name in ("nps_responses", "csat_responses", "ces_responses", "cli_responses"):
        assert m[name] == 0, name


@pytest.mark.parametrize(
    ("score", "scale", "csat"),
    [(3, 5, 0.0), (4, 5, 100.0), (5, 5, 100.0), (5, 7, 0.0), (6, 7, 100.0),
     (8, 10, 0.0), (9, 10, 100.0), (4, None, 100.0)],
)
def test_csat_scale_edges(score: int, scale: int | None, csat: float) -> None:
    """Satisfied is 4-5 of 5, 6-7 of 7, 9-10 of 10 (scale 5 by default)."""
    m = metrics([survey(IN_W, "csat", score, scale=scale)])
    assert m["csat"] == csat and m["csat_responses"] == 1


def test_csat_mixed() -> None:
    """Three satisfied of four responses is 75."""
    events = [survey(IN_W, "csat", 5), survey(IN_W, "csat", 1), survey(IN_W, "csat", 7, scale=7),
              survey(IN_W, "csat", 10, scale=10)]
    assert metrics(events)["csat"] == 75.0


def test_ces_and_cli() -> None:
    """CES is the mean score; CLI the mean of per-response mapped means; cli_raw the mean answer."""
    events = [survey(IN_W, "ces", 1), survey(IN_W, "ces", 2), survey(IN_W, "ces", 6),
              survey(IN_W, "cli", answers=(1, 1, 1)),   # 100 points
              survey(IN_W, "cli", answers=(6, 6, 6)),   # 0 points
              survey(IN_W, "cli", answers=(1, 2, 3))]   # (100+80+60)/3 = 80 points
    m = metrics(events)
    assert (m["ces"], m["ces_responses"]) == (3.0, 3)
    assert m["cli"] == pytest.approx(60.0)   # (100 + 0 + 80) / 3
    assert m["cli_raw"] == pytest.approx(3.0)  # (3 + 18 + 6) / 9
    assert m["cli_responses"] == 3


# --- customers ---------------------------------------------------------------------


def test_retention_golden() -> None:
    """SPEC 10: retention 22.5% and churn 77.5% without reactivations."""
    config = ReferenceConfig(bucket_ms=HOUR, horizon_ms=7 * DAY)
    events = [signup(T - 8 * DAY, f"old{i}") for i in range(40)]      # active at K-n
    events += [order(T - DAY, f"old{i}", 10) for i in range(9)]       # 9 of them stay
    events += [signup(T - DAY, f"new{i}") for i in range(5)]          # 5 new in W
    m = metrics(events, window=7 * DAY, config=config)
    assert (m["customers_start"], m["customers_end"], m["new_customers"]) == (40, 14, 5)
    assert m["retention_rate"] == 22.5  # 100 * (14 - 5) / 40
    assert (m["churned_customers"], m["churn_rate"]) == (31, 77.5)
    assert m["reactivated_customers"] == 0


def test_reactivated_customer() -> None:
    """A customer lapsed at K-n, not new, active at K is reactivated."""
    config = ReferenceConfig(bucket_ms=HOUR, horizon_ms=DAY)
    m = metrics([signup(T - 10 * DAY, "a"), order(IN_W, "a", 5)], config=config)
    assert (m["customers_start"], m["customers_end"], m["new_customers"]) == (0, 1, 0)
    assert m["reactivated_customers"] == 1
    assert m["retention_rate"] is None and m["churn_rate"] is None


@pytest.mark.parametrize(
    ("offsets", "active"),
    [
        ([("signup", 0), ("close", 0)], 1),              # close at the same instant: still active
        ([("signup", 0), ("close", 1)], 0),              # close 1 ms later ends it
        ([("close", -1), ("signup", 0)], 1),             # close before the activity
        ([("signup", 0), ("close", 1), ("order", 2)], 1),  # later activity revives
        ([("order", 0), ("close", 0), ("signup", -5)], 1),  # same instant as the last activity
        ([("signup", 0), ("close", HOUR + 1)], 1),        # close after T is ignored
    ],
)
def test_closed_customer(offsets: list[tuple[str, int]], active: int) -> None:
    """customer.closed ends activity only when strictly later than the last activity."""
    base = T - HOUR  # close at base + HOUR + 1 is after T
    events = []
    for kind, offset in offsets:
        if kind == "signup":
            events.append(signup(base + offset, "a"))
        elif kind == "order":
            events.append(order(base + offset, "a", 1))
        else:
            events.append(close(base + offset, "a"))
    assert metrics(events)["customers_end"] == active


@pytest.mark.parametrize(
    ("activity_ms", "active"),
    [
        (T - 1, 1),                 # bucket K
        (T - HOUR, 1),              # first instant of bucket K-1 = K-h+1
        (T - HOUR - 1, 0),          # last instant of bucket K-2: expired
        (T - 2 * HOUR, 0),
    ],
)
def test_horizon_expiry_at_bucket_boundary(activity_ms: int, active: int) -> None:
    """With h = 2 buckets, activity in bucket K-1 keeps a customer active at K, K-2 does not."""
    config = ReferenceConfig(bucket_ms=HOUR, horizon_ms=2 * HOUR)
    as_of = T + 30 * 60_000  # inside bucket K = T // HOUR
    m = metrics([signup(activity_ms, "a")], window=HOUR, as_of=as_of, config=config)
    assert m["customers_end"] == active


def test_new_customer_is_first_activity_in_w() -> None:
    """Only a customer whose earliest activity is in W is new."""
    events = [order(IN_W, "a", 1), signup(T - 2 * DAY, "b"), order(IN_W, "b", 1),
              signup(T - 23 * HOUR, "c"), signup(T - 23 * HOUR - 1, "d")]
    assert metrics(events)["new_customers"] == 2  # a, c (d is in bucket K-n)


def test_star_counts_customers_per_store() -> None:
    """The same customer_id in two stores is two customers for "*"."""
    events = [signup(IN_W, "x", store="a"), signup(IN_W, "x", store="b"), signup(IN_W, "y", store="b")]
    assert metrics(events, store="*")["new_customers"] == 3
    assert metrics(events, store="b")["customers_end"] == 2


# --- orders and value --------------------------------------------------------------


def test_clv_golden() -> None:
    """SPEC 10: 400 orders, revenue 20,000, 180 customers, 5-year lifespans -> CLV 555.56."""
    config = ReferenceConfig(bucket_ms=HOUR, horizon_ms=10 * YEAR)
    as_of = 20 * YEAR
    last = as_of - DAY  # in W (one 365.25-day window: annualisation factor 1)
    events: list[Event] = []
    for i in range(180):
        customer = f"c{i}"
        events.append(order(last - 5 * YEAR, customer, 999))  # first order, before W
        events += [order(last, customer, 50) for _ in range(3 if i < 40 else 2)]  # 40*3 + 140*2
    m = metrics(events, window=YEAR, as_of=as_of, config=config)
    assert (m["orders"], m["gross_revenue"], m["purchasers"]) == (400, Decimal(20_000), 180)
    assert m["aov"] == 50.0
    assert m["purchase_frequency"] == pytest.approx(400 / 180)
    assert m["customer_value"] == pytest.approx(20_000 / 180)
    assert m["avg_lifespan_years"] == pytest.approx(5.0)
    assert m["clv"] == pytest.approx(555.56, abs=0.005)
    assert (m["returning_customers"], m["one_time_customers"], m["repeat_purchase_rate"]) == (180, 0, 100.0)


def test_one_order_lifespan_zero() -> None:
    """A single order gives lifespan 0, CLV 0 and a one-time customer."""
    m = metrics([order(IN_W, "a", "12.5")])
    assert m["avg_lifespan_years"] == 0.0 and m["clv"] == 0.0
    assert (m["purchasers"], m["returning_customers"], m["one_time_customers"]) == (1, 0, 1)
    assert m["repeat_purchase_rate"] == 0.0
    assert m["aov"] == 12.5 and m["customer_value"] == 12.5


def test_lifetime_orders_reach_before_every_window() -> None:
    """A purchase a year before W makes the purchaser returning with a one-year lifespan."""
    events = [order(IN_W - YEAR, "a", 3), order(IN_W, "a", 10)]
    m = metrics(events)
    assert (m["orders"], m["returning_customers"]) == (1, 1)
    assert m["avg_lifespan_years"] == pytest.approx(1.0)
    assert m["clv"] == pytest.approx(10 * 365.25 * 1.0)  # value 10, 365.25 one-day windows a year


def test_refunds() -> None:
    """Refunds in W are subtracted from gross revenue; AOV uses gross."""
    events = [order(IN_W, "a", 100), order(IN_W, "b", "20.50"), refund(IN_W, "a", 30),
              refund(T - 2 * DAY, "b", 7)]
    m = metrics(events)
    assert m["gross_revenue"] == Decimal("120.50")
    assert m["refunds"] == Decimal(30)
    assert m["net_revenue"] == Decimal("90.50")
    assert m["aov"] == 60.25


def test_revenue_churn_and_net_revenue_retention() -> None:
    """Tiny hand-computed revenue churn and NRR over the previous period."""
    events = [
        order(IN_PREV, "a", 100), refund(IN_PREV, "a", 20), order(IN_W, "a", 40),
        order(IN_PREV, "b", 50), order(T - 48 * HOUR, "b", 1000),  # bucket K-48: before prev
        order(IN_PREV, "c", 70), refund(IN_W, "c", 10),
        order(IN_W, "d", 70),
    ]
    m = metrics(events)
    assert m["revenue_prev_period"] == Decimal(200)   # (100-20) + 50 + 70
    assert m["churned_revenue"] == Decimal(120)       # b 50 + c 70: no order in W
    assert m["revenue_churn_rate"] == 60.0
    assert m["net_revenue_retention"] == 15.0         # 100 * (a 40 + b 0 + c -10) / 200
    assert (m["gross_revenue"], m["refunds"], m["net_revenue"]) == (Decimal(110), Decimal(10), Decimal(100))
    assert (m["purchasers"], m["returning_customers"], m["one_time_customers"]) == (2, 1, 1)


def test_revenue_churn_none_without_previous_revenue() -> None:
    """No net revenue in the previous period makes both revenue rates None."""
    m = metrics([order(IN_PREV, "a", 10), refund(IN_PREV, "a", 10), order(IN_W, "a", 5)])
    assert m["revenue_prev_period"] == Decimal(0)
    assert m["revenue_churn_rate"] is None and m["net_revenue_retention"] is None


# --- acceptance: duplicates, currency, time ----------------------------------------


def test_duplicate_counted_once() -> None:
    """A repeated event_id counts once; the first arrival wins."""
    events = [order(IN_W, "a", 10, event_id="dup"), order(IN_W, "a", 99, event_id="dup"),
              survey(IN_W, "nps", 10, event_id="s1"), survey(IN_W, "nps", 10, event_id="s1")]
    m = metrics(events)
    assert (m["orders"], m["gross_revenue"], m["nps_responses"]) == (1, Decimal(10), 1)
    assert m["returning_customers"] == 0


def test_duplicate_scope_is_store_and_customer() -> None:
    """An id repeats only within one (store, customer), or one store for spend."""
    events = [order(IN_W, "a", 10, event_id="x"), order(IN_W, "b", 20, event_id="x"),
              order(IN_W, "a", 30, event_id="x", store="other", currency="EUR"),
              order(IN_W, "a", 40, event_id="x"),
              spend(IN_W, 5, event_id="x"), spend(IN_W, 6, event_id="x")]
    kept = accepted_events(events)
    assert [e.amount_micros for e in kept] == [10_000_000, 20_000_000, 30_000_000, 5_000_000]
    m = metrics(events)
    assert (m["orders"], m["gross_revenue"], m["marketing_spend"]) == (2, Decimal(30), Decimal(5))


def test_currency_mismatch_rejected() -> None:
    """A money event in another currency than the store's first is dropped, id not remembered."""
    events = [
        order(IN_W, "a", 10, currency="EUR"),
        order(IN_W, "a", 99, currency="USD", event_id="x"),
        spend(IN_W, 500, currency="USD"),
        order(IN_W, "b", 5, currency="EUR", event_id="x"),  # same id as the rejected one
        order(IN_W, "c", 7, currency="USD", store="other"),  # other store: its own currency
    ]
    kept = accepted_events(events)
    assert [e.amount_micros for e in kept] == [10_000_000, 5_000_000, 7_000_000]
    m = metrics(events)
    assert (m["orders"], m["gross_revenue"], m["marketing_spend"]) == (2, Decimal(15), Decimal(0))
    assert reference_currency(events, "s") == "EUR"
    assert reference_currency(events, "other") == "USD"


@pytest.mark.parametrize(
    ("currencies", "star"),
    [(("EUR", "EUR"), "EUR"), (("EUR", "USD"), None), (("EUR", None), "EUR"), ((None, None), None)],
)
def test_star_currency_and_masking(currencies: tuple[str | None, str | None], star: str | None) -> None:
    """Monetary metrics of "*" are None exactly when the stores' currencies differ."""
    events = [signup(IN_W, "x", store="a"), signup(IN_W, "x", store="b")]
    for store, currency in zip(("a", "b"), currencies, strict=True):
        if currency is not None:
            events.append(order(IN_W, "x", 10, store=store, currency=currency))
    assert reference_currency(events, "*") == star
    m = metrics(events, store="*")
    orders = sum(c is not None for c in currencies)
    assert m["orders"] == orders and m["new_customers"] == 2
    mixed = set(currencies) == {"EUR", "USD"}
    if mixed:
        assert all(m[name] is None for name in MONETARY_METRICS)
    else:
        assert m["gross_revenue"] == Decimal(10 * orders)
        assert m["cac"] == 0.0 and m["cac_by_channel"] == {}
    assert metrics(events, store="a")["gross_revenue"] == Decimal(10 if currencies[0] else 0)


def test_events_after_as_of_ignored() -> None:
    """Events later than T count for nothing; an event exactly at T counts."""
    events = [order(T + 1, "a", 10), survey(T + 1, "nps", 10), signup(T + 1, "b"),
              spend(T + 1, 5), order(T, "c", 3)]
    m = metrics(events)
    assert (m["orders"], m["gross_revenue"], m["nps_responses"]) == (1, Decimal(3), 0)
    assert (m["new_customers"], m["customers_end"], m["marketing_spend"]) == (1, 1, Decimal(0))
    later = [order(T + 1, "a", 10, store="late"), signup(T, "b", store="s")]
    result = reference_all(later, windows_ms=[HOUR, DAY], as_of_ms=T, config=CFG)
    assert set(result) == {("s", HOUR), ("s", DAY), ("*", HOUR), ("*", DAY)}


# --- acquisition -------------------------------------------------------------------


def test_cac_by_channel() -> None:
    """CAC overall and per channel of the earliest signup (ties by event_id)."""
    events = [
        spend(IN_W, 300, "ads"), spend(IN_W, 100, "email"), spend(IN_W, 50),
        spend(IN_PREV, 999, "ads"),                       # previous period: not counted
        signup(IN_W, "n1", "ads"), signup(IN_W, "n2", "ads"), signup(IN_W, "n3", "social"),
        order(IN_W, "n4", 1),                             # new, no channel
        signup(IN_W, "n5", "email", event_id="sig-b"),
        signup(IN_W, "n5", "ads", event_id="sig-a"),      # same instant, smaller id wins
        signup(IN_W - HOUR, "n6", "social"), signup(IN_W, "n6", "ads"),  # earliest wins
        order(T - 10 * DAY, "old", 1), signup(IN_W, "old", "email"),     # not new
    ]
    m = metrics(events)
    assert m["marketing_spend"] == Decimal(450)
    assert m["new_customers"] == 6
    assert m["cac"] == 75.0  # 450 / 6
    assert m["cac_by_channel"] == {"ads": 100.0, "email": None, "social": 0.0}  # 300/3, 100/0, 0/2


def test_cac_without_channels_or_new_customers() -> None:
    """No channel anywhere gives an empty map; no new customer gives cac None."""
    m = metrics([spend(IN_W, 40), order(T - 10 * DAY, "a", 1)])
    assert m["cac_by_channel"] == {} and m["cac"] is None
    assert m["marketing_spend"] == Decimal(40)


# --- loyalty programme -------------------------------------------------------------


@pytest.mark.parametrize(
    ("history", "member"),
    [
        ([(LOYALTY_ENROLLED, 0, None)], 1),
        ([(LOYALTY_ENROLLED, 0, None), (LOYALTY_LEFT, 1, None)], 0),
        ([(LOYALTY_ENROLLED, 0, None), (LOYALTY_LEFT, 1, None), (LOYALTY_ENROLLED, 2, None)], 1),
        ([(LOYALTY_LEFT, 2, None), (LOYALTY_ENROLLED, 0, None)], 0),        # arrival order irrelevant
        ([(LOYALTY_ENROLLED, 0, "m-b"), (LOYALTY_LEFT, 0, "m-a")], 1),      # tie: larger id is later
        ([(LOYALTY_ENROLLED, 0, "m-a"), (LOYALTY_LEFT, 0, "m-b")], 0),
        ([(LOYALTY_ENROLLED, 0, None), (LOYALTY_LEFT, 2 * HOUR, None)], 1),  # leave after T ignored
        ([(LOYALTY_ENROLLED, -400 * DAY, None)], 1),                          # older than every window
    ],
)
def test_membership(history: list[tuple[str, int, str | None]], member: int) -> None:
    """Membership is decided by the latest enrolled/left event up to T."""
    events = [signup(IN_W, "a")]
    events += [loyalty(IN_W + offset, kind, "a", event_id=eid) for kind, offset, eid in history]
    m = metrics(events)
    assert m["loyalty_members"] == member
    assert m["participation_rate"] == 100.0 * member


def test_loyalty_rewards_and_participation() -> None:
    """Members among active customers, rewards in W, and active members."""
    config = ReferenceConfig(bucket_ms=HOUR, horizon_ms=7 * DAY)
    events = [
        signup(IN_W, "x"), loyalty(IN_W, LOYALTY_ENROLLED, "x"),
        loyalty(IN_W, REWARD_ISSUED, "x"), loyalty(IN_W, REWARD_REDEEMED, "x"),
        signup(IN_W, "y"), loyalty(IN_W, LOYALTY_ENROLLED, "y"),
        loyalty(IN_PREV, REWARD_ISSUED, "y"),                     # before W
        signup(IN_W, "z"), loyalty(IN_W, REWARD_ISSUED, "z"),     # not a member
        signup(T - 30 * DAY, "w"), loyalty(IN_W, LOYALTY_ENROLLED, "w"),  # member, inactive
        loyalty(IN_W, REWARD_REDEEMED, "w"),
    ]
    m = metrics(events, config=config)
    assert (m["customers_end"], m["loyalty_members"]) == (3, 2)
    assert m["participation_rate"] == pytest.approx(200 / 3)
    assert (m["rewards_issued"], m["rewards_redeemed"]) == (2, 2)
    assert m["redemption_rate"] == 100.0
    assert (m["active_members"], m["active_participation_rate"]) == (1, 50.0)


# --- whole-run consistency ---------------------------------------------------------


def _random_events(count: int, seed: int) -> list[Event]:
    rng = random.Random(seed)
    events: list[Event] = []
    for _ in range(count):
        store = rng.choice(["s1", "s2", "s3", "s4"])
        customer = f"c{rng.randrange(300)}"
        t = T - rng.randrange(40 * DAY) + rng.randrange(2) * HOUR
        kind = rng.randrange(9)
        eid = f"r{rng.randrange(count)}"  # some duplicates
        currency = "EUR" if store != "s4" or rng.random() < 0.9 else "USD"
        if kind == 0:
            events.append(signup(t, customer, rng.choice([None, "ads", "mail"]), store=store, event_id=eid))
        elif kind in (1, 2):
            events.append(order(t, customer, rng.randrange(1, 90), store=store, currency=currency, event_id=eid))
        elif kind == 3:
            events.append(Event(eid, ORDER_REFUNDED, t, store, customer, amount_micros=1_000_000, currency=currency))
        elif kind == 4:
            events.append(Event(eid, CUSTOMER_CLOSED, t, store, customer))
        elif kind == 5:
            events.append(Event(eid, SURVEY_RESPONDED, t, store, customer, survey="nps", score=rng.randrange(11)))
        elif kind == 6:
            events.append(Event(eid, SPEND_RECORDED, t, store, amount_micros=2_500_000, currency=currency,
                                channel=rng.choice([None, "ads"])))
        elif kind == 7:
            events.append(Event(eid, rng.choice([LOYALTY_ENROLLED, LOYALTY_LEFT]), t, store, customer))
        else:
            events.append(Event(eid, rng.choice([REWARD_ISSUED, REWARD_REDEEMED]), t, store, customer))
    return events


def test_reference_all_matches_reference_metrics() -> None:
    """reference_all equals reference_metrics for every store and window."""
    events = _random_events(3000, seed=7)
    windows = [HOUR, DAY, 7 * DAY]
    result = reference_all(events, windows_ms=windows, as_of_ms=T, config=CFG)
    assert set(result) == {(s, w) for s in ("s1", "s2", "s3", "s4", "*") for w in windows}
    for (store, window), values in result.items():
        assert values == metrics(events, store=store, window=window), (store, window)
    star = result[("*", 7 * DAY)]
    per_store = [result[(s, 7 * DAY)]["orders"] for s in ("s1", "s2", "s3", "s4")]
    assert all(isinstance(n, int) for n in per_store)
    assert star["orders"] == sum(n for n in per_store if isinstance(n, int))
    mixed = reference_currency(events, "s4") == "USD"
    assert (star["gross_revenue"] is None) == mixed
