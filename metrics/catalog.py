"""The published metric names of SPEC section 5 and the kind of value each holds.

Kinds: ``count`` (int), ``money`` (exact ``Decimal`` sum), ``ratio`` (float,
percentages 0-100 where the SPEC says rate), ``map`` (``cac_by_channel``:
channel -> float or ``None``; the ``*_by_nps_segment`` maps: segment -> the
kind of :data:`MAP_VALUE_KINDS`, ratio unless named). Any metric may be ``None``
when undefined.
"""

from __future__ import annotations

COUNT = "count"
MONEY = "money"
RATIO = "ratio"
MAP = "map"

METRIC_KINDS: dict[str, str] = {
    # surveys
    "nps": RATIO,
    "nps_responses": COUNT,
    "nps_promoters": COUNT,
    "nps_passives": COUNT,
    "nps_detractors": COUNT,
    "nps_ci_low": RATIO,
    "nps_ci_high": RATIO,
    "csat": RATIO,
    "csat_responses": COUNT,
    "ces": RATIO,
    "ces_responses": COUNT,
    "cli": RATIO,
    "cli_raw": RATIO,
    "cli_responses": COUNT,
    # customers
    "customers_end": COUNT,
    "customers_start": COUNT,
    "new_customers": COUNT,
    "retention_rate": RATIO,
    "churned_customers": COUNT,
    "churn_rate": RATIO,
    "reactivated_customers": COUNT,
    # orders and value
    "orders": COUNT,
    "gross_revenue": MONEY,
    "refunds": MONEY,
    "net_revenue": MONEY,
    "purchasers": COUNT,
    "returning_customers": COUNT,
    "one_time_customers": COUNT,
    "repeat_purchase_rate": RATIO,
    "aov": RATIO,
    "purchase_frequency": RATIO,
    "customer_value": RATIO,
    "avg_lifespan_years": RATIO,
    "clv": RATIO,
    "revenue_prev_period": MONEY,
    "churned_revenue": MONEY,
    "revenue_churn_rate": RATIO,
    "net_revenue_retention": RATIO,
    # acquisition
    "marketing_spend": MONEY,
    "cac": RATIO,
    "cac_by_channel": MAP,
    # loyalty programme
    "loyalty_members": COUNT,
    "participation_rate": RATIO,
    "rewards_issued": COUNT,
    "rewards_redeemed": COUNT,
    "redemption_rate": RATIO,
    "active_members": COUNT,
    "active_participation_rate": RATIO,
    # by NPS segment (beyond the articles): promoter, passive, detractor, none
    "churn_rate_by_nps_segment": MAP,
    "repeat_purchase_rate_by_nps_segment": MAP,
    "net_revenue_by_nps_segment": MAP,
}

#: the kind of a map's values, where it is not ``ratio``
MAP_VALUE_KINDS: dict[str, str] = {"net_revenue_by_nps_segment": MONEY}

#: NPS segments: (series code, published name), by the group of the customer's latest NPS answer up to T
NPS_SEGMENTS: tuple[tuple[str, str], ...] = (("p", "promoter"), ("pa", "passive"), ("d", "detractor"))
#: the segment of customers without an NPS answer up to T
NO_SEGMENT = "none"

METRIC_NAMES: tuple[str, ...] = tuple(METRIC_KINDS)

#: metrics expressed in the store's currency: ``null`` for ``*`` when stores differ
MONETARY_METRICS: frozenset[str] = frozenset(
    {
        "gross_revenue",
        "refunds",
        "net_revenue",
        "aov",
        "customer_value",
        "clv",
        "revenue_prev_period",
        "churned_revenue",
        # ratios of sums that would mix currencies
        "revenue_churn_rate",
        "net_revenue_retention",
        "marketing_spend",
        "cac",
        "cac_by_channel",
        "net_revenue_by_nps_segment",
    }
)

ALL_STORES = "*"
