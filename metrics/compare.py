"""Compare two metric dictionaries the way the SPEC demands: money exactly, ratios to 1e-9.

Values may come back from JSON or Redis as strings or floats; they are
compared by the kind of the metric (:mod:`metrics.catalog`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from metrics.catalog import COUNT, MAP, MAP_VALUE_KINDS, METRIC_KINDS, MONEY, RATIO

#: relative (and absolute, near zero) tolerance for ratios
RATIO_TOLERANCE = 1e-9


def _decimal(value: object) -> Decimal | None:
    if value is None or value == "":
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return None


def _close(left: float, right: float) -> bool:
    return math.isclose(left, right, rel_tol=RATIO_TOLERANCE, abs_tol=RATIO_TOLERANCE)


def _same(kind: str, actual: object, expected: object, value_kind: str = RATIO) -> bool:
    if kind == MAP:
        if not isinstance(actual, Mapping) or not isinstance(expected, Mapping):
            return actual == expected
        if set(actual) != set(expected):
            return False
        return all(_same(value_kind, actual[key], expected[key]) for key in expected)
    left = _decimal(actual)
    right = _decimal(expected)
    if left is None or right is None:
        return left is None and right is None
    if kind in (COUNT, MONEY):
        return left == right
    return _close(float(left), float(right))


def metric_differences(actual: Mapping[str, object], expected: Mapping[str, object]) -> list[str]:
    """Names and values of the metrics that differ; empty when all match.

    >>> metric_differences({"orders": 3, "aov": 10.0}, {"orders": 3, "aov": 10.0 + 1e-12})
    []
    >>> metric_differences({"gross_revenue": "10.01"}, {"gross_revenue": Decimal("10.02")})
    ['gross_revenue: got 10.01, expected 10.02']
    """
    problems = []
    for name, expected_value in expected.items():
        kind = METRIC_KINDS.get(name, "ratio")
        actual_value = actual.get(name)
        if not _same(kind, actual_value, expected_value, MAP_VALUE_KINDS.get(name, RATIO)):
            problems.append(f"{name}: got {actual_value}, expected {expected_value}")
    return problems


#: the count fields and the ratio fields of a cohort matrix row (:meth:`metrics.store.MetricReader.cohorts`)
_COHORT_COUNTS = ("active_customers", "purchasers")
_COHORT_RATES = ("active_rate", "purchase_rate")


def cohort_differences(actual: Mapping[str, object], expected: Mapping[str, object]) -> list[str]:
    """The cells of two cohort matrices that differ (counts exactly, shares to 1e-9); empty when all match.

    >>> row = {"cohort": "2026-01", "customers": 2, "active_customers": [2, None], "active_rate": [100.0, None],
    ...        "purchasers": [1, None], "purchase_rate": [50.0, None]}
    >>> cohort_differences({"period": "month", "cohorts": [row]}, {"period": "month", "cohorts": [row]})
    []
    >>> cohort_differences({"period": "month", "cohorts": [{**row, "purchasers": [0, None]}]},
    ...                    {"period": "month", "cohorts": [row]})
    ['2026-01 purchasers[0]: got 0, expected 1']
    """
    if actual.get("period") != expected.get("period"):
        return [f"period: got {actual.get('period')}, expected {expected.get('period')}"]
    actual_rows: list[Any] = list(actual.get("cohorts") or [])  # type: ignore[call-overload]
    expected_rows: list[Any] = list(expected.get("cohorts") or [])  # type: ignore[call-overload]
    if [row.get("cohort") for row in actual_rows] != [row.get("cohort") for row in expected_rows]:
        return ["cohorts: got {}, expected {}".format([row.get("cohort") for row in actual_rows],
                                                      [row.get("cohort") for row in expected_rows])]
    problems = []
    for got, want in zip(actual_rows, expected_rows, strict=True):
        label = want["cohort"]
        if not _same(COUNT, got.get("customers"), want["customers"]):
            problems.append(f"{label} customers: got {got.get('customers')}, expected {want['customers']}")
        for name in (*_COHORT_COUNTS, *_COHORT_RATES):
            kind = COUNT if name in _COHORT_COUNTS else RATIO
            cells = list(got.get(name) or [])
            for period, wanted in enumerate(want[name]):
                value = cells[period] if period < len(cells) else "missing"
                if not _same(kind, value, wanted):
                    problems.append(f"{label} {name}[{period}]: got {value}, expected {wanted}")
    return problems
