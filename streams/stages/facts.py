"""Stage 3, the facts (by store and customer): dedupe, update facts, emit contribution differences as deltas.

The deltas of an input message go to the aggregation partitions of their stores and of ``*``
(:func:`delta_messages`), each message part stamped with its source so that the aggregation
applies it at most once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from metrics import events as ev
from metrics.customer import (
    CustomerFacts,
    DeltaTarget,
    grouped_rows,
    new_deltas,
)
from metrics.engine import customer_key
from metrics.timegrid import Grid
from streams.stages.routed import DeltaParts
from streams.worker.wire import customer_route_key, event_from_list, route

#: a customer whose whole record would be larger than this is stored paged (see
#: CustomerFacts.paged_records): a head record and pages, each far below Kafka's message limit
INLINE_BYTES = 64 * 1024
#: a paged customer holding fewer entries than this (after pruning) is stored whole again
UNPAGE_ENTRIES = 256
#: separates a customer's key from a page name in the page's table key (a customer key is JSON,
#: which escapes control characters, so it never contains one)
PAGE_SEPARATOR = "\x00"


def page_key(key: str, stored: str) -> str:
    """The table key of a customer's stored page (routed like the customer: see ``routing_key``).

    >>> page_key('["s","c"]', "b3.1").split(PAGE_SEPARATOR)
    ['["s","c"]', 'b3.1']
    """
    return key + PAGE_SEPARATOR + stored


def routing_key(table_key: str) -> str:
    """The customer key a table key belongs to: a page lives in its customer's partition.

    >>> routing_key(page_key('["s","c"]', "s0.2")), routing_key('["s","c"]')
    ('["s","c"]', '["s","c"]')
    """
    return table_key.split(PAGE_SEPARATOR, 1)[0]


def whole_record(facts: CustomerFacts, inline_bytes: int = INLINE_BYTES) -> bytes | None:
    """The one record of an unpaged customer, or ``None`` when it is longer than ``inline_bytes`` (it is paged then).

    >>> facts = CustomerFacts(); facts.order_count = 1
    >>> whole_record(facts) == orjson.dumps(facts.to_record()), whole_record(facts, inline_bytes=10)
    (True, None)
    """
    value = orjson.dumps(facts.to_record())
    return value if len(value) <= inline_bytes else None


def customer_records(
    key: str, facts: CustomerFacts, grid: Grid, inline_bytes: int = INLINE_BYTES, unpage_entries: int = UNPAGE_ENTRIES
) -> dict[bytes, bytes | None]:
    """The table writes that store a customer's facts, in order (``None``: delete the key).

    Small facts are one record. Larger ones are paged: the changed pages first,
    under new versions, then the head that names them, then deletes of the
    versions it replaced, so a crash anywhere leaves a head whose pages all exist.
    """
    if facts.paging is None:
        value = whole_record(facts, inline_bytes)
        if value is not None:
            return {key.encode(): value}
        head, pages = facts.paged_records(grid)
    elif facts.entry_count() < unpage_entries:
        head, pages = facts.unpaged_records()
    else:
        head, pages = facts.paged_records(grid)
    writes: dict[bytes, bytes | None] = {
        page_key(key, stored).encode(): orjson.dumps(content)
        for stored, content in pages.items() if content is not None
    }
    writes[key.encode()] = orjson.dumps(head)
    for stored, content in pages.items():
        if content is None:
            writes[page_key(key, stored).encode()] = None
    return writes


def apply_records(table: MutableMapping[bytes, bytes], writes: dict[bytes, bytes | None]) -> None:
    """Apply :func:`customer_records`'s writes, in order, to an in-memory table (``None``: delete).

    >>> table = {b"a": b"1"}; apply_records(table, {b"b": b"2", b"a": None}); table
    {b'b': b'2'}
    """
    for key, value in writes.items():
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value


def load_customer(key: str, get: Callable[[bytes], bytes | None]) -> CustomerFacts | None:
    """A customer's facts from the table (``None``: a new customer); raises ``MissingPageError``
    when a page its head names is missing."""
    return decode_customer(key, get(key.encode()), get)


def _no_pages(stored_key: bytes) -> bytes | None:
    # a customer encoded within the batch is stored whole: it names no page
    return None


def decode_customer(key: str, value: bytes | None, get: Callable[[bytes], bytes | None]) -> CustomerFacts | None:
    """A customer's facts from its record ``value`` read from the table (``None``: a new customer);
    the pages a paged customer's head names are read with ``get``."""
    if value is None:
        return None

    def page(stored: str) -> Any:
        raw = get(page_key(key, stored).encode())
        return None if raw is None else orjson.loads(raw)

    return CustomerFacts.from_record(orjson.loads(value), page)


#: a customer holding fewer bucketed entries and remembered ids than this (and stored whole) is
#: encoded as soon as its events are applied, and its objects freed (see ``CustomerStage``)
SMALL_ENTRIES = 64


class BatchCustomers:
    """The customers a batch changed, as the table will store them.

    Small customers are encoded as soon as their events are applied (``encoded``: their table
    writes); larger ones are kept as objects (``kept``) and encoded when the batch is written,
    by :meth:`CustomerStage.table_writes`. A customer is in one of the two, never in both.
    """

    def __init__(self) -> None:
        #: customer key -> record of the small customers
        self.encoded: dict[str, bytes] = {}
        #: customer key -> facts of the larger ones
        self.kept: dict[str, CustomerFacts] = {}

    def __len__(self) -> int:
        return len(self.encoded) + len(self.kept)


@dataclass
class CustomerOutput:
    """Deltas by store from one input message, the batch's customers, and the message's latest event time."""

    deltas: dict[str, DeltaTarget] = field(default_factory=dict)
    currencies: dict[str, str] = field(default_factory=dict)
    #: shared by the messages of a batch (see CustomerStage.process)
    customers: BatchCustomers = field(default_factory=BatchCustomers)
    max_time_ms: int | None = None
    applied: int = 0
    duplicates: int = 0


class CustomerStage:
    """Per (store, customer): dedupe, update facts, emit contribution differences.

    A small customer (stored whole, fewer than :data:`SMALL_ENTRIES` entries: nearly all) is
    encoded right after its events are applied and its objects freed at once: encoding and
    freeing them while they are still in the CPU's caches costs a fraction of doing it later,
    and reading it again costs little. A larger customer is kept as objects until the batch is
    written and, with ``cache_size`` > 0, between batches (the most recently used), since
    decoding it again costs in proportion to its history. The table stays the truth; call
    :meth:`forget` whenever it may have changed under us (a rebalance).
    """

    def __init__(self, grid: Grid, cache_size: int = 0, inline_bytes: int = INLINE_BYTES,
                 unpage_entries: int = UNPAGE_ENTRIES) -> None:
        self.grid = grid
        self.cache_size = cache_size
        self.inline_bytes = inline_bytes
        self.unpage_entries = unpage_entries
        self._recent: OrderedDict[str, CustomerFacts] = OrderedDict()

    def forget(self) -> None:
        """Drop every customer kept in memory."""
        self._recent.clear()

    def table_writes(self, customers: BatchCustomers) -> dict[bytes, bytes | None]:
        """The table writes that store a batch's customers (see :func:`customer_records`), in order."""
        writes: dict[bytes, bytes | None] = {key.encode(): value for key, value in customers.encoded.items()}
        for key, facts in customers.kept.items():
            writes.update(customer_records(key, facts, self.grid, self.inline_bytes, self.unpage_entries))
        return writes

    def _recall(
        self,
        key: str,
        customers: BatchCustomers,
        records: dict[str, bytes | None],
        read: Callable[[bytes], bytes | None],
        horizon_start: int,
        seen_after: int,
    ) -> CustomerFacts:
        # the memory cache's order is kept by _store, which follows every recall
        kept = customers.kept.get(key)
        if kept is not None:
            # an earlier message of the same batch has it: its object is ahead of the table
            return kept
        kept = self._recent.get(key)
        if kept is not None:
            # pruned exactly as a reload would be: a batch replayed after a crash must compute the
            # very same deltas, or the aggregation's skip-by-part would mix two versions
            kept.prune(self.grid, horizon_start, seen_after)
            return kept
        encoded = customers.encoded.get(key)
        if encoded is not None:
            # an earlier message of the same batch changed it (a small customer is stored whole)
            facts = decode_customer(key, encoded, _no_pages)
        elif key in records:
            # read with the message's other customers, decoded only now that its events are applied,
            # and the record let go: its objects are made, used and freed while in the CPU's caches
            facts = decode_customer(key, records.pop(key), read)
        else:
            # not read with the message's customers (no read_many), or kept in memory then and
            # dropped since by another customer's _store: read alone
            facts = load_customer(key, read)
        facts = facts or CustomerFacts()
        facts.prune(self.grid, horizon_start, seen_after)
        return facts

    def _keep(self, key: str, facts: CustomerFacts) -> CustomerFacts:
        if self.cache_size > 0:
            self._recent[key] = facts
            self._recent.move_to_end(key)
            while len(self._recent) > self.cache_size:
                self._recent.popitem(last=False)
        return facts

    def _store(self, key: str, facts: CustomerFacts, customers: BatchCustomers) -> None:
        """Hold a customer's facts for the batch's write: encoded now when small, else as objects."""
        if facts.paging is None and facts.entry_count() < SMALL_ENTRIES:
            value = whole_record(facts, self.inline_bytes)
            if value is not None:
                customers.encoded[key] = value
                customers.kept.pop(key, None)
                self._recent.pop(key, None)
                return
        customers.encoded.pop(key, None)
        customers.kept[key] = self._keep(key, facts)

    def process(
        self,
        events: Iterable[list[Any]],
        read: Callable[[bytes], bytes | None],
        now_ms: int,
        out: CustomerOutput,
        seen_at_ms: int,
        read_many: Callable[[list[str]], dict[str, bytes | None]] | None = None,
    ) -> None:
        """Apply packed events; facts are read from the table with ``read`` (the value of one key,
        ``None`` when missing: see :func:`load_customer`), or taken from ``out.customers``, and left
        in ``out.customers``.

        Several calls of one batch share ``out.customers``: a customer already in it is taken from
        there (the table is written once, after the batch, with :meth:`table_writes`), whatever the
        memory cache dropped. With ``read_many``, the records of the customers to read from the
        table are read with it, all at once (``None``: a new customer), and each is decoded right
        before its events are applied (a paged customer's pages read with ``read``). Decoded all
        first, every customer's objects would be held until the end: made, used and freed out of
        the CPU's caches, which costs much more.

        ``now_ms`` is the metric clock; ``seen_at_ms`` (wall time) stamps event
        ids for deduplication, which lasts ``LOYALTY_DEDUPE_TTL`` after that.
        """
        grid = self.grid
        horizon_start = grid.bucket(now_ms) - grid.fact_retention
        seen_after = seen_at_ms - grid.dedupe_ttl_ms
        # the events of each customer, in arrival order, applied together by
        # CustomerFacts.apply_events (its contributions computed once before and once after them)
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
        customers = out.customers
        records: dict[str, bytes | None] = {}
        if read_many is not None:
            recent = self._recent
            unread = [key for key in by_customer
                      if key not in customers.kept and key not in recent and key not in customers.encoded]
            if unread:
                records = read_many(unread)
        for key, customer_events in by_customer.items():
            facts = self._recall(key, customers, records, read, horizon_start, seen_after)
            store_id = customer_events[0].store_id
            store = out.deltas.get(store_id)
            if store is None:
                store = out.deltas[store_id] = new_deltas()
            # after minus before, added straight into the message's deltas (zeros are dropped on sending)
            applied, duplicates, latest_ms, currency = facts.apply_events(
                customer_events, grid, horizon_start, seen_at_ms, store)
            self._store(key, facts, customers)
            out.applied += applied
            out.duplicates += duplicates
            if currency is not None:
                out.currencies[store_id] = currency
            if latest_ms is not None and (out.max_time_ms is None or latest_ms > out.max_time_ms):
                out.max_time_ms = latest_ms


def delta_messages(
    output: CustomerOutput, source: tuple[int, int], partitions: int
) -> dict[int, list[dict[str, Any]]]:
    """Deltas of one input message as message parts per aggregation partition (of their stores).

    Each part carries ``src`` = (input partition, offset, part number) so that
    the aggregation applies it at most once per bucket record, whatever gets
    replayed; parts of a message go to one partition in order. ``*`` gets no
    part here: the aggregation forwards each deltas message's sum to it
    (:func:`streams.stages.aggregate.star_parts`), so no partition carries every
    store's rows.
    """
    # rows travel grouped by series, ``[series, [bucket, delta, bucket, delta, ...], series, ...]``:
    # one list per series, and the aggregation looks each series up once, not once per row
    scopes = [(store_id, grouped_rows(deltas)) for store_id, deltas in output.deltas.items()]
    entries_by_partition: dict[int, list[tuple[str, list[Any], dict[str, str] | None]]] = {}
    for store_id, groups in scopes:
        currencies = {store_id: output.currencies[store_id]} if store_id in output.currencies else None
        entries_by_partition.setdefault(route(store_id, partitions), []).append((store_id, groups, currencies))
    messages: dict[int, list[dict[str, Any]]] = {}
    for partition, entries in entries_by_partition.items():
        parts = DeltaParts(source, output.max_time_ms)
        for store_id, groups, currencies in entries:
            parts.add(store_id, groups, currencies)
        messages[partition] = parts.parts
    return messages
