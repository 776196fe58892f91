"""Compare two metric dictionaries the way the SPEC demands: money exactly, ratios to 1e-9.

Values may come back from JSON or Redis as strings or floats; they are
compared by the kind of the metric (:mod:`metrics.catalog`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation

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
