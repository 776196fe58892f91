"""The storefront traffic model: a deterministic stream of realistic events of several stores.

:class:`Storefronts` is a pure generator of ``(topic, body)`` pairs given a seed and a
clock function (epoch ms, called once per event). Same seed and same clock readings,
same events. Each store has its own random stream and the choice of the store of the
next event has another one, so changing what happens in one store (a churn spike)
leaves the events of the other stores exactly as they were. ``loyalty simulate`` and the
demo send it live or as a backfill (:mod:`streams.tools.simulate`); the bench and the
tests take it as a history (:mod:`streams.tools.history`).

The behaviour model works in *store events* rather than in seconds, so the same model
makes sense at any rate and in compressed historical time: customers arrive (most sign up
through a channel, some order as guests) until each store nears its population, then at a
trickle; a loyal 30% order often, the others one to three times, each after a random gap;
about 7% of orders are refunded (fully or partly); customers close their accounts now and
then; surveys of all four kinds (the score mixes of :func:`survey_fields`); marketing spend
by channel; loyalty enrolments, rewards issued and redeemed, departures. Producers differ,
and so do the events: times are half RFC 3339, half epoch milliseconds, amounts half
decimal strings, half JSON numbers.

Demand follows the calendar (:func:`demand`, UTC): orders and arrivals peak on weekend
days and in the evening and are quiet at night, so a day's or a week's numbers move as a real
store's do. The caller's clock sets how many events a second are made; seasonality sets what
they are (at night a larger part of them is surveys, spend and loyalty activity). It is a pure
function of the event time: same seed and clock, same events.

A churn spike (``--churn-spike AT:FACTOR``) makes one store, from event time ``AT`` on,
close accounts at ``FACTOR`` times its normal share of its events; its customers stop
ordering and no new ones arrive beyond the trickle. An NPS drop (``--nps-drop AT:DURATION``)
makes one store's NPS answers mostly detractors from ``AT`` for ``DURATION``.

>>> from itertools import count, islice
>>> from metrics.events import INPUT_TOPICS
>>> events = list(islice(Storefronts(seed=1, stores=2, customers=50,
...                                   clock=count(1_700_000_000_000, 10).__next__), 300))
>>> sorted({topic for topic, _ in events}) == sorted(INPUT_TOPICS)
True
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

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
    TYPE_TOPIC,
)

__all__ = ["CHANNELS", "CURRENCIES", "ChurnSpike", "NpsDrop", "Storefronts", "demand", "survey_fields", "time_field"]

DEFAULT_STORES = 3
DEFAULT_CUSTOMERS = 3_000
CURRENCIES = ("EUR", "USD", "TRY")
CHANNELS = ("search", "social", "email", "referral")

# -- the behaviour model: weights are per store event ------------------------------------------

LOYAL_SHARE = 0.3
SIGNUP_SHARE = 0.85  # the others first appear with a guest order
SIGNUP_CHANNEL_SHARE = 0.8
CHANNEL_WEIGHTS = (0.35, 0.25, 0.15, 0.25)  # CHANNELS: search, social, email, referral
CHANNEL_SPEND = (180.0, 140.0, 40.0, 60.0)  # typical spend per record, by channel
ARRIVAL_FLOOR = 1.5  # new customers keep trickling in
ARRIVAL_GROWTH = 30.0  # extra arrivals while a store is below its population
W_ORDER = 50.0
W_REFUND = 3.5
W_CLOSE = 1.0
W_SURVEY = 10.0
W_SPEND = 3.0
W_ENROL = 2.0  # times the share of open customers who are not members
W_ISSUE = 4.0
W_REDEEM = 2.5
W_LEAVE = 0.5
#: mean order gap in store events, as a fraction of the store's population
LOYAL_GAP = 0.4
OCCASIONAL_GAP = 1.5
MAX_SPIKE_SHARE = 0.9
RECENT_ORDERS = 2_000

# -- seasonality: relative demand by UTC hour and weekday, each averaging 1 -------------------

_HOURLY = (0.25, 0.15, 0.1, 0.1, 0.1, 0.2, 0.4, 0.7, 0.9, 1.1, 1.2, 1.3,
           1.4, 1.3, 1.2, 1.2, 1.3, 1.4, 1.6, 1.8, 1.9, 1.7, 1.2, 0.6)
_WEEKDAY = (0.85, 0.85, 0.9, 0.95, 1.05, 1.35, 1.25)  # Monday .. Sunday
HOURLY_DEMAND = tuple(value * 24 / sum(_HOURLY) for value in _HOURLY)
WEEKDAY_DEMAND = tuple(value * 7 / sum(_WEEKDAY) for value in _WEEKDAY)
_HOUR_MS = 3_600_000
_DAY_MS = 24 * _HOUR_MS
#: 1970-01-01 was a Thursday (index 3, Monday = 0)
_EPOCH_WEEKDAY = 3

(ARRIVE, ORDER, REFUND, CLOSE, SURVEY, SPEND, ENROL, ISSUE, REDEEM, LEAVE) = range(10)
ACTIONS = tuple(range(10))


@dataclass(frozen=True)
class ChurnSpike:
    """From event time ``at_ms`` on (for ``duration_ms``, or for ever), the store ``store_index`` (0-based)
    loses customers abruptly."""

    store_index: int
    at_ms: int
    factor: float
    duration_ms: int | None = None

    def active(self, store_index: int, time_ms: int) -> bool:
        """Whether an event of that store at that time is in the spike.

        >>> spike = ChurnSpike(0, 1_000, 5.0, duration_ms=500)
        >>> [spike.active(0, t) for t in (999, 1_000, 1_499, 1_500)], ChurnSpike(0, 1_000, 5.0).active(0, 10**12)
        ([False, True, True, False], True)
        """
        if store_index != self.store_index or time_ms < self.at_ms:
            return False
        return self.duration_ms is None or time_ms < self.at_ms + self.duration_ms


@dataclass(frozen=True)
class NpsDrop:
    """From event time ``at_ms`` for ``duration_ms``, the store ``store_index``'s NPS answers are mostly detractors."""

    store_index: int
    at_ms: int
    duration_ms: int

    def active(self, store_index: int, time_ms: int) -> bool:
        """Whether an event of that store at that time is in the drop.

        >>> drop = NpsDrop(1, 1_000, 500)
        >>> [drop.active(1, t) for t in (999, 1_000, 1_499, 1_500)], drop.active(0, 1_200)
        ([False, True, True, False], False)
        """
        return store_index == self.store_index and self.at_ms <= time_ms < self.at_ms + self.duration_ms


def demand(time_ms: int) -> float:
    """Relative demand (orders, arrivals) at an event time: hour-of-day times weekday factor, UTC.

    Each factor averages 1 over its cycle, so the mean over a week is 1: the small hours are
    down to a tenth, weekday evenings near 1.7, Saturday evenings above 2.5.

    >>> saturday_8pm, tuesday_2am = 1_700_337_600_000, 1_700_532_000_000
    >>> round(demand(saturday_8pm), 2), round(demand(tuesday_2am), 2)
    (2.59, 0.09)
    >>> round(sum(demand(h * _HOUR_MS) for h in range(7 * 24)) / (7 * 24), 9)
    1.0
    """
    day, rest = divmod(time_ms, _DAY_MS)
    return HOURLY_DEMAND[rest // _HOUR_MS] * WEEKDAY_DEMAND[(day + _EPOCH_WEEKDAY) % 7]


def _money(rng: random.Random, cents: int) -> object:
    """An amount as producers send it: half decimal strings, half JSON numbers."""
    text = f"{cents // 100}.{cents % 100:02d}"
    return text if rng.random() < 0.5 else float(text)


def base36(number: int) -> str:
    """``number`` (>= 0) in base 36, lowercase.

    >>> base36(0), base36(35), base36(36)
    ('0', 'z', '10')
    """
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
        if not number:
            return out


class _Customer:
    __slots__ = ("budget", "id", "loyal", "member", "next_order", "orders")

    def __init__(self, customer_id: str, loyal: bool, budget: int, next_order: int) -> None:
        self.id = customer_id
        self.loyal = loyal
        self.budget = budget
        self.next_order = next_order
        self.orders = 0
        self.member = False


class _Bag:
    """A set of customers with O(1) add, discard and uniform random choice."""

    __slots__ = ("items", "where")

    def __init__(self) -> None:
        self.items: list[_Customer] = []
        self.where: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def add(self, customer: _Customer) -> None:
        if customer.id not in self.where:
            self.where[customer.id] = len(self.items)
            self.items.append(customer)

    def discard(self, customer: _Customer) -> None:
        index = self.where.pop(customer.id, None)
        if index is None:
            return
        last = self.items.pop()
        if last is not customer:
            self.items[index] = last
            self.where[last.id] = index

    def choice(self, rng: random.Random) -> _Customer:
        return self.items[int(rng.random() * len(self.items))]


def _take_random(rng: random.Random, items: list[Any]) -> Any:
    """Remove and return a random element (order is not kept)."""
    index = int(rng.random() * len(items))
    items[index], items[-1] = items[-1], items[index]
    return items.pop()


class _Store:
    """One storefront: its customers and its own random stream."""

    def __init__(self, seed: int | str, index: int, population: int) -> None:
        self.rng = random.Random(f"{seed}:store:{index}")
        self.index = index
        self.id = f"store-{index + 1}"
        self.currency = CURRENCIES[index % len(CURRENCIES)]
        self.population = max(1, population)
        self.seed = seed
        self.step = 0  # events of this store so far
        self.events = 0
        self.customers = 0
        self.orders = 0
        self.rewards = 0
        self.open = _Bag()
        self.shoppers = _Bag()  # open customers who will order again
        self.members = _Bag()
        self.recent: list[tuple[str, str, int]] = []  # (customer, order, cents) that may be refunded
        self.unredeemed: list[tuple[str, str, int]] = []  # (customer, reward, points)
        self.id_prefix = ""
        self.detracting = False  # in an NPS drop

    # -- choosing what happens --------------------------------------------------------------

    def _weights(self, spiking: bool, factor: float, season: float) -> list[float]:
        open_n = len(self.open)
        members = len(self.members)
        growth = ARRIVAL_GROWTH * max(0.0, 1.0 - open_n / self.population)
        weights = [
            (ARRIVAL_FLOOR + growth) * season,
            W_ORDER * season,
            W_REFUND if self.recent else 0.0,
            W_CLOSE if open_n else 0.0,
            W_SURVEY if open_n else 0.0,
            W_SPEND,
            W_ENROL * (open_n - members) / open_n if open_n else 0.0,
            W_ISSUE if members else 0.0,
            W_REDEEM if self.unredeemed else 0.0,
            W_LEAVE if members else 0.0,
        ]
        if spiking:
            normal_share = weights[CLOSE] / sum(weights)
            weights[ARRIVE] = ARRIVAL_FLOOR * season
            weights[ORDER] = 0.0
            others = sum(weights) - weights[CLOSE]
            share = min(MAX_SPIKE_SHARE, factor * normal_share)
            weights[CLOSE] = share * others / (1.0 - share) if open_n else 0.0
        return weights

    def next_event(self, time_ms: int, spiking: bool, factor: float, season: float = 1.0,
                   detracting: bool = False) -> tuple[str, dict[str, Any]]:
        self.step += 1
        self.detracting = detracting
        action = self.rng.choices(ACTIONS, self._weights(spiking, factor, season))[0]
        if action == ARRIVE:
            guest = self.rng.random() >= SIGNUP_SHARE
            return self._arrive(time_ms, guest=guest and not spiking)
        if action == ORDER:
            return self._order(time_ms)
        if action == REFUND:
            return self._refund(time_ms)
        if action == CLOSE:
            return self._close(time_ms)
        if action == SURVEY:
            return self._survey(time_ms)
        if action == SPEND:
            return self._spend(time_ms)
        if action == ENROL:
            return self._enrol(time_ms)
        if action == ISSUE:
            return self._issue(time_ms)
        if action == REDEEM:
            return self._redeem(time_ms)
        return self._leave(time_ms)

    # -- events -----------------------------------------------------------------------------

    def _event(self, kind: str, time_ms: int, customer: str | None, **fields: Any) -> tuple[str, dict[str, Any]]:
        self.events += 1
        body: dict[str, Any] = {
            "event_id": f"{self.id_prefix}{self.index + 1}-{self.events}",
            "type": kind,
            "occurred_at": time_field(self.rng, time_ms),
            "store_id": self.id,
        }
        if customer is not None:
            body["customer_id"] = customer
        body.update(fields)
        return TYPE_TOPIC[kind], body

    def _gap(self, loyal: bool) -> int:
        mean = self.population * (LOYAL_GAP if loyal else OCCASIONAL_GAP)
        return 1 + int(self.rng.expovariate(1.0 / mean))

    def _arrive(self, time_ms: int, guest: bool) -> tuple[str, dict[str, Any]]:
        rng = self.rng
        self.customers += 1
        loyal = rng.random() < LOYAL_SHARE
        budget = rng.randint(10, 120) if loyal else rng.choice((1, 1, 1, 2, 2, 3))
        first_order = self.step + 1 + int(rng.expovariate(1.0 / (0.05 * self.population + 1)))
        customer = _Customer(f"c{self.seed}-{self.index + 1}-{self.customers}", loyal, budget, first_order)
        self.open.add(customer)
        self.shoppers.add(customer)
        if guest:
            return self._place(time_ms, customer)
        fields = {}
        if rng.random() < SIGNUP_CHANNEL_SHARE:
            fields["channel"] = rng.choices(CHANNELS, CHANNEL_WEIGHTS)[0]
        return self._event(CUSTOMER_SIGNED_UP, time_ms, customer.id, **fields)

    def _order(self, time_ms: int) -> tuple[str, dict[str, Any]]:
        if not self.shoppers:
            return self._arrive(time_ms, guest=True)
        rng = self.rng
        for _ in range(8):
            customer = self.shoppers.choice(rng)
            if customer.next_order <= self.step and rng.random() < (1.0 if customer.loyal else 0.7):
                break
        return self._place(time_ms, customer)

    def _place(self, time_ms: int, customer: _Customer) -> tuple[str, dict[str, Any]]:
        rng = self.rng
        self.orders += 1
        order_id = f"o{self.seed}-{self.index + 1}-{self.orders}"
        basket = 45.0 if customer.loyal else 35.0
        cents = max(199, min(200_000, int(rng.lognormvariate(math.log(basket), 0.7) * 100)))
        customer.orders += 1
        customer.budget -= 1
        customer.next_order = self.step + self._gap(customer.loyal)
        if customer.budget <= 0:
            self.shoppers.discard(customer)
        self.recent.append((customer.id, order_id, cents))
        if len(self.recent) > RECENT_ORDERS:
            _take_random(rng, self.recent)
        return self._event(ORDER_PLACED, time_ms, customer.id, order_id=order_id, amount=_money(rng, cents),
                           currency=self.currency)

    def _refund(self, time_ms: int) -> tuple[str, dict[str, Any]]:
        rng = self.rng
        customer, order_id, cents = _take_random(rng, self.recent)
        refunded = cents if rng.random() < 0.6 else rng.randint(1, cents)
        return self._event(ORDER_REFUNDED, time_ms, customer, order_id=order_id, amount=_money(rng, refunded),
                           currency=self.currency)

    def _close(self, time_ms: int) -> tuple[str, dict[str, Any]]:
        customer = self.open.choice(self.rng)
        for bag in (self.open, self.shoppers, self.members):
            bag.discard(customer)
        customer.member = False
        return self._event(CUSTOMER_CLOSED, time_ms, customer.id)

    def _survey(self, time_ms: int) -> tuple[str, dict[str, Any]]:
        customer = self.open.choice(self.rng)
        if not customer.orders:  # buyers answer more often
            customer = self.open.choice(self.rng)
        return self._event(SURVEY_RESPONDED, time_ms, customer.id, **survey_fields(self.rng, self.detracting))

    def _spend(self, time_ms: int) -> tuple[str, dict[str, Any]]:
        rng = self.rng
        index = rng.choices(range(len(CHANNELS)), CHANNEL_WEIGHTS)[0]
        cents = max(100, int(rng.lognormvariate(math.log(CHANNEL_SPEND[index]), 0.5) * 100))
        return self._event(SPEND_RECORDED, time_ms, None, amount=_money(rng, cents), currency=self.currency,
                           channel=CHANNELS[index])

    def _enrol(self, time_ms: int) -> tuple[str, dict[str, Any]]:
        for _ in range(8):
            customer = self.open.choice(self.rng)
            if not customer.member:
                break
        if customer.member:
            return self._survey(time_ms)
        customer.member = True
        self.members.add(customer)
        return self._event(LOYALTY_ENROLLED, time_ms, customer.id)

    def _issue(self, time_ms: int) -> tuple[str, dict[str, Any]]:
        rng = self.rng
        customer = self.members.choice(rng)
        self.rewards += 1
        reward_id = f"r{self.seed}-{self.index + 1}-{self.rewards}"
        points = rng.choice((50, 100, 100, 150, 200, 250, 500))
        self.unredeemed.append((customer.id, reward_id, points))
        if len(self.unredeemed) > RECENT_ORDERS:
            _take_random(rng, self.unredeemed)
        return self._event(REWARD_ISSUED, time_ms, customer.id, reward_id=reward_id, points=points)

    def _redeem(self, time_ms: int) -> tuple[str, dict[str, Any]]:
        customer, reward_id, points = _take_random(self.rng, self.unredeemed)
        return self._event(REWARD_REDEEMED, time_ms, customer, reward_id=reward_id, points=points)

    def _leave(self, time_ms: int) -> tuple[str, dict[str, Any]]:
        customer = self.members.choice(self.rng)
        customer.member = False
        self.members.discard(customer)
        return self._event(LOYALTY_LEFT, time_ms, customer.id)


class Storefronts:
    """An endless, deterministic stream of ``(topic, body)`` storefront events (module docstring).

    ``stores`` stores named ``store-1``, ``store-2``, ... of decreasing size (``store-1`` the
    largest); ``customers`` is the population they grow to together. ``clock()`` gives each
    event's time in epoch ms (never moving back: a smaller reading is raised to the last
    one). Event ids are ``sim<seed>-<first time, base 36>-<store>-<n>``, so a rerun with the
    same seed at another time is not taken for duplicates. ``seasonal=False`` makes demand
    flat (the event mix does not follow the calendar).
    """

    def __init__(
        self,
        *,
        seed: int,
        stores: int = DEFAULT_STORES,
        customers: int = DEFAULT_CUSTOMERS,
        clock: Callable[[], int],
        churn_spike: ChurnSpike | None = None,
        nps_drop: NpsDrop | None = None,
        seasonal: bool = True,
    ) -> None:
        if stores < 1:
            raise ValueError("at least one store")
        if churn_spike is not None and not 0 <= churn_spike.store_index < stores:
            raise ValueError(f"churn spike store {churn_spike.store_index + 1} is not one of the {stores} stores")
        if nps_drop is not None and not 0 <= nps_drop.store_index < stores:
            raise ValueError(f"NPS drop store {nps_drop.store_index + 1} is not one of the {stores} stores")
        sizes = [1.0 / math.sqrt(index + 1) for index in range(stores)]
        total = sum(sizes)
        self.seed = seed
        self.stores = [_Store(seed, index, round(customers * size / total)) for index, size in enumerate(sizes)]
        self._pick = random.Random(f"{seed}:stores")
        self._cum_weights = [sum(sizes[: index + 1]) for index in range(stores)]
        self._clock = clock
        self._spike = churn_spike
        self._drop = nps_drop
        self._seasonal = seasonal
        self._last_ms: int | None = None

    @property
    def last_ms(self) -> int | None:
        """The time of the last event made."""
        return self._last_ms

    @property
    def store_ids(self) -> list[str]:
        """The ids of the stores, largest first."""
        return [store.id for store in self.stores]

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        return self

    def __next__(self) -> tuple[str, dict[str, Any]]:
        time_ms = int(self._clock())
        if self._last_ms is None:
            prefix = f"sim{self.seed}-{base36(max(time_ms, 0))}-"
            for store in self.stores:
                store.id_prefix = prefix
        elif time_ms < self._last_ms:
            time_ms = self._last_ms
        self._last_ms = time_ms
        store = self._pick.choices(self.stores, cum_weights=self._cum_weights)[0]
        spike = self._spike
        spiking = spike is not None and spike.active(store.index, time_ms)
        detracting = self._drop is not None and self._drop.active(store.index, time_ms)
        season = demand(time_ms) if self._seasonal else 1.0
        return store.next_event(time_ms, spiking, spike.factor if spike is not None else 1.0, season, detracting)


_NORMAL_NPS = (10, 10, 9, 9, 9, 8, 8, 7, 6, 5, 3, 0)
_DETRACTING_NPS = (0, 1, 2, 3, 4, 5, 5, 6, 6, 7, 8, 9)


def time_field(rng: random.Random, time_ms: int) -> object:
    """Half RFC 3339 with an offset, half epoch milliseconds: producers differ."""
    if rng.random() < 0.5:
        return time_ms
    moment = datetime.fromtimestamp(time_ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{time_ms % 1000:03d}Z"


def survey_fields(rng: random.Random, detracting: bool = False) -> dict[str, Any]:
    """The survey part of a ``survey.responded`` event: one of the four kinds with a plausible score mix.

    NPS leans to promoters with a tail of detractors (NPS about 33), or in an NPS drop
    (``detracting``) mostly detractors (NPS about -67); CSAT mostly satisfied on its 5/7/10 scale
    (``scale`` omitted half the time when it is the default 5), CES and CLI answers spread evenly.
    Both NPS mixes draw once from 12 scores, so a drop leaves the random stream in step.

    >>> survey_fields(random.Random(1))
    {'survey': 'csat', 'score': 6, 'scale': 10}
    """
    survey = rng.choice(("nps", "csat", "ces", "cli"))
    body: dict[str, Any] = {"survey": survey}
    if survey == "nps":
        body["score"] = rng.choice(_DETRACTING_NPS if detracting else _NORMAL_NPS)
    elif survey == "csat":
        scale = rng.choice((5, 7, 10))
        body["score"] = rng.randint(max(1, scale - 4), scale)
        if scale != 5 or rng.random() < 0.5:
            body["scale"] = scale
    elif survey == "ces":
        body["score"] = rng.randint(1, 7)
    else:
        body["answers"] = {"recommend": rng.randint(1, 6), "repurchase": rng.randint(1, 6),
                           "try_other": rng.randint(1, 6)}
    return body
