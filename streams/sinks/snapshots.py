"""The ``loyalty.metrics.v1`` snapshot of SPEC section 6, as JSON for the output topic and Redis.

Money is exact end to end: ``Decimal`` values become JSON numbers with their
exact decimal text (``orjson.Fragment``) and decimal strings in Redis.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

SNAPSHOT_SCHEMA = "loyalty.metrics.v1"
#: the cohort matrix of a store (README, "Cohort retention"), keyed ``{store_id}|cohorts`` on the output topic
COHORTS_SCHEMA = "loyalty.cohorts.v1"
#: the output topic's key suffix and the Redis key suffix of the cohort matrix
COHORTS = "cohorts"


def rfc3339_ms(epoch_ms: int) -> str:
    """RFC 3339 UTC with milliseconds.

    >>> rfc3339_ms(1_700_000_000_123)
    '2023-11-14T22:13:20.123Z'
    """
    moment = datetime.fromtimestamp(epoch_ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{epoch_ms % 1000:03d}Z"


def decimal_text(value: Decimal) -> str:
    """A decimal without exponent or trailing zeros.

    >>> decimal_text(Decimal("1E+3")), decimal_text(Decimal("19.9900"))
    ('1000', '19.99')
    """
    text = format(value.normalize(), "f")
    return text


def _json_default(value: object) -> Any:
    if isinstance(value, Decimal):
        return orjson.Fragment(decimal_text(value).encode())
    raise TypeError(f"cannot serialise {type(value).__name__}")


def snapshot_payload(
    store_id: str, window: str, as_of_ms: int, currency: str | None, metrics: dict[str, object]
) -> dict[str, Any]:
    """The snapshot object of SPEC section 6."""
    return {
        "schema": SNAPSHOT_SCHEMA,
        "store_id": store_id,
        "window": window,
        "as_of": rfc3339_ms(as_of_ms),
        "as_of_ms": as_of_ms,
        "currency": currency,
        "metrics": metrics,
    }


def cohorts_payload(store_id: str, as_of_ms: int, matrix: dict[str, Any]) -> dict[str, Any]:
    """The ``loyalty.cohorts.v1`` object: a store's cohort matrix (:meth:`metrics.store.MetricReader.cohorts`).

    >>> cohorts_payload("s1", 0, {"period": "month", "cohorts": []})["as_of"]
    '1970-01-01T00:00:00.000Z'
    """
    return {
        "schema": COHORTS_SCHEMA,
        "store_id": store_id,
        "as_of": rfc3339_ms(as_of_ms),
        "as_of_ms": as_of_ms,
        "period": matrix["period"],
        "cohorts": matrix["cohorts"],
    }


def dumps(payload: object) -> bytes:
    """orjson with exact decimals.

    >>> dumps({"gross_revenue": Decimal("12.50"), "nps": None})
    b'{"gross_revenue":12.5,"nps":null}'
    """
    return orjson.dumps(payload, default=_json_default)
