"""Stage 3, the facts (by store and customer): dedupe, update facts, emit contribution differences as deltas.

The deltas of an input message go to the aggregation partitions of their stores and of ``*``
(:func:`delta_messages`), each message part stamped with its source so that the aggregation
applies it at most once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from metrics import events as ev
from metrics.catalog import ALL_STORES
from metrics.customer import CustomerFacts, Deltas, add_delta, event_deltas, families_of
from metrics.engine import customer_key
from metrics.intervals import PLUS_INFINITY
from metrics.timegrid import Grid
from streams.worker.wire import customer_route_key, event_from_list, route


@dataclass
class CustomerOutput:
    """Deltas by store from one input message, facts to store, and the message's latest event time."""

    deltas: dict[str, Deltas] = field(default_factory=dict)
    currencies: dict[str, str] = field(default_factory=dict)
    facts: dict[str, CustomerFacts] = field(default_factory=dict)
    max_time_ms: int | None = None
    applied: int = 0
    duplicates: int = 0


class CustomerStage:
    """Per (store, customer): dedupe, update facts, emit contribution differences.

    With ``cache_size`` > 0 it keeps the facts of the most recently used
    customers in memory between batches, so their next event skips the table
    read and decode. The table stays the truth; call :meth:`forget` whenever it
    may have changed under us (a rebalance).
    """

    def __init__(self, grid: Grid, cache_size: int = 0) -> None:
        self.grid = grid
        self.cache_size = cache_size
        self._recent: OrderedDict[str, CustomerFacts] = OrderedDict()

    def forget(self) -> None:
        """Drop every customer kept in memory."""
        self._recent.clear()

    def _recall(
        self,
        key: str,
        batch_facts: dict[str, CustomerFacts],
        load: Callable[[str], CustomerFacts | None],
        horizon_start: int,
        seen_after: int,
    ) -> CustomerFacts:
        loaded = batch_facts.get(key)
        if loaded is not None:
            # an earlier message of the same batch has it: its object is ahead of the table
            return self._keep(key, loaded)
        kept = self._recent.get(key)
        if kept is not None:
            self._recent.move_to_end(key)
            # pruned exactly as a reload would be: a batch replayed after a crash must compute the
            # very same deltas, or the aggregation's skip-by-part would mix two versions
            kept.prune(self.grid, horizon_start, seen_after)
            return kept
        facts = load(key) or CustomerFacts()
        facts.prune(self.grid, horizon_start, seen_after)
        return self._keep(key, facts)

    def _keep(self, key: str, facts: CustomerFacts) -> CustomerFacts:
        if self.cache_size > 0:
            self._recent[key] = facts
            self._recent.move_to_end(key)
            while len(self._recent) > self.cache_size:
                self._recent.popitem(last=False)
        return facts

    def process(
        self,
        events: Iterable[list[Any]],
        load: Callable[[str], CustomerFacts | None],
        now_ms: int,
        out: CustomerOutput,
        seen_at_ms: int,
    ) -> None:
        """Apply packed events; facts are read with ``load`` (or from ``out.facts``) and left in ``out.facts``.

        Several calls of one batch share ``out.facts``: a customer already in it is taken from
        there (the table is written once, after the batch), whatever the memory cache dropped.

        ``now_ms`` is the metric clock; ``seen_at_ms`` (wall time) stamps event
        ids for deduplication, which lasts ``LOYALTY_DEDUPE_TTL`` after that.
        """
        grid = self.grid
        horizon_start = grid.bucket(now_ms) - grid.fact_retention
        seen_after = seen_at_ms - grid.dedupe_ttl_ms
        # the events of each customer, in arrival order: a customer's contributions are computed
        # once before and once after all of them, clipped at their earliest bucket; the
        # differences of consecutive events telescope, and clipping below an event's bucket
        # changes no difference (see CustomerFacts.contributions)
        by_customer: dict[str, list[ev.Event]] = {}
        for fields in events:
            event = event_from_list(fields)
            store_id, customer_id = customer_key(event)
            key = customer_route_key(store_id, customer_id)
            queued = by_customer.get(key)
            if queued is None:
                by_customer[key] = [event]
            else:
                queued.append(event)
        for key, customer_events in by_customer.items():
            facts = self._recall(key, out.facts, load, horizon_start, seen_after)
            out.facts[key] = facts
            store_id = customer_events[0].store_id
            families = 0
            since = PLUS_INFINITY
            for event in customer_events:
                families |= families_of(event.type)
                since = min(since, grid.bucket(event.occurred_at_ms))
            store = out.deltas.get(store_id)
            if store is None:
                store = out.deltas[store_id] = {}
            if families:
                # after minus before, added straight into the message's deltas (zeros are dropped
                # on sending)
                facts.contributions(grid, families, since, out=store, sign=-1)
            for event in customer_events:
                if facts.is_duplicate(event.event_id):
                    out.duplicates += 1
                    continue
                facts.remember(event.event_id, seen_at_ms)
                facts.apply(event, grid, horizon_start)
                for series, delta_bucket, delta in event_deltas(event, grid.bucket(event.occurred_at_ms)):
                    add_delta(store, series, delta_bucket, delta)
                if event.currency is not None:
                    out.currencies[store_id] = event.currency
                if out.max_time_ms is None or event.occurred_at_ms > out.max_time_ms:
                    out.max_time_ms = event.occurred_at_ms
                out.applied += 1
            if families:
                facts.contributions(grid, families, since, out=store, sign=1)


#: at most this many delta rows in one message part (well under the message size limit)
MAX_DELTA_ROWS = 20_000


def delta_messages(
    output: CustomerOutput, source: tuple[int, int], partitions: int
) -> dict[int, list[dict[str, Any]]]:
    """Deltas of one input message as message parts per aggregation partition, ``*`` included.

    Each part carries ``src`` = (input partition, offset, part number) so that
    the aggregation applies it at most once per bucket record, whatever gets
    replayed; parts of a message go to one partition in order.
    """
    # rows travel grouped by series, ``[series, [bucket, delta, bucket, delta, ...], series, ...]``:
    # one list per series, and the aggregation looks each series up once, not once per row
    scopes: list[tuple[str, list[Any]]] = []
    for store_id, deltas in output.deltas.items():
        groups: list[Any] = []
        for series, buckets in deltas.items():
            pairs = [item for bucket, delta in buckets.items() if delta for item in (bucket, delta)]
            if pairs:
                groups.append(series)
                groups.append(pairs)
        scopes.append((store_id, groups))
    if scopes:
        # ``*`` gets every store's groups as they are: its aggregate adds them up, which costs less
        # than merging them here
        scopes.append((ALL_STORES, [item for _, groups in scopes for item in groups]))
    entries_by_partition: dict[int, list[tuple[str, list[Any], dict[str, str] | None]]] = {}
    for store_id, groups in scopes:
        if store_id == ALL_STORES:
            currencies: dict[str, str] | None = dict(output.currencies)
        elif store_id in output.currencies:
            currencies = {store_id: output.currencies[store_id]}
        else:
            currencies = None
        entries_by_partition.setdefault(route(store_id, partitions), []).append((store_id, groups, currencies))
    messages: dict[int, list[dict[str, Any]]] = {}
    for partition, entries in entries_by_partition.items():
        parts = _Parts(source, output.max_time_ms)
        for store_id, groups, currencies in entries:
            # every store gets an entry, rows or not: it carries the currency and marks the shard
            grouped = parts.entry(store_id, currencies)
            for index in range(0, len(groups), 2):
                series, pairs = groups[index], groups[index + 1]
                start = 0
                while start < len(pairs):
                    if parts.room == 0:
                        grouped = parts.entry(store_id, currencies)
                    taken = pairs[start:start + 2 * parts.room]
                    grouped.append(series)
                    grouped.append(taken)
                    parts.room -= len(taken) // 2
                    start += len(taken)
        messages[partition] = parts.parts
    return messages


class _Parts:
    """The delta message parts bound for one partition, each of at most ``MAX_DELTA_ROWS`` rows."""

    def __init__(self, source: tuple[int, int], max_time_ms: int | None) -> None:
        self.source = source
        self.max_time_ms = max_time_ms
        self.parts: list[dict[str, Any]] = []
        #: rows the last part can still take
        self.room = 0

    def entry(self, store_id: str, currencies: dict[str, str] | None) -> list[Any]:
        """The grouped rows of the store in the last part (a new part when it is full)."""
        if self.room == 0:
            src = [self.source[0], self.source[1], len(self.parts)]
            self.parts.append({"src": src, "t": self.max_time_ms, "stores": {}})
            self.room = MAX_DELTA_ROWS
        entry = self.parts[-1]["stores"].setdefault(store_id, {"g": []})
        if currencies:
            entry["cur"] = currencies
        grouped: list[Any] = entry["g"]
        return grouped
