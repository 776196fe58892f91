"""Validation of input messages (SPEC section 3): bytes in, events or rejections out.

Pure and fast: no I/O and no clock reads (the wall clock ``now_ms`` is an
argument). It sits on the hot path of the stream processor.

A message value is one JSON object (an event, at most 64 KiB) or a JSON array
of 1..10,000 events (a batch, at most 1 MiB). :func:`parse_message` returns
one item per event: an :class:`~metrics.events.Event` when valid, else a
:class:`Rejection`. A batch behaves as its elements sent one by one, in
order: each element is validated on its own, and an invalid one becomes its
own rejection with its index. A message that cannot be split into events
(not JSON, not an object or array, an empty array, too large) is one
rejection with ``index=None``.

Reason codes (:data:`REASONS`). An event's fields are checked in the order
type, event_id, occurred_at, store_id, customer_id, the type's own fields,
then the future skew; the first failure wins.

Message level
    ``null_message``       the value is ``None`` (a tombstone; ``raw`` is b"")
    ``message_too_large``  over 1 MiB; an object over 64 KiB; or a batch
                           element whose JSON text is over 64 KiB
    ``invalid_utf8``       the bytes are not UTF-8
    ``invalid_json``       not JSON (a BOM, ``NaN`` and unpaired surrogate
                           escapes are invalid too)
    ``not_an_object``      the value, or a batch element, is not a JSON object
    ``not_an_event``       a batch element is itself an array (however deep)
    ``too_deep``           JSON nesting deeper than 32 levels: an event (or a
                           batch element, counted as if sent alone), or a
                           message too deep to decode at all
    ``empty_batch``        ``[]``
    ``batch_too_large``    more than 10,000 elements
Event level
    ``missing_field``      a required field is absent or ``null``
    ``wrong_type``         a field has the wrong JSON type (ints must be
                           integers: no booleans, no ``7.0``)
    ``unknown_type``       ``type`` is not a known event type
    ``wrong_topic``        ``type`` is known but belongs to another topic
    ``out_of_range``       a string length or integer outside its range
                           (e.g. ``event_id`` 1..128 chars, NPS score 0..10)
    ``bad_timestamp``      ``occurred_at`` is not an RFC 3339 string with an
                           offset, nor an integer of epoch milliseconds
    ``bad_amount``         ``amount`` is not a decimal >= 0 with at most 6
                           significant fractional digits and at most 10^12
    ``bad_currency``       ``currency`` is not 3 uppercase ASCII letters
    ``unknown_survey``     ``survey`` is not one of nps, csat, ces, cli
    ``future_event``       ``occurred_at > now_ms + max_future_skew_ms``
                           (checked last: the event is otherwise valid)

Decisions where the spec is silent:

* Timestamps: ``YYYY-MM-DDTHH:MM:SS[.fraction](Z|+hh:mm|-hh:mm)``; ``t``,
  ``z`` and a space for ``T`` are accepted (RFC 3339 section 5.6), any number
  of fractional digits is accepted, and a leap second (``:60``) is rejected.
  Sub-millisecond fractions are truncated toward the earlier millisecond
  (floor, also before 1970). Strings and integers must lie in years
  0001..9999. Naive strings, date-only strings, floats and booleans are
  rejected.
* Amounts are converted exactly to integer micro-units. Strings are plain
  decimals (``"19.99"``, ``"5"``; no exponent, no ``+``, no spaces). A float
  is read as the decimal text of its shortest repr (``19.99`` -> ``"19.99"``
  -> 19,990,000), so whatever a JSON number's digits round to as a double is
  what counts. More than 6 fractional digits is rejected unless the extra
  digits are zeros (``"1.50000000"`` is exact and accepted, ``"0.0000001"`` is
  not): no amount is ever rounded. Negative zero is zero.
* ``null`` in an optional field (``channel``, ``points``, csat ``scale``)
  means absent. ``customer_id`` of ``spend.recorded`` is ignored. Unknown
  extra fields are ignored. ``points`` is at most 2^63 - 1.
* ``topic`` must be one of :data:`metrics.events.INPUT_TOPICS`; anything else
  is a programming error and raises :class:`ValueError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from math import isfinite
from typing import NoReturn

import orjson

from metrics.events import (
    CUSTOMER_SIGNED_UP,
    MICROS_PER_UNIT,
    ORDER_PLACED,
    ORDER_REFUNDED,
    REWARD_ISSUED,
    REWARD_REDEEMED,
    SPEND_RECORDED,
    SURVEY_CES,
    SURVEY_CLI,
    SURVEY_CSAT,
    SURVEY_NPS,
    SURVEY_RESPONDED,
    TOPIC_TYPES,
    TYPE_TOPIC,
    Event,
    new_event,
)

__all__ = [
    "MAX_AMOUNT_MICROS",
    "MAX_AMOUNT_UNITS",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_EVENTS",
    "MAX_DEPTH",
    "MAX_EVENT_BYTES",
    "MAX_POINTS",
    "REASONS",
    "Rejection",
    "parse_amount",
    "parse_message",
    "parse_timestamp",
    "validate_event",
]

MAX_EVENT_BYTES = 64 * 1024
MAX_BATCH_BYTES = 1024 * 1024
MAX_BATCH_EVENTS = 10_000
#: the largest accepted amount, in units (10^12) and micro-units
MAX_AMOUNT_UNITS = 10**12
MAX_AMOUNT_MICROS = MAX_AMOUNT_UNITS * MICROS_PER_UNIT
MAX_POINTS = 2**63 - 1
#: the deepest JSON nesting accepted in an event (a scalar has depth 0, ``{"a": 1}`` depth 1)
MAX_DEPTH = 32

NULL_MESSAGE = "null_message"
MESSAGE_TOO_LARGE = "message_too_large"
INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
NOT_AN_EVENT = "not_an_event"
TOO_DEEP = "too_deep"
EMPTY_BATCH = "empty_batch"
BATCH_TOO_LARGE = "batch_too_large"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
UNKNOWN_TYPE = "unknown_type"
WRONG_TOPIC = "wrong_topic"
OUT_OF_RANGE = "out_of_range"
BAD_TIMESTAMP = "bad_timestamp"
BAD_AMOUNT = "bad_amount"
BAD_CURRENCY = "bad_currency"
UNKNOWN_SURVEY = "unknown_survey"
FUTURE_EVENT = "future_event"

#: every reason code a :class:`Rejection` can carry
REASONS: frozenset[str] = frozenset(
    {
        NULL_MESSAGE,
        MESSAGE_TOO_LARGE,
        INVALID_UTF8,
        INVALID_JSON,
        NOT_AN_OBJECT,
        NOT_AN_EVENT,
        TOO_DEEP,
        EMPTY_BATCH,
        BATCH_TOO_LARGE,
        MISSING_FIELD,
        WRONG_TYPE,
        UNKNOWN_TYPE,
        WRONG_TOPIC,
        OUT_OF_RANGE,
        BAD_TIMESTAMP,
        BAD_AMOUNT,
        BAD_CURRENCY,
        UNKNOWN_SURVEY,
        FUTURE_EVENT,
    }
)


@dataclass(frozen=True, slots=True)
class Rejection:
    """An invalid message or batch element, bound for the dead-letter topic.

    ``reason`` is one of :data:`REASONS`; ``detail`` says which field and what
    was wrong; ``raw`` is the original message bytes, or for an element of a
    batch that element's JSON text; ``index`` is the element's index in its
    batch (``None`` for a single-event message or a whole-message rejection).
    """

    reason: str
    detail: str
    raw: bytes
    index: int | None


class _Invalid(Exception):
    """Internal: one validation failure (reason code and detail)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


_JSON_NAMES = {
    dict: "object",
    list: "array",
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def _kind(value: object) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------- timestamps

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MIN_MS = -62_135_596_800_000  # 0001-01-01T00:00:00Z
_MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
_SHAPE = "expected an RFC 3339 date-time with offset, like 2024-03-01T12:00:00Z"
_MINUTE_CACHE_LIMIT = 4096
#: "YYYY-MM-DDTHH:MM" as written -> epoch ms of that minute read as UTC; only
#: validated prefixes get in, and it is emptied when full
_MINUTE_CACHE: dict[str, int] = {}
#: "Z" / "+hh:mm" as written -> offset in ms; at most 2 + 2 * 24 * 60 entries
_OFFSETS: dict[str, int] = {"Z": 0, "z": 0}
_SECONDS: dict[str, int] = {f"{s:02d}": s * 1_000 for s in range(60)}
_MILLIS: dict[str, int] = {f"{m:03d}": m for m in range(1_000)}


def _minute_ms(prefix: str) -> int:
    """Epoch ms of ``YYYY-MM-DDTHH:MM`` read as UTC; validates, then caches."""
    if not (
        prefix.isascii()
        and prefix[0:4].isdigit()
        and prefix[4] == "-"
        and prefix[5:7].isdigit()
        and prefix[7] == "-"
        and prefix[8:10].isdigit()
        and prefix[10] in "Tt "
        and prefix[11:13].isdigit()
        and prefix[13] == ":"
        and prefix[14:16].isdigit()
    ):
        raise ValueError(_SHAPE)
    try:
        moment = datetime(
            int(prefix[0:4]),
            int(prefix[5:7]),
            int(prefix[8:10]),
            int(prefix[11:13]),
            int(prefix[14:16]),
            tzinfo=UTC,
        )
    except ValueError as exc:
        raise ValueError(f"no such date or time: {exc}") from None
    delta = moment - _EPOCH
    base = (delta.days * 86_400 + delta.seconds) * 1_000
    if len(_MINUTE_CACHE) >= _MINUTE_CACHE_LIMIT:
        _MINUTE_CACHE.clear()
    _MINUTE_CACHE[prefix] = base
    return base


def _offset_ms(zone: str) -> int:
    """Offset ``+hh:mm`` / ``-hh:mm`` in ms; validates, then caches."""
    if not (
        len(zone) == 6
        and zone.isascii()
        and zone[0] in "+-"
        and zone[1:3].isdigit()
        and zone[3] == ":"
        and zone[4:6].isdigit()
    ):
        raise ValueError("expected an offset Z, +hh:mm or -hh:mm at the end (naive times are rejected)")
    hours, minutes = int(zone[1:3]), int(zone[4:6])
    if hours > 23 or minutes > 59:
        raise ValueError(f"offset out of range: {zone}")
    offset = (hours * 60 + minutes) * 60_000
    _OFFSETS[zone] = offset = -offset if zone[0] == "-" else offset
    return offset


def _rfc3339_ms(text: str) -> int:
    n = len(text)
    if n < 20:
        raise ValueError(_SHAPE)
    last = text[-1]
    if last == "Z" or last == "z":
        offset = 0
        end = n - 1
    else:
        zone = text[-6:]
        found = _OFFSETS.get(zone)
        offset = _offset_ms(zone) if found is None else found
        end = n - 6
    prefix = text[:16]
    base = _MINUTE_CACHE.get(prefix)
    if base is None:
        base = _minute_ms(prefix)
    second = _SECONDS.get(text[17:19])
    if second is None or text[16] != ":" or end < 19:
        raise ValueError("expected seconds 00..59 after HH:MM: (no leap seconds)")
    if end == 19:
        result = base + second - offset
    else:
        fraction = text[20:end]
        millis = _MILLIS.get(fraction) if end == 23 else None
        if millis is None:
            if not (fraction.isdigit() and fraction.isascii()):
                raise ValueError(_SHAPE)
            millis = int(fraction[:3].ljust(3, "0"))  # truncate below the ms
        if text[19] != ".":
            raise ValueError(_SHAPE)
        result = base + second + millis - offset
    if _MIN_MS <= result <= _MAX_MS:
        return result
    raise ValueError("outside years 0001..9999")


def parse_timestamp(value: object) -> int:
    """``occurred_at`` as epoch milliseconds; raises :class:`ValueError`.

    Accepts an RFC 3339 string with an offset or an integer of epoch ms.
    Sub-millisecond fractions are truncated toward the earlier millisecond.

    >>> parse_timestamp("2024-03-01T12:00:00.123456Z")
    1709294400123
    >>> parse_timestamp("2024-03-01T15:00:00+03:00"), parse_timestamp(1709294400000)
    (1709294400000, 1709294400000)
    >>> parse_timestamp("2024-03-01T12:00:00")
    Traceback (most recent call last):
    ...
    ValueError: expected an RFC 3339 date-time with offset, like 2024-03-01T12:00:00Z
    """
    if type(value) is str:
        return _rfc3339_ms(value)
    if type(value) is int:
        if _MIN_MS <= value <= _MAX_MS:
            return value
        raise ValueError("epoch ms outside years 0001..9999")
    raise ValueError(f"expected an RFC 3339 string or integer epoch ms, got {_kind(value)}")


# --------------------------------------------------------------------------- amounts

_POW10: tuple[int, ...] = tuple(10**k for k in range(7))
_TOO_LARGE = "amount above 10^12"


def _decimal_micros(text: str, exponent: int) -> int:
    """Micro-units of ``[-]digits[.digits] * 10**exponent`` (exponent <= 0)."""
    negative = text.startswith("-")
    whole, dot, fraction = (text[1:] if negative else text).partition(".")
    if not (whole.isdigit() and whole.isascii()) or (dot and not (fraction.isdigit() and fraction.isascii())):
        raise ValueError(f"not a plain decimal number: {text[:40]!r}")
    whole = whole.lstrip("0")
    fraction = fraction.rstrip("0")
    scale = len(fraction) - exponent  # value = int(whole + fraction) / 10**scale
    if scale > 6:
        raise ValueError("more than 6 fractional digits")
    if len(whole) > 13:
        raise ValueError(_TOO_LARGE)
    micros = int(whole + fraction or "0") * _POW10[6 - scale]
    if micros > MAX_AMOUNT_MICROS:
        raise ValueError(_TOO_LARGE)
    if negative and micros:
        raise ValueError("negative amount")
    return micros


def parse_amount(value: object) -> int:
    """A decimal amount >= 0 as exact integer micro-units; raises :class:`ValueError`.

    Takes an int, a float (read as its shortest repr) or a plain decimal
    string; at most 6 significant fractional digits and at most 10^12.

    >>> parse_amount("19.99"), parse_amount(19.99), parse_amount(5)
    (19990000, 19990000, 5000000)
    >>> parse_amount("0.1") + parse_amount("0.2")
    300000
    >>> parse_amount("0.0000001")
    Traceback (most recent call last):
    ...
    ValueError: more than 6 fractional digits
    """
    if type(value) is str:
        whole, dot, fraction = value.partition(".")
        size = len(fraction)
        if (
            size <= 6
            and 0 < len(whole) <= 13
            and value.isascii()
            and whole.isdigit()
            and (fraction.isdigit() or not dot)
        ):  # fast path: "19.99"
            micros = int(whole + fraction) * _POW10[6 - size]
            if micros <= MAX_AMOUNT_MICROS:
                return micros
            raise ValueError(_TOO_LARGE)
        return _decimal_micros(value, 0)
    if type(value) is int:
        if 0 <= value <= MAX_AMOUNT_UNITS:
            return value * MICROS_PER_UNIT
        raise ValueError(_TOO_LARGE if value > 0 else "negative amount")
    if type(value) is float:
        if 0.0 <= value < 1e9:
            # The repr route below, without building text. If the shortest
            # repr has at most 6 fractional digits, its micros M are < 2^50 and
            # value * 10^6 lies within 0.2 of M, so round() finds M and
            # M / 10^6 == value. If it has more, no 6-place decimal converts
            # to value, the check fails and the repr route rejects it.
            micros = round(value * 1_000_000)
            if micros / 1_000_000 == value:
                return micros
        if not isfinite(value):
            raise ValueError("amount is not finite")
        if value < 0:
            raise ValueError("negative amount")
        if value > MAX_AMOUNT_UNITS:
            raise ValueError(_TOO_LARGE)
        mantissa, _, exponent = repr(value).partition("e")
        return _decimal_micros(mantissa, int(exponent) if exponent else 0)
    raise ValueError(f"expected a number or decimal string, got {_kind(value)}")


# --------------------------------------------------------------------------- events


def _string_error(value: object, field: str, max_len: int) -> _Invalid:
    """The failure for ``value`` where a string of 1..max_len chars is required."""
    if type(value) is str:
        return _Invalid(OUT_OF_RANGE, f"{field}: length must be 1..{max_len}, got {len(value)}")
    if value is None:
        return _Invalid(MISSING_FIELD, f"{field}: required")
    return _Invalid(WRONG_TYPE, f"{field}: expected a string, got {_kind(value)}")


def _string(obj: dict[str, object], field: str, max_len: int) -> str:
    value = obj.get(field)
    if type(value) is str and 0 < len(value) <= max_len:
        return value
    raise _string_error(value, field, max_len)


def _optional_string(obj: dict[str, object], field: str, max_len: int) -> str | None:
    value = obj.get(field)
    if value is None or (type(value) is str and 0 < len(value) <= max_len):
        return value
    raise _string_error(value, field, max_len)


def _int(obj: dict[str, object], field: str, low: int, high: int, label: str = "") -> int:
    value = obj.get(field)
    if type(value) is int:
        if low <= value <= high:
            return value
        raise _Invalid(OUT_OF_RANGE, f"{label}{field}: must be {low}..{high}, got {value}")
    if value is None:
        raise _Invalid(MISSING_FIELD, f"{label}{field}: required")
    raise _Invalid(WRONG_TYPE, f"{label}{field}: expected an integer, got {_kind(value)}")


def _type_error(etype: object, topic: str) -> _Invalid:
    """The failure for a ``type`` that is not a type of ``topic``."""
    if type(etype) is not str:
        if etype is None:
            return _Invalid(MISSING_FIELD, "type: required")
        return _Invalid(WRONG_TYPE, f"type: expected a string, got {_kind(etype)}")
    home = TYPE_TOPIC.get(etype)
    if home is None:
        return _Invalid(UNKNOWN_TYPE, f"type: unknown event type {etype[:64]!r}")
    return _Invalid(WRONG_TOPIC, f"type: {etype} belongs to topic {home}, not {topic}")


#: currencies already seen to be 3 uppercase ASCII letters (at most 26^3)
_CURRENCIES: set[str] = set()


def _money(obj: dict[str, object]) -> tuple[int, str]:
    amount = obj.get("amount")
    try:
        micros = parse_amount(amount)
    except ValueError as exc:
        if amount is None:
            raise _Invalid(MISSING_FIELD, "amount: required") from None
        raise _Invalid(BAD_AMOUNT, f"amount: {exc}") from None
    currency = obj.get("currency")
    if type(currency) is str:
        if currency in _CURRENCIES:
            return micros, currency
        if len(currency) == 3 and currency.isascii() and currency.isalpha() and currency.isupper():
            _CURRENCIES.add(currency)
            return micros, currency
        raise _Invalid(BAD_CURRENCY, f"currency: expected 3 uppercase letters (ISO 4217), got {currency[:16]!r}")
    if currency is None:
        raise _Invalid(MISSING_FIELD, "currency: required")
    raise _Invalid(BAD_CURRENCY, f"currency: expected a string, got {_kind(currency)}")


_ORDER_TYPES = frozenset({ORDER_PLACED, ORDER_REFUNDED})
_REWARD_TYPES = frozenset({REWARD_ISSUED, REWARD_REDEEMED})
_CSAT_SCALES = (5, 7, 10)
_CLI_KEYS = ("recommend", "repurchase", "try_other")


def _check(obj: object, topic: str, limit_ms: int) -> Event:
    """The event of one decoded element, or raises :class:`_Invalid`.

    The common fields are checked inline: this runs once per event.
    """
    if type(obj) is not dict:
        raise _Invalid(NOT_AN_OBJECT, f"expected a JSON object, got {_kind(obj)}")
    event: dict[str, object] = obj
    etype = event.get("type")
    if type(etype) is not str or TYPE_TOPIC.get(etype) != topic:
        raise _type_error(etype, topic)
    event_id = event.get("event_id")
    if type(event_id) is not str or not 0 < len(event_id) <= 128:
        raise _string_error(event_id, "event_id", 128)
    stamp = event.get("occurred_at")
    try:
        occurred = _rfc3339_ms(stamp) if type(stamp) is str else parse_timestamp(stamp)
    except ValueError as exc:
        if stamp is None:
            raise _Invalid(MISSING_FIELD, "occurred_at: required") from None
        raise _Invalid(BAD_TIMESTAMP, f"occurred_at: {exc}") from None
    store_id = event.get("store_id")
    if type(store_id) is not str or not 0 < len(store_id) <= 64:
        raise _string_error(store_id, "store_id", 64)
    customer_id: str | None = None
    if etype != SPEND_RECORDED:
        customer = event.get("customer_id")
        if type(customer) is not str or not 0 < len(customer) <= 128:
            raise _string_error(customer, "customer_id", 128)
        customer_id = customer

    result: Event
    if etype in _ORDER_TYPES:
        order_id = event.get("order_id")
        if type(order_id) is not str or not 0 < len(order_id) <= 128:
            raise _string_error(order_id, "order_id", 128)
        micros, currency = _money(event)
        result = new_event(event_id, etype, occurred, store_id, customer_id, order_id, micros, currency)
    elif etype == SPEND_RECORDED:
        micros, currency = _money(event)
        channel = _optional_string(event, "channel", 64)
        result = new_event(event_id, etype, occurred, store_id, None, None, micros, currency, channel)
    elif etype == CUSTOMER_SIGNED_UP:
        channel = _optional_string(event, "channel", 64)
        result = new_event(event_id, etype, occurred, store_id, customer_id, channel=channel)
    elif etype == SURVEY_RESPONDED:
        survey, score, scale, answers = _survey(event)
        result = new_event(
            event_id,
            etype,
            occurred,
            store_id,
            customer_id,
            survey=survey,
            score=score,
            scale=scale,
            answers=answers,
        )
    elif etype in _REWARD_TYPES:
        reward_id = _string(event, "reward_id", 128)
        points = None if event.get("points") is None else _int(event, "points", 0, MAX_POINTS)
        result = new_event(event_id, etype, occurred, store_id, customer_id, reward_id=reward_id, points=points)
    else:  # customer.closed, loyalty.enrolled, loyalty.left: no extra fields
        result = new_event(event_id, etype, occurred, store_id, customer_id)
    if occurred > limit_ms:  # last: an otherwise valid event
        raise _Invalid(FUTURE_EVENT, f"occurred_at: {occurred - limit_ms} ms beyond now + max future skew")
    return result


def _survey(event: dict[str, object]) -> tuple[str, int | None, int | None, tuple[int, int, int] | None]:
    """``(survey, score, scale, answers)`` of a survey response."""
    survey = event.get("survey")
    if survey == SURVEY_NPS:
        return SURVEY_NPS, _int(event, "score", 0, 10), None, None
    if survey == SURVEY_CSAT:
        scale = event.get("scale")
        if scale is None:
            scale = 5
        elif type(scale) is not int:
            raise _Invalid(WRONG_TYPE, f"scale: expected an integer, got {_kind(scale)}")
        elif scale not in _CSAT_SCALES:
            raise _Invalid(OUT_OF_RANGE, f"scale: must be 5, 7 or 10, got {scale}")
        return SURVEY_CSAT, _int(event, "score", 1, scale), scale, None
    if survey == SURVEY_CES:
        return SURVEY_CES, _int(event, "score", 1, 7), None, None
    if survey == SURVEY_CLI:
        answers = event.get("answers")
        if type(answers) is not dict:
            if answers is None:
                raise _Invalid(MISSING_FIELD, "answers: required")
            raise _Invalid(WRONG_TYPE, f"answers: expected an object, got {_kind(answers)}")
        rec, rep, other = (_int(answers, key, 1, 6, "answers.") for key in _CLI_KEYS)
        return SURVEY_CLI, None, None, (rec, rep, other)
    if survey is None:
        raise _Invalid(MISSING_FIELD, "survey: required")
    if type(survey) is not str:
        raise _Invalid(WRONG_TYPE, f"survey: expected a string, got {_kind(survey)}")
    raise _Invalid(UNKNOWN_SURVEY, f"survey: must be nps, csat, ces or cli, got {survey[:32]!r}")


# --------------------------------------------------------------------------- public entry points


def _unknown_topic(topic: str) -> NoReturn:
    raise ValueError(f"unknown input topic {topic!r}; expected one of {', '.join(TOPIC_TYPES)}")


def validate_event(
    obj: object,
    topic: str,
    *,
    now_ms: int,
    max_future_skew_ms: int,
    raw: bytes,
    index: int | None,
) -> Event | Rejection:
    """Validate one decoded event (a JSON value) that arrived on ``topic``.

    ``raw`` and ``index`` are only copied into the :class:`Rejection`.

    >>> event = {"event_id": "e1", "type": "customer.closed", "store_id": "s1",
    ...          "customer_id": "c1", "occurred_at": "2024-03-01T12:00:00Z"}
    >>> validate_event(event, "signups", now_ms=1709294400000,
    ...                max_future_skew_ms=0, raw=b"", index=None).occurred_at_ms
    1709294400000
    >>> validate_event(event, "orders", now_ms=1709294400000,
    ...                max_future_skew_ms=0, raw=b"", index=None).reason
    'wrong_topic'
    """
    if topic not in TOPIC_TYPES:
        _unknown_topic(topic)
    try:
        return _check(obj, topic, now_ms + max_future_skew_ms)
    except _Invalid as exc:
        return Rejection(exc.reason, exc.detail, raw, index)


def deeper_than(value: object, limit: int) -> bool:
    """Whether a decoded JSON value nests containers more than ``limit`` levels deep.

    A scalar has depth 0, a container one more than its deepest child. Iterative, so any
    depth that the decoder accepted is measured without recursion.

    >>> deeper_than({"a": [1, {"b": 2}]}, 2), deeper_than({"a": [1, {"b": 2}]}, 3), deeper_than(7, 0)
    (True, False, False)
    """
    if type(value) is not dict and type(value) is not list:
        return False
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if type(node) is dict else node
        for child in children:  # type: ignore[attr-defined]
            if type(child) is dict or type(child) is list:
                stack.append((child, depth + 1))
    return False


def json_text(value: object) -> bytes:
    """The JSON text of a decoded value, at any depth the decoder accepts (orjson writes at most 254 levels).

    >>> json_text([[[1, {"a": "x"}]]]), len(json_text(orjson.loads(b"[" * 600 + b"]" * 600)))
    (b'[[[1,{"a":"x"}]]]', 1200)
    """
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        pass
    # bytes never come out of a JSON decoder, so here they stand for text already written
    parts: list[bytes] = []
    stack: list[object] = [value]
    while stack:
        item = stack.pop()
        if type(item) is bytes:
            parts.append(item)
        elif type(item) is list:
            stack.append(b"]")
            for position in range(len(item) - 1, -1, -1):
                stack.append(item[position])
                if position:
                    stack.append(b",")
            stack.append(b"[")
        elif type(item) is dict:
            entries = list(item.items())
            stack.append(b"}")
            for position in range(len(entries) - 1, -1, -1):
                key, child = entries[position]
                stack.append(child)
                stack.append(orjson.dumps(key) + b":")
                if position:
                    stack.append(b",")
            stack.append(b"{")
        else:
            parts.append(orjson.dumps(item))
    return b"".join(parts)


def _whole(reason: str, detail: str, raw: bytes) -> list[Event | Rejection]:
    return [Rejection(reason, detail, raw, None)]


def parse_message(
    value: bytes | bytearray | memoryview | None,
    topic: str,
    *,
    now_ms: int,
    max_future_skew_ms: int,
) -> list[Event | Rejection]:
    """Decode and validate one message value from input ``topic``.

    Returns one item per event, in order (one :class:`Rejection` for a message
    that cannot be split into events). Events are future when
    ``occurred_at > now_ms + max_future_skew_ms``.

    >>> msg = (b'[{"event_id": "e1", "type": "loyalty.enrolled", "store_id": "s1",'
    ...        b' "customer_id": "c1", "occurred_at": 1709294400000}, 7]')
    >>> [type(item).__name__ for item in parse_message(
    ...     msg, "loyalty-activity", now_ms=1709294400000, max_future_skew_ms=300000)]
    ['Event', 'Rejection']
    >>> parse_message(b"[]", "orders", now_ms=0, max_future_skew_ms=0)[0].reason
    'empty_batch'
    """
    if topic not in TOPIC_TYPES:
        _unknown_topic(topic)
    if value is None:
        return _whole(NULL_MESSAGE, "message value is null", b"")
    raw = value if type(value) is bytes else bytes(value)
    size = len(raw)
    if size > MAX_BATCH_BYTES:
        return _whole(MESSAGE_TOO_LARGE, f"{size} bytes > {MAX_BATCH_BYTES}", raw)
    if size > MAX_EVENT_BYTES and not raw.lstrip().startswith(b"["):
        return _whole(MESSAGE_TOO_LARGE, f"{size} bytes > {MAX_EVENT_BYTES} for one event", raw)
    try:
        decoded = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            return _whole(INVALID_UTF8, f"byte {bad.start}: {bad.reason}", raw)
        if "depth limit" in str(exc):
            return _whole(TOO_DEEP, f"nesting deeper than {MAX_DEPTH} levels (too deep to decode)", raw)
        return _whole(INVALID_JSON, str(exc)[:200], raw)
    limit_ms = now_ms + max_future_skew_ms
    if type(decoded) is list:
        count = len(decoded)
        if count == 0:
            return _whole(EMPTY_BATCH, "empty array", raw)
        if count > MAX_BATCH_EVENTS:
            return _whole(BATCH_TOO_LARGE, f"{count} elements > {MAX_BATCH_EVENTS}", raw)
        # No element's text is longer than the message, so elements are
        # measured (by the JSON text a dead letter carries) only when the
        # message itself is over the one-event limit.
        measure = size > MAX_EVENT_BYTES
        out: list[Event | Rejection] = []
        append = out.append
        dumps = orjson.dumps
        for index, element in enumerate(decoded):
            try:
                if type(element) is list:
                    raise _Invalid(NOT_AN_EVENT, "an array inside a batch is not an event")
                if deeper_than(element, MAX_DEPTH):
                    raise _Invalid(TOO_DEEP, f"nesting deeper than {MAX_DEPTH} levels")
                if measure and len(text := dumps(element)) > MAX_EVENT_BYTES:
                    raise _Invalid(MESSAGE_TOO_LARGE, f"element of {len(text)} bytes > {MAX_EVENT_BYTES}")
                append(_check(element, topic, limit_ms))
            except _Invalid as exc:
                append(Rejection(exc.reason, exc.detail, json_text(element), index))
        return out
    try:
        if deeper_than(decoded, MAX_DEPTH):
            raise _Invalid(TOO_DEEP, f"nesting deeper than {MAX_DEPTH} levels")
        return [_check(decoded, topic, limit_ms)]
    except _Invalid as exc:
        return [Rejection(exc.reason, exc.detail, raw, None)]
