"""Sets of buckets as sorted, disjoint half-open intervals ``[start, end)``.

A customer's status over time (active, purchaser, member, ...) is a union of
intervals on the bucket grid; the store aggregate adds ``+w`` at each start and
``-w`` at each end, so the number of customers in a status at bucket ``j`` is a
prefix sum. These helpers keep interval lists *normalised*: sorted, disjoint,
non-empty and never touching (``[1, 3), [3, 5)`` becomes ``[1, 5)``).
"""

from __future__ import annotations

from collections.abc import Iterable

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
    left_count, right_count = len(left), len(right)
    while i < left_count and j < right_count:
        left_start, left_end = left[i]
        right_start, right_end = right[j]
        start = left_start if left_start > right_start else right_start
        end = left_end if left_end < right_end else right_end
        if start < end:
            result.append((start, end))
        if left_end < right_end:
            i += 1
        else:
            j += 1
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
    return normalise([(start, start + length) for start in starts])


def contains(intervals: Intervals, bucket: int) -> bool:
    """Whether ``bucket`` lies in one of the intervals.

    >>> contains([(1, 4)], 3), contains([(1, 4)], 4)
    (True, False)
    """
    return any(start <= bucket < end for start, end in intervals)
