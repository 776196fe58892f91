"""A storefront history: the traffic model's events over many days, arriving with late events and duplicates.

Used by the tests and the micro-benchmarks: :func:`generate_history` takes the events of
:class:`streams.tools.storefront.Storefronts` (the one traffic model, also behind
``loyalty simulate``) with event times spread evenly over ``days``, and returns them in
*arrival* order, as a log replayed from storefronts would hold them: a fraction arrives
late (up to ``max_late_ms`` after its event time) and a fraction is sent twice.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import count
from typing import Any

from streams.tools.storefront import Storefronts

DAY_MS = 86_400_000
#: events the model makes per customer of the population, on average (orders, surveys, loyalty, spend...)
EVENTS_PER_CUSTOMER = 5


@dataclass(frozen=True)
class HistoryEvent:
    """One event as sent: its input topic and JSON object."""

    topic: str
    body: dict[str, Any]

    @property
    def occurred_at_ms(self) -> int:
        """Event time (the generator always knows it in ms)."""
        return int(self.body["_ms"])


def generate_history(
    *,
    seed: int = 7,
    stores: int = 3,
    customers_per_store: int = 300,
    days: int = 120,
    start_ms: int = 1_700_006_400_000,
    late_fraction: float = 0.05,
    max_late_ms: int = 3 * DAY_MS,
    duplicate_fraction: float = 0.02,
) -> list[HistoryEvent]:
    """Events in arrival order (see the module docstring); ``_ms`` in a body is the event time, for tests.

    ``stores * customers_per_store * EVENTS_PER_CUSTOMER`` events are made, their times evenly
    spread from ``start_ms`` over ``days``. Same arguments, same history.

    >>> log = generate_history(stores=1, customers_per_store=5, days=10)
    >>> len({e.body["event_id"] for e in log}), {e.topic for e in log} <= {"orders", "signups", "survey-responses",
    ...     "marketing-spend", "loyalty-activity"}
    (25, True)
    """
    total = stores * customers_per_store * EVENTS_PER_CUSTOMER
    span_ms = days * DAY_MS
    steps = count()
    storefronts = Storefronts(
        seed=seed,
        stores=stores,
        customers=stores * customers_per_store,
        clock=lambda: start_ms + next(steps) * span_ms // total,
        seasonal=False,  # flat demand: the histories of the tests and benches stay as they were
    )
    made: list[HistoryEvent] = []
    for _ in range(total):
        topic, body = next(storefronts)
        body["_ms"] = storefronts.last_ms
        made.append(HistoryEvent(topic, body))

    # arrival: in time order, a fraction late by up to max_late_ms, a fraction twice
    rng = random.Random(f"{seed}:arrival")
    arrivals: list[tuple[int, int, HistoryEvent]] = []
    for index, event in enumerate(made):
        arrive = event.occurred_at_ms
        if rng.random() < late_fraction:
            arrive += rng.randrange(1, max_late_ms)
        arrivals.append((arrive, index, event))
        if rng.random() < duplicate_fraction:
            arrivals.append((arrive + rng.randrange(1, 3_600_000), index, event))
    arrivals.sort(key=lambda row: (row[0], row[1]))
    return [event for _, _, event in arrivals]


def wire_body(event: HistoryEvent) -> dict[str, Any]:
    """The JSON object a producer sends (without the test-only ``_ms``)."""
    return {key: value for key, value in event.body.items() if key != "_ms" and value is not None}
