"""The four processing stages without Faust: decoded input and state in, messages and state out.

1. :class:`IngestStage` (input topics, any key): validation, dead letters,
   events routed by store.
2. :class:`GateStage` (by store): the store's currency gate and, with the wall
   clock, events from the near future held until "now" reaches them.
3. :class:`CustomerStage` (by store and customer): deduplication, customer
   facts, and the difference of the customer's contributions as deltas routed
   by store, also to ``*``.
4. :class:`StoreShard` (by store): folds the deltas, each message part at
   most once, and reads the metrics.

Keeping them free of Faust keeps ``streams/pipeline.py`` thin and lets the
tests drive every stage directly.
"""

from __future__ import annotations

import base64
from collections import OrderedDict
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from metrics import events as ev
from metrics.catalog import ALL_STORES
from metrics.customer import CustomerFacts, Deltas, add_delta, event_deltas, families_of
from metrics.engine import CurrencyGate, customer_key
from metrics.intervals import PLUS_INFINITY
from metrics.store import StoreAggregate
from metrics.timegrid import Grid
from metrics.validation import Rejection, parse_message
from streams.wire import customer_route_key, event_from_list, event_to_list, route

DEAD_LETTER_SCHEMA = "loyalty.dead_letter.v1"
#: reasons added by the stages to those of :mod:`metrics.validation`
RESERVED_STORE_ID = "reserved_store_id"
CURRENCY_MISMATCH = "currency_mismatch"


def dead_letter(
    reason: str,
    detail: str,
    raw: bytes,
    source: tuple[str, int, int],
    index: int | None,
    now_ms: int,
) -> dict[str, Any]:
    """The dead-letter record of SPEC section 3 (original bytes in base64)."""
    topic, partition, offset = source
    return {
        "schema": DEAD_LETTER_SCHEMA,
        "reason": reason,
        "detail": detail,
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "index": index,
        "raw_base64": base64.b64encode(raw).decode(),
        "rejected_at_ms": now_ms,
    }


@dataclass
class Routed:
    """What a stage sends on: packed items by destination partition, and dead letters."""

    by_partition: dict[int, list[Any]] = field(default_factory=dict)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    accepted: int = 0

    def add(self, partition: int, item: Any) -> None:
        """Queue one item for a partition."""
        bucket = self.by_partition.get(partition)
        if bucket is None:
            self.by_partition[partition] = [item]
        else:
            bucket.append(item)


class IngestStage:
    """Validate one input message; route its events by store."""

    def __init__(self, partitions: int, max_future_skew_ms: int) -> None:
        self.partitions = partitions
        self.max_future_skew_ms = max_future_skew_ms

    def process(self, topic: str, source: tuple[str, int, int], value: bytes | None, now_ms: int, out: Routed) -> None:
        """Add the message's events to ``out`` (``topic`` is the unprefixed input topic name).

        Each routed item is ``[event, origin]``: ``origin`` is ``[topic,
        partition, offset, index, raw text]`` for money events, so that the
        gate can still dead-letter them with their original text, else ``None``.
        """
        items = parse_message(value, topic, now_ms=now_ms, max_future_skew_ms=self.max_future_skew_ms)
        is_batch = len(items) > 1 or (bool(items) and _is_array(value))
        elements: list[Any] | None = None

        def original(index: int) -> bytes:
            # the message's bytes, or a batch element's JSON text; the batch is parsed once, on demand
            nonlocal elements
            if not is_batch:
                return value or b""
            if elements is None:
                elements = orjson.loads(value or b"[]")
            return orjson.dumps(elements[index])

        for index, item in enumerate(items):
            if isinstance(item, Rejection):
                out.dead_letters.append(dead_letter(item.reason, item.detail, item.raw, source, item.index, now_ms))
                continue
            if item.store_id == ALL_STORES:
                raw = original(index)
                detail = f"store_id {ALL_STORES!r} is reserved for all stores together"
                out.dead_letters.append(
                    dead_letter(RESERVED_STORE_ID, detail, raw, source, index if is_batch else None, now_ms)
                )
                continue
            origin = None
            if item.type in ev.MONEY_TYPES:
                raw = original(index)
                origin = [source[0], source[1], source[2], index if is_batch else None, raw.decode()]
            out.add(route(item.store_id, self.partitions), [event_to_list(item), origin])
            out.accepted += 1


def _is_array(value: bytes | None) -> bool:
    return bool(value) and value.lstrip()[:1] == b"["  # type: ignore[union-attr]




class GateStage:
    """Per store: currency gate, and (wall clock) holding events later than now."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions

    def process(
        self,
        items: Iterable[list[Any]],
        currencies: MutableMapping[str, str],
        now_ms: int | None,
        pending: list[list[Any]],
        out: Routed,
    ) -> None:
        """Admit ``items`` (``[event, origin]``) to ``out``, routed by customer.

        With ``now_ms`` (wall clock) events later than it go to ``pending``.
        """
        gate = CurrencyGate(currencies)
        for item in items:
            fields, origin = item
            event_type, store_id, currency = fields[1], fields[3], fields[7]
            if event_type in ev.MONEY_TYPES and not gate.admit(store_id, currency):
                topic, partition, offset, index, raw = origin
                detail = f"store {store_id!r} uses {currencies.get(store_id)}, not {currency}"
                out.dead_letters.append(
                    dead_letter(CURRENCY_MISMATCH, detail, raw.encode(), (topic, partition, offset), index, 0)
                )
                continue
            if now_ms is not None and fields[2] > now_ms:
                pending.append(item)
                continue
            customer = "" if event_type == ev.SPEND_RECORDED else fields[4]
            out.add(route(customer_route_key(store_id, customer), self.partitions), fields)
            out.accepted += 1

    def release(self, pending: list[list[Any]], now_ms: int, out: Routed) -> list[list[Any]]:
        """Forward the held events that ``now_ms`` reached; returns those still held."""
        keep = []
        for item in pending:
            fields = item[0]
            if fields[2] > now_ms:
                keep.append(item)
                continue
            customer = "" if fields[1] == ev.SPEND_RECORDED else fields[4]
            out.add(route(customer_route_key(fields[3], customer), self.partitions), fields)
            out.accepted += 1
        return keep


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


class StoreShard:
    """One store's (or ``*``'s) aggregate: a fold of the deltas topic, applied at most once per message part.

    The deltas topic is the shard's log: the shard keeps no table and writes
    nothing; a worker that gets a deltas partition rebuilds its shards by
    reading the partition from the start (``streams.topology``). ``hwm`` keeps,
    per source partition of the facts stage, the latest (offset, part) applied,
    so a part that the facts stage sent again after a crash, or that the agent
    reads again after the rebuild, is skipped: parts of one source partition
    arrive in order.
    """

    def __init__(self, store_id: str) -> None:
        self.store_id = store_id
        self.aggregate = StoreAggregate()
        #: source partition -> [offset, part] of the latest part applied
        self.hwm: dict[int, list[int]] = {}
        #: currencies by store (one for a store; all stores' for ``*``)
        self.currencies: dict[str, str] = {}
        #: the latest event time of the applied deltas
        self.latest_event_ms: int | None = None
        self.floor: int | None = None
        self.changed = True

    def apply(self, message_source: tuple[int, int, int], entry: dict[str, Any], max_time_ms: int | None) -> bool:
        """Apply one store entry of a delta message part, unless applied already; returns whether it was."""
        partition, position = message_source[0], [message_source[1], message_source[2]]
        seen = self.hwm.get(partition)
        if seen is not None and seen >= position:
            return False
        self.hwm[partition] = position
        groups = entry.get("g")
        if groups is not None:
            self.aggregate.add_groups(groups)
        elif "f" in entry:  # the flat rows of a deltas log written before the groups
            rows = iter(entry["f"])
            self.aggregate.add_all(zip(rows, rows, rows, strict=True))
        else:  # and the row lists of one written before the flat rows
            self.aggregate.add_all(entry["d"])
        for store_id, currency in (entry.get("cur") or {}).items():
            self.currencies[store_id] = currency
        if max_time_ms is not None and (self.latest_event_ms is None or max_time_ms > self.latest_event_ms):
            self.latest_event_ms = max_time_ms
        self.changed = True
        return True

    def fold(self, as_of_bucket: int, longest: int) -> None:
        """Fold what no read as of ``as_of_bucket`` or later needs into each series' base.

        Memory stays bounded, and the sums exact.
        """
        if self.floor is not None and as_of_bucket <= self.floor:
            return
        self.floor = as_of_bucket
        self.aggregate.fold_read(as_of_bucket, longest)

    def metrics(self, grid: Grid, window: int, as_of_bucket: int) -> dict[str, object]:
        """Every metric of the store for a window as of a bucket."""
        monetary = True
        if self.store_id == ALL_STORES:
            monetary = len(set(self.currencies.values())) <= 1
        return self.aggregate.metrics(grid, window, as_of_bucket, monetary)

    def currency(self) -> str | None:
        """The store's currency (``*``: the common one), ``None`` when unknown or mixed."""
        distinct = set(self.currencies.values())
        return next(iter(distinct)) if len(distinct) == 1 else None


def apply_part(shards: dict[str, StoreShard], part: dict[str, Any]) -> int:
    """Apply one delta message part to the shards of its stores (created on first use).

    Returns how many of its store entries were new (0: the part was applied before).
    """
    source = (part["src"][0], part["src"][1], part["src"][2])
    latest = part.get("t")
    applied = 0
    for store_id, entry in part["stores"].items():
        shard = shards.get(store_id)
        if shard is None:
            shard = shards[store_id] = StoreShard(store_id)
        applied += shard.apply(source, entry, latest)
    return applied
