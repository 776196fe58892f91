"""Sets of buckets as sorted, disjoint half-open intervals ``[start, end)``.

A customer's status over time (active, purchaser, member, ...) is a union of
intervals on the bucket grid; the store aggregate adds ``+w`` at each start and
``-w`` at each end, so the number of customers in a status at bucket ``j`` is a
prefix sum. These helpers keep interval lists *normalised*: sorted, disjoint,
non-empty and never touching (``[1, 3), [3, 5)`` becomes ``[1, 5)``).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence

Interval = tuple[int, int]
Intervals = list[Interval]

#: a start far before any real bucket: "since always"
MINUS_INFINITY = -(2**62)
#: an end far after any real bucket: "for ever"
PLUS_INFINITY = 2**62


def normalise(intervals: Iterable[Interval]) -> Intervals:
    """Sort and merge overlapping or touching intervals; drop empty ones.

    >>> normalise([(5, 7), (1, 3), (3, 4), (6, 9), (10, 10)])
    [(1, 4), (5, 9)]
    """
    result: Intervals = []
    for start, end in sorted(intervals):
        if end <= start:
            continue
        if result and start <= result[-1][1]:
            if end > result[-1][1]:
                result[-1] = (result[-1][0], end)
        else:
            result.append((start, end))
    return result


def intersect(left: Intervals, right: Intervals) -> Intervals:
    """Intersection of two normalised interval lists.

    >>> intersect([(0, 5), (8, 12)], [(3, 10)])
    [(3, 5), (8, 10)]
    """
    result: Intervals = []
    i = j = 0
    while i < len(left) and j < len(right):
        start = max(left[i][0], right[j][0])
        end = min(left[i][1], right[j][1])
        if start < end:
            result.append((start, end))
        if left[i][1] < right[j][1]:
            i += 1
        else:
            j += 1
    return result


def subtract(left: Intervals, right: Intervals) -> Intervals:
    """Buckets of ``left`` that are not in ``right`` (both normalised).

    >>> subtract([(0, 10)], [(2, 3), (5, 7)])
    [(0, 2), (3, 5), (7, 10)]
    """
    result: Intervals = []
    j = 0
    for start, end in left:
        cursor = start
        while j < len(right) and right[j][1] <= cursor:
            j += 1
        k = j
        while k < len(right) and right[k][0] < end:
            if right[k][0] > cursor:
                result.append((cursor, right[k][0]))
            cursor = max(cursor, right[k][1])
            k += 1
        if cursor < end:
            result.append((cursor, end))
    return result


def clip(intervals: Intervals, ends: Sequence[int], start: int, end: int) -> Intervals:
    """``intersect(intervals, [(start, end)])`` in O(log n + k): ``ends`` lists each interval's end.

    It looks only at the intervals that overlap ``[start, end)``, found by bisection,
    so a customer with many orders does not pay a scan of all of them per order.

    >>> spans_ = [(0, 5), (8, 12), (20, 30)]
    >>> clip(spans_, [e for _, e in spans_], 3, 21)
    [(3, 5), (8, 12), (20, 21)]
    """
    result: Intervals = []
    index = bisect_right(ends, start)
    count = len(intervals)
    while index < count:
        low, high = intervals[index]
        if low >= end:
            break
        result.append((low if low > start else start, high if high < end else end))
        index += 1
    return result


def shift(intervals: Intervals, offset: int) -> Intervals:
    """Move every interval ``offset`` buckets later.

    >>> shift([(0, 2), (5, 6)], 10)
    [(10, 12), (15, 16)]
    """
    return [(start + offset, end + offset) for start, end in intervals]


def spans(starts: Iterable[int], length: int) -> Intervals:
    """Union of ``[s, s + length)`` for every start: "within ``length`` buckets after an event".

    >>> spans([3, 1, 9], 3)
    [(1, 6), (9, 12)]
    """
    return normalise((start, start + length) for start in starts)


def contains(intervals: Intervals, bucket: int) -> bool:
    """Whether ``bucket`` lies in one of the intervals.

    >>> contains([(1, 4)], 3), contains([(1, 4)], 4)
    (True, False)
    """
    return any(start <= bucket < end for start, end in intervals)
