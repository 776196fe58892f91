"""``loyalty simulate``: realistic storefront traffic into the five input topics.

Two parts:

- :class:`Storefronts`, a pure generator of ``(topic, body)`` pairs given a seed and a
  clock function (epoch ms, called once per event). Same seed and same clock readings,
  same events. Each store has its own random stream and the choice of the store of the
  next event has another one, so changing what happens in one store (a churn spike)
  leaves the events of the other stores exactly as they were.
- :func:`run_simulation`, which publishes the generated events to Kafka, live (event time
  is the wall clock when the event is made, sending paced by a token bucket on the
  monotonic clock) or historical (event times from ``start_ms``, as fast as Kafka
  acknowledges), one event per message or batches of ``batch`` events per message.

The behaviour model works in *store events* rather than in seconds, so the same model
makes sense at any rate and in compressed historical time: customers arrive (most sign up
through a channel, some order as guests) until each store nears its population, then at a
trickle; a loyal 30% order often, the others one to three times, each after a random gap;
about 7% of orders are refunded (fully or partly); customers close their accounts now and
then; surveys of all four kinds (the score mixes of :func:`streams.tools.history.survey_fields`);
marketing spend by channel; loyalty enrolments, rewards issued and redeemed, departures.

A churn spike (``--churn-spike AT:FACTOR``) makes one store, from event time ``AT`` on,
close accounts at ``FACTOR`` times its normal share of its events; its customers stop
ordering and no new ones arrive beyond the trickle.

>>> from itertools import count, islice
>>> events = list(islice(Storefronts(seed=1, stores=2, customers=50,
...                                   clock=count(1_700_000_000_000, 10).__next__), 300))
>>> sorted({topic for topic, _ in events}) == sorted(INPUT_TOPICS)
True
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from metrics.events import (
    CUSTOMER_CLOSED,
    CUSTOMER_SIGNED_UP,
    INPUT_TOPICS,
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
from metrics.timegrid import parse_duration
from metrics.validation import MAX_BATCH_EVENTS, parse_timestamp
from streams.settings import Settings
from streams.tools.history import CHANNELS, CURRENCIES, _time_field, survey_fields
from streams.worker.topics import KafkaUnreachable, start_input_producer

__all__ = [
    "ChurnSpike",
    "SimulationError",
    "SimulationOptions",
    "SimulationStats",
    "Storefronts",
    "TokenBucket",
    "parse_churn_spike",
    "parse_start",
    "run_simulation",
]

DEFAULT_RATE = 200.0
DEFAULT_STORES = 3
DEFAULT_CUSTOMERS = 3_000
#: byte budget of one batch message: under Kafka's default 1 MiB message limit
MAX_MESSAGE_BYTES = 900 * 1024
#: how many produced messages may wait for their acknowledgement at once
MAX_IN_FLIGHT = 256
#: live batches wait at most this long for more events of their topic
MAX_LINGER_S = 0.5
#: how often the progress callback is called
PROGRESS_INTERVAL_S = 0.1

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

(ARRIVE, ORDER, REFUND, CLOSE, SURVEY, SPEND, ENROL, ISSUE, REDEEM, LEAVE) = range(10)
ACTIONS = tuple(range(10))


@dataclass(frozen=True)
class ChurnSpike:
    """From event time ``at_ms`` on, the store ``store_index`` (0-based) loses customers abruptly."""

    store_index: int
    at_ms: int
    factor: float


def _money(rng: random.Random, cents: int) -> object:
    """An amount as producers send it: half decimal strings, half JSON numbers."""
    text = f"{cents // 100}.{cents % 100:02d}"
    return text if rng.random() < 0.5 else float(text)


def _base36(number: int) -> str:
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

    # -- choosing what happens --------------------------------------------------------------

    def _weights(self, spiking: bool, factor: float) -> list[float]:
        open_n = len(self.open)
        members = len(self.members)
        growth = ARRIVAL_GROWTH * max(0.0, 1.0 - open_n / self.population)
        weights = [
            ARRIVAL_FLOOR + growth,
            W_ORDER,
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
            weights[ARRIVE] = ARRIVAL_FLOOR
            weights[ORDER] = 0.0
            others = sum(weights) - weights[CLOSE]
            share = min(MAX_SPIKE_SHARE, factor * normal_share)
            weights[CLOSE] = share * others / (1.0 - share) if open_n else 0.0
        return weights

    def next_event(self, time_ms: int, spiking: bool, factor: float) -> tuple[str, dict[str, Any]]:
        self.step += 1
        action = self.rng.choices(ACTIONS, self._weights(spiking, factor))[0]
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
            "occurred_at": _time_field(self.rng, time_ms),
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
        return self._event(SURVEY_RESPONDED, time_ms, customer.id, **survey_fields(self.rng))

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
    same seed at another time is not taken for duplicates.
    """

    def __init__(
        self,
        *,
        seed: int,
        stores: int = DEFAULT_STORES,
        customers: int = DEFAULT_CUSTOMERS,
        clock: Callable[[], int],
        churn_spike: ChurnSpike | None = None,
    ) -> None:
        if stores < 1:
            raise ValueError("at least one store")
        if churn_spike is not None and not 0 <= churn_spike.store_index < stores:
            raise ValueError(f"churn spike store {churn_spike.store_index + 1} is not one of the {stores} stores")
        sizes = [1.0 / math.sqrt(index + 1) for index in range(stores)]
        total = sum(sizes)
        self.seed = seed
        self.stores = [_Store(seed, index, round(customers * size / total)) for index, size in enumerate(sizes)]
        self._pick = random.Random(f"{seed}:stores")
        self._cum_weights = [sum(sizes[: index + 1]) for index in range(stores)]
        self._clock = clock
        self._spike = churn_spike
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
            prefix = f"sim{self.seed}-{_base36(max(time_ms, 0))}-"
            for store in self.stores:
                store.id_prefix = prefix
        elif time_ms < self._last_ms:
            time_ms = self._last_ms
        self._last_ms = time_ms
        store = self._pick.choices(self.stores, cum_weights=self._cum_weights)[0]
        spike = self._spike
        spiking = spike is not None and store.index == spike.store_index and time_ms >= spike.at_ms
        return store.next_event(time_ms, spiking, spike.factor if spike is not None else 1.0)


# -- options ---------------------------------------------------------------------------------


def parse_start(text: str) -> int:
    """``--start``: RFC 3339 with an offset, or epoch milliseconds.

    >>> parse_start("2024-03-01T12:00:00Z"), parse_start("1709294400000")
    (1709294400000, 1709294400000)
    """
    text = text.strip()
    try:
        return parse_timestamp(int(text)) if text.isdigit() else parse_timestamp(text)
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc} (or epoch milliseconds)") from None


@dataclass(frozen=True)
class SpikeSpec:
    """``--churn-spike AT:FACTOR`` as given: ``offset_ms`` after the start, or at ``at_ms``."""

    factor: float
    offset_ms: int | None = None
    at_ms: int | None = None

    def resolve(self, store_index: int, start_ms: int) -> ChurnSpike:
        """The spike on the event-time axis of a run whose (live or historical) start is ``start_ms``."""
        at_ms = self.at_ms if self.at_ms is not None else start_ms + (self.offset_ms or 0)
        return ChurnSpike(store_index, at_ms, self.factor)


def parse_churn_spike(text: str) -> SpikeSpec:
    """``AT:FACTOR``; AT is an offset from the start (``30s``, ``2h``, ``10d``), RFC 3339 or epoch ms.

    >>> parse_churn_spike("30s:8")
    SpikeSpec(factor=8.0, offset_ms=30000, at_ms=None)
    >>> parse_churn_spike("2024-03-01T12:00:00Z:5").at_ms
    1709294400000
    """
    at, sep, factor_text = text.strip().rpartition(":")
    if not sep or not at:
        raise ValueError(f"{text!r} is not AT:FACTOR (e.g. 30s:10)")
    try:
        factor = float(factor_text)
    except ValueError:
        raise ValueError(f"{factor_text!r} is not a number (FACTOR of AT:FACTOR)") from None
    if not math.isfinite(factor) or factor <= 0:
        raise ValueError(f"FACTOR must be a positive number, not {factor_text!r}")
    if at[-1:].isalpha() and not at[:1].isalpha() and "T" not in at:
        return SpikeSpec(factor, offset_ms=parse_duration(at))
    return SpikeSpec(factor, at_ms=parse_start(at))


@dataclass(frozen=True)
class SimulationOptions:
    """What ``loyalty simulate`` does (see :func:`run_simulation`)."""

    rate: float = DEFAULT_RATE
    duration_ms: int | None = None
    events: int | None = None
    stores: int = DEFAULT_STORES
    customers: int = DEFAULT_CUSTOMERS
    seed: int = 1
    start_ms: int | None = None
    churn_spike: SpikeSpec | None = None
    spike_store: int = 0  # 0-based index
    batch: int = 1
    #: live runs only: first publish ``backfill_events`` events covering the ``backfill_ms`` before now
    backfill_ms: int | None = None
    backfill_events: int = 0

    def __post_init__(self) -> None:
        if not self.rate > 0 or not math.isfinite(self.rate):
            raise ValueError("--rate must be a positive number of events per second")
        if not 1 <= self.batch <= MAX_BATCH_EVENTS:
            raise ValueError(f"--batch must be 1..{MAX_BATCH_EVENTS}")
        if self.stores < 1 or self.customers < 1:
            raise ValueError("--stores and --customers must be at least 1")
        if not 0 <= self.spike_store < self.stores:
            raise ValueError(f"the spike store must be one of store-1..store-{self.stores}")
        if self.start_ms is not None and self.historical_events() is None:
            raise ValueError("a historical run (--start) needs --events or --duration")
        if self.start_ms is not None and self.backfill_ms:
            raise ValueError("a historical run (--start) has no backfill")

    @property
    def live(self) -> bool:
        return self.start_ms is None

    def historical_events(self) -> int | None:
        """How many events a historical run sends: ``events``, else ``rate`` x ``duration``."""
        if self.events is not None:
            return self.events
        if self.duration_ms is not None:
            return max(1, round(self.rate * self.duration_ms / 1000))
        return None

    def historical_span_ms(self) -> int:
        """The event-time span of a historical run: ``duration``, else ``events / rate``."""
        if self.duration_ms is not None:
            return self.duration_ms
        return round((self.historical_events() or 0) * 1000 / self.rate)


# -- sending ---------------------------------------------------------------------------------


class TokenBucket:
    """Pacing at ``rate`` tokens per second on a monotonic clock, with bursts of at most ``burst``.

    Tokens accrue from elapsed time (never from fixed sleeps), so a slow iteration is made
    up by the next ones and the long-run rate does not drift.

    >>> now = [0.0]
    >>> bucket = TokenBucket(100.0, burst=10, clock=lambda: now[0])
    >>> bucket.take(50), bucket.take(50)
    ((1, 0.0), (0, 0.01))
    >>> now[0] = 1.0; bucket.take(50)
    (10, 0.0)
    """

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self.clock = clock
        self.tokens = 1.0
        self.last = clock()

    def take(self, want: int) -> tuple[int, float]:
        """Up to ``want`` whole tokens now, or none and the seconds until the next one."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        granted = min(want, int(self.tokens))
        if granted:
            self.tokens -= granted
            return granted, 0.0
        return 0, (1.0 - self.tokens) / self.rate


class SimulationError(Exception):
    """A fatal problem (Kafka unreachable, a bad historical span) with an operator-facing message."""


@dataclass
class SimulationStats:
    """What a run did so far; passed to the progress callback and returned at the end."""

    seed: int
    target: int | None = None  # events expected, when known
    generated: int = 0
    delivered: int = 0
    messages: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    first_ms: int | None = None
    last_ms: int | None = None
    phase: str = "live"
    per_type: Counter[str] = field(default_factory=Counter)
    per_store: Counter[str] = field(default_factory=Counter)
    spike: ChurnSpike | None = None
    store_ids: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def rate(self) -> float:
        """Acknowledged events per second since the start."""
        seconds = self.seconds
        return self.delivered / seconds if seconds > 0 else 0.0

    def text(self) -> str:
        """The summary printed by ``loyalty simulate``."""
        from streams.sinks.snapshots import rfc3339_ms

        lines = [
            f"sent {self.delivered:,} events in {self.messages:,} messages in {self.seconds:.1f}s "
            f"({self.rate:,.0f} events/s), seed {self.seed}"
        ]
        if self.first_ms is not None and self.last_ms is not None:
            lines.append(f"  event times {rfc3339_ms(self.first_ms)} .. {rfc3339_ms(self.last_ms)}")
        if self.per_store:
            lines.append("  " + ", ".join(f"{store}: {count:,}" for store, count in sorted(self.per_store.items())))
        if self.per_type:
            lines.append("  " + ", ".join(f"{kind}: {count:,}" for kind, count in sorted(self.per_type.items())))
        if self.spike is not None:
            lines.append(
                f"  churn spike: {self.store_ids[self.spike.store_index]} from {rfc3339_ms(self.spike.at_ms)}, "
                f"x{self.spike.factor:g} closures, no orders"
            )
        return "\n".join(lines)


def wall_clock_ms() -> int:
    """The wall clock in epoch milliseconds."""
    return time.time_ns() // 1_000_000


class _SwitchClock:
    """Virtual (evenly spaced) event times for a historical phase, then the wall clock."""

    def __init__(self) -> None:
        self.start_ms = 0
        self.step_ms = 0.0
        self.count = 0
        self.virtual = False

    def historical(self, start_ms: int, span_ms: int, events: int) -> None:
        self.start_ms, self.step_ms, self.count, self.virtual = start_ms, span_ms / max(events, 1), 0, True

    def __call__(self) -> int:
        if not self.virtual:
            return wall_clock_ms()
        value = self.start_ms + int(self.count * self.step_ms)
        self.count += 1
        return value


Progress = Callable[[SimulationStats], None]


async def _start_producer(settings: Settings) -> AIOKafkaProducer:
    try:
        return await start_input_producer(settings, linger_ms=5)
    except KafkaUnreachable as exc:
        raise SimulationError(str(exc)) from None


async def run_simulation(
    settings: Settings,
    options: SimulationOptions,
    progress: Progress | None = None,
    stop: asyncio.Event | None = None,
) -> SimulationStats:
    """Publish simulated traffic to the prefixed input topics until done or ``stop`` is set.

    Live (``options.start_ms`` is None): after an optional backfill, each event's time is the
    wall clock when it is made; sending is paced at ``options.rate`` and ends after
    ``duration_ms``, after ``events`` events, or when ``stop`` is set (every buffered event is
    still sent). Historical: ``historical_events()`` events with times evenly spread over
    ``historical_span_ms()`` from ``start_ms``, sent as fast as Kafka acknowledges; the span
    must end before now. ``AT`` of a churn spike counts from the start of the live part (or
    from ``start_ms``). ``progress(stats)`` is called about every 0.1 s and at the end.
    """
    now = wall_clock_ms()
    clock = _SwitchClock()
    if options.start_ms is not None:
        span = options.historical_span_ms()
        if options.start_ms + span > now + settings.max_future_skew_ms:
            raise SimulationError(
                "a historical run must end before now: --start plus the span "
                f"({span / 1000:,.0f}s) reaches into the future; leave out --start for a live run"
            )
        spike_origin = options.start_ms
    else:
        spike_origin = now
    spike = options.churn_spike.resolve(options.spike_store, spike_origin) if options.churn_spike else None
    generator = Storefronts(seed=options.seed, stores=options.stores, customers=options.customers,
                            clock=clock, churn_spike=spike)
    stats = SimulationStats(seed=options.seed, spike=spike, store_ids=generator.store_ids)
    stop = stop or asyncio.Event()
    producer = await _start_producer(settings)
    topics = {name: settings.topic(name) for name in INPUT_TOPICS}
    buffers: dict[str, list[bytes]] = {name: [] for name in INPUT_TOPICS}
    sizes: dict[str, int] = dict.fromkeys(INPUT_TOPICS, 1)
    since: dict[str, float] = {}
    pending: deque[tuple[asyncio.Future[Any], int]] = deque()
    last_report = 0.0

    def report(force: bool = False) -> None:
        nonlocal last_report
        if progress is not None and (force or time.monotonic() - last_report >= PROGRESS_INTERVAL_S):
            last_report = time.monotonic()
            progress(stats)

    async def settle(keep: int) -> None:
        while len(pending) > keep:
            future, count = pending.popleft()
            await future
            stats.delivered += count
            report()

    async def send(topic: str, value: bytes, key: bytes | None, count: int) -> None:
        pending.append((await producer.send(topics[topic], value, key=key), count))
        stats.messages += 1
        await settle(MAX_IN_FLIGHT)

    async def flush(topic: str) -> None:
        parts = buffers[topic]
        if parts:
            buffers[topic], sizes[topic] = [], 1
            since.pop(topic, None)
            await send(topic, b"[" + b",".join(parts) + b"]", None, len(parts))

    async def publish_one() -> None:
        topic, body = next(generator)
        stats.generated += 1
        time_ms = generator.last_ms
        if stats.first_ms is None:
            stats.first_ms = time_ms
        stats.last_ms = time_ms
        stats.per_type[body["type"]] += 1
        stats.per_store[body["store_id"]] += 1
        value = orjson.dumps(body)
        if options.batch == 1:
            key = body.get("customer_id") or body["store_id"]
            await send(topic, value, key.encode(), 1)
            return
        if sizes[topic] + len(value) + 1 > MAX_MESSAGE_BYTES:
            await flush(topic)
        buffers[topic].append(value)
        sizes[topic] += len(value) + 1
        since.setdefault(topic, time.monotonic())
        if len(buffers[topic]) >= options.batch:
            await flush(topic)

    async def pause(seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=seconds)

    async def historical(start_ms: int, span_ms: int, events: int, phase: str) -> None:
        stats.phase = phase
        clock.historical(start_ms, span_ms, events)
        for _ in range(events):
            if stop.is_set():
                break
            await publish_one()
            if stats.generated % 64 == 0:
                await asyncio.sleep(0)  # let acknowledgements and signals in
                report()
        for topic in INPUT_TOPICS:
            await flush(topic)
        clock.virtual = False

    async def live(limit: int | None, duration_ms: int | None) -> None:
        stats.phase = "live"
        bucket = TokenBucket(options.rate, burst=max(options.rate, 1.0))  # a stall of up to 1 s is made up
        started = time.monotonic()
        deadline = started + duration_ms / 1000 if duration_ms is not None else None
        made = 0
        while not stop.is_set() and (limit is None or made < limit):
            now_s = time.monotonic()
            if deadline is not None and now_s >= deadline:
                break
            for topic, first in list(since.items()):
                if now_s - first >= MAX_LINGER_S:
                    await flush(topic)
            granted, wait = bucket.take(64 if limit is None else min(64, limit - made))
            for _ in range(granted):
                await publish_one()
            made += granted
            report()
            if not granted:
                if deadline is not None:
                    wait = min(wait, max(deadline - now_s, 0.0))
                if since:
                    wait = min(wait, MAX_LINGER_S)
                await pause(wait)
        for topic in INPUT_TOPICS:
            await flush(topic)

    try:
        if options.start_ms is not None:
            stats.target = options.historical_events()
            await historical(options.start_ms, options.historical_span_ms(), stats.target or 0, "history")
        else:
            if options.backfill_ms and options.backfill_events > 0:
                await historical(now - options.backfill_ms, options.backfill_ms, options.backfill_events,
                                 "backfill")
            if options.events is not None:
                stats.target = stats.generated + options.events
            elif options.duration_ms is not None:
                stats.target = stats.generated + round(options.rate * options.duration_ms / 1000)
            await live(options.events, options.duration_ms)
        await settle(0)
    except KafkaError as exc:
        raise SimulationError(
            f"Kafka at {settings.kafka_bootstrap_servers} failed after {stats.delivered} acknowledged events: {exc}"
        ) from None
    finally:
        stats.finished = time.monotonic()
        for future, _ in pending:
            future.cancel()
        with contextlib.suppress(Exception):
            await producer.stop()
    report(force=True)
    return stats


def progress_bar(stats_target: int | None, description: str = "simulate"):  # type: ignore[no-untyped-def]
    """A rich progress bar on stderr and the callback that updates (and first starts) it: ``(bar, callback)``."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskProgressColumn, TimeElapsedColumn
    from rich.text import Text

    class SendRate(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(f"{int(task.completed):,} events  {task.fields.get('rate', 0.0):,.0f} events/s  "
                        f"{task.fields.get('phase', '')}", style="progress.data.speed")

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        TaskProgressColumn(),
        SendRate(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    task = bar.add_task(description, total=stats_target, rate=0.0, phase="")
    recent: deque[tuple[float, int]] = deque(maxlen=30)

    def update(stats: SimulationStats) -> None:
        if not bar.live.is_started:
            bar.start()  # on the first report: a run that fails at once draws no bar
        now = time.monotonic()
        recent.append((now, stats.delivered))
        then, before = recent[0]
        rate = (stats.delivered - before) / (now - then) if now - then > 0.5 else stats.rate
        bar.update(task, completed=stats.delivered, total=stats.target, rate=rate, phase=stats.phase)

    return bar, update
