"""Per-customer facts and the customer's contributions to store-level series.

A customer's facts (activity, closes, orders, revenue, membership, rewards,
first activity, lifetime order count) determine, for every bucket ``j``, whether
the customer is active, a purchaser, a member and so on. Each such status is a
set of buckets (see :mod:`metrics.intervals`); the customer contributes
``+w`` at each interval start and ``-w`` at each end of a *difference series*,
and the store aggregate reads "how many customers are X at bucket j" as a
prefix sum. When an event changes the facts, the customer emits only the
difference between its contributions after and before: no stage ever scans all
customers, and time passing needs no per-customer work at all.

Series (``n`` = a window in buckets; value at bucket j is the prefix sum):

==============  ================================================================
``A``           active at j (CE at K, CS at K - n)
``both:n``      active at j and at j - n (CS - churned)
``newact:n``    active at j with the first activity in j-n+1..j
``F``           histogram: first activity (window sum = new customers)
``Fch:c``       histogram: first activity of customers whose signup channel is c
``LM``          active member at j
``actmem:n``    active member with a reward issued or redeemed in j-n+1..j
``P:n``         purchaser: an order placed in j-n+1..j
``ret:n``       purchaser with a lifetime order count >= 2 by j
``life:n``      purchaser, weighted by lifespan (ms) from first to last order by j
``crev:n``      previous-period net revenue (micros) of customers without an order in W
``nrr:n``       net revenue in W of customers who ordered in the previous period
``segcs:g:n``   active at j - n, NPS segment ``g`` at j (``g``: ``p``, ``pa``, ``d``)
``segboth:g:n`` active at j and at j - n, NPS segment ``g`` at j
``segP:g:n``    purchaser, NPS segment ``g`` at j
``segret:g:n``  returning purchaser, NPS segment ``g`` at j
``segrev:g:n``  net revenue in j-n+1..j (micros), NPS segment ``g`` at j
``cmN``         histogram at the last bucket of month c: customers of cohort c
``ckN``         first activity in j's month up to j (the current cohort's size)
``cmA:c``       read at the last bucket e of a month of cohort c's periods: active at e
``cmO:c``       read at the last bucket e of a month of cohort c's periods: an order in e's month
``ckA:c``       active at j, of cohort c, during its periods (the current month's column, at K)
``ckO:c``       an order in j's month up to j, of cohort c (the same)
==============  ================================================================

A customer's cohort c is the calendar month (UTC, counted from January 1970) of the bucket of
its first activity; its periods are the months c .. c+11. The ``cm`` series give the cohort
matrix of the months before K's, the ``ck`` series its current month (read at K). The month-end
statuses come from a per-month summary that a customer keeps for the months its cohort reads
(:attr:`CustomerFacts.months`), so a late event of the past year still changes them.

A customer's NPS segment at j is the group of its latest NPS answer in a bucket
``<= j`` (by ``occurred_at``, then ``event_id``); customers without one are in
no ``seg`` series, and the store reads segment "none" as the total minus the three.

Per-event histograms (``orders``, ``gross``, ``refunds``, ``spend``, survey
tallies, rewards) come from :func:`event_deltas`.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable
from functools import cache, lru_cache
from itertools import accumulate, islice
from typing import Any, NamedTuple, Protocol, TypeVar

from metrics import events as ev
from metrics import native_function
from metrics.formulas import cli_points_sum, csat_satisfied, nps_group
from metrics.intervals import (
    MINUS_INFINITY,
    PLUS_INFINITY,
    Interval,
    Intervals,
    intersect,
    normalise,
    shift,
    spans,
)
from metrics.timegrid import Grid, month_start_ms

#: a contribution: series -> bucket -> delta (grouped by series: one lookup per series, not per
#: bucket, and no tuple key per entry, on the hot paths that build, subtract and apply them)
Deltas = dict[str, dict[int, int]]


class DeltaSink(Protocol):
    """Deltas kept outside Python dicts: :class:`metrics._blocks.DeltaAccumulator` (see :func:`new_deltas`)."""

    def add(self, series: str, bucket: int, delta: int) -> None: ...

    def add_deltas(self, deltas: Deltas) -> None: ...

    def rows(self) -> list[Any]: ...

    def as_dict(self) -> Deltas: ...


#: where contributions are added: a dict of dicts, or a native accumulator
DeltaTarget = Deltas | DeltaSink

#: families of series an event can change
ACTIVITY_FAMILY = 1
ORDER_FAMILY = 2
#: the NPS segment series alone (an NPS answer moves the customer between segments)
SEGMENT_FAMILY = 4

_FAMILIES = {
    ev.CUSTOMER_SIGNED_UP: ACTIVITY_FAMILY,
    ev.CUSTOMER_CLOSED: ACTIVITY_FAMILY,
    ev.ORDER_PLACED: ACTIVITY_FAMILY | ORDER_FAMILY,
    ev.ORDER_REFUNDED: ORDER_FAMILY,
    ev.LOYALTY_ENROLLED: ACTIVITY_FAMILY,
    ev.LOYALTY_LEFT: ACTIVITY_FAMILY,
    ev.REWARD_ISSUED: ACTIVITY_FAMILY,
    ev.REWARD_REDEEMED: ACTIVITY_FAMILY,
}

_NPS_SERIES = ("nps_d", "nps_pa", "nps_p")
#: NPS segment codes in series names, by :func:`metrics.formulas.nps_group` (0 detractor, 1 passive, 2 promoter)
SEGMENT_CODES = ("d", "pa", "p")

#: the NPS answers of every customer without one kept (never mutated: replaced at the first answer)
_NO_ANSWERS: list[tuple[int, str, int]] = []
#: months since the cohort's month in the cohort matrix (periods 0 .. COHORT_PERIODS - 1)
COHORT_PERIODS = 12
#: a customer keeps its month summary this many months before the clock's month (the oldest
#: cohort of the matrix is COHORT_PERIODS - 1 months back; one more of slack for stages' clocks)
COHORT_MONTHS_KEPT = COHORT_PERIODS + 1
#: a month summary: (latest activity, latest close, first order) times in the month, absent as
#: MINUS_INFINITY, MINUS_INFINITY and PLUS_INFINITY
MonthSummary = tuple[int, int, int]
_EMPTY_MONTH: MonthSummary = (MINUS_INFINITY, MINUS_INFINITY, PLUS_INFINITY)
#: the month summaries of every customer without one (never mutated: replaced at the first)
_NO_MONTHS: dict[int, MonthSummary] = {}
#: what :meth:`CustomerFacts._summarise` folds in
_ACTIVITY, _ORDER, _CLOSE = 0, 1, 2


def _months_floor(grid: Grid, horizon_start: int) -> int:
    """The oldest month a customer keeps a summary of, with ``horizon_start`` = K - fact_retention."""
    return grid.month_of_bucket(horizon_start + grid.fact_retention) - COHORT_MONTHS_KEPT


def _month_record(summary: MonthSummary) -> list[int | None]:
    activity, close, first_order = summary
    return [None if activity == MINUS_INFINITY else activity, None if close == MINUS_INFINITY else close,
            None if first_order == PLUS_INFINITY else first_order]


def _month_summary(entry: list[Any]) -> MonthSummary:
    """The summary of a ``[month, activity, close, first order]`` record entry (``None``: absent)."""
    return (MINUS_INFINITY if entry[1] is None else entry[1], MINUS_INFINITY if entry[2] is None else entry[2],
            PLUS_INFINITY if entry[3] is None else entry[3])
#: a paged customer's bucketed facts are stored in pages of this many buckets, and its remembered
#: event ids in chunks of this many ids (see :meth:`CustomerFacts.paged_records`): each record
#: then stays far below 256 KiB whatever the customer does (per bucket it keeps one activity time,
#: one order time, one revenue sum, one reward count, one close time and one membership event)
PAGE_BUCKETS = 360
SEEN_CHUNK_IDS = 1000
#: the fields of a head record (:meth:`CustomerFacts.to_record`)
RECORD_FIELDS = 18


class MissingPageError(LookupError):
    """A page that a customer's head record lists is not in the table: the state is incomplete."""


def page_name(name: str, version: int) -> str:
    """The stored name of version ``version`` of page ``name`` (``b<n>``: buckets, ``s<n>``: ids).

    >>> page_name("b12", 3)
    'b12.3'
    """
    return f"{name}.{version}"


@lru_cache(maxsize=4096)
def month_bounds(bucket_ms: int, cohort: int) -> tuple[int, ...]:
    """The first bucket of each month ``cohort .. cohort + COHORT_PERIODS + 1`` (14 values).

    Period p's buckets are ``bounds[p] .. bounds[p + 1] - 1`` (a bucket belongs to the month of
    its first instant, so a seven-minute bucket across a month's end is the earlier month's).

    >>> bounds = month_bounds(86_400_000, 0); bounds[:3], len(bounds)
    ((0, 31, 59), 14)
    >>> from metrics.timegrid import month_of_ms
    >>> first = month_bounds(7 * 60_000, 0)[1]
    >>> month_of_ms((first - 1) * 7 * 60_000), month_of_ms(first * 7 * 60_000)
    (0, 1)
    """
    return tuple(-(-month_start_ms(cohort + period) // bucket_ms) for period in range(COHORT_PERIODS + 2))


class CohortSeries(NamedTuple):
    """The names of one cohort's series (see the module docstring)."""

    active_ends: str
    ordered_ends: str
    active_now: str
    ordered_now: str


@lru_cache(maxsize=4096)
def cohort_series(cohort: int) -> CohortSeries:
    """The series of the cohort of month ``cohort`` (months counted from January 1970).

    >>> cohort_series(672).active_ends
    'cmA:672'
    """
    return CohortSeries(f"cmA:{cohort}", f"cmO:{cohort}", f"ckA:{cohort}", f"ckO:{cohort}")


def families_of(event_type: str, survey: str | None = None) -> int:
    """Which series families an event of this type (and survey) can change (0: none).

    >>> families_of("order.placed"), families_of("survey.responded", "csat"), families_of("survey.responded", "nps")
    (3, 0, 4)
    """
    if event_type == ev.SURVEY_RESPONDED:
        return SEGMENT_FAMILY if survey == ev.SURVEY_NPS else 0
    return _FAMILIES.get(event_type, 0)


def event_deltas(event: ev.Event, bucket: int) -> list[tuple[str, int, int]]:
    """Per-event histogram deltas ``(series, bucket, delta)`` of one accepted event.

    >>> event_deltas(ev.Event("e1", "order.placed", 0, "s", "c", "o1", 5_000_000, "EUR"), 0)
    [('orders', 0, 1), ('gross', 0, 5000000)]
    """
    kind = event.type
    if kind == ev.ORDER_PLACED:
        return [("orders", bucket, 1), ("gross", bucket, event.amount_micros or 0)]
    if kind == ev.ORDER_REFUNDED:
        return [("refunds", bucket, event.amount_micros or 0)]
    if kind == ev.SPEND_RECORDED:
        amount = event.amount_micros or 0
        out = [("spend", bucket, amount)]
        if event.channel:
            out.append(("spend_ch:" + event.channel, bucket, amount))
            out.append(("spend_chn:" + event.channel, bucket, 1))
        return out
    if kind == ev.SURVEY_RESPONDED:
        survey = event.survey
        score = event.score or 0
        if survey == ev.SURVEY_NPS:
            return [("nps_n", bucket, 1), (_NPS_SERIES[nps_group(score)], bucket, 1)]
        if survey == ev.SURVEY_CSAT:
            satisfied = csat_satisfied(score, event.scale or 5)
            return [("csat_n", bucket, 1), ("csat_sat", bucket, int(satisfied))]
        if survey == ev.SURVEY_CES:
            return [("ces_n", bucket, 1), ("ces_sum", bucket, score)]
        answers = event.answers or (1, 1, 1)
        return [
            ("cli_n", bucket, 1),
            ("cli_pts", bucket, cli_points_sum(answers)),
            ("cli_ans", bucket, sum(answers)),
        ]
    if kind == ev.REWARD_ISSUED:
        return [("rw_i", bucket, 1)]
    if kind == ev.REWARD_REDEEMED:
        return [("rw_r", bucket, 1)]
    return []


class AppliedEvents(NamedTuple):
    """What :meth:`CustomerFacts.apply_events` did with one customer's events."""

    #: events applied (not duplicates)
    applied: int
    #: events skipped as duplicates of a remembered id
    duplicates: int
    #: the latest ``occurred_at`` of the applied events (``None``: none applied)
    latest_ms: int | None
    #: the currency of the last applied event that has one (``None``: none has)
    currency: str | None


class Paging:
    """How a paged customer is stored (see :meth:`CustomerFacts.paged_records`)."""

    __slots__ = ("dirty", "garbage", "generation", "pages", "seen_first")

    def __init__(self, pages: dict[str, int] | None = None, generation: int = 0, seen_first: int = 0,
                 garbage: list[str] | None = None) -> None:
        #: page name -> version of the stored page
        self.pages: dict[str, int] = pages if pages is not None else {}
        #: how many times the paged record was written (the version of pages written next is +1)
        self.generation = generation
        #: the running index of the first id in ``seen`` (chunk c holds indexes c*SEEN_CHUNK_IDS...)
        self.seen_first = seen_first
        #: stored page versions that the head no longer lists, deleted after it is written
        self.garbage: list[str] = garbage if garbage is not None else []
        #: names of pages changed since they were stored
        self.dirty: set[str] = set()


class CustomerFacts:
    """Everything the metrics need to know about one (store, customer).

    Lifetime facts (first activity, first two order times, order count, signup
    channel, membership before the kept history) are kept for ever; bucketed
    facts are pruned past ``Grid.fact_retention`` (see :meth:`prune`). Per
    bucket at most one close and one membership event are kept (the latest),
    which decide everything the metrics read of that bucket, so a customer's
    state grows with the buckets it is active in, never with its event rate;
    remembered event ids grow with the rate, for ``LOYALTY_DEDUPE_TTL``.

    Stored either whole (one record, :meth:`to_record`) or, once that grows
    large, *paged*: a head record with the lifetime facts and a versioned list
    of pages (:meth:`paged_records`).
    """

    __slots__ = (
        "activity",
        "closes",
        "first_activity_ms",
        "first_orders",
        "member_before",
        "member_before_key",
        "membership",
        "months",
        "nps_answers",
        "nps_before",
        "order_count",
        "orders",
        "paging",
        "revenue",
        "rewards",
        "seen",
        "signup_channel",
        "signup_key",
    )

    def __init__(self) -> None:
        self.first_activity_ms: int | None = None
        #: (occurred_at, event_id) of the earliest signup: its channel is the customer's
        self.signup_key: tuple[int, str] | None = None
        self.signup_channel: str | None = None
        #: bucket -> latest activity time in it
        self.activity: dict[int, int] = {}
        #: sorted close times, the latest of each bucket
        self.closes: list[int] = []
        self.order_count = 0
        #: the two earliest order times (lifetime)
        self.first_orders: list[int] = []
        #: bucket -> latest order time in it
        self.orders: dict[int, int] = {}
        #: bucket -> net revenue (placed - refunded) in micros
        self.revenue: dict[int, int] = {}
        #: membership state before the kept membership events, and the key of the last dropped one
        self.member_before = False
        self.member_before_key: tuple[int, str] | None = None
        #: sorted (occurred_at, event_id, enrolled), the latest of each bucket
        self.membership: list[tuple[int, str, bool]] = []
        #: buckets with a reward issued or redeemed -> count
        self.rewards: dict[int, int] = {}
        #: sorted (occurred_at, event_id, NPS group), the latest answer of each bucket (most customers
        #: never answer: they share one empty list, replaced by their own at the first answer kept)
        self.nps_answers: list[tuple[int, str, int]] = _NO_ANSWERS
        #: the latest answer older than the kept ones (occurred_at, event_id, NPS group): the segment before them
        self.nps_before: tuple[int, str, int] | None = None
        #: month -> summary of the month (see MonthSummary), for the months from COHORT_MONTHS_KEPT
        #: before the clock's month to the cohort's last period (the cohort matrix's month-end statuses)
        self.months: dict[int, MonthSummary] = _NO_MONTHS
        #: event_id -> when it was seen (the caller's clock), for deduplication within the TTL,
        #: in the order remembered
        self.seen: dict[str, int] = {}
        #: how the facts are stored paged (see paged_records); None while stored whole
        self.paging: Paging | None = None

    # -- persistence ---------------------------------------------------------

    def to_record(self) -> list[object]:
        """A compact, JSON-ready list of the facts (the inverse of :meth:`from_record`).

        A paged customer's record is its head: lifetime facts and the page list only.
        """
        paging = self.paging
        paged = paging is not None
        # tuples and lists of tuples as they are: JSON writes a tuple as an array, so the bytes are
        # those of lists, without building one list per entry (this runs for every customer written)
        return [
            self.first_activity_ms,
            self.signup_key,
            self.signup_channel,
            [] if paged else list(self.activity.items()),
            [] if paged else self.closes,
            self.order_count,
            self.first_orders,
            [] if paged else list(self.orders.items()),
            [] if paged else list(self.revenue.items()),
            self.member_before,
            self.member_before_key,
            [] if paged else self.membership,
            [] if paged else list(self.rewards.items()),
            {} if paged else self.seen,
            None if paging is None else [paging.generation, paging.pages, paging.seen_first, paging.garbage],
            [] if paged else self.nps_answers,
            None if self.nps_before is None else [self.nps_before[2], self.nps_before[0], self.nps_before[1]],
            [[month, *_month_record(summary)] for month, summary in self.months.items()],
        ]

    @classmethod
    def from_record(
        cls, record: list[object], page: Callable[[str], list[object] | None] | None = None
    ) -> CustomerFacts:
        """Facts from :meth:`to_record`'s list (after a JSON round trip).

        A head record's pages are read with ``page`` (by stored name, see
        :func:`page_name`); a page it lists that is missing raises
        :class:`MissingPageError` rather than giving facts that lack it.

        >>> facts = CustomerFacts(); facts.order_count = 2; facts.activity[5] = 300_001
        >>> CustomerFacts.from_record(facts.to_record()).to_record() == facts.to_record()
        True
        """
        (first, signup_key, channel, activity, closes, order_count, first_orders, orders, revenue,
         member_before, member_before_key, membership, rewards, seen) = record[:14]
        paging: list[object] | None = record[14] if len(record) > 14 else None  # type: ignore[assignment]
        # records written before the NPS segments have no answers
        answers: list[list[Any]] = record[15] if len(record) > 15 else []  # type: ignore[assignment]
        before: list[Any] | None = record[16] if len(record) > 16 else None  # type: ignore[assignment]
        # records written before the cohorts have no month summaries
        months: list[list[Any]] = record[17] if len(record) > 17 else []  # type: ignore[assignment]
        facts = cls()
        facts.first_activity_ms = first  # type: ignore[assignment]
        facts.signup_key = (signup_key[0], signup_key[1]) if signup_key else None  # type: ignore[index]
        facts.signup_channel = channel  # type: ignore[assignment]
        facts.activity = dict(activity)  # type: ignore[call-overload]
        facts.closes = list(closes)  # type: ignore[call-overload]
        facts.order_count = order_count  # type: ignore[assignment]
        facts.first_orders = list(first_orders)  # type: ignore[call-overload]
        facts.orders = dict(orders)  # type: ignore[call-overload]
        facts.revenue = dict(revenue)  # type: ignore[call-overload]
        facts.member_before = bool(member_before)
        facts.member_before_key = (member_before_key[0], member_before_key[1]) if member_before_key else None  # type: ignore[index]
        facts.membership = [(m[0], m[1], bool(m[2])) for m in membership]  # type: ignore[attr-defined]
        facts.rewards = dict(rewards)  # type: ignore[call-overload]
        facts.seen = dict(seen)  # type: ignore[call-overload]
        if answers:
            facts.nps_answers = [(a[0], a[1], a[2]) for a in answers]
        if before is not None:
            facts.nps_before = (before[1], before[2], before[0])
        if months:
            facts.months = {entry[0]: _month_summary(entry) for entry in months}
        if paging is not None:
            generation, pages, seen_first, garbage = paging
            facts.paging = Paging(dict(pages), generation, seen_first, list(garbage))  # type: ignore[call-overload, arg-type]
            facts._read_pages(page)
        return facts

    def _read_pages(self, page: Callable[[str], list[object] | None] | None) -> None:
        assert self.paging is not None
        bucket_pages: list[tuple[int, list[object]]] = []
        seen_chunks: list[tuple[int, list[object]]] = []
        for name, version in self.paging.pages.items():
            stored = page_name(name, version)
            content = None if page is None else page(stored)
            if content is None:
                raise MissingPageError(f"page {stored} of a paged customer is missing")
            number = int(name[1:])
            (bucket_pages if name[0] == "b" else seen_chunks).append((number, content))
        for _, content in sorted(bucket_pages, key=lambda item: item[0]):
            activity, closes, orders, revenue, membership, rewards = content[:6]
            # pages written before the NPS segments have six parts
            answers = content[6] if len(content) > 6 else None
            if answers:
                self._own_answers().extend((a[0], a[1], a[2]) for a in answers)  # type: ignore[attr-defined]
            self.activity.update((b, t) for b, t in activity)  # type: ignore[attr-defined]
            self.closes.extend(closes)  # type: ignore[arg-type]
            self.orders.update((b, t) for b, t in orders)  # type: ignore[attr-defined]
            self.revenue.update((b, r) for b, r in revenue)  # type: ignore[attr-defined]
            self.membership.extend((m[0], m[1], bool(m[2])) for m in membership)  # type: ignore[attr-defined]
            self.rewards.update((b, c) for b, c in rewards)  # type: ignore[attr-defined]
        for _, content in sorted(seen_chunks, key=lambda item: item[0]):
            for pair in content:
                self.seen[pair[0]] = pair[1]  # type: ignore[index]

    def entry_count(self) -> int:
        """How many bucketed entries and remembered ids the facts hold (what paging splits)."""
        return (len(self.activity) + len(self.closes) + len(self.orders) + len(self.revenue)
                + len(self.membership) + len(self.rewards) + len(self.nps_answers) + len(self.seen))

    def paged_records(self, grid: Grid) -> tuple[list[object], dict[str, list[object] | None]]:
        """Page the facts: the head record, and the pages to store now by stored name (``None``: delete).

        Called on facts stored whole, it pages all of them; afterwards only the pages
        changed since (``dirty``) are written, each under a new version. The head
        names the versions it was written with, so storing the pages first and the
        head last is atomic for a reader: a crash in between leaves pages that no
        head names (their versions are written again by the replay), never a head
        with a page of another version. Versions the new head no longer names are
        returned for deletion and kept in the head as ``garbage`` until the next
        write, which deletes them again (a crash may have stopped the first delete).

        >>> grid = Grid(60_000, 600_000, (60_000,))
        >>> facts = CustomerFacts(); facts.activity = {3: 180_000, 400: 24_000_000}
        >>> head, pages = facts.paged_records(grid)
        >>> sorted(pages), head[3], head[14]
        (['b0.1', 'b1.1'], [], [1, {'b0': 1, 'b1': 1}, 0, []])
        >>> facts.apply(ev.Event("e", "customer.signed_up", 24_000_001, "s", "c"), grid, 0)
        >>> head, pages = facts.paged_records(grid)
        >>> {stored: content is None for stored, content in pages.items()}, head[14]
        ({'b1.2': False, 'b1.1': True}, [2, {'b0': 1, 'b1': 2}, 0, ['b1.1']])
        """
        paging = self.paging
        if paging is None:
            paging = self.paging = Paging()
            paging.dirty = self._all_page_names(grid)
        old_garbage = paging.garbage
        version = paging.generation + 1
        writes: dict[str, list[object] | None] = {}
        garbage: list[str] = []
        for name in sorted(paging.dirty):
            content = self._page(name, grid)
            previous = paging.pages.get(name)
            if previous is not None:
                garbage.append(page_name(name, previous))
            if content is None:
                paging.pages.pop(name, None)
            else:
                writes[page_name(name, version)] = content
                paging.pages[name] = version
        paging.generation = version
        paging.garbage = garbage
        paging.dirty = set()
        for stored in old_garbage + garbage:
            writes.setdefault(stored, None)
        return self.to_record(), writes

    def unpaged_records(self) -> tuple[list[object], dict[str, list[object] | None]]:
        """Store the facts whole again: the whole record, and every page (and garbage) to delete."""
        paging = self.paging or Paging()
        deletes: dict[str, list[object] | None] = {stored: None for stored in paging.garbage}
        for name, version in paging.pages.items():
            deletes[page_name(name, version)] = None
        self.paging = None
        return self.to_record(), deletes

    def _all_page_names(self, grid: Grid) -> set[str]:
        bucket_ms = grid.bucket_ms
        buckets = set(self.activity) | set(self.orders) | set(self.revenue) | set(self.rewards)
        buckets.update(time // bucket_ms for time in self.closes)
        buckets.update(entry[0] // bucket_ms for entry in self.membership)
        buckets.update(entry[0] // bucket_ms for entry in self.nps_answers)
        names = {"b" + str(bucket // PAGE_BUCKETS) for bucket in buckets}
        names.update(self._seen_chunk_names())
        return names

    def _seen_chunk_names(self) -> list[str]:
        """The names of the chunks that hold ``seen`` (none when empty)."""
        if not self.seen:
            return []
        seen_first = self.paging.seen_first if self.paging is not None else 0
        first = seen_first // SEEN_CHUNK_IDS
        last = (seen_first + len(self.seen) - 1) // SEEN_CHUNK_IDS
        return ["s" + str(chunk) for chunk in range(first, last + 1)]

    def _page(self, name: str, grid: Grid) -> list[object] | None:
        number = int(name[1:])
        if name[0] == "s":
            seen_first = self.paging.seen_first if self.paging is not None else 0
            start = max(0, number * SEEN_CHUNK_IDS - seen_first)
            stop = min(len(self.seen), (number + 1) * SEEN_CHUNK_IDS - seen_first)
            if start >= stop:
                return None
            return [[i, t] for i, t in islice(self.seen.items(), start, stop)]
        low = number * PAGE_BUCKETS
        high = low + PAGE_BUCKETS
        low_ms, high_ms = low * grid.bucket_ms, high * grid.bucket_ms
        content: list[object] = []
        empty = True
        for facts in (self.activity, self.orders, self.revenue, self.rewards):
            pairs = [[b, facts[b]] for b in range(low, high) if b in facts]
            empty = empty and not pairs
            content.append(pairs)
        closes = self.closes[bisect_left(self.closes, low_ms):bisect_left(self.closes, high_ms)]
        membership = [list(m) for m in self.membership if low_ms <= m[0] < high_ms]
        answers = [list(a) for a in self.nps_answers if low_ms <= a[0] < high_ms]
        if empty and not closes and not membership and not answers:
            return None
        activity, orders, revenue, rewards = content
        return [activity, closes, orders, revenue, membership, rewards, answers]

    def _touch(self, bucket: int) -> None:
        if self.paging is not None:
            self.paging.dirty.add("b" + str(bucket // PAGE_BUCKETS))

    # -- updates -----------------------------------------------------------

    def is_duplicate(self, event_id: str) -> bool:
        """Whether this event id was already applied (within the dedupe TTL)."""
        return event_id in self.seen

    def remember(self, event_id: str, seen_at_ms: int) -> None:
        """Remember an event id as applied, stamped with when it was seen.

        The stamp is processing time, not event time: a replay that reads
        partitions unevenly must still recognise a duplicate of an old event.
        """
        paging = self.paging
        if paging is not None:
            if event_id in self.seen:
                self._touch_all_seen()
            else:
                index = paging.seen_first + len(self.seen)
                paging.dirty.add("s" + str(index // SEEN_CHUNK_IDS))
        self.seen[event_id] = seen_at_ms

    def _touch_all_seen(self) -> None:
        if self.paging is not None:
            self.paging.dirty.update(self._seen_chunk_names())

    def apply(self, event: ev.Event, grid: Grid, horizon_start: int) -> None:
        """Fold one accepted, non-duplicate event into the facts.

        ``horizon_start`` is the oldest bucket whose bucketed facts are kept:
        older events still update lifetime facts only.
        """
        time = event.occurred_at_ms
        bucket = grid.bucket(time)
        kept = bucket >= horizon_start
        kind = event.type
        if kept:
            self._touch(bucket)
        if kind == ev.ORDER_PLACED or kind == ev.CUSTOMER_SIGNED_UP:
            if self.first_activity_ms is None or time < self.first_activity_ms:
                self.first_activity_ms = time
                self._trim_months(grid)
            if kept and self.activity.get(bucket, MINUS_INFINITY) < time:
                self.activity[bucket] = time
            self._summarise(grid, bucket, horizon_start, time, _ORDER if kind == ev.ORDER_PLACED else _ACTIVITY)
        elif kind == ev.CUSTOMER_CLOSED:
            self._summarise(grid, bucket, horizon_start, time, _CLOSE)
        if kind == ev.CUSTOMER_SIGNED_UP:
            key = (time, event.event_id)
            if self.signup_key is None or key < self.signup_key:
                self.signup_key = key
                self.signup_channel = event.channel
        elif kind == ev.ORDER_PLACED:
            self.order_count += 1
            insort(self.first_orders, time)
            del self.first_orders[2:]
            if kept:
                if self.orders.get(bucket, MINUS_INFINITY) < time:
                    self.orders[bucket] = time
                self.revenue[bucket] = self.revenue.get(bucket, 0) + (event.amount_micros or 0)
        elif kind == ev.ORDER_REFUNDED:
            if kept:
                self.revenue[bucket] = self.revenue.get(bucket, 0) - (event.amount_micros or 0)
        elif kind == ev.CUSTOMER_CLOSED:
            if kept:
                # only the bucket's latest close matters: a close ends activity at its bucket,
                # and the latest close of a bucket is later than an activity of it if any is
                closes = self.closes
                low = bisect_left(closes, bucket * grid.bucket_ms)
                high = bisect_left(closes, (bucket + 1) * grid.bucket_ms)
                if low == high:
                    closes.insert(low, time)
                elif time > closes[high - 1]:
                    closes[low:high] = [time]
        elif kind == ev.LOYALTY_ENROLLED or kind == ev.LOYALTY_LEFT:
            entry = (time, event.event_id, kind == ev.LOYALTY_ENROLLED)
            if kept:
                # only the latest event of a bucket decides the bucket (member_intervals)
                _keep_latest_of_bucket(self.membership, entry, bucket, grid.bucket_ms)
            elif self.member_before_key is None or entry[:2] > self.member_before_key:
                # an event older than the kept history still decides the state
                # before it, when it is the latest of those older events
                self.member_before_key = entry[:2]
                self.member_before = entry[2]
        elif (kind == ev.REWARD_ISSUED or kind == ev.REWARD_REDEEMED) and kept:
            self.rewards[bucket] = self.rewards.get(bucket, 0) + 1
        elif kind == ev.SURVEY_RESPONDED and event.survey == ev.SURVEY_NPS:
            answer = (time, event.event_id, nps_group(event.score or 0))
            if kept:
                # only the latest answer of a bucket decides the bucket's segment (segment_intervals)
                _keep_latest_of_bucket(self._own_answers(), answer, bucket, grid.bucket_ms)
            elif self.nps_before is None or answer[:2] > self.nps_before[:2]:
                # as for membership: an answer older than the kept history decides the segment before it
                self.nps_before = answer

    def _summarise(self, grid: Grid, bucket: int, horizon_start: int, time: int, what: int) -> None:
        """Fold an activity, an order (also an activity) or a close at ``time`` into its month's summary."""
        month = grid.month_of_bucket(bucket)
        if month < _months_floor(grid, horizon_start):
            return
        cohort = self._cohort(grid)
        if cohort is not None and month >= cohort + COHORT_PERIODS:
            return  # no period of the cohort reads it, nor of any earlier cohort it may move to
        months = self.months
        if months is _NO_MONTHS:
            months = self.months = {}
        activity, close, first_order = months.get(month, _EMPTY_MONTH)
        if what == _CLOSE:
            close = max(close, time)
        else:
            activity = max(activity, time)
            if what == _ORDER:
                first_order = min(first_order, time)
        months[month] = (activity, close, first_order)

    def _trim_months(self, grid: Grid) -> None:
        """Drop the month summaries after the last period of the (new, earlier) cohort."""
        cohort = self._cohort(grid)
        if self.months and cohort is not None:
            for month in [month for month in self.months if month >= cohort + COHORT_PERIODS]:
                del self.months[month]

    def _cohort(self, grid: Grid) -> int | None:
        """The customer's cohort: the month of the bucket of its first activity (``None``: no activity yet)."""
        first = self.first_activity_ms
        return None if first is None else grid.month_of_bucket(grid.bucket(first))

    def _own_answers(self) -> list[tuple[int, str, int]]:
        """The customer's own answer list, to add to (not the empty one shared by all who have none)."""
        if self.nps_answers is _NO_ANSWERS:
            self.nps_answers = []
        return self.nps_answers

    def prune(self, grid: Grid, horizon_start: int, seen_after_ms: int) -> bool:
        """Drop bucketed facts before bucket ``horizon_start`` and ids seen before ``seen_after_ms``.

        ``horizon_start`` is at most ``K - Grid.fact_retention``: dropping older
        facts changes no contribution at or after ``K - 3 * longest``, so it is
        done silently; the store keeps the old deltas, whose effect is confined
        to buckets that no metric reads any more. Returns whether a bucketed
        fact was dropped (the contributions may differ then).

        >>> facts = CustomerFacts(); facts.activity = {3: 180_000, 9: 540_000}
        >>> facts.prune(Grid(60_000, 600_000, (60_000,)), 5, 0), sorted(facts.activity)
        (True, [9])
        """
        dropped = False
        for facts in (self.activity, self.orders, self.revenue, self.rewards):
            if facts and min(facts) < horizon_start:
                dropped = True
                for bucket in [b for b in facts if b < horizon_start]:
                    del facts[bucket]
                    self._touch(bucket)
        start_ms = horizon_start * grid.bucket_ms
        if self.closes and self.closes[0] < start_ms:
            dropped = True
            end = bisect_right(self.closes, start_ms - 1)
            for time in self.closes[:end]:
                self._touch(grid.bucket(time))
            del self.closes[:end]
        while self.membership and self.membership[0][0] < start_ms:
            dropped = True
            time, event_id, enrolled = self.membership.pop(0)
            self._touch(grid.bucket(time))
            self.member_before_key = (time, event_id)
            self.member_before = enrolled
        if self.months:
            floor = _months_floor(grid, horizon_start)
            old = [month for month in self.months if month < floor]
            if old:
                dropped = True
                for month in old:
                    del self.months[month]
        while self.nps_answers and self.nps_answers[0][0] < start_ms:
            dropped = True
            self.nps_before = self.nps_answers.pop(0)
            self._touch(grid.bucket(self.nps_before[0]))
        if self.seen and min(self.seen.values()) < seen_after_ms:
            kept = {k: t for k, t in self.seen.items() if t >= seen_after_ms}
            paging = self.paging
            if paging is not None:
                dirty_before = set(paging.dirty)
                self._touch_all_seen()
                # ids are remembered in time order, so the expired ones are a prefix: the chunks
                # after it keep their ids and need no rewrite (otherwise all are rewritten)
                expired = len(self.seen) - len(kept)
                if all(t < seen_after_ms for t in islice(self.seen.values(), expired)):
                    paging.seen_first += expired
                    first_kept = paging.seen_first // SEEN_CHUNK_IDS
                    paging.dirty = dirty_before | {n for n in paging.dirty if n[0] != "s" or int(n[1:]) <= first_kept}
            self.seen = kept
        return dropped

    # -- derived statuses ----------------------------------------------------

    def active_intervals(self, grid: Grid, low: int = MINUS_INFINITY) -> Intervals:
        """Buckets at which the customer is active (SPEC 5, "Customers"), exact from bucket ``low`` on.

        An activity bucket's interval ends by the next activity bucket, so every
        interval of the buckets before the last one at or before ``low`` ends by
        ``low``: they are left out (earlier starts may differ, later buckets do not).
        """
        if not self.activity:
            return []
        buckets = sorted(self.activity)
        first_index = max(0, bisect_right(buckets, low) - 1)
        closes = self.closes
        horizon = grid.horizon
        count = len(buckets)
        result: list[Interval] = []
        for i in range(first_index, count):
            bucket = buckets[i]
            end = bucket + horizon
            if i + 1 < count and buckets[i + 1] < end:
                end = buckets[i + 1]
            if closes:
                # the first close strictly later than the bucket's last activity ends it
                index = bisect_right(closes, self.activity[bucket])
                if index < len(closes):
                    close_bucket = grid.bucket(closes[index])
                    if close_bucket < end:
                        end = close_bucket
            if end > bucket:
                result.append((bucket, end))
        return normalise(result)

    def member_intervals(self, grid: Grid) -> Intervals:
        """Buckets at whose end the latest enrol/leave event is an enrolment."""
        state = self.member_before
        start = MINUS_INFINITY
        result: list[Interval] = []
        events = self.membership
        for i, (time, _, enrolled) in enumerate(events):
            bucket = grid.bucket(time)
            if i + 1 < len(events) and grid.bucket(events[i + 1][0]) == bucket:
                continue  # only the last event of a bucket decides the bucket
            if enrolled and not state:
                start = bucket
            elif state and not enrolled:
                result.append((start, bucket))
            state = enrolled
        if state:
            result.append((start, PLUS_INFINITY))
        return result

    def segment_intervals(self, grid: Grid) -> dict[int, Intervals]:
        """NPS group -> the buckets at which it is the customer's segment (its latest answer up to them).

        >>> facts = CustomerFacts(); facts.nps_answers = [(60_000, "a", 2), (300_000, "b", 0)]
        >>> facts.segment_intervals(Grid(60_000, 600_000, (60_000,)))
        {2: [(1, 5)], 0: [(5, 4611686018427387904)]}
        """
        state = None if self.nps_before is None else self.nps_before[2]
        start = MINUS_INFINITY
        result: dict[int, Intervals] = {}
        for time, _, group in self.nps_answers:
            if group == state:
                continue
            bucket = grid.bucket(time)
            if state is not None:
                result.setdefault(state, []).append((start, bucket))
            state = group
            start = bucket
        if state is not None:
            result.setdefault(state, []).append((start, PLUS_INFINITY))
        return result

    def contributions(self, grid: Grid, families: int, since: int = MINUS_INFINITY) -> Deltas:
        """The customer's contribution to every series of ``families``, clipped to buckets ``>= since``.

        :meth:`add_contributions` into a new dict; see there.

        Clipped: an interval that starts before ``since`` starts at ``since``, one
        that ends by then is left out, so the contribution at ``since`` is the
        prefix sum up to it. Every status at bucket j is a function of the facts
        at buckets ``<= j`` (each is "as of j"), so an event at bucket b changes
        nothing below b, and the difference of two contributions clipped at b
        equals the difference of the whole ones. Clipped, the cost depends on
        the facts near ``since`` rather than on the whole kept history.
        Two exceptions: membership may start "for ever" ago, but counts only
        where the customer is active, and activity is kept from the horizon
        start on; and the first activity's histogram (``F``, ``Fch:c``) is a
        single point, never clipped, since a later signup's channel classifies it.

        >>> facts = CustomerFacts(); facts.activity = {10: 600_000, 20: 1_200_000}
        >>> grid = Grid(60_000, 600_000, (60_000,))
        >>> facts.contributions(grid, ACTIVITY_FAMILY, since=15)["A"]
        {15: 1, 30: -1}
        """
        out: Deltas = {}
        self.add_contributions(grid, families, since, out, 1)
        return out

    def apply_events(self, events: list[ev.Event], grid: Grid, horizon_start: int, seen_at_ms: int,
                     out: DeltaTarget) -> AppliedEvents:
        """Apply one customer's events, in order, and add what they change to ``out``.

        What is added: the customer's contributions after the events minus those before, both
        clipped at the events' earliest bucket (the differences of consecutive events telescope,
        and clipping below an event's bucket changes no difference, see :meth:`contributions`),
        plus each applied event's own histogram deltas (:func:`event_deltas`). An event whose id
        is remembered (:meth:`is_duplicate`) changes nothing and is counted as a duplicate;
        ``seen_at_ms`` stamps the ids of the others (:meth:`remember`).

        >>> grid = Grid(60_000, 600_000, (60_000,)); facts = CustomerFacts(); out: Deltas = {}
        >>> order = ev.Event("e1", "order.placed", 600_000, "s", "c", "o1", 5_000_000, "EUR")
        >>> facts.apply_events([order, order], grid, 0, 0, out)
        AppliedEvents(applied=1, duplicates=1, latest_ms=600000, currency='EUR')
        >>> out["orders"], out["A"]
        ({10: 1}, {10: 1, 20: -1})
        """
        families = 0
        since = PLUS_INFINITY
        for event in events:
            families |= families_of(event.type, event.survey)
            since = min(since, grid.bucket(event.occurred_at_ms))
        if families:
            self.add_contributions(grid, families, since, out, -1)
        applied = 0
        duplicates = 0
        latest_ms: int | None = None
        currency: str | None = None
        for event in events:
            event_id = event.event_id
            if self.is_duplicate(event_id):
                duplicates += 1
                continue
            self.remember(event_id, seen_at_ms)
            self.apply(event, grid, horizon_start)
            time = event.occurred_at_ms
            for series, delta_bucket, delta in event_deltas(event, grid.bucket(time)):
                add_delta(out, series, delta_bucket, delta)
            if event.currency is not None:
                currency = event.currency
            if latest_ms is None or time > latest_ms:
                latest_ms = time
            applied += 1
        if families:
            self.add_contributions(grid, families, since, out, 1)
        return AppliedEvents(applied, duplicates, latest_ms, currency)

    def add_contributions(self, grid: Grid, families: int, since: int, out: DeltaTarget, sign: int) -> None:
        """Add the customer's contributions to every series of ``families``, clipped at ``since``, times ``sign``.

        The facts stage adds the contributions before a customer's events with sign -1 and
        those after with +1 straight into a message's deltas (:func:`new_deltas`), rather
        than building two dicts and subtracting them.

        >>> facts = CustomerFacts(); facts.activity = {10: 600_000}
        >>> grid = Grid(60_000, 600_000, (60_000,)); out: Deltas = {"A": {10: 1}}
        >>> facts.add_contributions(grid, ACTIVITY_FAMILY, 10, out, -1); out["A"]
        {10: 0, 20: 1}
        """
        active = None
        if families & ACTIVITY_FAMILY:
            active = self._activity_contributions(grid, out, since, sign)
        if families & ORDER_FAMILY:
            self._order_contributions(grid, out, since, sign)
        if self.nps_answers or self.nps_before is not None:
            segment = families & SEGMENT_FAMILY
            activity = bool(segment or families & ACTIVITY_FAMILY)
            orders = bool(segment or families & ORDER_FAMILY)
            if activity or orders:
                self._segment_contributions(grid, out, since, sign, activity, orders, active)

    def _segment_contributions(self, grid: Grid, out: DeltaTarget, since: int, sign: int,
                               activity: bool, orders: bool, active: Intervals | None) -> None:
        # the statuses of the other families, each intersected with the buckets of each NPS segment;
        # only buckets >= since matter, so the segments are clipped there first (a customer answering
        # every few minutes has thousands of segment changes, and a message touches the last few)
        segments = [(group, clipped) for group, intervals in self.segment_intervals(grid).items()
                    if (clipped := [(max(start, since), end) for start, end in intervals if end > since])]
        if not segments:
            return
        if active is None:  # the activity family's, when it ran: the same intervals from the same bucket
            active = self.active_intervals(grid, since - grid.longest) if activity else []
        order_buckets = sorted(self.orders) if orders else []
        second_order = grid.bucket(self.first_orders[1]) if orders and self.order_count >= 2 else None
        revenue = sorted((bucket, amount) for bucket, amount in self.revenue.items() if amount) if orders else []
        windows = _segment_windows(grid.windows)
        _add_by_loop(_NATIVE_SEGMENT_DELTAS, _segment_deltas, out, segments, active, order_buckets, second_order,
                     revenue, windows, since, sign, activity, orders)

    def _activity_contributions(self, grid: Grid, out: DeltaTarget, since: int, sign: int) -> Intervals:
        """Add the activity family's contributions; returns the active intervals (exact from since - longest)."""
        # both:n reads activity n buckets back
        active = self.active_intervals(grid, since - grid.longest)
        first = None if self.first_activity_ms is None else grid.bucket(self.first_activity_ms)
        channel_series = "Fch:" + self.signup_channel if first is not None and self.signup_channel else None
        members = intersect(active, self.member_intervals(grid)) if self.membership or self.member_before else []
        reward_buckets = sorted(self.rewards) if members and self.rewards else []
        windows = _activity_windows(grid.windows)
        _add_by_loop(_NATIVE_ACTIVITY_DELTAS, _activity_deltas, out, active, first, channel_series, members,
                     reward_buckets, windows, since, sign)
        if first is not None:
            self._cohort_contributions(grid, out, since, sign, active, first)
        return active

    def _cohort_contributions(self, grid: Grid, out: DeltaTarget, since: int, sign: int, active: Intervals,
                              first: int) -> None:
        """The cohort series (see the module docstring), clipped at ``since`` like the difference series."""
        cohort = grid.month_of_bucket(first)
        bounds = month_bounds(grid.bucket_ms, cohort)
        if bounds[-1] - 1 <= since:
            return  # every run of the cohort ends before since
        months = self.months
        summaries = sorted(months.items()) if len(months) > 1 else list(months.items())
        names = cohort_series(cohort)
        _add_by_loop(_NATIVE_COHORT_DELTAS, _cohort_deltas, out, first, cohort, bounds, names, active, summaries,
                     grid.bucket_ms, grid.horizon, since, sign)

    def _order_contributions(self, grid: Grid, out: DeltaTarget, since: int, sign: int) -> None:
        all_orders = sorted(self.orders)
        revenue = self.revenue
        revenue_buckets = sorted(bucket for bucket, amount in revenue.items() if amount)
        second_order = grid.bucket(self.first_orders[1]) if self.order_count >= 2 else None
        first_order_ms = self.first_orders[0] if self.first_orders else 0
        windows = _order_windows(grid.windows)
        _add_by_loop(_NATIVE_ORDER_DELTAS, _order_deltas, out, all_orders, self.orders, revenue_buckets, revenue,
                     second_order, first_order_ms, windows, since, sign)


def _cohort_deltas(out: Deltas, first: int, cohort: int, bounds: tuple[int, ...], names: CohortSeries,
                   active: Intervals, summaries: list[tuple[int, MonthSummary]], bucket_ms: int, horizon: int,
                   since: int, sign: int) -> None:
    """The cohort series of a customer of cohort ``cohort``, clipped at ``since``, times ``sign``, into ``out``.

    ``first``: the first activity's bucket; ``bounds``: :func:`month_bounds` of the cohort, whose
    last run ends after ``since``; ``names``: :func:`cohort_series`; ``active``: the active
    intervals; ``summaries``: the month summaries, sorted by month. A status at a month's last
    bucket e depends on the facts at buckets <= e only, so clipping changes no difference. The
    month-end statuses are runs of periods: active (or ordered) from the end of period p0 to the end
    of p1 is +1 at the one and -1 at the other, whatever the length.
    :func:`metrics._blocks.cohort_deltas` is the same loop in C, adding the same deltas in the same
    order (used when built; it declines inputs past 62 bits, which this loop then takes).

    >>> out: Deltas = {}
    >>> bounds = month_bounds(86_400_000, 0)
    >>> _cohort_deltas(out, 3, 0, bounds, cohort_series(0), [(3, 40)], [(0, (3 * 86_400_000, MINUS_INFINITY,
    ...                PLUS_INFINITY))], 86_400_000, 30, 0, 1)
    >>> out["cmN"], out["ckN"], out["ckA:0"], out["cmA:0"]
    ({30: 1}, {3: 1, 31: -1}, {3: 1, 40: -1}, {30: 1, 58: -1})
    """
    if bounds[1] - 1 >= since:
        add_delta(out, "cmN", bounds[1] - 1, sign)
    _add_interval(out, "ckN", first, bounds[1], sign, since)
    # active at j (of the current month, read at K) during the cohort's twelve periods
    limit = bounds[COHORT_PERIODS]
    for start, end in active:
        _add_interval(out, names.active_now, start, end if end < limit else limit, sign, since)
    count = len(summaries)
    if not count:
        return
    # the month-end statuses, from the month summaries: the latest activity and close up to each
    # month's end; the periods before the one holding since only set where the runs stand there
    first_period = bisect_left(bounds, since + 1, 1) - 1  # the first period whose last bucket is >= since
    index = 0
    latest_activity = latest_close = MINUS_INFINITY
    month = cohort + first_period
    while index < count and summaries[index][0] < month:
        activity, close, _ = summaries[index][1]
        latest_activity = max(latest_activity, activity)
        latest_close = max(latest_close, close)
        index += 1
    active_from: int | None = None
    ordered_from: int | None = None
    period = first_period
    while period < COHORT_PERIODS:
        month = cohort + period
        first_order = PLUS_INFINITY
        while index < count and summaries[index][0] <= month:
            activity, close, order = summaries[index][1]
            latest_activity = max(latest_activity, activity)
            latest_close = max(latest_close, close)
            if summaries[index][0] == month:
                first_order = order
            index += 1
        last = bounds[period + 1] - 1
        active_then = (latest_activity != MINUS_INFINITY and latest_activity // bucket_ms > last - horizon
                       and latest_close <= latest_activity)
        if active_then:
            if active_from is None:
                active_from = last
        elif active_from is not None:
            _add_interval(out, names.active_ends, active_from, last, sign, since)
            active_from = None
        if first_order != PLUS_INFINITY:
            _add_interval(out, names.ordered_now, first_order // bucket_ms, bounds[period + 1], sign, since)
            if ordered_from is None:
                ordered_from = last
        elif ordered_from is not None:
            _add_interval(out, names.ordered_ends, ordered_from, last, sign, since)
            ordered_from = None
        period += 1
        if index == count and not active_then:
            break  # no later summary: inactive and without orders from here on
    # runs still open end at the next period's end (the one after the last period is never read)
    end = bounds[period + 1] - 1
    if active_from is not None:
        _add_interval(out, names.active_ends, active_from, end, sign, since)
    if ordered_from is not None:
        _add_interval(out, names.ordered_ends, ordered_from, end, sign, since)


#: per window length: the length and the names of its activity series (active at j and j - n, newly
#: active, active member with a reward), as :func:`_activity_deltas` takes them
ActivityWindows = tuple[tuple[int, str, str, str], ...]


@cache
def _activity_windows(windows: tuple[int, ...]) -> ActivityWindows:
    """The activity series of each window length (see :data:`ActivityWindows`).

    >>> _activity_windows((60,))
    ((60, 'both:60', 'newact:60', 'actmem:60'),)
    """
    result = []
    for n in windows:
        names = _series_names(n)
        result.append((n, names.both, names.newact, names.actmem))
    return tuple(result)


def _activity_deltas(out: Deltas, active: Intervals, first: int | None, channel_series: str | None,
                     members: Intervals, reward_buckets: list[int], windows: ActivityWindows, since: int,
                     sign: int) -> None:
    """The activity family's contributions but the cohort series, clipped at ``since``, times ``sign``, into ``out``.

    ``active``: the active intervals; ``first``: the first activity's bucket (``None``: none yet);
    ``channel_series``: ``Fch:`` and the signup channel (``None``: no channel); ``members``: the
    active member intervals; ``reward_buckets``: the buckets with a reward issued or redeemed, sorted
    (read only with members). :func:`metrics._blocks.activity_deltas` is the same loop in C, adding
    the same deltas in the same order (used when built; it declines inputs past 62 bits, which this
    loop then takes).

    >>> out: Deltas = {}
    >>> _activity_deltas(out, [(10, 40)], 10, "Fch:web", [], [], _activity_windows((20,)), 0, 1)
    >>> out
    {'A': {10: 1, 40: -1}, 'F': {10: 1}, 'Fch:web': {10: 1}, 'both:20': {30: 1, 40: -1}, 'newact:20': {10: 1, 30: -1}}
    """
    _add_intervals(out, "A", active, sign, since)
    if first is not None:
        # never clipped: a signup's channel classifies the first activity, which may be earlier
        add_delta(out, "F", first, sign)
        if channel_series is not None:
            add_delta(out, channel_series, first, sign)
    _add_intervals(out, "LM", members, sign, since)
    # one active interval is the common case: its intersections are single intervals
    single = active[0] if len(active) == 1 else None
    for n, both_series, newact_series, actmem_series in windows:
        if single is not None:
            _add_interval(out, both_series, single[0] + n, single[1], sign, since)
        else:
            _add_intervals(out, both_series, intersect(active, shift(active, n)), sign, since)
        if first is not None and first + n > since:
            if single is not None:
                _add_interval(out, newact_series, max(single[0], first), min(single[1], first + n), sign, since)
            else:
                _add_intervals(out, newact_series, intersect(active, [(first, first + n)]), sign, since)
        if members and reward_buckets:
            recent = reward_buckets[bisect_right(reward_buckets, since - n):]
            if recent:
                _add_intervals(out, actmem_series, intersect(members, spans(recent, n)), sign, since)


#: per window length: the length and, per NPS group (by :func:`metrics.formulas.nps_group`), the names
#: of its segment series (active at j - n, active at j and j - n, purchaser, returning purchaser,
#: revenue), as :func:`_segment_deltas` takes them
SegmentWindows = tuple[tuple[int, tuple[tuple[str, str, str, str, str], ...]], ...]


@cache
def _segment_windows(windows: tuple[int, ...]) -> SegmentWindows:
    """The segment series of each window length and NPS group (see :data:`SegmentWindows`).

    >>> _segment_windows((60,))[0][1][2]
    ('segcs:p:60', 'segboth:p:60', 'segP:p:60', 'segret:p:60', 'segrev:p:60')
    """
    result = []
    for n in windows:
        suffix = ":" + str(n)
        result.append((n, tuple(
            ("segcs:" + code + suffix, "segboth:" + code + suffix, "segP:" + code + suffix,
             "segret:" + code + suffix, "segrev:" + code + suffix)
            for code in SEGMENT_CODES
        )))
    return tuple(result)


def _segment_deltas(out: Deltas, segments: list[tuple[int, Intervals]], active: Intervals, order_buckets: list[int],
                    second_order: int | None, revenue: list[tuple[int, int]], windows: SegmentWindows, since: int,
                    sign: int, activity: bool, orders: bool) -> None:
    """The NPS segment series, clipped at ``since``, times ``sign``, into ``out``.

    ``segments``: (NPS group, its buckets clipped at ``since``) in the customer's order;
    ``active``: the active intervals (exact from ``since`` minus the longest window); ``order_buckets``:
    the buckets with an order, sorted; ``second_order``: the bucket of the second order (``None``:
    fewer); ``revenue``: (bucket, nonzero net revenue), sorted; ``activity`` and ``orders``: which
    statuses to add. :func:`metrics._blocks.segment_deltas` is the same loop in C, adding the same
    deltas in the same order (used when built; it declines inputs past 62 bits, which this loop then
    takes).

    >>> out: Deltas = {}
    >>> _segment_deltas(out, [(2, [(5, 45)])], [(0, 40)], [], None, [], _segment_windows((10,)), 5, 1, True, False)
    >>> out
    {'segcs:p:10': {10: 1, 45: -1}, 'segboth:p:10': {10: 1, 40: -1}}
    """
    for n, names_by_group in windows:
        started = shift(active, n)  # active at j - n
        both = intersect(active, started)
        # purchaser at j: an order in j-n+1..j
        first = bisect_right(order_buckets, since - n)
        buyers = spans(order_buckets[first:], n)
        returning = intersect(buyers, [(second_order, PLUS_INFINITY)]) if second_order is not None else []
        window_revenue = _window_sums(revenue, n, since) if revenue else None
        for group, segment in segments:
            names = names_by_group[group]
            if activity:
                _add_intervals(out, names[0], intersect(started, segment), sign, since)
                _add_intervals(out, names[1], intersect(both, segment), sign, since)
            if orders:
                _add_intervals(out, names[2], intersect(buyers, segment), sign, since)
                _add_intervals(out, names[3], intersect(returning, segment), sign, since)
                if window_revenue is not None:
                    window_revenue.add_within(_series(out, names[4]), segment, sign)


#: per window length: the length and the names of its order series (purchasers, returning, lifespan,
#: churned revenue, retained revenue), as :func:`_order_deltas` takes them
OrderWindows = tuple[tuple[int, str, str, str, str, str], ...]


@cache
def _order_windows(windows: tuple[int, ...]) -> OrderWindows:
    """The order series of each window length (see :data:`OrderWindows`).

    >>> _order_windows((60,))
    ((60, 'P:60', 'ret:60', 'life:60', 'crev:60', 'nrr:60'),)
    """
    result = []
    for n in windows:
        names = _series_names(n)
        result.append((n, names.purchasers, names.returning, names.lifespan, names.churned_revenue,
                       names.retained_revenue))
    return tuple(result)


def _order_deltas(out: Deltas, all_orders: list[int], order_times: dict[int, int], revenue_buckets: list[int],
                  revenue: dict[int, int], second_order: int | None, first_order_ms: int, windows: OrderWindows,
                  since: int, sign: int) -> None:
    """The order family's contributions clipped at ``since``, times ``sign``, added into ``out``.

    ``all_orders``: the order buckets, sorted; ``order_times``: bucket -> latest order time;
    ``revenue_buckets``: the buckets of nonzero net ``revenue``, sorted; ``second_order``: the
    second lifetime order's bucket (``None``: fewer orders); ``first_order_ms``: the first's time.
    :func:`metrics._blocks.order_deltas` is the same loop in C, adding the same deltas in the same
    order (used when built; it declines inputs past 62 bits, which this loop then takes).

    >>> out: Deltas = {}
    >>> _order_deltas(out, [10], {10: 600_000}, [10], {10: 5}, None, 600_000, _order_windows((60,)), 0, 1)
    >>> out["P:60"], out["crev:60"], out["nrr:60"]
    ({10: 1, 70: -1}, {70: 5, 130: -5}, {})
    """
    # the hot path of an order event: loops are inlined, and interval lists are built in one
    # pass over sorted buckets (the intervals the spans and intersect helpers would give)
    count = len(all_orders)
    for n, purchasers_series, returning_series, lifespan_series, churned_series, retained_series in windows:
        # nrr reads the purchaser status n buckets back, and an order's span lasts n buckets
        reach = since - 2 * n
        # purchaser at j: an order in j-n+1..j, the union of [o, o + n) (spans of sorted orders)
        starts: list[int] = []
        ends: list[int] = []
        for i in range(bisect_right(all_orders, reach), count):
            bucket = all_orders[i]
            if ends and bucket <= ends[-1]:
                ends[-1] = bucket + n
            else:
                starts.append(bucket)
                ends.append(bucket + n)
        purchasers = _series(out, purchasers_series)
        returning = _series(out, returning_series)
        for index, start in enumerate(starts):
            end = ends[index]
            if end > since:
                low = start if start > since else since
                purchasers[low] = purchasers.get(low, 0) + sign
                purchasers[end] = purchasers.get(end, 0) - sign
                # returning: a purchaser from the second lifetime order on
                if second_order is not None and end > second_order:
                    low = start if start > second_order else second_order
                    low = low if low > since else since
                    returning[low] = returning.get(low, 0) + sign
                    returning[end] = returning.get(end, 0) - sign
        # lifespan by j: last order up to j minus the first order; constant between orders
        lifespans = _series(out, lifespan_series)
        # an order's step ends at the next order: every order before the last one up to since
        # ends by since and adds nothing, so the loop starts at that last one
        first_lifespan = bisect_right(all_orders, since) - 1
        recent = bisect_right(all_orders, since - n)
        for i in range(first_lifespan if first_lifespan > recent else recent, count):
            bucket = all_orders[i]
            end = bucket + n
            if i + 1 < count and all_orders[i + 1] < end:
                end = all_orders[i + 1]
            lifespan = (order_times[bucket] - first_order_ms) * sign
            if lifespan and end > since:
                low = bucket if bucket > since else since
                lifespans[low] = lifespans.get(low, 0) + lifespan
                lifespans[end] = lifespans.get(end, 0) - lifespan
        churned = _series(out, churned_series)
        retained = _series(out, retained_series)
        spans_count = len(starts)
        for bucket in revenue_buckets[bisect_right(revenue_buckets, reach):]:
            amount = revenue[bucket] * sign
            # revenue of bucket b is "previous period" for j in [b+n, b+2n): churned where
            # the customer is no purchaser (the period minus the purchaser spans)
            cursor = bucket + n
            period_end = cursor + n
            index = bisect_right(ends, cursor)
            while index < spans_count and starts[index] < period_end:
                if starts[index] > cursor and starts[index] > since:
                    low = cursor if cursor > since else since
                    churned[low] = churned.get(low, 0) + amount
                    churned[starts[index]] = churned.get(starts[index], 0) - amount
                cursor = ends[index]
                index += 1
            if cursor < period_end and period_end > since:
                low = cursor if cursor > since else since
                churned[low] = churned.get(low, 0) + amount
                churned[period_end] = churned.get(period_end, 0) - amount
            # and "in W" for j in [b, b+n): retained where the customer was a purchaser n
            # buckets before (the purchaser spans shifted by n)
            if bucket + n > since:
                window_end = bucket + n
                index = bisect_right(ends, bucket - n)
                while index < spans_count and starts[index] + n < window_end:
                    low = starts[index] + n
                    high = ends[index] + n
                    low = low if low > bucket else bucket
                    high = high if high < window_end else window_end
                    if high > since:
                        low = low if low > since else since
                        retained[low] = retained.get(low, 0) + amount
                        retained[high] = retained.get(high, 0) - amount
                    index += 1


_State = TypeVar("_State")


def _keep_latest_of_bucket(entries: list[tuple[int, str, _State]], entry: tuple[int, str, _State], bucket: int,
                           bucket_ms: int) -> None:
    """Put ``entry`` (time, event id, state) into the sorted ``entries`` if it is the latest of its bucket.

    >>> entries = [(60_000, "a", True)]
    >>> _keep_latest_of_bucket(entries, (90_000, "b", False), 1, 60_000); entries
    [(90000, 'b', False)]
    """
    low = bisect_left(entries, (bucket * bucket_ms,))
    high = bisect_left(entries, ((bucket + 1) * bucket_ms,))
    if low == high:
        entries.insert(low, entry)
    elif entry[:2] > entries[high - 1][:2]:
        entries[low:high] = [entry]


class _WindowSums:
    """The net revenue in j-n+1..j as a step function of j >= since: its change points and values."""

    __slots__ = ("points", "values")

    def __init__(self, points: list[int], values: list[int]) -> None:
        #: the buckets where the sum changes, sorted, and the sum from each on
        self.points = points
        self.values = values

    def at(self, bucket: int) -> int:
        index = bisect_right(self.points, bucket) - 1
        return self.values[index] if index >= 0 else 0

    def add_within(self, series: dict[int, int], intervals: Intervals, sign: int) -> None:
        """Add the sum, times ``sign``, at the buckets of ``intervals`` (as a difference series)."""
        points, values = self.points, self.values
        for start, end in intervals:
            first = self.at(start)
            if first:
                series[start] = series.get(start, 0) + first * sign
            low = bisect_right(points, start)
            high = bisect_left(points, end)
            for index in range(low, high):
                change = values[index] - (values[index - 1] if index else 0)
                if change:
                    bucket = points[index]
                    series[bucket] = series.get(bucket, 0) + change * sign
            if end < PLUS_INFINITY:
                last = self.at(end - 1)
                if last:
                    series[end] = series.get(end, 0) - last * sign


def _window_sums(revenue: list[tuple[int, int]], n: int, since: int) -> _WindowSums:
    """The sum of ``revenue`` (sorted (bucket, amount)) over j-n+1..j, for j >= since (see :class:`_WindowSums`).

    >>> sums = _window_sums([(3, 10), (4, 5)], 2, 0)
    >>> [sums.at(j) for j in range(2, 8)]
    [0, 10, 15, 5, 0, 0]
    """
    changes: dict[int, int] = {}
    for bucket, amount in revenue[bisect_right(revenue, (since - n, PLUS_INFINITY)):]:
        changes[bucket] = changes.get(bucket, 0) + amount
        changes[bucket + n] = changes.get(bucket + n, 0) - amount
    points = sorted(changes)
    values = list(accumulate([changes[point] for point in points]))
    return _WindowSums(points, values)


class _WindowSeries(NamedTuple):
    """The names of the per-window series of one window length."""

    both: str
    newact: str
    actmem: str
    purchasers: str
    returning: str
    lifespan: str
    churned_revenue: str
    retained_revenue: str


@cache
def _series_names(window: int) -> _WindowSeries:
    suffix = ":" + str(window)
    prefixes = ("both", "newact", "actmem", "P", "ret", "life", "crev", "nrr")
    return _WindowSeries(*[prefix + suffix for prefix in prefixes])


def _series(out: Deltas, series: str) -> dict[int, int]:
    # the deltas of a series in out (a series left empty is harmless: it has no rows)
    buckets = out.get(series)
    if buckets is None:
        buckets = out[series] = {}
    return buckets


def add_delta(out: DeltaTarget, series: str, bucket: int, delta: int) -> None:
    """Add one delta to ``out``.

    >>> out: Deltas = {}; add_delta(out, "orders", 7, 1); add_delta(out, "orders", 7, 2); out
    {'orders': {7: 3}}
    """
    if isinstance(out, dict):
        buckets = _series(out, series)
        buckets[bucket] = buckets.get(bucket, 0) + delta
    else:
        out.add(series, bucket, delta)


def new_deltas() -> DeltaTarget:
    """An empty target for a message's deltas of one store: a native accumulator when built, else a dict.

    The accumulator keeps the deltas as int64 cells (exact: a sum past int64 becomes a Python
    int), so that a customer's contributions before and after its events cancel without a
    Python int made per bucket; :func:`grouped_rows` reads either alike.

    >>> out = new_deltas(); add_delta(out, "orders", 7, 2); add_delta(out, "orders", 9, 0); grouped_rows(out)
    ['orders', [7, 2]]
    """
    if _NATIVE_ACCUMULATOR is not None:
        accumulator: DeltaSink = _NATIVE_ACCUMULATOR()
        return accumulator
    return {}


def _add_by_loop(native: Any, python_loop: Callable[..., None], out: DeltaTarget, *arguments: Any) -> None:
    """Add a family's contributions into ``out`` by its C loop, or, when there is none or it declines
    (changing nothing), by its Python twin: into ``out`` itself when a dict, else into a dict then
    added into the accumulator."""
    if native is not None and native(out, *arguments) is not None:
        return
    if isinstance(out, dict):
        python_loop(out, *arguments)
    else:
        added: Deltas = {}
        python_loop(added, *arguments)
        out.add_deltas(added)


def _add_interval(out: Deltas, series: str, start: int, end: int, weight: int, since: int) -> None:
    # +weight where the interval starts (clipped at since), -weight where it ends; nothing if empty
    if end <= since or end <= start:
        return
    buckets = _series(out, series)
    low = start if start > since else since
    buckets[low] = buckets.get(low, 0) + weight
    if end < PLUS_INFINITY:
        buckets[end] = buckets.get(end, 0) - weight


def _add_intervals(out: Deltas, series: str, intervals: Intervals, weight: int, since: int) -> None:
    for start, end in intervals:
        _add_interval(out, series, start, end, weight, since)


def add_difference(out: Deltas, after: Deltas, before: Deltas) -> None:
    """Add ``after - before`` into ``out`` (entries that cancel stay, as zeros).

    >>> out = {"A": {3: 2}}
    >>> add_difference(out, {"A": {1: 1, 5: -1}}, {"A": {1: 1, 3: -1}, "P:60": {4: 1}}); out
    {'A': {3: 3, 1: 0, 5: -1}, 'P:60': {4: -1}}
    """
    for series, buckets in after.items():
        for bucket, value in buckets.items():
            add_delta(out, series, bucket, value)
    for series, buckets in before.items():
        for bucket, value in buckets.items():
            add_delta(out, series, bucket, -value)


def grouped_rows(deltas: DeltaTarget) -> list[Any]:
    """Nonzero deltas grouped by series, ``[series, [bucket, delta, bucket, delta, ...], series, ...]``.

    The form of the deltas topic (:meth:`metrics.store.StoreAggregate.add_groups` reads it); a
    series whose deltas all cancelled is left out. The facts stage's last step for every message:
    the accumulator's own rows, :func:`metrics._blocks.grouped_rows` for a dict when the C module
    is built, else :func:`_grouped_rows`.

    >>> grouped_rows({"A": {3: 1, 5: 0, 9: -1}, "P:60": {4: 0}})
    ['A', [3, 1, 9, -1]]
    """
    if not isinstance(deltas, dict):
        return deltas.rows()
    if _NATIVE_GROUPED_ROWS is not None:
        native: list[Any] = _NATIVE_GROUPED_ROWS(deltas)
        return native
    return _grouped_rows(deltas)


def _grouped_rows(deltas: Deltas) -> list[Any]:
    """:func:`grouped_rows` in Python (the reference of its C loop).

    >>> _grouped_rows({"A": {3: 0}, "B": {1: -2, 2: 0, 7: 2}})
    ['B', [1, -2, 7, 2]]
    """
    groups: list[Any] = []
    for series, buckets in deltas.items():
        pairs: list[int] = []
        for bucket, delta in buckets.items():
            if delta:
                pairs.append(bucket)
                pairs.append(delta)
        if pairs:
            groups.append(series)
            groups.append(pairs)
    return groups


#: :func:`metrics._blocks.grouped_rows`, or ``None`` (pure Python, or no C build)
_NATIVE_GROUPED_ROWS: Any = native_function("grouped_rows")
#: :class:`metrics._blocks.DeltaAccumulator`, or ``None`` (see :func:`new_deltas`)
_NATIVE_ACCUMULATOR: Any = native_function("DeltaAccumulator")
#: :func:`metrics._blocks.order_deltas`, or ``None`` (see :func:`_order_deltas`)
_NATIVE_ORDER_DELTAS: Any = native_function("order_deltas")
#: :func:`metrics._blocks.activity_deltas`, or ``None`` (see :func:`_activity_deltas`)
_NATIVE_ACTIVITY_DELTAS: Any = native_function("activity_deltas")
#: :func:`metrics._blocks.cohort_deltas`, or ``None`` (see :func:`_cohort_deltas`)
_NATIVE_COHORT_DELTAS: Any = native_function("cohort_deltas")
#: :func:`metrics._blocks.segment_deltas`, or ``None`` (see :func:`_segment_deltas`)
_NATIVE_SEGMENT_DELTAS: Any = native_function("segment_deltas")


def diff(after: Deltas, before: Deltas) -> Deltas:
    """``after - before``, without zero entries (nor series left empty).

    >>> diff({"A": {1: 1, 5: -1}}, {"A": {1: 1, 3: -1}})
    {'A': {5: -1, 3: 1}}
    """
    out: Deltas = {}
    add_difference(out, after, before)
    nonzero = {series: {b: v for b, v in buckets.items() if v} for series, buckets in out.items()}
    return {series: buckets for series, buckets in nonzero.items() if buckets}
