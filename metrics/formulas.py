"""The formulas of SPEC section 5 as small pure functions over exact counts.

Counts and money (integer micro-units) are exact; a ratio is computed once,
at the end, as a float. A ratio whose denominator is 0 is ``None``.
"""

from __future__ import annotations

import math
from decimal import Decimal

from metrics.timegrid import YEAR_MS

#: NPS z for a 95% interval
_Z95 = 1.96
#: points of a CLI answer 1..6 (1 = definitely yes)
CLI_POINTS = (100, 80, 60, 40, 20, 0)


def percent(part: int | float, whole: int | float) -> float | None:
    """``100 * part / whole``; ``None`` when ``whole`` is 0. Range: any real (0-100 for rates).

    >>> percent(45, 200), percent(1, 0)
    (22.5, None)
    """
    if whole == 0:
        return None
    return 100 * part / whole


def ratio(numerator: int | float, denominator: int | float) -> float | None:
    """``numerator / denominator``; ``None`` when the denominator is 0.

    >>> ratio(20_000, 400), ratio(3, 0)
    (50.0, None)
    """
    if denominator == 0:
        return None
    return numerator / denominator


def money(micros: int) -> Decimal:
    """Exact decimal amount of integer micro-units.

    >>> money(19_990_000), money(-1)
    (Decimal('19.99'), Decimal('-0.000001'))
    """
    return Decimal(micros).scaleb(-6).normalize() if micros else Decimal(0)


def nps(promoters: int, detractors: int, responses: int) -> float | None:
    """Net Promoter Score: ``100 * (promoters - detractors) / responses``, range -100..100.

    >>> nps(90, 40, 200)
    25.0
    """
    return percent(promoters - detractors, responses)


def nps_interval(promoters: int, detractors: int, responses: int) -> tuple[float | None, float | None]:
    """95% adjusted-Wald interval of NPS, clamped to [-100, 100]; ``(None, None)`` without responses.

    With n' = n + 3, p' = (promoters + 3/4) / n', d' = (detractors + 3/4) / n':
    ``100 * (p' - d' -/+ 1.96 * sqrt((p' + d' - (p' - d')**2) / n'))``.

    >>> low, high = nps_interval(90, 40, 200)
    >>> round(low, 3), round(high, 3)
    (14.09, 35.171)
    """
    if responses == 0:
        return None, None
    adjusted_n = responses + 3
    p = (promoters + 0.75) / adjusted_n
    d = (detractors + 0.75) / adjusted_n
    half_width = _Z95 * math.sqrt((p + d - (p - d) ** 2) / adjusted_n)
    low = max(-100.0, 100 * (p - d - half_width))
    high = min(100.0, 100 * (p - d + half_width))
    return low, high


def nps_group(score: int) -> int:
    """0 for a detractor (0-6), 1 for a passive (7-8), 2 for a promoter (9-10).

    >>> [nps_group(s) for s in (0, 6, 7, 8, 9, 10)]
    [0, 0, 1, 1, 2, 2]
    """
    return 2 if score >= 9 else 1 if score >= 7 else 0


def csat_satisfied(score: int, scale: int) -> bool:
    """Satisfied: the top two points of the scale (4-5 of 5, 6-7 of 7, 9-10 of 10).

    >>> csat_satisfied(4, 5), csat_satisfied(3, 5), csat_satisfied(6, 7), csat_satisfied(8, 10)
    (True, False, True, False)
    """
    return score >= scale - 1


def cli_points_sum(answers: tuple[int, int, int]) -> int:
    """Sum of the three answers' points (1 -> 100 ... 6 -> 0); a response's points are this / 3.

    >>> cli_points_sum((1, 2, 6))
    180
    """
    return CLI_POINTS[answers[0] - 1] + CLI_POINTS[answers[1] - 1] + CLI_POINTS[answers[2] - 1]


def years(duration_ms: int | float) -> float:
    """A duration in years of 365.25 days.

    >>> years(365.25 * 86_400_000 * 5)
    5.0
    """
    return duration_ms / YEAR_MS


def clv(customer_value: float | None, window_ms: int, lifespan_years: float | None) -> float | None:
    """Customer lifetime value: ``customer_value * (365.25 days / W) * lifespan_years``.

    ``customer_value`` is revenue per purchaser in the window W; the middle factor
    annualises it. Range: >= 0 for non-negative revenue; ``None`` if a factor is.

    >>> round(clv(20_000 / 180, int(365.25 * 86_400_000), 5.0), 2)
    555.56
    """
    if customer_value is None or lifespan_years is None:
        return None
    return customer_value * (YEAR_MS / window_ms) * lifespan_years


def retention_rate(customers_end: int, new_customers: int, customers_start: int) -> float | None:
    """Retention: ``100 * (CE - CA) / CS`` (the articles' formula).

    >>> retention_rate(95, 50, 200)
    22.5
    """
    return percent(customers_end - new_customers, customers_start)
