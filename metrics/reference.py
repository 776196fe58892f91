"""Batch reference of every metric (SPEC sections 3, 4 and 5).

A plain, from-scratch computation of the published metrics from a list of
events. It is the oracle the incremental streaming engine is checked against,
so it favours being obviously faithful to the SPEC over being clever; it
shares no code with the engine.

Decisions taken for the product (where the SPEC leaves room):

* **Acceptance** (:func:`accepted_events`), walking the input in *arrival*
  order:

  1. currency gate: a store's currency is the currency of its first (by
     arrival) money event (``order.placed``, ``order.refunded``,
     ``spend.recorded``); a later money event of that store in another
     currency is rejected (dropped, and its ``event_id`` is not remembered).
     The gate runs before deduplication, so the very first money event of a
     store fixes its currency even if it is then dropped as a duplicate.
  2. channel cap (SPEC 3: a store keeps at most 100 distinct channels, the
     rest counted under ``other``): the distinct ``channel`` values of a
     store's events that passed the currency gate are numbered in arrival
     order, duplicates included (a duplicate is dropped only by step 3);
     the first ``max_channels`` (100) names are kept, an event with a later
     one counts under ``other``. A producer's own ``"other"`` is that same
     bucket and is not numbered.
  3. deduplication: an event whose ``event_id`` was already accepted for
     the same store and customer (the same store, for ``spend.recorded``)
     is dropped; the first arrival wins. The same id for another customer
     or store is another event. Ids are remembered for ever (the reference
     has no ``LOYALTY_DEDUPE_TTL``).

  Of the accepted events, only those with ``occurred_at_ms <= T`` count, for
  every metric ("counted" events below).
* **Time**: ``bucket(t) = t // bucket_ms``; ``K = bucket(T)``,
  ``n = window_ms // bucket_ms``, ``h = horizon_ms // bucket_ms``. "In W" is
  buckets ``K-n+1 .. K``; the "previous period" is buckets ``K-2n+1 .. K-n``.
* **Customers** are ``(store_id, customer_id)``; the scope ``"*"`` is all
  stores together (customer counts add up over stores, all survey responses
  pool, and so on).
* **Activity** is ``customer.signed_up`` or ``order.placed``. A customer is
  active at bucket ``j`` when ``a``, their latest activity time in a bucket
  ``<= j``, exists, ``bucket(a) >= j-h+1``, and no ``customer.closed`` ``c``
  has ``bucket(c) <= j`` and ``c > a`` (a close at the same instant as the
  activity does not end it; a later activity revives the customer).
  A customer is new in the bucket of their earliest activity.
* **Lifetime facts** (order count, first/last order, first activity, first
  signup channel, loyalty membership) use every counted event, even events
  older than every window.
* **Customer value** is computed as gross/purchasers and ``clv`` as the exact
  rational ``customer_value * (year / W) * avg_lifespan_years``, each rounded
  to a float once; a year is 365.25 days.
* **cac_by_channel**: a new customer's channel is the ``channel`` of their
  earliest ``customer.signed_up`` (ties broken by ``event_id``; as the channel
  cap of the acceptance left it), or none. The
  map holds every channel seen on a ``spend.recorded`` in W or on a new
  customer of W, valued ``spend_of_channel / new_customers_of_channel`` (None
  when that count is 0); channel-less spend and customers stay out of the map.
* **Loyalty membership** at T: the latest (by ``(occurred_at_ms, event_id)``)
  ``loyalty.enrolled``/``loyalty.left`` of the customer is an enrolment.
* **NPS segment** of a customer at T: ``promoter`` (score 9-10), ``passive``
  (7-8) or ``detractor`` (0-6) by their latest (by ``(occurred_at_ms,
  event_id)``) NPS answer, else ``none``. Per segment, of the customers in it:
  ``churn_rate`` as above (customers active at the window's start who are not
  active at T), ``repeat_purchase_rate`` as above (purchasers in W with at
  least two lifetime orders), and the net revenue (orders minus refunds) they
  made in W.
* **Cohorts** (:func:`reference_cohorts`): a customer's cohort is the calendar
  month (UTC) holding the first instant of the bucket of their first activity; a
  bucket belongs to the month of its first instant. Of the 12 cohorts up to T's
  month (K's), for each period p = 0..11 with month c+p at most K's: the cohort's
  customers active at the last bucket of month c+p (at K for K's month) and those
  with an ``order.placed`` in a bucket of month c+p (up to T), and their shares of
  the cohort in percent (``None`` when the cohort is empty); later periods are ``None``.
* **Value types**: counts are ``int``; money sums (``gross_revenue``,
  ``refunds``, ``net_revenue``, ``revenue_prev_period``, ``churned_revenue``,
  ``marketing_spend``) are exact ``Decimal`` built from integer micro-units;
  every other ratio is a ``float`` computed from exact integer sums. A ratio
  whose denominator is exactly 0 is ``None``; the NPS interval is ``None``
  without responses.
* **Currency of "*"**: the stores' currencies are those fixed by the gate over
  the whole input (see :func:`reference_currency`); when the stores that have
  one do not all share it, the monetary metrics of ``"*"``
  (``metrics.catalog.MONETARY_METRICS``) are ``None``.
"""

from __future__ import annotations

import dataclasses
import math
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import TypeVar

from metrics.catalog import ALL_STORES, METRIC_NAMES, MONETARY_METRICS
from metrics.events import (
    ACTIVITY_TYPES,
    CUSTOMER_CLOSED,
    CUSTOMER_SIGNED_UP,
    LOYALTY_ENROLLED,
    LOYALTY_LEFT,
    MAX_STORE_CHANNELS,
    MICROS_PER_UNIT,
    MONEY_TYPES,
    ORDER_PLACED,
    ORDER_REFUNDED,
    OTHER_CHANNEL,
    REWARD_ISSUED,
    REWARD_REDEEMED,
    SPEND_RECORDED,
    SURVEY_CES,
    SURVEY_CLI,
    SURVEY_CSAT,
    SURVEY_NPS,
    SURVEY_RESPONDED,
    Event,
)
from metrics.timegrid import DAY_MS, buckets_in

__all__ = [
    "ReferenceConfig",
    "accepted_events",
    "reference_all",
    "reference_cohorts",
    "reference_cohorts_all",
    "reference_currency",
    "reference_metrics",
]

#: a customer is identified by (store_id, customer_id)
CustomerKey = tuple[str, str]

#: a year of 365.25 days, in milliseconds, as an exact integer
YEAR_MS_EXACT = 36_525 * DAY_MS // 100

#: the lowest satisfied CSAT score per scale
CSAT_SATISFIED_FROM = {5: 4, 7: 6, 10: 9}

_V = TypeVar("_V")


@dataclass(frozen=True)
class ReferenceConfig:
    """The time settings the metrics depend on.

    ``bucket_ms`` is ``LOYALTY_BUCKET``; ``horizon_ms`` is
    ``LOYALTY_ACTIVE_HORIZON`` and must be a whole number of buckets
    (h = horizon_ms / bucket_ms).

    >>> ReferenceConfig(bucket_ms=60_000, horizon_ms=90 * 86_400_000)
    ReferenceConfig(bucket_ms=60000, horizon_ms=7776000000)
    >>> ReferenceConfig(bucket_ms=60_000, horizon_ms=90_000)
    Traceback (most recent call last):
    ValueError: 90s is not a multiple of the bucket 1m
    """

    bucket_ms: int
    horizon_ms: int

    def __post_init__(self) -> None:
        if self.bucket_ms <= 0 or self.horizon_ms <= 0:
            raise ValueError("bucket and horizon must be positive")
        buckets_in(self.horizon_ms, self.bucket_ms)


# ---------------------------------------------------------------------------
# acceptance and currency


def accepted_events(events: Sequence[Event], *, max_channels: int = MAX_STORE_CHANNELS) -> list[Event]:
    """The events that count, in arrival order: currency gate, channel cap, then dedupe.

    Walking ``events`` in arrival order: a money event whose currency differs
    from its store's currency (that of the store's first money event) is
    dropped and its id is not remembered; an event whose channel is not among
    the first ``max_channels`` distinct channels of its store (``"other"``
    aside) is kept with the channel ``"other"``; then an event whose
    ``event_id`` was already accepted in its scope (store and customer; store
    for spend) is dropped. Everything else is kept.

    >>> placed = lambda eid, cur: Event(eid, ORDER_PLACED, 0, "s", "c",
    ...                                 amount_micros=1, currency=cur)
    >>> kept = accepted_events([placed("a", "EUR"), placed("b", "USD"),
    ...                         placed("a", "EUR"), placed("b", "EUR")])
    >>> [(e.event_id, e.currency) for e in kept]
    [('a', 'EUR'), ('b', 'EUR')]
    >>> signup = lambda eid, channel: Event(eid, CUSTOMER_SIGNED_UP, 0, "s", eid, channel=channel)
    >>> kept = accepted_events([signup("1", "ads"), signup("2", "other"), signup("3", "tv"),
    ...                         signup("4", "ads")], max_channels=1)
    >>> [e.channel for e in kept]
    ['ads', 'other', 'other', 'ads']
    """
    store_currency: dict[str, str | None] = {}
    store_channels: dict[str, list[str]] = {}
    accepted_ids: set[tuple[str, str | None, str]] = set()
    accepted: list[Event] = []
    for event in events:
        if event.type in MONEY_TYPES:
            currency = store_currency.setdefault(event.store_id, event.currency)
            if event.currency != currency:
                continue  # currency gate: rejected, id not remembered
        if event.channel is not None and event.channel != OTHER_CHANNEL:
            named = store_channels.setdefault(event.store_id, [])
            if event.channel not in named:
                if len(named) < max_channels:
                    named.append(event.channel)  # the store's next channel
                else:
                    event = dataclasses.replace(event, channel=OTHER_CHANNEL)  # no slot left
        # spend belongs to its store: its customer_id, if any, plays no part
        scope = (event.store_id, None if event.type == SPEND_RECORDED else event.customer_id, event.event_id)
        if scope in accepted_ids:
            continue  # duplicate: the first arrival wins
        accepted_ids.add(scope)
        accepted.append(event)
    return accepted


def _store_currencies(events: Sequence[Event]) -> dict[str, str]:
    """store_id -> currency of its first (by arrival) money event."""
    currencies: dict[str, str] = {}
    for event in events:
        if event.type in MONEY_TYPES and event.currency is not None:
            currencies.setdefault(event.store_id, event.currency)
    return currencies


def reference_currency(events: Sequence[Event], store_id: str) -> str | None:
    """The currency of a store, or the common currency of ``"*"``.

    A store's currency is the currency of its first money event by arrival in
    ``events`` (the input, in arrival order); ``None`` when it has none. For
    ``"*"`` it is the one currency all stores with a currency share, else
    ``None`` (no store has one, or they differ).

    >>> def spend(eid, store, cur):
    ...     return Event(eid, SPEND_RECORDED, 0, store, amount_micros=1, currency=cur)
    >>> evs = [spend("1", "a", "EUR"), spend("2", "a", "USD"), spend("3", "b", "USD")]
    >>> reference_currency(evs, "a"), reference_currency(evs, "c"), reference_currency(evs, "*")
    ('EUR', None, None)
    >>> reference_currency(evs[:2], "*")
    'EUR'
    """
    currencies = _store_currencies(events)
    if store_id != ALL_STORES:
        return currencies.get(store_id)
    distinct = set(currencies.values())
    return distinct.pop() if len(distinct) == 1 else None


def _mixed_currencies(events: Sequence[Event]) -> bool:
    """Whether the stores that have a currency use more than one."""
    return len(set(_store_currencies(events).values())) > 1


# ---------------------------------------------------------------------------
# small helpers


def _required(value: _V | None, name: str, event: Event) -> _V:
    """A field validation guarantees for this event type."""
    if value is None:
        raise ValueError(f"event {event.event_id!r} ({event.type}) has no {name}")
    return value


def _customer_key(event: Event) -> CustomerKey:
    return (event.store_id, _required(event.customer_id, "customer_id", event))


def _money(micros: int) -> Decimal:
    """Exact decimal amount of integer micro-units."""
    return Decimal(micros).scaleb(-6)


def _ratio(numerator: int | Fraction, denominator: int | Fraction) -> float | None:
    """``numerator / denominator`` as a float rounded once, ``None`` if the denominator is 0."""
    if denominator == 0:
        return None
    return float(Fraction(numerator) / Fraction(denominator))


def _percent(part: int, whole: int) -> float | None:
    """``100 * part / whole``, ``None`` if ``whole`` is 0."""
    return _ratio(100 * part, whole)


# ---------------------------------------------------------------------------
# per-customer facts and the events of one scope


@dataclass
class _Customer:
    """Lifetime facts of one customer from the counted events (all <= T)."""

    activity_ms: list[int] = field(default_factory=list)
    closed_ms: list[int] = field(default_factory=list)
    placed_ms: list[int] = field(default_factory=list)
    signups: list[tuple[int, str, str | None]] = field(default_factory=list)
    membership: list[tuple[int, str, bool]] = field(default_factory=list)
    #: (occurred_at, event_id, score) of every NPS answer
    nps_answers: list[tuple[int, str, int]] = field(default_factory=list)

    def sort(self) -> None:
        self.activity_ms.sort()
        self.closed_ms.sort()
        self.placed_ms.sort()
        self.signups.sort(key=lambda s: (s[0], s[1]))
        self.membership.sort(key=lambda m: (m[0], m[1]))
        self.nps_answers.sort(key=lambda a: (a[0], a[1]))

    def active_at(self, j: int, bucket_ms: int, horizon: int) -> bool:
        """Active at bucket ``j`` (see the module docstring)."""
        end_ms = (j + 1) * bucket_ms  # first instant after bucket j
        i = bisect_left(self.activity_ms, end_ms)
        if i == 0:
            return False  # no activity in a bucket <= j
        last = self.activity_ms[i - 1]
        if last // bucket_ms < j - horizon + 1:
            return False  # last activity older than the horizon
        k = bisect_right(self.closed_ms, last)  # first close strictly after it
        closed_since = k < len(self.closed_ms) and self.closed_ms[k] < end_ms
        return not closed_since

    def first_activity_bucket(self, bucket_ms: int) -> int | None:
        return self.activity_ms[0] // bucket_ms if self.activity_ms else None

    def channel(self) -> str | None:
        """Channel of the earliest signup (ties by event_id), or None."""
        return self.signups[0][2] if self.signups else None

    def nps_segment(self) -> str:
        """``promoter``, ``passive`` or ``detractor`` by the latest NPS answer, else ``none``."""
        if not self.nps_answers:
            return "none"
        score = self.nps_answers[-1][2]
        return "promoter" if score >= 9 else "passive" if score >= 7 else "detractor"

    def is_member(self) -> bool:
        """Whether the latest enrolled/left event is an enrolment."""
        return bool(self.membership) and self.membership[-1][2]


class _Scope:
    """Counted events of one scope (a store or ``"*"``), sorted by time, and
    the facts of its customers; built once and shared by every window."""

    def __init__(self, events: Sequence[Event]) -> None:
        self.events = sorted(events, key=lambda e: e.occurred_at_ms)
        self.times = [e.occurred_at_ms for e in self.events]
        self.customers: dict[CustomerKey, _Customer] = {}
        #: the NPS answers of customers, also of those with no other event
        self.answers: dict[CustomerKey, list[tuple[int, str, int]]] = {}
        for event in self.events:
            if event.type == SURVEY_RESPONDED and event.survey == SURVEY_NPS:
                score = _required(event.score, "score", event)
                self.answers.setdefault(_customer_key(event), []).append(
                    (event.occurred_at_ms, event.event_id, score))
            if event.type == SPEND_RECORDED or event.type == SURVEY_RESPONDED:
                continue
            facts = self.customers.setdefault(_customer_key(event), _Customer())
            t = event.occurred_at_ms
            if event.type in ACTIVITY_TYPES:
                facts.activity_ms.append(t)
            if event.type == ORDER_PLACED:
                facts.placed_ms.append(t)
            elif event.type == CUSTOMER_SIGNED_UP:
                facts.signups.append((t, event.event_id, event.channel))
            elif event.type == CUSTOMER_CLOSED:
                facts.closed_ms.append(t)
            elif event.type in (LOYALTY_ENROLLED, LOYALTY_LEFT):
                facts.membership.append((t, event.event_id, event.type == LOYALTY_ENROLLED))
        for key, facts in self.customers.items():
            facts.nps_answers = self.answers.get(key, [])
            facts.sort()

    def between(self, start_ms: int, end_ms: int) -> list[Event]:
        """Events with ``start_ms <= occurred_at_ms < end_ms``."""
        return self.events[bisect_left(self.times, start_ms):bisect_left(self.times, end_ms)]


# ---------------------------------------------------------------------------
# the metric families of SPEC section 5


def _survey_metrics(in_w: list[Event]) -> dict[str, object]:
    """NPS (with adjusted-Wald interval), CSAT, CES and CLI of the responses in W."""
    nps = [e for e in in_w if e.type == SURVEY_RESPONDED and e.survey == SURVEY_NPS]
    csat = [e for e in in_w if e.type == SURVEY_RESPONDED and e.survey == SURVEY_CSAT]
    ces = [e for e in in_w if e.type == SURVEY_RESPONDED and e.survey == SURVEY_CES]
    cli = [e for e in in_w if e.type == SURVEY_RESPONDED and e.survey == SURVEY_CLI]

    nps_scores = [_required(e.score, "score", e) for e in nps]
    promoters = sum(1 for s in nps_scores if 9 <= s <= 10)
    passives = sum(1 for s in nps_scores if 7 <= s <= 8)
    detractors = sum(1 for s in nps_scores if 0 <= s <= 6)
    responses = len(nps_scores)
    ci_low, ci_high = _nps_interval(promoters, detractors, responses)

    satisfied = 0
    for e in csat:
        scale = e.scale if e.scale is not None else 5
        if _required(e.score, "score", e) >= CSAT_SATISFIED_FROM[scale]:
            satisfied += 1

    ces_total = sum(_required(e.score, "score", e) for e in ces)

    answers = [a for e in cli for a in _required(e.answers, "answers", e)]
    points_total = sum(120 - 20 * a for a in answers)  # 1->100, 2->80, ..., 6->0

    return {
        "nps": _percent(promoters - detractors, responses),
        "nps_responses": responses,
        "nps_promoters": promoters,
        "nps_passives": passives,
        "nps_detractors": detractors,
        "nps_ci_low": ci_low,
        "nps_ci_high": ci_high,
        "csat": _percent(satisfied, len(csat)),
        "csat_responses": len(csat),
        "ces": _ratio(ces_total, len(ces)),
        "ces_responses": len(ces),
        # mean over responses of (mean of its 3 mapped answers) = total / (3 * responses)
        "cli": _ratio(points_total, 3 * len(cli)),
        "cli_raw": _ratio(sum(answers), 3 * len(cli)),
        "cli_responses": len(cli),
    }


def _nps_interval(promoters: int, detractors: int, responses: int) -> tuple[float | None, float | None]:
    """95% adjusted-Wald interval of NPS, clamped to [-100, 100]; None without responses.

    n' = n + 3, p' = (promoters + 3/4)/n', d' = (detractors + 3/4)/n',
    interval = 100 * (p' - d' -/+ 1.96 * sqrt((p' + d' - (p' - d')**2) / n')).
    """
    if responses == 0:
        return None, None
    n_adj = responses + 3
    p_adj = (promoters + 0.75) / n_adj
    d_adj = (detractors + 0.75) / n_adj
    diff = p_adj - d_adj
    half_width = 1.96 * math.sqrt((p_adj + d_adj - diff**2) / n_adj)
    low = 100 * (diff - half_width)
    high = 100 * (diff + half_width)
    return max(-100.0, min(100.0, low)), max(-100.0, min(100.0, high))


def _customer_metrics(
    scope: _Scope, k: int, n: int, config: ReferenceConfig
) -> tuple[dict[str, object], set[CustomerKey], set[CustomerKey]]:
    """CE, CS, CA, retention, churn, reactivation; also the new and the active-at-K customers."""
    b = config.bucket_ms
    h = config.horizon_ms // b
    start, end, new = 0, 0, 0
    churned, reactivated = 0, 0
    new_keys: set[CustomerKey] = set()
    active_keys: set[CustomerKey] = set()
    for key, facts in scope.customers.items():
        first = facts.first_activity_bucket(b)
        is_new = first is not None and k - n + 1 <= first <= k
        at_start = facts.active_at(k - n, b, h)
        at_end = facts.active_at(k, b, h)
        start += at_start
        end += at_end
        if is_new:
            new += 1
            new_keys.add(key)
        if at_end:
            active_keys.add(key)
        if at_start and not at_end:
            churned += 1
        if not at_start and not is_new and at_end:
            reactivated += 1
    metrics: dict[str, object] = {
        "customers_end": end,
        "customers_start": start,
        "new_customers": new,
        "retention_rate": _percent(end - new, start),
        "churned_customers": churned,
        "churn_rate": _percent(churned, start),
        "reactivated_customers": reactivated,
    }
    return metrics, new_keys, active_keys


def _order_metrics(
    scope: _Scope, in_w: list[Event], in_prev: list[Event], window_ms: int
) -> dict[str, object]:
    """Orders, revenue, repeat purchase, CLV and revenue churn."""
    orders = 0
    gross = 0
    refunds = 0
    purchasers: set[CustomerKey] = set()
    net_in_w: dict[CustomerKey, int] = {}
    for e in in_w:
        if e.type == ORDER_PLACED:
            amount = _required(e.amount_micros, "amount", e)
            orders += 1
            gross += amount
            purchasers.add(_customer_key(e))
            net_in_w[_customer_key(e)] = net_in_w.get(_customer_key(e), 0) + amount
        elif e.type == ORDER_REFUNDED:
            amount = _required(e.amount_micros, "amount", e)
            refunds += amount
            net_in_w[_customer_key(e)] = net_in_w.get(_customer_key(e), 0) - amount

    prev_buyers: set[CustomerKey] = set()
    net_in_prev: dict[CustomerKey, int] = {}
    for e in in_prev:
        if e.type == ORDER_PLACED:
            prev_buyers.add(_customer_key(e))
            amount = _required(e.amount_micros, "amount", e)
            net_in_prev[_customer_key(e)] = net_in_prev.get(_customer_key(e), 0) + amount
        elif e.type == ORDER_REFUNDED:
            amount = _required(e.amount_micros, "amount", e)
            net_in_prev[_customer_key(e)] = net_in_prev.get(_customer_key(e), 0) - amount
    revenue_prev = sum(net_in_prev.values())
    churned_revenue = sum(v for key, v in net_in_prev.items() if key not in purchasers)
    retained_revenue = sum(v for key, v in net_in_w.items() if key in prev_buyers)

    returning = sum(1 for key in purchasers if len(scope.customers[key].placed_ms) >= 2)
    lifespans_ms = sum(
        scope.customers[key].placed_ms[-1] - scope.customers[key].placed_ms[0] for key in purchasers
    )
    buyers = len(purchasers)
    # customer_value = aov * frequency = (gross/orders) * (orders/buyers) = gross / buyers
    value_units: Fraction | None = (
        Fraction(gross, buyers * MICROS_PER_UNIT) if buyers else None
    )
    lifespan_years: Fraction | None = (
        Fraction(lifespans_ms, buyers * YEAR_MS_EXACT) if buyers else None
    )
    clv = (
        None
        if value_units is None or lifespan_years is None
        else float(value_units * Fraction(YEAR_MS_EXACT, window_ms) * lifespan_years)
    )
    return {
        "orders": orders,
        "gross_revenue": _money(gross),
        "refunds": _money(refunds),
        "net_revenue": _money(gross - refunds),
        "purchasers": buyers,
        "returning_customers": returning,
        "one_time_customers": buyers - returning,
        "repeat_purchase_rate": _percent(returning, buyers),
        "aov": _ratio(gross, orders * MICROS_PER_UNIT),
        "purchase_frequency": _ratio(orders, buyers),
        "customer_value": None if value_units is None else float(value_units),
        "avg_lifespan_years": None if lifespan_years is None else float(lifespan_years),
        "clv": clv,
        "revenue_prev_period": _money(revenue_prev),
        "churned_revenue": _money(churned_revenue),
        "revenue_churn_rate": _percent(churned_revenue, revenue_prev),
        "net_revenue_retention": _percent(retained_revenue, revenue_prev),
    }


def _segment_metrics(scope: _Scope, in_w: list[Event], k: int, n: int, config: ReferenceConfig) -> dict[str, object]:
    """Churn rate, repeat purchase rate and net revenue in W of each NPS segment's customers."""
    b = config.bucket_ms
    h = config.horizon_ms // b
    names = ("promoter", "passive", "detractor", "none")
    start = dict.fromkeys(names, 0)
    churned = dict.fromkeys(names, 0)
    for facts in scope.customers.values():
        if facts.active_at(k - n, b, h):
            segment = facts.nps_segment()
            start[segment] += 1
            churned[segment] += not facts.active_at(k, b, h)
    buyers: set[CustomerKey] = set()
    net = dict.fromkeys(names, 0)
    for e in in_w:
        if e.type == ORDER_PLACED:
            buyers.add(_customer_key(e))
            net[scope.customers[_customer_key(e)].nps_segment()] += _required(e.amount_micros, "amount", e)
        elif e.type == ORDER_REFUNDED:
            net[scope.customers[_customer_key(e)].nps_segment()] -= _required(e.amount_micros, "amount", e)
    purchasers = dict.fromkeys(names, 0)
    returning = dict.fromkeys(names, 0)
    for key in buyers:
        segment = scope.customers[key].nps_segment()
        purchasers[segment] += 1
        returning[segment] += len(scope.customers[key].placed_ms) >= 2
    return {
        "churn_rate_by_nps_segment": {name: _percent(churned[name], start[name]) for name in names},
        "repeat_purchase_rate_by_nps_segment": {name: _percent(returning[name], purchasers[name]) for name in names},
        "net_revenue_by_nps_segment": {name: _money(net[name]) for name in names},
    }


def _month_of(bucket: int, bucket_ms: int) -> tuple[int, int]:
    """(year, month) of a bucket's first instant, by the calendar."""
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=bucket * bucket_ms)
    return moment.year, moment.month


def _cohort_matrix(scope: _Scope, as_of_ms: int, config: ReferenceConfig) -> dict[str, object]:
    """The cohort matrix of a scope's counted events (see the module docstring)."""
    b = config.bucket_ms
    h = config.horizon_ms // b
    k = as_of_ms // b
    year, month = _month_of(k, b)
    # months are counted as year * 12 + month - 1; the cohorts are the 12 up to K's month
    current = year * 12 + month - 1

    def month_number(bucket: int) -> int:
        y, m = _month_of(bucket, b)
        return y * 12 + m - 1

    def last_bucket(number: int) -> int:
        # the last bucket whose first instant lies in month `number`: the one before the next month's first
        y, m = divmod(number + 1, 12)
        start_ms = int((datetime(y, m + 1, 1, tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds()) * 1000
        return -(-start_ms // b) - 1

    rows: list[dict[str, object]] = []
    for cohort in range(current - 11, current + 1):
        members = [facts for facts in scope.customers.values()
                   if facts.activity_ms and month_number(facts.activity_ms[0] // b) == cohort]
        active: list[int | None] = []
        buyers: list[int | None] = []
        for period in range(12):
            number = cohort + period
            if number > current:
                active.append(None)
                buyers.append(None)
                continue
            j = k if number == current else last_bucket(number)
            active.append(sum(1 for facts in members if facts.active_at(j, b, h)))
            buyers.append(sum(1 for facts in members
                              if any(month_number(t // b) == number for t in facts.placed_ms)))
        size = len(members)
        y, m = divmod(cohort, 12)
        rows.append({
            "cohort": f"{y:04d}-{m + 1:02d}",
            "customers": size,
            "active_customers": active,
            "active_rate": [None if value is None else _percent(value, size) for value in active],
            "purchasers": buyers,
            "purchase_rate": [None if value is None else _percent(value, size) for value in buyers],
        })
    return {"period": "month", "cohorts": rows}


def _acquisition_metrics(
    scope: _Scope, in_w: list[Event], new_keys: set[CustomerKey]
) -> dict[str, object]:
    """Marketing spend, CAC and CAC per channel."""
    spend = 0
    spend_by_channel: dict[str, int] = {}
    for e in in_w:
        if e.type == SPEND_RECORDED:
            amount = _required(e.amount_micros, "amount", e)
            spend += amount
            if e.channel is not None:
                spend_by_channel[e.channel] = spend_by_channel.get(e.channel, 0) + amount
    new_by_channel: dict[str, int] = {}
    for key in new_keys:
        channel = scope.customers[key].channel()
        if channel is not None:
            new_by_channel[channel] = new_by_channel.get(channel, 0) + 1
    by_channel: dict[str, float | None] = {
        channel: _ratio(spend_by_channel.get(channel, 0), new_by_channel.get(channel, 0) * MICROS_PER_UNIT)
        for channel in sorted(spend_by_channel.keys() | new_by_channel.keys())
    }
    return {
        "marketing_spend": _money(spend),
        "cac": _ratio(spend, len(new_keys) * MICROS_PER_UNIT),
        "cac_by_channel": by_channel,
    }


def _loyalty_metrics(
    scope: _Scope, in_w: list[Event], active_keys: set[CustomerKey]
) -> dict[str, object]:
    """Loyalty members, participation, rewards and redemption."""
    members = {key for key in active_keys if scope.customers[key].is_member()}
    issued = 0
    redeemed = 0
    rewarded: set[CustomerKey] = set()
    for e in in_w:
        if e.type == REWARD_ISSUED:
            issued += 1
            rewarded.add(_customer_key(e))
        elif e.type == REWARD_REDEEMED:
            redeemed += 1
            rewarded.add(_customer_key(e))
    active_members = len(members & rewarded)
    return {
        "loyalty_members": len(members),
        "participation_rate": _percent(len(members), len(active_keys)),
        "rewards_issued": issued,
        "rewards_redeemed": redeemed,
        "redemption_rate": _percent(redeemed, issued),
        "active_members": active_members,
        "active_participation_rate": _percent(active_members, len(members)),
    }


def _window_metrics(
    scope: _Scope, *, window_ms: int, as_of_ms: int, config: ReferenceConfig, mask_money: bool
) -> dict[str, object]:
    """Every metric of one scope and window as of T, keyed in catalog order."""
    b = config.bucket_ms
    n = buckets_in(window_ms, b)
    k = as_of_ms // b
    in_w = scope.between((k - n + 1) * b, as_of_ms + 1)
    in_prev = scope.between((k - 2 * n + 1) * b, (k - n + 1) * b)

    values: dict[str, object] = {}
    values.update(_survey_metrics(in_w))
    customer_values, new_keys, active_keys = _customer_metrics(scope, k, n, config)
    values.update(customer_values)
    values.update(_order_metrics(scope, in_w, in_prev, window_ms))
    values.update(_acquisition_metrics(scope, in_w, new_keys))
    values.update(_loyalty_metrics(scope, in_w, active_keys))
    values.update(_segment_metrics(scope, in_w, k, n, config))
    if mask_money:
        for name in MONETARY_METRICS:
            values[name] = None
    assert values.keys() == set(METRIC_NAMES)
    return {name: values[name] for name in METRIC_NAMES}


# ---------------------------------------------------------------------------
# public entry points


def reference_metrics(
    events: Sequence[Event],
    *,
    store_id: str,
    window_ms: int,
    as_of_ms: int,
    config: ReferenceConfig,
    max_channels: int = MAX_STORE_CHANNELS,
) -> dict[str, object]:
    """Every metric of one store (or ``"*"``) and window as of T = ``as_of_ms``.

    ``events`` is the input in arrival order; the metrics use
    :func:`accepted_events` (with ``max_channels``) with ``occurred_at_ms <= T``. For example
    ``nps = 100 * (promoters - detractors) / responses``,
    ``retention_rate = 100 * (CE - CA) / CS`` and
    ``clv = (gross / purchasers) * (365.25 days / W) * avg_lifespan_years``;
    the module docstring and SPEC section 5 give every formula.

    >>> hour = 3_600_000
    >>> config = ReferenceConfig(bucket_ms=hour, horizon_ms=24 * hour)
    >>> events = [
    ...     Event("1", CUSTOMER_SIGNED_UP, 0, "s", "ann"),
    ...     Event("2", ORDER_PLACED, hour, "s", "ann", amount_micros=12_500_000, currency="EUR"),
    ...     Event("3", SURVEY_RESPONDED, hour, "s", "ann", survey=SURVEY_NPS, score=10),
    ...     Event("4", ORDER_PLACED, 5 * hour, "s", "bob", amount_micros=1, currency="EUR"),
    ... ]
    >>> m = reference_metrics(events, store_id="s", window_ms=3 * hour, as_of_ms=2 * hour,
    ...                       config=config)
    >>> m["orders"], m["gross_revenue"], m["nps"], m["customers_end"], m["new_customers"]
    (1, Decimal('12.500000'), 100.0, 1, 1)
    """
    counted = [e for e in accepted_events(events, max_channels=max_channels) if e.occurred_at_ms <= as_of_ms]
    if store_id != ALL_STORES:
        counted = [e for e in counted if e.store_id == store_id]
    mask = store_id == ALL_STORES and _mixed_currencies(events)
    return _window_metrics(
        _Scope(counted), window_ms=window_ms, as_of_ms=as_of_ms, config=config, mask_money=mask
    )


def reference_all(
    events: Sequence[Event],
    *,
    windows_ms: Sequence[int],
    as_of_ms: int,
    config: ReferenceConfig,
    max_channels: int = MAX_STORE_CHANNELS,
) -> dict[tuple[str, int], dict[str, object]]:
    """Metrics of every scope and window: ``{(store_id or "*", window_ms): metrics}``.

    The scopes are every store with an accepted event at or before T, plus
    ``"*"`` (always present); each value equals :func:`reference_metrics` of
    that store and window (``max_channels`` as there).

    >>> hour = 3_600_000
    >>> config = ReferenceConfig(bucket_ms=hour, horizon_ms=hour)
    >>> events = [Event("1", CUSTOMER_SIGNED_UP, 0, "a", "x"),
    ...           Event("2", CUSTOMER_SIGNED_UP, 0, "b", "x"),
    ...           Event("3", CUSTOMER_SIGNED_UP, 2 * hour, "c", "x")]
    >>> result = reference_all(events, windows_ms=[hour], as_of_ms=0, config=config)
    >>> sorted(result), result[("*", hour)]["new_customers"]
    ([('*', 3600000), ('a', 3600000), ('b', 3600000)], 2)
    """
    counted = [e for e in accepted_events(events, max_channels=max_channels) if e.occurred_at_ms <= as_of_ms]
    by_store: dict[str, list[Event]] = {}
    for event in counted:
        by_store.setdefault(event.store_id, []).append(event)
    scopes = {store: _Scope(store_events) for store, store_events in by_store.items()}
    scopes[ALL_STORES] = _Scope(counted)
    mixed = _mixed_currencies(events)
    result: dict[tuple[str, int], dict[str, object]] = {}
    for store, scope in scopes.items():
        for window_ms in windows_ms:
            result[(store, window_ms)] = _window_metrics(
                scope,
                window_ms=window_ms,
                as_of_ms=as_of_ms,
                config=config,
                mask_money=store == ALL_STORES and mixed,
            )
    return result


def reference_cohorts(
    events: Sequence[Event],
    *,
    store_id: str,
    as_of_ms: int,
    config: ReferenceConfig,
    max_channels: int = MAX_STORE_CHANNELS,
) -> dict[str, object]:
    """The cohort matrix of one store (or ``"*"``) as of T = ``as_of_ms`` (see the module docstring).

    >>> day = 86_400_000
    >>> config = ReferenceConfig(bucket_ms=60_000, horizon_ms=90 * day)
    >>> events = [Event("1", CUSTOMER_SIGNED_UP, 0, "s", "ann"),  # 1970-01
    ...           Event("2", ORDER_PLACED, 40 * day, "s", "ann", amount_micros=1, currency="EUR")]  # 1970-02
    >>> row = reference_cohorts(events, store_id="s", as_of_ms=200 * day, config=config)["cohorts"][-7]
    >>> row["cohort"], row["customers"], row["active_customers"][:6], row["purchasers"][:3]
    ('1970-01', 1, [1, 1, 1, 1, 0, 0], [0, 1, 0])
    """
    counted = [e for e in accepted_events(events, max_channels=max_channels) if e.occurred_at_ms <= as_of_ms]
    if store_id != ALL_STORES:
        counted = [e for e in counted if e.store_id == store_id]
    return _cohort_matrix(_Scope(counted), as_of_ms, config)


def reference_cohorts_all(
    events: Sequence[Event],
    *,
    as_of_ms: int,
    config: ReferenceConfig,
    max_channels: int = MAX_STORE_CHANNELS,
) -> dict[str, dict[str, object]]:
    """The cohort matrix of every store with an accepted event at or before T, and of ``"*"``.

    Each equals :func:`reference_cohorts` of that store.

    >>> config = ReferenceConfig(bucket_ms=60_000, horizon_ms=86_400_000)
    >>> result = reference_cohorts_all([Event("1", CUSTOMER_SIGNED_UP, 0, "a", "x")], as_of_ms=0, config=config)
    >>> sorted(result), result["*"]["cohorts"][-1]["customers"]
    (['*', 'a'], 1)
    """
    counted = [e for e in accepted_events(events, max_channels=max_channels) if e.occurred_at_ms <= as_of_ms]
    by_store: dict[str, list[Event]] = {}
    for event in counted:
        by_store.setdefault(event.store_id, []).append(event)
    result = {store: _cohort_matrix(_Scope(store_events), as_of_ms, config) for store, store_events in by_store.items()}
    result[ALL_STORES] = _cohort_matrix(_Scope(counted), as_of_ms, config)
    return result
