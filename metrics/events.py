"""Typed storefront events (SPEC section 3).

An :class:`Event` is what validation (``metrics.validation``) returns for a
valid input element. Times are epoch milliseconds, money is integer
micro-units (1 unit = 1_000_000 micros), so sums are exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

ORDER_PLACED = "order.placed"
ORDER_REFUNDED = "order.refunded"
CUSTOMER_SIGNED_UP = "customer.signed_up"
CUSTOMER_CLOSED = "customer.closed"
SURVEY_RESPONDED = "survey.responded"
SPEND_RECORDED = "spend.recorded"
LOYALTY_ENROLLED = "loyalty.enrolled"
LOYALTY_LEFT = "loyalty.left"
REWARD_ISSUED = "loyalty.reward_issued"
REWARD_REDEEMED = "loyalty.reward_redeemed"

#: input topic (before prefix) -> event types that belong to it
TOPIC_TYPES: dict[str, frozenset[str]] = {
    "orders": frozenset({ORDER_PLACED, ORDER_REFUNDED}),
    "signups": frozenset({CUSTOMER_SIGNED_UP, CUSTOMER_CLOSED}),
    "survey-responses": frozenset({SURVEY_RESPONDED}),
    "marketing-spend": frozenset({SPEND_RECORDED}),
    "loyalty-activity": frozenset(
        {LOYALTY_ENROLLED, LOYALTY_LEFT, REWARD_ISSUED, REWARD_REDEEMED}
    ),
}
INPUT_TOPICS: tuple[str, ...] = tuple(TOPIC_TYPES)
TYPE_TOPIC: dict[str, str] = {t: topic for topic, ts in TOPIC_TYPES.items() for t in ts}

#: event types that make a customer active
ACTIVITY_TYPES = frozenset({CUSTOMER_SIGNED_UP, ORDER_PLACED})
#: event types that carry money
MONEY_TYPES = frozenset({ORDER_PLACED, ORDER_REFUNDED, SPEND_RECORDED})

SURVEY_NPS = "nps"
SURVEY_CSAT = "csat"
SURVEY_CES = "ces"
SURVEY_CLI = "cli"

MICROS_PER_UNIT = 1_000_000

#: a store keeps at most this many distinct channels (SPEC 3), the first to arrive;
#: later ones count under :data:`OTHER_CHANNEL`
MAX_STORE_CHANNELS = 100
#: the channel under which a store's channels beyond :data:`MAX_STORE_CHANNELS` count; a
#: producer's own ``"other"`` is that same bucket and takes none of the named slots
OTHER_CHANNEL = "other"


@dataclass(frozen=True, slots=True)
class Event:
    """One valid storefront event.

    Only the fields of its type are set; the others stay ``None``.
    ``answers`` is ``(recommend, repurchase, try_other)`` for CLI surveys.
    """

    event_id: str
    type: str
    occurred_at_ms: int
    store_id: str
    customer_id: str | None = None
    order_id: str | None = None
    amount_micros: int | None = None
    currency: str | None = None
    channel: str | None = None
    survey: str | None = None
    score: int | None = None
    scale: int | None = None
    answers: tuple[int, int, int] | None = None
    reward_id: str | None = None
    points: int | None = None


class _EventDraft:
    """A mutable twin of :class:`Event` with the same slots, for speed.

    The frozen dataclass ``__init__`` sets each of its 15 fields through
    ``object.__setattr__``, which costs about five times a plain construction
    and more than all the checks of an event. A draft stores its fields with
    plain slot writes, then becomes an :class:`Event` by ``__class__``
    assignment (allowed: same slot layout). The result is an ordinary, equal,
    frozen ``Event``. :func:`_drafts_work` checks this at import; if ``Event``
    ever changes shape, ``Event`` itself is used.
    """

    __slots__ = Event.__slots__

    def __init__(
        self,
        event_id: str,
        type: str,
        occurred_at_ms: int,
        store_id: str,
        customer_id: str | None = None,
        order_id: str | None = None,
        amount_micros: int | None = None,
        currency: str | None = None,
        channel: str | None = None,
        survey: str | None = None,
        score: int | None = None,
        scale: int | None = None,
        answers: tuple[int, int, int] | None = None,
        reward_id: str | None = None,
        points: int | None = None,
    ) -> None:
        self.event_id = event_id
        self.type = type
        self.occurred_at_ms = occurred_at_ms
        self.store_id = store_id
        self.customer_id = customer_id
        self.order_id = order_id
        self.amount_micros = amount_micros
        self.currency = currency
        self.channel = channel
        self.survey = survey
        self.score = score
        self.scale = scale
        self.answers = answers
        self.reward_id = reward_id
        self.points = points
        self.__class__ = Event  # type: ignore[assignment]


def _drafts_work() -> bool:
    values = ("e", "t", 1, "s", "c", "o", 2, "EUR", "ch", "nps", 3, 5, (1, 2, 3), "r", 4)
    try:
        draft: object = _EventDraft(*values)
        return type(draft) is Event and draft == Event(*values)
    except (TypeError, AttributeError):
        return False


#: builds an :class:`Event` with ``Event``'s signature, faster (the validator and the facts stage
#: build one per event); the result is a frozen ``Event`` like any other
new_event: type[Event] = cast("type[Event]", _EventDraft) if _drafts_work() else Event
