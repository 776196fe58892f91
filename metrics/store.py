"""Store-level state: prefix-summed series on the bucket grid, and the metrics read off them.

A store aggregate holds, per series, the deltas by bucket that customers and
events sent (see :mod:`metrics.customer`). The value of a difference series at
bucket j, or a histogram's running total, is a prefix sum; a window sum is the
difference of two. Buckets older than what any metric reads are folded into a
per-series base, so prefix sums stay exact while memory stays bounded.
"""

from __future__ import annotations

import zlib
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from itertools import accumulate
from sys import intern
from typing import Any, Union

import orjson

from metrics import formulas as f
from metrics import native_function
from metrics.catalog import METRIC_NAMES, MONETARY_METRICS, NO_SEGMENT, NPS_SEGMENTS
from metrics.customer import COHORT_PERIODS, cohort_series, month_bounds
from metrics.intervals import MINUS_INFINITY
from metrics.timegrid import Grid, month_label

#: buckets per block of a series: deltas are kept in arrays of this many slots (1 to 8 bytes each
#: where a dict entry costs about 100), created when a bucket of the block is first touched
_BLOCK_BITS = 10
_BLOCK_SIZE = 1 << _BLOCK_BITS
_BLOCK_MASK = _BLOCK_SIZE - 1
#: a dense block is an array of the narrowest of these integer types that holds its values (int8 up to
#: int64): a count series' slot holds the customers whose status changes in that minute, a few, so most
#: blocks take 1 KiB where int64 took 8; a value that leaves its type widens the block (:func:`_widen`),
#: past int64 to a plain list, exact at any size (amounts reach 10^18 micro-units). Arrays are not
#: tracked by the garbage collector, where lists of 1,024 slots each would be traversed at every full
#: collection.
_DENSE_TYPES = ("b", "h", "i", "q")
_TYPE_BOUNDS = {code: 1 << (8 * array(code).itemsize - 1) for code in _DENSE_TYPES}
#: a block starts sparse, a dict of its nonzero slots, and becomes an array past this many (a dict
#: of this many entries takes about as much as an int8 block): a store with a handful of customers
#: touches few slots of each block, and a dense block each would make its memory follow the calendar
#: instead of its activity
_SPARSE_MAX = 16
#: a series starts as one flat list of up to this many (bucket, delta) pairs, sorted, and takes blocks
#: past it: a small store has some 80 series of a few deltas each, and blocks (two dicts and a sparse
#: block each) would take twice the memory of the deltas they hold
_FEW_MAX = 16
#: the blocks and block sums of every small series: shared and always empty (nothing writes to a
#: small series' blocks; it gets dicts of its own when it takes blocks), 128 bytes less a series
_NO_BLOCKS: dict[int, Block] = {}
_NO_SUMS: dict[int, int] = {}
Block = Union["array[int]", list[int], dict[int, int]]
#: series read only at K (statuses "as of K"): every bucket up to K may fold into the base
_READ_AT_K_ONLY = ("both:", "newact:", "LM", "actmem:", "P:", "ret:", "life:", "crev:", "nrr:", "seg", "ck")
#: the prefixes of the series of one cohort each (metrics.customer.cohort_series)
_COHORT_SERIES = tuple(name.split(":")[0] + ":" for name in cohort_series(0))
#: series also read for the previous period (K - 2n)
_READ_TWO_WINDOWS_BACK = ("gross", "refunds")


def read_reach(series: str, longest: int, cohort_reach: int) -> int:
    """How far before K :meth:`StoreAggregate.metrics` (and :meth:`~MetricReader.cohorts`) reads a series.

    In buckets. Statuses are read at K, ``A`` also at K - n, histograms over windows (K - n),
    and gross and refunds for the previous period too (K - 2n); the cohort histograms ``cm``
    a year back (``cohort_reach``, :attr:`metrics.timegrid.Grid.cohort_reach`). Unknown names
    get ``longest``, the common case.

    >>> [read_reach(name, 1440, 576000) for name in ("P:60", "A", "gross", "cmN")]
    [0, 1440, 2880, 576000]
    """
    if series.startswith(_READ_AT_K_ONLY):
        return 0
    if series.startswith("cm"):
        return cohort_reach
    if series in _READ_TWO_WINDOWS_BACK:
        return 2 * longest
    return longest


def _narrowest(low: int, high: int, start: int = 0) -> str | None:
    """The narrowest dense type from ``_DENSE_TYPES[start]`` on that holds ``low .. high``, else ``None``.

    >>> _narrowest(-128, 127), _narrowest(0, 128), _narrowest(0, 2**31), _narrowest(0, 2**63)
    ('b', 'h', 'q', None)
    """
    for code in _DENSE_TYPES[start:]:
        bound = _TYPE_BOUNDS[code]
        if -bound <= low and high < bound:
            return code
    return None


def _zeros(code: str, count: int) -> array[int]:
    """``count`` zero slots of dense type ``code``.

    >>> _zeros("h", 3), _zeros("b", 1024).itemsize * 1024
    (array('h', [0, 0, 0]), 1024)
    """
    return array(code, bytes(array(code).itemsize * count))


def _densify(sparse: dict[int, int]) -> Block:
    """A sparse block as an array of the narrowest type that holds its values (a list past int64)."""
    values = sparse.values()
    code = _narrowest(min(values), max(values)) if values else "b"
    if code is None:
        wide = [0] * _BLOCK_SIZE
        for slot, value in sparse.items():
            wide[slot] = value
        return wide
    dense = _zeros(code, _BLOCK_SIZE)
    for slot, value in sparse.items():
        dense[slot] = value
    return dense


#: the C sum of a dense block's slots (:mod:`metrics._blocks`), ``None`` when it is not built
_NATIVE_DENSE_SUM: Any = native_function("dense_sum")


def _slot_sum(block: Block, start: int, stop: int) -> int:
    """The sum of a block's slots ``start .. stop - 1``: every prefix read of a series sums part of a block.

    >>> _slot_sum(array("b", [1, 2, 3, 4]), 1, 3), _slot_sum({0: 5, 7: 1}, 0, 7), _slot_sum([2**70, 1], 0, 9)
    (5, 5, 1180591620717411303425)
    """
    if isinstance(block, dict):
        return sum([value for slot, value in block.items() if start <= slot < stop])
    if _NATIVE_DENSE_SUM is not None and isinstance(block, array):
        total: int | None = _NATIVE_DENSE_SUM(block, start, stop)
        if total is not None:
            return total
    return sum(block[start:stop])


def _widen(blocks: dict[int, Block], bucket: int, delta: int) -> None:
    """Add a delta that takes its slot (or the delta itself) out of its block's type: the block becomes the
    narrowest array from its own type on that holds the sum, or a list past int64.

    >>> blocks = {0: _densify({3: 100})}
    >>> _widen(blocks, 3, 100); blocks[0].typecode, blocks[0][3]
    ('h', 200)
    >>> _widen(blocks, 3, 2**63); type(blocks[0]).__name__, blocks[0][3] == 2**63 + 200
    ('list', True)
    """
    index = bucket >> _BLOCK_BITS
    slot = bucket & _BLOCK_MASK
    block = blocks[index]
    total = block[slot] + delta
    code = None
    if isinstance(block, array):
        # from the block's own type: a delta past int64 may still leave a sum that fits it
        code = _narrowest(total, total, _DENSE_TYPES.index(block.typecode))
    widened: Block = list(block) if code is None else array(code, block)
    widened[slot] = total
    blocks[index] = widened


class PrefixSeries:
    """Deltas by bucket in blocks, with each block's sum kept, so a prefix sum adds block sums.

    A new series holds its deltas in one sorted list of (bucket, delta) pairs (``few``) and
    moves them into blocks once it has more than :data:`_FEW_MAX`; reads and folds pass over
    the few pairs. In blocks, adding a delta costs two in-place additions (its slot and its block's sum);
    a prefix sum is the base, the sums of the blocks before the bucket's block
    and part of that block. The running sums of the blocks are kept for reading (a binary
    search instead of a pass over every block: a store with years of unfolded history has
    thousands) and dropped by any change, so reads between writes share them.

    >>> series = PrefixSeries()
    >>> series.add(3, 2); series.add(7, -1); series.add(1, 5)
    >>> series.prefix(0), series.prefix(3), series.prefix(10)
    (0, 7, 6)
    >>> series.fold_before(5), series.prefix(5), series.prefix(7)
    (0, 7, 6)
    >>> for bucket in range(100, 120): series.add(bucket, 1)
    >>> series.few is None, series.prefix(7), series.prefix(109), series.next_delta(7)
    (True, 6, 16, 100)
    """

    __slots__ = ("_running", "base", "blocks", "few", "floor", "sums")

    def __init__(self) -> None:
        #: while the series is small: ``[bucket, delta, ...]`` by bucket, one pair per bucket, no zero
        #: delta, none below ``floor``; ``None`` once its deltas are in ``blocks``
        self.few: list[int] | None = []
        #: block index (bucket >> _BLOCK_BITS) -> the deltas of its buckets; zero below ``floor``
        #: (:data:`_NO_BLOCKS` while the series is small)
        self.blocks: dict[int, Block] = _NO_BLOCKS
        #: block index -> the sum of its deltas (exact at any size; a block without an entry sums to 0)
        self.sums: dict[int, int] = _NO_SUMS
        #: sum of the deltas of buckets below ``floor``
        self.base = 0
        self.floor: int | None = None
        #: (block indexes in order, the sum of the blocks up to each), or ``None`` after a change
        self._running: tuple[list[int], list[int]] | None = None

    def changed(self) -> None:
        """Drop the running sums: a block sum changed (for writers of ``sums`` outside this class; its own
        writers, :meth:`add` and :meth:`fold_before`, drop them inline)."""
        self._running = None

    def add(self, bucket: int, delta: int) -> None:
        """Add ``delta`` at ``bucket``."""
        if self.floor is not None and bucket < self.floor:
            self.base += delta
            return
        few = self.few
        if few is not None:
            self._add_few(few, bucket, delta)
            return
        self._running = None
        index = bucket >> _BLOCK_BITS
        slot = bucket & _BLOCK_MASK
        block = self.blocks.get(index)
        if block is None:
            self.blocks[index] = {slot: delta}
        elif isinstance(block, dict):
            block[slot] = block.get(slot, 0) + delta
            if len(block) > _SPARSE_MAX:
                self.blocks[index] = _densify(block)
        else:
            try:
                block[slot] += delta
            except OverflowError:
                _widen(self.blocks, bucket, delta)
        self.sums[index] = self.sums.get(index, 0) + delta

    def _add_few(self, few: list[int], bucket: int, delta: int) -> None:
        """Add a delta at or above the floor to the pairs of a small series; past :data:`_FEW_MAX`, to blocks."""
        count = len(few)
        position = 0
        while position < count and few[position] < bucket:
            position += 2
        if position < count and few[position] == bucket:
            total = few[position + 1] + delta
            if total:
                few[position + 1] = total
            else:
                del few[position:position + 2]
            return
        if not delta:
            return
        few[position:position] = [bucket, delta]
        if count + 2 > 2 * _FEW_MAX:
            self.take_blocks()

    def take_blocks(self) -> None:
        """Move a small series' pairs into blocks (and block sums) of its own; a series of blocks stays as it is."""
        few = self.few
        if few is None:
            return
        self.few = None
        self.blocks = {}
        self.sums = {}
        # every pair is at or above the floor (folds take the pairs below it): nothing goes to the base
        _add_pairs(self.blocks, self.sums, few, MINUS_INFINITY)

    def prefix(self, bucket: int) -> int:
        """Sum of the deltas at buckets ``<= bucket`` (exact from ``floor - 1`` on; below, an error)."""
        if self.floor is not None and bucket < self.floor - 1:
            raise ValueError(f"bucket {bucket} is below the series' folded floor {self.floor}")
        few = self.few
        if few is not None:
            value = self.base
            for position in range(0, len(few), 2):
                if few[position] > bucket:
                    break
                value += few[position + 1]
            return value
        index = bucket >> _BLOCK_BITS
        running = self._running
        if running is None:
            indexes = sorted(self.sums)
            totals = list(accumulate([self.sums[i] for i in indexes]))
            running = self._running = (indexes, totals)
        before = bisect_left(running[0], index)
        value = self.base + (running[1][before - 1] if before else 0)
        block = self.blocks.get(index)
        if block is not None:
            value += _slot_sum(block, 0, (bucket & _BLOCK_MASK) + 1)
        return value

    def window(self, end: int, length: int) -> int:
        """Sum of the deltas in buckets ``end - length + 1 .. end``."""
        return self.prefix(end) - self.prefix(end - length)

    def next_delta(self, after: int) -> int | None:
        """The first bucket after ``after`` that holds a delta (or held one that summed to 0), else ``None``.

        >>> series = PrefixSeries()
        >>> series.add(3, 2); series.add(5000, -1); series.add(-70_000, 1)
        >>> series.next_delta(-10**9), series.next_delta(0), series.next_delta(3), series.next_delta(5000)
        (-70000, 3, 5000, None)
        """
        few = self.few
        if few is not None:
            for position in range(0, len(few), 2):
                if few[position] > after:
                    return few[position]
            return None
        start = (after + 1) >> _BLOCK_BITS
        for index in sorted(i for i in self.blocks if i >= start):
            block = self.blocks[index]
            base = index << _BLOCK_BITS
            first = max(after + 1 - base, 0)
            if isinstance(block, dict):
                slots = [slot for slot in block if slot >= first]
                if slots:
                    return base + min(slots)
                continue
            for slot in range(first, _BLOCK_SIZE):
                if block[slot]:
                    return base + slot
        return None

    def items(self) -> Iterator[tuple[int, int]]:
        """The kept nonzero deltas as (bucket, delta), by bucket."""
        few = self.few
        if few is not None:
            for position in range(0, len(few), 2):
                yield few[position], few[position + 1]
            return
        for index in sorted(self.blocks):
            origin = index << _BLOCK_BITS
            block = self.blocks[index]
            slots = sorted(block.items()) if isinstance(block, dict) else enumerate(block)
            for offset, delta in slots:
                if delta:
                    yield origin + offset, delta

    def merge(self, other: PrefixSeries) -> None:
        """Add every delta of ``other`` (the series of the union of both inputs)."""
        if other.floor is not None:
            self.fold_before(other.floor)
        self.base += other.base
        for bucket, delta in other.items():
            self.add(bucket, delta)

    def fold_before(self, floor: int) -> int:
        """Fold the deltas of buckets below ``floor`` into the base; returns how many whole blocks went.

        A small series' pairs below the floor go too, and count as no block: a checkpoint that
        still holds them reads the same sums, so they need not make one sooner.
        """
        previous = self.floor
        if previous is not None and floor <= previous:
            return 0
        self.floor = floor
        few = self.few
        if few is not None:
            position = 0
            while position < len(few) and few[position] < floor:
                self.base += few[position + 1]
                position += 2
            if position:
                del few[:position]
            return 0
        self._running = None
        blocks = self.blocks
        sums = self.sums
        floor_block = floor >> _BLOCK_BITS
        dropped = 0
        if previous is None or previous >> _BLOCK_BITS < floor_block:
            gone = [i for i in blocks if i < floor_block]
            dropped = len(gone)
            for index in gone:
                del blocks[index]
                self.base += sums.pop(index, 0)
            start = 0
        else:
            start = previous & _BLOCK_MASK  # below it the block is folded already
        stop = floor & _BLOCK_MASK
        block = blocks.get(floor_block)
        if block is not None and stop > start:
            if isinstance(block, dict):
                gone = [slot for slot in block if start <= slot < stop]
                folded = sum([block.pop(slot) for slot in gone])
            else:
                folded = _slot_sum(block, start, stop)
                if isinstance(block, array):
                    block[start:stop] = _zeros(block.typecode, stop - start)
                else:
                    block[start:stop] = [0] * (stop - start)
            self.base += folded
            sums[floor_block] = sums.get(floor_block, 0) - folded
        return dropped


#: :meth:`StoreAggregate.alert_quiet_until` when nothing later can end the quiet
QUIET_FOR_EVER = 2**62


class MetricReader:
    """Every metric of SPEC section 5 read off prefix sums: ``_at(series, bucket)`` and the series' names."""

    def _at(self, series: str, bucket: int) -> int:
        raise NotImplementedError

    def _series_names(self) -> Iterable[str]:
        """The names of the series (for the channels of ``cac_by_channel``)."""
        raise NotImplementedError

    def _window(self, series: str, end: int, length: int) -> int:
        return self._at(series, end) - self._at(series, end - length)

    def alert_metrics(self, window: int, as_of_bucket: int) -> dict[str, object]:
        """Only what the alert detectors watch (SPEC 7), as :meth:`metrics` computes it: a sample costs less.

        ``churn_rate``, ``churned_customers``, ``nps``, ``nps_responses`` and ``nps_ci_high``.
        """
        k, n = as_of_bucket, window
        win = self._window
        nps_n = win("nps_n", k, n)
        promoters = win("nps_p", k, n)
        detractors = win("nps_d", k, n)
        customers_start = self._at("A", k - n)
        churned = customers_start - self._at("both:" + str(n), k)
        return {
            "nps": f.nps(promoters, detractors, nps_n),
            "nps_responses": nps_n,
            "nps_ci_high": f.nps_interval(promoters, detractors, nps_n)[1],
            "churned_customers": churned,
            "churn_rate": f.percent(churned, customers_start),
        }

    def metrics(self, grid: Grid, window: int, as_of_bucket: int, monetary: bool = True) -> dict[str, object]:
        """Every metric of SPEC section 5 for the window of ``window`` buckets as of bucket K.

        ``monetary=False`` publishes the monetary metrics as ``None`` (``*`` across currencies).
        """
        k = as_of_bucket
        n = window
        suffix = ":" + str(n)
        window_ms = n * grid.bucket_ms
        at = self._at
        win = self._window
        out: dict[str, object] = {}

        # surveys
        nps_n = win("nps_n", k, n)
        promoters = win("nps_p", k, n)
        detractors = win("nps_d", k, n)
        out["nps"] = f.nps(promoters, detractors, nps_n)
        out["nps_responses"] = nps_n
        out["nps_promoters"] = promoters
        out["nps_passives"] = win("nps_pa", k, n)
        out["nps_detractors"] = detractors
        out["nps_ci_low"], out["nps_ci_high"] = f.nps_interval(promoters, detractors, nps_n)
        csat_n = win("csat_n", k, n)
        out["csat"] = f.percent(win("csat_sat", k, n), csat_n)
        out["csat_responses"] = csat_n
        ces_n = win("ces_n", k, n)
        out["ces"] = f.ratio(win("ces_sum", k, n), ces_n)
        out["ces_responses"] = ces_n
        cli_n = win("cli_n", k, n)
        out["cli"] = f.ratio(win("cli_pts", k, n), 3 * cli_n)
        out["cli_raw"] = f.ratio(win("cli_ans", k, n), 3 * cli_n)
        out["cli_responses"] = cli_n

        # customers
        customers_end = at("A", k)
        customers_start = at("A", k - n)
        new_customers = win("F", k, n)
        both = at("both" + suffix, k)
        churned = customers_start - both
        out["customers_end"] = customers_end
        out["customers_start"] = customers_start
        out["new_customers"] = new_customers
        out["retention_rate"] = f.retention_rate(customers_end, new_customers, customers_start)
        out["churned_customers"] = churned
        out["churn_rate"] = f.percent(churned, customers_start)
        out["reactivated_customers"] = customers_end - both - at("newact" + suffix, k)

        # orders and value
        orders = win("orders", k, n)
        gross = win("gross", k, n)
        refunds = win("refunds", k, n)
        purchasers = at("P" + suffix, k)
        returning = at("ret" + suffix, k)
        out["orders"] = orders
        out["gross_revenue"] = f.money(gross)
        out["refunds"] = f.money(refunds)
        out["net_revenue"] = f.money(gross - refunds)
        out["purchasers"] = purchasers
        out["returning_customers"] = returning
        out["one_time_customers"] = purchasers - returning
        out["repeat_purchase_rate"] = f.percent(returning, purchasers)
        aov = f.ratio(gross, orders)
        out["aov"] = None if aov is None else aov / 1_000_000
        out["purchase_frequency"] = f.ratio(orders, purchasers)
        customer_value = f.ratio(gross, purchasers)
        customer_value = None if customer_value is None else customer_value / 1_000_000
        out["customer_value"] = customer_value
        lifespan_ms = f.ratio(at("life" + suffix, k), purchasers)
        lifespan = None if lifespan_ms is None else f.years(lifespan_ms)
        out["avg_lifespan_years"] = lifespan
        out["clv"] = f.clv(customer_value, window_ms, lifespan)
        previous = win("gross", k - n, n) - win("refunds", k - n, n)
        churned_revenue = at("crev" + suffix, k)
        out["revenue_prev_period"] = f.money(previous)
        out["churned_revenue"] = f.money(churned_revenue)
        out["revenue_churn_rate"] = f.percent(churned_revenue, previous)
        out["net_revenue_retention"] = f.percent(at("nrr" + suffix, k), previous)

        # acquisition
        spend = win("spend", k, n)
        out["marketing_spend"] = f.money(spend)
        cac = f.ratio(spend, new_customers)
        out["cac"] = None if cac is None else cac / 1_000_000
        out["cac_by_channel"] = self._cac_by_channel(k, n)

        # loyalty programme
        members = at("LM", k)
        active_members = at("actmem" + suffix, k)
        issued = win("rw_i", k, n)
        redeemed = win("rw_r", k, n)
        out["loyalty_members"] = members
        out["participation_rate"] = f.percent(members, customers_end)
        out["rewards_issued"] = issued
        out["rewards_redeemed"] = redeemed
        out["redemption_rate"] = f.percent(redeemed, issued)
        out["active_members"] = active_members
        out["active_participation_rate"] = f.percent(active_members, members)

        # by NPS segment
        churn: dict[str, float | None] = {}
        repeat: dict[str, float | None] = {}
        revenue: dict[str, object] = {}
        rest_start, rest_both, rest_buyers, rest_returning = customers_start, both, purchasers, returning
        rest_revenue = gross - refunds
        for code, segment in NPS_SEGMENTS:
            series = code + suffix
            start = at("segcs:" + series, k)
            retained = at("segboth:" + series, k)
            buyers = at("segP:" + series, k)
            again = at("segret:" + series, k)
            net = at("segrev:" + series, k)
            churn[segment] = f.percent(start - retained, start)
            repeat[segment] = f.percent(again, buyers)
            revenue[segment] = f.money(net)
            rest_start -= start
            rest_both -= retained
            rest_buyers -= buyers
            rest_returning -= again
            rest_revenue -= net
        # customers without an NPS answer: every customer minus those of the three segments
        churn[NO_SEGMENT] = f.percent(rest_start - rest_both, rest_start)
        repeat[NO_SEGMENT] = f.percent(rest_returning, rest_buyers)
        revenue[NO_SEGMENT] = f.money(rest_revenue)
        out["churn_rate_by_nps_segment"] = churn
        out["repeat_purchase_rate_by_nps_segment"] = repeat
        out["net_revenue_by_nps_segment"] = revenue

        if not monetary:
            for name in MONETARY_METRICS:
                out[name] = None
        return {name: out[name] for name in METRIC_NAMES}

    def cohorts(self, grid: Grid, as_of_bucket: int) -> dict[str, object]:
        """The cohort matrix as of bucket K: the last 12 cohorts (by month of first activity), oldest first.

        Each row: ``cohort`` (``YYYY-MM``), ``customers`` (first activity in that month, up to K),
        and per period p = 0..11 (the month p months after the cohort's) ``active_customers``
        (active at the month's last bucket, or at K for K's month), ``purchasers`` (an
        ``order.placed`` in that month, up to K) and their shares of ``customers`` in percent,
        ``active_rate`` and ``purchase_rate``. A period after K's month is ``None``, and so is a
        share of an empty cohort.
        """
        k = as_of_bucket
        at = self._at
        current = grid.month_of_bucket(k)
        rows: list[dict[str, object]] = []
        for cohort in range(current - COHORT_PERIODS + 1, current + 1):
            bounds = month_bounds(grid.bucket_ms, cohort)
            names = cohort_series(cohort)
            # a past cohort's size is its histogram entry, the current one's is read at K
            last = bounds[1] - 1
            customers = at("cmN", last) - at("cmN", last - 1) if cohort < current else at("ckN", k)
            active: list[int | None] = []
            buyers: list[int | None] = []
            for period in range(COHORT_PERIODS):
                month = cohort + period
                if month > current:
                    active.append(None)
                    buyers.append(None)
                elif month < current:
                    last = bounds[period + 1] - 1
                    active.append(at(names.active_ends, last))
                    buyers.append(at(names.ordered_ends, last))
                else:
                    active.append(at(names.active_now, k))
                    buyers.append(at(names.ordered_now, k))
            rows.append({
                "cohort": month_label(cohort),
                "customers": customers,
                "active_customers": active,
                "active_rate": [None if value is None else f.percent(value, customers) for value in active],
                "purchasers": buyers,
                "purchase_rate": [None if value is None else f.percent(value, customers) for value in buyers],
            })
        return {"period": "month", "cohorts": rows}

    def _cac_by_channel(self, k: int, n: int) -> dict[str, float | None]:
        channels = {name.split(":", 1)[1] for name in self._series_names() if name.startswith(("spend_ch:", "Fch:"))}
        result: dict[str, float | None] = {}
        for channel in sorted(channels):
            spend = self._window("spend_ch:" + channel, k, n)
            new = self._window("Fch:" + channel, k, n)
            if new or self._window("spend_chn:" + channel, k, n):
                cac = f.ratio(spend, new)
                result[channel] = None if cac is None else cac / 1_000_000
        return result


def _add_pairs(blocks: dict[int, Block], sums: dict[int, int], pairs: list[int], floor: int) -> int:
    """Add a series' ``[bucket, delta, ...]`` at or above ``floor`` into its blocks and their sums (as
    :meth:`PrefixSeries.add`, inline); returns the sum of the deltas below ``floor``, for the base.

    Consecutive deltas of one block reuse it, and their sum is added to the block's once. Written
    for mypyc (typed locals, indexed loops); :mod:`metrics._blocks` is the same loop in C.

    >>> blocks, sums = {}, {}
    >>> _add_pairs(blocks, sums, [3, 1, 9, -1, 1030, 4, 0, 7], 1), blocks, sums
    (7, {0: {3: 1, 9: -1}, 1: {6: 4}}, {1: 4})
    """
    count = len(pairs)
    folded = 0
    # the block of the current run of deltas, and their sum, added to its block's once
    block_index = MINUS_INFINITY
    block: Block = {}  # replaced by the first pair's block
    sparse: dict[int, int] | None = None
    run = 0
    item = 0
    while item < count:
        bucket = pairs[item]
        delta = pairs[item + 1]
        item += 2
        if bucket < floor:
            folded += delta
            continue
        index = bucket >> _BLOCK_BITS
        if index != block_index:
            if run:
                sums[block_index] = sums.get(block_index, 0) + run
                run = 0
            block_index = index
            found = blocks.get(index)
            if found is None:
                found = blocks[index] = {}
            block = found
            sparse = found if isinstance(found, dict) else None
        slot = bucket & _BLOCK_MASK
        if sparse is not None:
            sparse[slot] = sparse.get(slot, 0) + delta
            if len(sparse) > _SPARSE_MAX:
                block = blocks[index] = _densify(sparse)
                sparse = None
        else:
            try:
                block[slot] += delta
            except OverflowError:
                _widen(blocks, bucket, delta)
                block = blocks[index]
        run += delta
    if run:
        sums[block_index] = sums.get(block_index, 0) + run
    return folded


#: :func:`metrics._blocks.add_pairs`, or ``None`` (pure Python, or no C build): see :func:`_add_pairs`
_NATIVE_ADD_PAIRS: Any = native_function("add_pairs")


class StoreAggregate(MetricReader):
    """All series of one store (or of ``*``): apply deltas, read metrics as of a bucket."""

    __slots__ = ("series",)

    def __init__(self) -> None:
        self.series: dict[str, PrefixSeries] = {}

    def add(self, series: str, bucket: int, delta: int) -> None:
        """Add one delta."""
        target = self.series.get(series)
        if target is None:
            target = self.series[intern(series)] = PrefixSeries()
        target.add(bucket, delta)

    def add_all(self, deltas: Iterable[Sequence[Any]]) -> None:
        """Add many ``(series, bucket, delta)`` (the engine's form; the pipeline's is :meth:`add_groups`)."""
        for series, bucket, delta in deltas:
            self.add(series, bucket, delta)

    def add_groups(self, groups: list[Any]) -> None:
        """Add deltas grouped by series, ``[series, [bucket, delta, bucket, delta, ...], series, ...]``.

        The aggregation's hot path: each series is looked up once, and its pairs are added
        by the C loop (:mod:`metrics._blocks`, built with the compiled modules) or else by
        :func:`_add_pairs`, which does the same.

        >>> aggregate = StoreAggregate(); aggregate.add_groups(["A", [3, 1, 9, -1], "A", [5, 2]])
        >>> aggregate.series["A"].prefix(4), aggregate.series["A"].prefix(9)
        (1, 2)
        """
        all_series = self.series
        for position in range(0, len(groups), 2):
            name: str = groups[position]
            pairs: list[int] = groups[position + 1]
            count = len(pairs)
            if count & 1:
                raise ValueError(f"series {name!r}: an odd number of bucket/delta items ({count})")
            target = all_series.get(name)
            if target is None:
                # one name object for every store that has the series (a store has some 80)
                target = all_series[intern(name)] = PrefixSeries()
            few = target.few
            if few is not None:
                if len(few) + count <= 2 * _FEW_MAX:
                    # stays small: pair by pair into its list
                    for item in range(0, count, 2):
                        target.add(pairs[item], pairs[item + 1])
                    continue
                # too many for a small series: blocks first, then the group through the loop below
                target.take_blocks()
            floor: int = MINUS_INFINITY if target.floor is None else target.floor
            target.changed()
            folded: Any = None
            if _NATIVE_ADD_PAIRS is not None:
                folded = _NATIVE_ADD_PAIRS(target.blocks, target.sums, pairs, floor, _SPARSE_MAX, _densify, _widen)
            if folded is None:
                folded = _add_pairs(target.blocks, target.sums, pairs, floor)
            if folded:
                target.base += folded

    def to_bytes(self) -> bytes:
        """The aggregate as bytes (zlib): a JSON head, then the dense blocks as they lie in memory.

        :meth:`from_bytes` restores it exactly, each dense block in its type. A block a sum took
        out of int64 (a list) is written in the head. Serialising is a copy of the blocks at C speed, so a checkpoint
        of a large store costs milliseconds, not a Python loop over its buckets.

        >>> aggregate = StoreAggregate(); aggregate.add_groups(["A", [3, 1, 2000, 2**62, 2000, 2**62]])
        >>> aggregate.add_groups(["B", [value for slot in range(20) for value in (slot, slot)]])
        >>> aggregate.add_groups(["C", [value for slot in range(20) for value in (slot, 10**12)]])
        >>> aggregate.fold_before(1)  # no whole block below bucket 1
        0
        >>> restored = StoreAggregate.from_bytes(aggregate.to_bytes()).series
        >>> restored["A"].prefix(3), restored["A"].prefix(2000), restored["A"].floor
        (1, 9223372036854775809, 1)
        >>> restored["B"].blocks[0].typecode, restored["B"].prefix(19), restored["B"].prefix(0)
        ('b', 190, 0)
        >>> restored["C"].blocks[0].typecode, restored["C"].prefix(19)
        ('q', 20000000000000)
        """
        head: list[object] = []
        payload: list[array[int]] = []
        for name, series in self.series.items():
            blocks: list[object] = []
            for index, block in series.blocks.items():
                if isinstance(block, array):
                    # an int64 block is its index alone (the form of checkpoints written before narrower types)
                    blocks.append([index] if block.typecode == "q" else [index, block.typecode])
                    payload.append(block)
                elif isinstance(block, dict):
                    blocks.append([index, [str(value) for slot_value in block.items() for value in slot_value], 1])
                else:
                    blocks.append([index, [str(value) for value in block]])
            few = series.few
            if few is None:
                head.append([name, str(series.base), series.floor, blocks])
            else:  # a small series: its pairs, as text (a delta may be past int64)
                head.append([name, str(series.base), series.floor, blocks, [str(value) for value in few]])
        # compressed block by block: no copy of all the blocks at once, whatever the store's size
        compressor = zlib.compressobj(1)
        out = [compressor.compress(orjson.dumps(head) + b"\n")]
        out.extend(compressor.compress(block) for block in payload)
        out.append(compressor.flush())
        return b"".join(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> StoreAggregate:
        """The aggregate of :meth:`to_bytes`."""
        raw = zlib.decompress(data)
        split = raw.index(b"\n")
        head = orjson.loads(raw[:split])
        view = memoryview(raw)[split + 1:]
        position = 0
        aggregate = cls()
        for entry_of_series in head:
            name, base, floor, blocks = entry_of_series[:4]
            series = aggregate.series[intern(name)] = PrefixSeries()
            series.base = int(base)
            series.floor = floor
            # a series of blocks has four entries (as every series had before small series were lists)
            if len(entry_of_series) > 4:
                series.few = [int(value) for value in entry_of_series[4]]
            else:
                series.take_blocks()
            for entry in blocks:
                index = entry[0]
                block: Block
                if len(entry) == 1 or isinstance(entry[1], str):  # dense: its type, int64 when not named
                    block = array("q" if len(entry) == 1 else entry[1])
                    block_bytes = block.itemsize * _BLOCK_SIZE
                    block.frombytes(view[position:position + block_bytes])
                    position += block_bytes
                elif len(entry) == 3:  # sparse: slot, value, slot, value, ...
                    values = entry[1]
                    block = {int(values[i]): int(values[i + 1]) for i in range(0, len(values), 2)}
                else:
                    block = [int(value) for value in entry[1]]
                series.blocks[index] = block
                series.sums[index] = sum(block.values()) if isinstance(block, dict) else sum(block)
        return aggregate

    def merge(self, other: StoreAggregate) -> None:
        """Fold another aggregate into this one: the aggregate of both event sets.

        Deltas add up, so merging is associative and commutative.
        """
        for name, series in other.series.items():
            target = self.series.get(name)
            if target is None:
                target = self.series[intern(name)] = PrefixSeries()
            target.merge(series)

    def fold_before(self, floor: int) -> int:
        """Forget buckets below ``floor`` except through each series' base; returns the blocks dropped."""
        return sum([series.fold_before(floor) for series in self.series.values()])

    def fold_read(self, as_of_bucket: int, longest: int, cohort_reach: int) -> int:
        """Fold, per series, every bucket that no later :meth:`metrics` (nor :meth:`cohorts`) reads.

        Reads are as of ``as_of_bucket`` or later (the clock only moves forward):
        a series is folded below ``as_of_bucket - read_reach(series)``, so a
        status read only at K keeps just its future deltas (interval ends), and
        memory does not grow with the buckets a run has passed. A cohort's series that reads 0
        everywhere is dropped (a cohort more than a year old has no more deltas), so the series of
        a store do not grow with the months it has lived. Returns how many whole blocks and
        series were dropped.
        """
        dropped = sum([series.fold_before(as_of_bucket - read_reach(name, longest, cohort_reach))
                       for name, series in self.series.items()])
        empty = [name for name, series in self.series.items()
                 if name.startswith(_COHORT_SERIES) and not series.few and not series.blocks and not series.base]
        for name in empty:
            del self.series[name]
        return dropped + len(empty)

    def _series_names(self) -> Iterable[str]:
        return self.series.keys()

    def _at(self, series: str, bucket: int) -> int:
        target = self.series.get(series)
        return 0 if target is None else target.prefix(bucket)

    def _window(self, series: str, end: int, length: int) -> int:
        target = self.series.get(series)
        return 0 if target is None else target.window(end, length)

    def alert_quiet_until(self, window: int, as_of_bucket: int) -> int | None:
        """When the alert sample as of K is empty, the first bucket after K whose sample may not be; else ``None``.

        Empty: no customer active at K - n (``churn_rate`` has no denominator) and no NPS response in the
        window (``nps`` has none), so the detectors skip it (SPEC 7). It stays so for every K' until the
        active series ``A`` has a delta after K - n that K' - n reaches, or an NPS response lands in the
        window: the answer is ``min(next A delta after K - n, + n; next response after K - n)``, or
        :data:`QUIET_FOR_EVER` when neither has one. A sampler skips the boundaries in between: their
        samples would change nothing (a store with a year-0001 event need not sample every boundary since).

        >>> aggregate = StoreAggregate()
        >>> aggregate.add_all([("A", 10, 1), ("A", 20, -1), ("nps_n", 500, 1)])
        >>> aggregate.alert_quiet_until(5, 15), aggregate.alert_quiet_until(5, 100), aggregate.alert_quiet_until(5, 8)
        (None, 500, 15)
        >>> StoreAggregate().alert_quiet_until(5, 100) == QUIET_FOR_EVER
        True
        """
        k, n = as_of_bucket, window
        if self._at("A", k - n) or self._window("nps_n", k, n):
            return None
        candidates = [QUIET_FOR_EVER]
        active = self.series.get("A")
        change = None if active is None else active.next_delta(k - n)
        if change is not None:
            candidates.append(change + n)
        responses = self.series.get("nps_n")
        change = None if responses is None else responses.next_delta(k - n)
        if change is not None:
            candidates.append(change)
        return min(candidates)

    def alert_points(self, window: int, as_of_bucket: int) -> ReadPoints:
        """The prefix sums :meth:`alert_metrics` reads: those of several aggregates summed give their sample."""
        recorder = _Recorder(self)
        recorder.alert_metrics(window, as_of_bucket)
        return recorder.points

    def read_points(self, grid: Grid, as_of_bucket: int) -> ReadPoints:
        """The prefix sums that :meth:`metrics` reads as of bucket K for every window of ``grid``.

        Metrics are functions of these values alone, and the values add up over stores, so the
        read points of several aggregates summed (:meth:`ReadPoints.merge`) give the metrics of
        the aggregate of all their events: how ``*`` is computed from partial sums.
        """
        recorder = _Recorder(self)
        for window in grid.windows:
            recorder.metrics(grid, window, as_of_bucket)
        recorder.cohorts(grid, as_of_bucket)
        return recorder.points


#: the largest integer that orjson writes as a number
_INT64_MAX = 2**63 - 1


class ReadPoints(MetricReader):
    """The prefix sums a metric computation reads (series -> bucket -> value), itself readable as metrics.

    Unread points count as 0. Read points of disjoint sets of events add up (:meth:`merge`).

    >>> left, right = StoreAggregate(), StoreAggregate()
    >>> left.add_groups(["orders", [10, 2]]); right.add_groups(["orders", [11, 1], "gross", [11, 5_000_000]])
    >>> grid = Grid(60_000, 180_000, (180_000,))
    >>> total = left.read_points(grid, 12); total.merge(right.read_points(grid, 12))
    >>> both = StoreAggregate(); both.add_groups(["orders", [10, 2, 11, 1], "gross", [11, 5_000_000]])
    >>> total.metrics(grid, 3, 12) == both.metrics(grid, 3, 12)
    True
    """

    __slots__ = ("values",)

    def __init__(self, values: dict[str, dict[int, int]] | None = None) -> None:
        self.values: dict[str, dict[int, int]] = values if values is not None else {}

    def _series_names(self) -> Iterable[str]:
        return self.values.keys()

    def _at(self, series: str, bucket: int) -> int:
        points = self.values.get(series)
        return 0 if points is None else points.get(bucket, 0)

    def merge(self, other: ReadPoints) -> None:
        """Add another set of read points (of other events) to these."""
        for name, points in other.values.items():
            target = self.values.get(name)
            if target is None:
                self.values[name] = dict(points)
                continue
            for bucket, value in points.items():
                target[bucket] = target.get(bucket, 0) + value

    def to_record(self) -> list[object]:
        """JSON-ready: ``[series, [bucket, value, ...], ...]`` (values past int64 as strings).

        >>> points = ReadPoints({"gross": {5: 2**70, 6: 1}})
        >>> ReadPoints.from_record(orjson.loads(orjson.dumps(points.to_record()))).values == points.values
        True
        """
        record: list[object] = []
        for name, points in self.values.items():
            pairs: list[object] = []
            for bucket, value in points.items():
                pairs.append(bucket)
                pairs.append(value if -_INT64_MAX <= value <= _INT64_MAX else str(value))
            record.append(name)
            record.append(pairs)
        return record

    @classmethod
    def from_record(cls, record: Sequence[Any]) -> ReadPoints:
        """The read points of :meth:`to_record`'s list."""
        values: dict[str, dict[int, int]] = {}
        for position in range(0, len(record), 2):
            pairs = record[position + 1]
            values[record[position]] = {int(pairs[i]): int(pairs[i + 1]) for i in range(0, len(pairs), 2)}
        return cls(values)


class _Recorder(MetricReader):
    """Reads an aggregate and keeps every prefix sum it read."""

    def __init__(self, aggregate: StoreAggregate) -> None:
        self.aggregate = aggregate
        self.points = ReadPoints()

    def _series_names(self) -> Iterable[str]:
        return self.aggregate._series_names()

    def _at(self, series: str, bucket: int) -> int:
        value = self.aggregate._at(series, bucket)
        self.points.values.setdefault(series, {})[bucket] = value
        return value
