"""A deterministic storefront history: realistic events over many days, with late arrivals and duplicates.

Used by the tests and by historical backfills: customers sign up over time
through channels, order with repeat behaviour and gaps (some come back after
the activity horizon), get refunds, close accounts, answer surveys of all four
kinds, join and leave the loyalty programme and earn rewards; each store
spends on marketing every day. Events are JSON-ready dicts (what a producer
would send), returned in *arrival* order: a fraction arrives late and a
fraction is sent twice.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

DAY_MS = 86_400_000
CURRENCIES = ("EUR", "USD", "TRY")
CHANNELS = ("search", "social", "email", "referral")


@dataclass(frozen=True)
class HistoryEvent:
    """One event as sent: its input topic and JSON object."""

    topic: str
    body: dict[str, Any]

    @property
    def occurred_at_ms(self) -> int:
        """Event time (the generator always knows it in ms)."""
        return int(self.body["_ms"])


def _time_field(rng: random.Random, time_ms: int) -> object:
    """Half RFC 3339 with an offset, half epoch milliseconds: producers differ."""
    if rng.random() < 0.5:
        return time_ms
    moment = datetime.fromtimestamp(time_ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{time_ms % 1000:03d}Z"


def _amount(rng: random.Random, low: float, high: float) -> object:
    cents = rng.randint(int(low * 100), int(high * 100))
    text = f"{cents // 100}.{cents % 100:02d}"
    return text if rng.random() < 0.5 else float(text)


def survey_fields(rng: random.Random) -> dict[str, Any]:
    """The survey part of a ``survey.responded`` event: one of the four kinds with a plausible score mix.

    NPS leans to promoters with a tail of detractors, CSAT mostly satisfied on its 5/7/10 scale
    (``scale`` omitted half the time when it is the default 5), CES and CLI answers spread evenly.

    >>> survey_fields(random.Random(1))
    {'survey': 'csat', 'score': 6, 'scale': 10}
    """
    survey = rng.choice(("nps", "csat", "ces", "cli"))
    body: dict[str, Any] = {"survey": survey}
    if survey == "nps":
        body["score"] = rng.choice((10, 10, 9, 9, 9, 8, 8, 7, 6, 5, 3, 0))
    elif survey == "csat":
        scale = rng.choice((5, 7, 10))
        body["score"] = rng.randint(max(1, scale - 4), scale)
        if scale != 5 or rng.random() < 0.5:
            body["scale"] = scale
    elif survey == "ces":
        body["score"] = rng.randint(1, 7)
    else:
        body["answers"] = {"recommend": rng.randint(1, 6), "repurchase": rng.randint(1, 6),
                           "try_other": rng.randint(1, 6)}
    return body


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

    >>> log = generate_history(stores=1, customers_per_store=5, days=10)
    >>> len(log) > 20, {e.topic for e in log} <= {"orders", "signups", "survey-responses",
    ...     "marketing-spend", "loyalty-activity"}
    (True, True)
    """
    rng = random.Random(seed)
    end_ms = start_ms + days * DAY_MS
    made: list[HistoryEvent] = []
    counter = 0

    def emit(topic: str, kind: str, time_ms: int, store: str, **fields: Any) -> None:
        nonlocal counter
        counter += 1
        body = {"event_id": f"h{seed}-{counter}", "type": kind, "occurred_at": _time_field(rng, time_ms),
                "store_id": store, "_ms": time_ms, **fields}
        made.append(HistoryEvent(topic, body))

    for store_index in range(stores):
        store = f"store-{store_index + 1}"
        currency = CURRENCIES[store_index % len(CURRENCIES)]
        for day in range(days):
            for channel in CHANNELS:
                if rng.random() < 0.7:
                    emit("marketing-spend", "spend.recorded", start_ms + day * DAY_MS + rng.randrange(DAY_MS), store,
                         amount=_amount(rng, 20, 400), currency=currency, channel=channel)
        for customer_index in range(customers_per_store):
            customer = f"cust-{store_index + 1}-{customer_index + 1}"
            joined = start_ms + rng.randrange(days * DAY_MS)
            signed_up = rng.random() < 0.85
            if signed_up:
                emit("signups", "customer.signed_up", joined, store, customer_id=customer,
                     channel=rng.choice(CHANNELS) if rng.random() < 0.8 else None)
            # order stream: a loyal core orders often, others once or twice; some come back much later
            loyal = rng.random() < 0.3
            orders = rng.randint(3, 12) if loyal else rng.choice((0, 1, 1, 2))
            moment = joined + rng.randrange(3 * DAY_MS)
            for _ in range(orders):
                if moment >= end_ms:
                    break
                order_id = f"o-{customer}-{moment}"
                amount = _amount(rng, 5, 250)
                emit("orders", "order.placed", moment, store, customer_id=customer, order_id=order_id,
                     amount=amount, currency=currency)
                if rng.random() < 0.08:
                    refund_at = moment + rng.randrange(1, 10 * DAY_MS)
                    if refund_at < end_ms:
                        emit("orders", "order.refunded", refund_at, store, customer_id=customer, order_id=order_id,
                             amount=_amount(rng, 1, 5), currency=currency)
                gap_days = rng.expovariate(1 / (8 if loyal else 30))
                if rng.random() < 0.05:
                    gap_days += 95  # a comeback after the 90-day horizon
                moment += int(gap_days * DAY_MS) + rng.randrange(3_600_000)
            if rng.random() < 0.06:
                closed_at = joined + rng.randrange(1, 60 * DAY_MS)
                if closed_at < end_ms:
                    emit("signups", "customer.closed", closed_at, store, customer_id=customer)
            for _ in range(rng.choice((0, 0, 1, 2))):
                at = joined + rng.randrange(30 * DAY_MS)
                if at >= end_ms:
                    continue
                emit("survey-responses", "survey.responded", at, store, customer_id=customer, **survey_fields(rng))
            if rng.random() < 0.35:
                enrolled = joined + rng.randrange(10 * DAY_MS)
                if enrolled < end_ms:
                    emit("loyalty-activity", "loyalty.enrolled", enrolled, store, customer_id=customer)
                    for reward in range(rng.randint(0, 4)):
                        at = enrolled + rng.randrange(1, 40 * DAY_MS)
                        if at < end_ms:
                            kind = "loyalty.reward_issued" if rng.random() < 0.6 else "loyalty.reward_redeemed"
                            emit("loyalty-activity", kind, at, store, customer_id=customer,
                                 reward_id=f"r-{customer}-{reward}", points=rng.randint(0, 500))
                    if rng.random() < 0.2:
                        left = enrolled + rng.randrange(1, 50 * DAY_MS)
                        if left < end_ms:
                            emit("loyalty-activity", "loyalty.left", left, store, customer_id=customer)
                            if rng.random() < 0.3 and left + DAY_MS < end_ms:
                                emit("loyalty-activity", "loyalty.enrolled", left + DAY_MS, store,
                                     customer_id=customer)

    # arrival: in time order, a fraction late by up to max_late_ms, a fraction twice
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
