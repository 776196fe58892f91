"""The whole incremental computation in one process: gate, dedupe, clock, customers, stores.

The streaming pipeline splits the same steps over Kafka partitions (gate by
store, facts by customer, aggregation by store); this class chains them in
memory. It is what the property tests compare with the batch reference, and
what a single-process replay or benchmark check can use.

Order of the steps for each arriving event, and why:

1. currency gate: a store's currency is that of its first money event to
   arrive; a money event in another currency is rejected (``currency_mismatch``);
   channel cap: a store keeps the first ``max_channels`` (100, SPEC 3) distinct
   channels to arrive on the events the currency gate let through, duplicates
   included (the worker's gate comes before its deduplication); a later new
   channel is rewritten to ``other``, as is ``other`` itself, which takes no slot;
2. dedupe: an event id already accepted for the same (store, customer) is a
   duplicate (``duplicate``);
3. clock: an event later than "now" waits (``pending``) until the clock passes
   it, so that the numbers as of T are exactly those of the events at or before T;
4. apply: the customer's facts change and the difference of its contributions,
   plus the event's own histogram deltas, go to its store and to ``*``.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Collection, MutableMapping

from metrics import events as ev
from metrics.catalog import ALL_STORES
from metrics.customer import CustomerFacts, diff, event_deltas, families_of
from metrics.store import StoreAggregate
from metrics.timegrid import Grid

ACCEPTED = "accepted"
DUPLICATE = "duplicate"
PENDING = "pending"
CURRENCY_MISMATCH = "currency_mismatch"

EVENT_CLOCK = "event"
WALL_CLOCK = "wall"

#: the pseudo customer under which spend events are deduplicated
SPEND_CUSTOMER = ""


def customer_key(event: ev.Event) -> tuple[str, str]:
    """The (store, customer) an event belongs to; spend belongs to its store.

    >>> customer_key(ev.Event("e", "spend.recorded", 0, "s1", "c9"))
    ('s1', '')
    """
    if event.type == ev.SPEND_RECORDED or event.customer_id is None:
        return event.store_id, SPEND_CUSTOMER
    return event.store_id, event.customer_id


class CurrencyGate:
    """A store's currency is the currency of its first money event; others are rejected.

    >>> gate = CurrencyGate()
    >>> gate.admit("s", "EUR"), gate.admit("s", "USD"), gate.admit("s", "EUR")
    (True, False, True)
    """

    __slots__ = ("currencies",)

    def __init__(self, currencies: MutableMapping[str, str] | None = None) -> None:
        #: store -> currency; any mapping (the pipeline passes its table)
        self.currencies: MutableMapping[str, str] = {} if currencies is None else currencies

    def admit(self, store_id: str, currency: str | None) -> bool:
        """Whether a money event of this currency is admitted for the store."""
        if currency is None:
            return True
        known = self.currencies.get(store_id)
        if known is None:
            self.currencies[store_id] = currency
            return True
        return known == currency

    def common_currency(self) -> tuple[bool, str | None]:
        """(all stores share one currency, that currency or ``None``)."""
        distinct = set(self.currencies.values())
        if len(distinct) > 1:
            return False, None
        return True, next(iter(distinct), None)


class ChannelCap:
    """A store keeps its first ``limit`` distinct channels, by arrival; later new ones count as ``other``.

    ``admit`` returns the channel to count the event under: the channel itself
    when the store knows it or has a free slot (it then takes it), else
    :data:`~metrics.events.OTHER_CHANNEL`. ``other`` sent by a producer is the
    overflow bucket itself and takes no slot; no channel stays no channel.

    >>> cap = ChannelCap(limit=2)
    >>> [cap.admit("s", c) for c in ("a", "other", "b", "c", "a", None)]
    ['a', 'other', 'b', 'other', 'a', None]
    >>> cap.admit("t", "c"), cap.channels
    ('c', {'s': ['a', 'b'], 't': ['c']})
    """

    __slots__ = ("channels", "limit")

    def __init__(
        self, channels: MutableMapping[str, list[str]] | None = None, limit: int = ev.MAX_STORE_CHANNELS
    ) -> None:
        #: store -> its named channels in arrival order; any mapping (the pipeline passes a table view)
        self.channels: MutableMapping[str, list[str]] = {} if channels is None else channels
        self.limit = limit

    def admit(self, store_id: str, channel: str | None) -> str | None:
        """The channel an event of the store with ``channel`` counts under (a new one takes a free slot)."""
        known = self.channels.get(store_id)
        decided, counted = channel_decided(known, channel, self.limit)
        if decided or channel is None:  # (no channel is always decided)
            return counted
        self.channels[store_id] = [*(known or ()), channel]  # a new named channel with a free slot
        return channel


def channel_decided(known: Collection[str] | None, channel: str | None, limit: int) -> tuple[bool, str | None]:
    """(whether a store knowing channels ``known`` counts ``channel`` without taking a slot, the channel counted).

    The one rule of the channel cap: no channel and ``other`` count as they are, a known channel
    as itself, a new one as ``other`` when the ``limit`` slots are taken. Not decided: a new
    channel with a free slot, which :meth:`ChannelCap.admit` gives it. ``known`` is ``None`` for a
    store with no channel yet.

    >>> [channel_decided(["web"], c, 2) for c in ("web", None, "app")]
    [(True, 'web'), (True, None), (False, None)]
    >>> channel_decided(["web", "app"], "mail", 2), channel_decided(None, "mail", 0)
    ((True, 'other'), (True, 'other'))
    """
    if channel is None or channel == ev.OTHER_CHANNEL:
        return True, channel
    if known is not None and channel in known:
        return True, channel
    if len(known or ()) >= limit:
        return True, ev.OTHER_CHANNEL
    return False, None


class LoyaltyEngine:
    """Incremental loyalty metrics for many stores, as of a monotone clock.

    >>> from metrics.timegrid import DAY_MS
    >>> engine = LoyaltyEngine(Grid(60_000, 90 * DAY_MS, (DAY_MS,)))
    >>> engine.ingest(ev.Event("e1", "customer.signed_up", 1_000, "s", "c"))
    'accepted'
    >>> engine.snapshot("s", DAY_MS)["customers_end"]
    1
    """

    def __init__(self, grid: Grid, clock: str = EVENT_CLOCK, max_channels: int = ev.MAX_STORE_CHANNELS) -> None:
        self.grid = grid
        self.clock_mode = clock
        self.now_ms: int | None = None
        self.gate = CurrencyGate()
        self.channels = ChannelCap(limit=max_channels)
        self.customers: dict[tuple[str, str], CustomerFacts] = {}
        self.stores: dict[str, StoreAggregate] = {}
        self.all_stores = StoreAggregate()
        self._pending: list[tuple[int, int, ev.Event]] = []
        self._pending_seq = 0
        self._folded_at: int | None = None

    # -- input ---------------------------------------------------------------

    def ingest(self, event: ev.Event) -> str:
        """Take one valid event in arrival order; returns what happened to it."""
        if event.type in ev.MONEY_TYPES and not self.gate.admit(event.store_id, event.currency):
            return CURRENCY_MISMATCH
        if event.channel is not None:
            channel = self.channels.admit(event.store_id, event.channel)
            if channel != event.channel:
                event = dataclasses.replace(event, channel=channel)
        key = customer_key(event)
        facts = self.customers.get(key)
        if facts is None:
            facts = self.customers[key] = CustomerFacts()
        elif facts.is_duplicate(event.event_id):
            return DUPLICATE
        if self.clock_mode == EVENT_CLOCK:
            self.advance(event.occurred_at_ms)
        facts.remember(event.event_id, self.now_ms if self.now_ms is not None else event.occurred_at_ms)
        if self.now_ms is None or event.occurred_at_ms > self.now_ms:
            heapq.heappush(self._pending, (event.occurred_at_ms, self._pending_seq, event))
            self._pending_seq += 1
            return PENDING
        self._apply(key, facts, event)
        return ACCEPTED

    def advance(self, now_ms: int) -> None:
        """Move the clock forward to ``now_ms`` (never back) and apply events it reached."""
        if self.now_ms is not None and now_ms <= self.now_ms:
            return
        self.now_ms = now_ms
        pending = self._pending
        while pending and pending[0][0] <= now_ms:
            _, _, event = heapq.heappop(pending)
            key = customer_key(event)
            self._apply(key, self.customers[key], event)
        self._fold(self.grid.bucket(now_ms))

    # -- state changes -------------------------------------------------------

    def _apply(self, key: tuple[str, str], facts: CustomerFacts, event: ev.Event) -> None:
        grid = self.grid
        assert self.now_ms is not None
        now_bucket = grid.bucket(self.now_ms)
        horizon_start = now_bucket - grid.fact_retention
        facts.prune(grid, horizon_start, self.now_ms - grid.dedupe_ttl_ms)
        facts.remember(event.event_id, self.now_ms)
        families = families_of(event.type, event.survey)
        bucket = grid.bucket(event.occurred_at_ms)
        # nothing below the event's bucket can change: both sides are clipped there
        before = facts.contributions(grid, families, since=bucket) if families else {}
        facts.apply(event, grid, horizon_start)
        store = self.stores.get(event.store_id)
        if store is None:
            store = self.stores[event.store_id] = StoreAggregate()
        changes = event_deltas(event, bucket)
        if families:
            after = facts.contributions(grid, families, since=bucket)
            changes.extend(
                (series, b, delta) for series, buckets in diff(after, before).items() for b, delta in buckets.items()
            )
        store.add_all(changes)
        self.all_stores.add_all(changes)

    def _fold(self, now_bucket: int) -> None:
        # every later snapshot reads as of now_bucket or later: fold what none of them reads
        if self._folded_at is not None and now_bucket <= self._folded_at:
            return
        self._folded_at = now_bucket
        longest, cohort_reach = self.grid.longest, self.grid.cohort_reach
        for store in self.stores.values():
            store.fold_read(now_bucket, longest, cohort_reach)
        self.all_stores.fold_read(now_bucket, longest, cohort_reach)

    # -- output --------------------------------------------------------------

    def store_ids(self) -> list[str]:
        """Stores with at least one applied event, then ``*``."""
        return [*sorted(self.stores), ALL_STORES]

    def currency(self, store_id: str) -> str | None:
        """The store's currency (``*``: the common one), ``None`` when unknown or mixed."""
        if store_id == ALL_STORES:
            return self.gate.common_currency()[1]
        return self.gate.currencies.get(store_id)

    def snapshot(self, store_id: str, window_ms: int) -> dict[str, object]:
        """Every metric of a store (or ``*``) and window as of the clock."""
        if self.now_ms is None:
            raise ValueError("the clock has not started: no event and no advance() yet")
        grid = self.grid
        window = grid.windows[grid.windows_ms.index(window_ms)]
        if store_id == ALL_STORES:
            aggregate = self.all_stores
            monetary = self.gate.common_currency()[0]
        else:
            aggregate = self.stores.get(store_id) or StoreAggregate()
            monetary = True
        return aggregate.metrics(grid, window, grid.bucket(self.now_ms), monetary)

    def cohorts(self, store_id: str) -> dict[str, object]:
        """The cohort matrix of a store (or ``*``) as of the clock (see :meth:`StoreAggregate.cohorts`)."""
        if self.now_ms is None:
            raise ValueError("the clock has not started: no event and no advance() yet")
        aggregate = self.all_stores if store_id == ALL_STORES else self.stores.get(store_id) or StoreAggregate()
        return aggregate.cohorts(self.grid, self.grid.bucket(self.now_ms))
