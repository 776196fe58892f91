"""Durations and the bucket grid of SPEC section 4.

Bucket ``k`` holds event times in ``[k*b, (k+1)*b)`` (epoch milliseconds).
"""

from __future__ import annotations

import re
from functools import lru_cache

_UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d|w)\s*$")

DAY_MS = 86_400_000
YEAR_MS = 365.25 * DAY_MS
#: how far back a store reads its cohort series, in days: the oldest cohort of the matrix
#: (12 months back, at most 366 days) from its month's start, with a month of slack
COHORT_REACH_DAYS = 400


def parse_duration(text: str) -> int:
    """Parse ``"1m"``, ``"24h"``, ``"7d"``, ``"500ms"`` into milliseconds (> 0).

    >>> parse_duration("24h")
    86400000
    """
    match = _DURATION.match(text)
    if match is None or int(match.group(1)) == 0:
        raise ValueError(f"not a positive duration: {text!r} (use e.g. 1m, 24h, 7d)")
    return int(match.group(1)) * _UNIT_MS[match.group(2)]


def format_duration(ms: int) -> str:
    """The shortest exact spelling of a duration, the inverse of :func:`parse_duration`.

    >>> format_duration(604_800_000), format_duration(90_000)
    ('7d', '90s')
    """
    for unit in ("d", "h", "m", "s"):
        if ms % _UNIT_MS[unit] == 0:
            return f"{ms // _UNIT_MS[unit]}{unit}"
    return f"{ms}ms"


def bucket_of(time_ms: int, bucket_ms: int) -> int:
    """Index of the bucket holding ``time_ms`` (floor division, so negatives work).

    >>> bucket_of(119_999, 60_000), bucket_of(120_000, 60_000), bucket_of(-1, 60_000)
    (1, 2, -1)
    """
    return time_ms // bucket_ms


def buckets_in(duration_ms: int, bucket_ms: int) -> int:
    """How many buckets a window or horizon spans; it must be a whole multiple.

    >>> buckets_in(86_400_000, 60_000)
    1440
    """
    if duration_ms % bucket_ms:
        raise ValueError(f"{format_duration(duration_ms)} is not a multiple of the bucket {format_duration(bucket_ms)}")
    return duration_ms // bucket_ms


def month_of_ms(time_ms: int) -> int:
    """The calendar month (UTC) holding ``time_ms``, counted from January 1970 (month 0).

    Civil-from-days arithmetic (proleptic Gregorian), exact for any integer.

    >>> month_of_ms(0), month_of_ms(1_700_000_000_000), month_of_ms(-1)
    (0, 646, -1)
    """
    return _month_of_day(time_ms // DAY_MS)


@lru_cache(maxsize=4096)
def _month_of_day(day: int) -> int:
    """The month of :func:`month_of_ms` holding day ``day`` since 1970-01-01 (the events of a run share few days)."""
    days = day + 719_468  # days since 0000-03-01
    era = days // 146_097
    day_of_era = days - era * 146_097
    year_of_era = (day_of_era - day_of_era // 1460 + day_of_era // 36_524 - day_of_era // 146_096) // 365
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    march_month = (5 * day_of_year + 2) // 153  # 0 = March
    year = year_of_era + era * 400 + (1 if march_month >= 10 else 0)
    month = march_month + 3 if march_month < 10 else march_month - 9  # 1..12
    return (year - 1970) * 12 + month - 1


def month_start_ms(month: int) -> int:
    """The first instant (UTC epoch ms) of a month of :func:`month_of_ms`.

    >>> month_start_ms(646), month_start_ms(month_of_ms(1_700_000_000_000) + 1)
    (1698796800000, 1701388800000)
    """
    year = 1970 + month // 12
    month_of_year = month % 12 + 1
    # days-from-civil, the inverse of month_of_ms's arithmetic
    year -= 1 if month_of_year <= 2 else 0
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month_of_year + (-3 if month_of_year > 2 else 9)) + 2) // 5
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return (era * 146_097 + day_of_era - 719_468) * DAY_MS


def month_label(month: int) -> str:
    """``YYYY-MM`` of a month of :func:`month_of_ms`.

    >>> month_label(0), month_label(646), month_label(-1)
    ('1970-01', '2023-11', '1969-12')
    """
    return f"{1970 + month // 12:04d}-{month % 12 + 1:02d}"


class Grid:
    """The time model of one deployment: bucket, activity horizon, windows, dedupe TTL.

    All derived sizes are in buckets: ``horizon`` (h), ``windows`` (n per window),
    ``longest`` (the longest n). ``fact_retention`` is how far back per-customer
    bucketed facts are kept: far enough that dropping older ones never changes a
    number at or after ``K - 2 * longest`` (the oldest bucket any metric reads),
    with one more ``longest`` of slack for stages whose clocks lag each other.

    >>> grid = Grid(60_000, 90 * DAY_MS, (3_600_000, DAY_MS))
    >>> grid.horizon, grid.windows, grid.store_retention
    (129600, (60, 1440), 131040)
    """

    __slots__ = (
        "bucket_ms",
        "cohort_reach",
        "dedupe_ttl_ms",
        "fact_retention",
        "horizon",
        "horizon_ms",
        "longest",
        "store_retention",
        "windows",
        "windows_ms",
    )

    def __init__(self, bucket_ms: int, horizon_ms: int, windows_ms: tuple[int, ...],
                 dedupe_ttl_ms: int = 30 * DAY_MS) -> None:
        if not windows_ms:
            raise ValueError("at least one window is needed")
        self.bucket_ms = bucket_ms
        self.horizon_ms = horizon_ms
        self.windows_ms = tuple(windows_ms)
        self.dedupe_ttl_ms = dedupe_ttl_ms
        self.horizon = buckets_in(horizon_ms, bucket_ms)
        self.windows = tuple(buckets_in(w, bucket_ms) for w in windows_ms)
        self.longest = max(self.windows)
        # SPEC 4: twice the longest window, or the horizon plus the longest window
        self.store_retention = max(2 * self.longest, self.horizon + self.longest)
        self.fact_retention = self.horizon + 4 * self.longest
        #: how far before K the cohort matrix reads (see COHORT_REACH_DAYS), in buckets
        self.cohort_reach = -(-COHORT_REACH_DAYS * DAY_MS // bucket_ms)

    def bucket(self, time_ms: int) -> int:
        """The bucket of an event time."""
        return time_ms // self.bucket_ms

    def month_of_bucket(self, bucket: int) -> int:
        """The calendar month of a bucket: that of its first instant.

        >>> Grid(3_600_000, DAY_MS, (DAY_MS,)).month_of_bucket(24 * 31)  # 1970-02-01 00:00
        1
        """
        return month_of_ms(bucket * self.bucket_ms)
