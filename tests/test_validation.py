"""Tests of input validation (metrics.validation, SPEC section 3)."""

from __future__ import annotations

import ast
import dataclasses
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as note
from hypothesis import strategies as st

import metrics
from metrics import events as events_module
from metrics import validation
from metrics.events import (
    CUSTOMER_CLOSED,
    CUSTOMER_SIGNED_UP,
    INPUT_TOPICS,
    LOYALTY_ENROLLED,
    LOYALTY_LEFT,
    ORDER_PLACED,
    ORDER_REFUNDED,
    REWARD_ISSUED,
    REWARD_REDEEMED,
    SPEND_RECORDED,
    SURVEY_RESPONDED,
    TYPE_TOPIC,
    Event,
)
from metrics.validation import (
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    MAX_EVENT_BYTES,
    REASONS,
    Rejection,
    json_text,
    parse_amount,
    parse_message,
    parse_timestamp,
    validate_event,
)
from streams.worker.wire import event_from_list, event_to_list

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NOW_MS = 1_709_294_400_000  # 2024-03-01T12:00:00Z
SKEW_MS = 300_000
T0 = "2024-03-01T11:00:00Z"
T0_MS = NOW_MS - 3_600_000
DROP = object()  # marks a field to delete in a case table

#: reasons seen by the tables below, checked against REASONS at the end
SEEN_REASONS: set[str] = set()


def ms(moment: datetime) -> int:
    """Epoch ms of an aware datetime, floored, computed independently of the module."""
    return (moment - EPOCH) // timedelta(milliseconds=1)


def parse(value: bytes | None, topic: str, now_ms: int = NOW_MS) -> list[Event | Rejection]:
    """parse_message with the test clock and skew."""
    return parse_message(value, topic, now_ms=now_ms, max_future_skew_ms=SKEW_MS)


def parse_one(obj: object, topic: str) -> Event | Rejection:
    """The single result of sending ``obj`` as one JSON message."""
    (result,) = parse(orjson.dumps(obj), topic)
    return result


def rejected(result: object, reason: str) -> Rejection:
    """Assert ``result`` is a rejection with ``reason`` and a detail; return it."""
    assert isinstance(result, Rejection), result
    assert result.reason == reason, result
    assert result.reason in REASONS
    assert result.detail
    SEEN_REASONS.add(reason)
    return result


def common(etype: str, **fields: object) -> dict[str, object]:
    """A valid event of ``etype`` with the common fields set and ``fields`` on top."""
    event: dict[str, object] = {
        "event_id": "e-1",
        "type": etype,
        "occurred_at": T0,
        "store_id": "s-1",
        "customer_id": "c-1",
    }
    event.update(fields)
    return event


ORDER = common(ORDER_PLACED, order_id="o-1", amount="19.99", currency="EUR")
SPEND = common(SPEND_RECORDED, amount=250, currency="USD", channel="search")
SIGNUP = common(CUSTOMER_SIGNED_UP, channel="web")
NPS = common(SURVEY_RESPONDED, survey="nps", score=9)
CSAT = common(SURVEY_RESPONDED, survey="csat", score=4)
CES = common(SURVEY_RESPONDED, survey="ces", score=2)
CLI = common(SURVEY_RESPONDED, survey="cli", answers={"recommend": 1, "repurchase": 2, "try_other": 6})
REWARD = common(REWARD_ISSUED, reward_id="r-1", points=50)

BASE = {"event_id": "e-1", "occurred_at_ms": T0_MS, "store_id": "s-1", "customer_id": "c-1"}


def expect(etype: str, **fields: object) -> Event:
    """The Event expected for ``common(etype, ...)``."""
    values: dict[str, Any] = {**BASE, "type": etype, **fields}
    return Event(**values)


VALID: list[tuple[str, dict[str, object], Event]] = [
    ("orders", ORDER, expect(ORDER_PLACED, order_id="o-1", amount_micros=19_990_000, currency="EUR")),
    (
        "orders",
        {**ORDER, "type": ORDER_REFUNDED, "amount": 5, "currency": "TRY"},
        expect(ORDER_REFUNDED, order_id="o-1", amount_micros=5_000_000, currency="TRY"),
    ),
    (
        "orders",
        {**ORDER, "amount": 19.99, "occurred_at": T0_MS},
        expect(ORDER_PLACED, order_id="o-1", amount_micros=19_990_000, currency="EUR"),
    ),
    (
        "orders",
        {**ORDER, "amount": 0},
        expect(ORDER_PLACED, order_id="o-1", amount_micros=0, currency="EUR"),
    ),
    ("signups", SIGNUP, expect(CUSTOMER_SIGNED_UP, channel="web")),
    ("signups", {**SIGNUP, "channel": None}, expect(CUSTOMER_SIGNED_UP)),
    ("signups", common(CUSTOMER_SIGNED_UP), expect(CUSTOMER_SIGNED_UP)),
    ("signups", common(CUSTOMER_CLOSED), expect(CUSTOMER_CLOSED)),
    ("survey-responses", NPS, expect(SURVEY_RESPONDED, survey="nps", score=9)),
    ("survey-responses", {**NPS, "score": 0}, expect(SURVEY_RESPONDED, survey="nps", score=0)),
    ("survey-responses", CSAT, expect(SURVEY_RESPONDED, survey="csat", score=4, scale=5)),
    (
        "survey-responses",
        {**CSAT, "scale": 10, "score": 10},
        expect(SURVEY_RESPONDED, survey="csat", score=10, scale=10),
    ),
    (
        "survey-responses",
        {**CSAT, "scale": 7, "score": 1},
        expect(SURVEY_RESPONDED, survey="csat", score=1, scale=7),
    ),
    ("survey-responses", CES, expect(SURVEY_RESPONDED, survey="ces", score=2)),
    ("survey-responses", CLI, expect(SURVEY_RESPONDED, survey="cli", answers=(1, 2, 6))),
    (
        "marketing-spend",
        SPEND,
        expect(SPEND_RECORDED, customer_id=None, amount_micros=250_000_000, currency="USD", channel="search"),
    ),
    (
        "marketing-spend",
        {**SPEND, "customer_id": 42, "channel": None, "amount": "0.000001"},
        expect(SPEND_RECORDED, customer_id=None, amount_micros=1, currency="USD"),
    ),
    ("loyalty-activity", common(LOYALTY_ENROLLED), expect(LOYALTY_ENROLLED)),
    ("loyalty-activity", common(LOYALTY_LEFT), expect(LOYALTY_LEFT)),
    ("loyalty-activity", REWARD, expect(REWARD_ISSUED, reward_id="r-1", points=50)),
    (
        "loyalty-activity",
        {**REWARD, "type": REWARD_REDEEMED, "points": None},
        expect(REWARD_REDEEMED, reward_id="r-1"),
    ),
    ("loyalty-activity", common(REWARD_REDEEMED, reward_id="r-2"), expect(REWARD_REDEEMED, reward_id="r-2")),
    (
        "orders",
        {**ORDER, "unknown": {"nested": [1, 2]}, "event_id": "é" * 128, "store_id": "x" * 64},
        expect(
            ORDER_PLACED,
            event_id="é" * 128,
            store_id="x" * 64,
            order_id="o-1",
            amount_micros=19_990_000,
            currency="EUR",
        ),
    ),
]


@pytest.mark.parametrize(("topic", "event", "expected"), VALID)
def test_valid_event_round_trips(topic: str, event: dict[str, object], expected: Event) -> None:
    """Every valid type (and variant) becomes exactly the expected Event."""
    result = parse_one(event, topic)
    assert type(result) is Event
    assert result == expected
    assert dataclasses.astuple(result) == dataclasses.astuple(expected)


def test_every_type_is_covered_by_the_valid_table() -> None:
    """The valid table has at least one case per known event type."""
    assert {expected.type for _, _, expected in VALID} == set(TYPE_TOPIC)


def test_events_are_real_frozen_events() -> None:
    """A produced Event is an ordinary, hashable, frozen Event."""
    result = parse_one(ORDER, "orders")
    assert type(result) is Event
    assert hash(result) == hash(dataclasses.replace(result))
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.store_id = "other"  # type: ignore[misc]


def test_draft_event_path_is_active() -> None:
    """The fast Event construction passes its self-check on this interpreter."""
    assert events_module._drafts_work()
    assert events_module.new_event is not Event


@pytest.mark.parametrize(("topic", "event", "expected"), VALID)
def test_events_decoded_from_the_wire_are_real_frozen_events(topic: str, event: dict[str, object],
                                                             expected: Event) -> None:
    """The facts stage's decoding of an internal message gives the validator's frozen Event back."""
    decoded = event_from_list(orjson.loads(orjson.dumps(event_to_list(parse_one(event, topic)))))
    assert type(decoded) is Event
    assert dataclasses.astuple(decoded) == dataclasses.astuple(expected)
    assert hash(decoded) == hash(expected)
    with pytest.raises(dataclasses.FrozenInstanceError):
        decoded.event_id = "other"  # type: ignore[misc]


def case(base: dict[str, object], **changes: object) -> dict[str, object]:
    """``base`` with fields replaced (or removed when the value is DROP)."""
    event = dict(base)
    for key, value in changes.items():
        if value is DROP:
            event.pop(key, None)
        else:
            event[key] = value
    return event


INVALID: list[tuple[str, dict[str, object], str]] = [
    # common fields
    ("orders", case(ORDER, event_id=DROP), "missing_field"),
    ("orders", case(ORDER, event_id=None), "missing_field"),
    ("orders", case(ORDER, event_id=123), "wrong_type"),
    ("orders", case(ORDER, event_id=""), "out_of_range"),
    ("orders", case(ORDER, event_id="x" * 129), "out_of_range"),
    ("orders", case(ORDER, type=DROP), "missing_field"),
    ("orders", case(ORDER, type=5), "wrong_type"),
    ("orders", case(ORDER, type=["order.placed"]), "wrong_type"),
    ("orders", case(ORDER, type="order.shipped"), "unknown_type"),
    ("orders", case(ORDER, type="ORDER.PLACED"), "unknown_type"),
    ("orders", common(CUSTOMER_CLOSED), "wrong_topic"),
    ("signups", ORDER, "wrong_topic"),
    ("marketing-spend", common(LOYALTY_ENROLLED), "wrong_topic"),
    ("orders", case(ORDER, occurred_at=DROP), "missing_field"),
    ("orders", case(ORDER, occurred_at="2024-03-01T11:00:00"), "bad_timestamp"),
    ("orders", case(ORDER, occurred_at="2024-03-01T11:00:00.123"), "bad_timestamp"),
    ("orders", case(ORDER, occurred_at="2024-03-01"), "bad_timestamp"),
    ("orders", case(ORDER, occurred_at=float(T0_MS)), "bad_timestamp"),
    ("orders", case(ORDER, occurred_at=True), "bad_timestamp"),
    ("orders", case(ORDER, occurred_at=[T0]), "bad_timestamp"),
    ("orders", case(ORDER, occurred_at=10**15), "bad_timestamp"),
    ("orders", case(ORDER, store_id=DROP), "missing_field"),
    ("orders", case(ORDER, store_id=""), "out_of_range"),
    ("orders", case(ORDER, store_id="x" * 65), "out_of_range"),
    ("orders", case(ORDER, store_id=7), "wrong_type"),
    ("orders", case(ORDER, customer_id=DROP), "missing_field"),
    ("orders", case(ORDER, customer_id=None), "missing_field"),
    ("orders", case(ORDER, customer_id=5), "wrong_type"),
    ("orders", case(ORDER, customer_id="x" * 129), "out_of_range"),
    ("signups", case(common(CUSTOMER_CLOSED), customer_id=DROP), "missing_field"),
    ("loyalty-activity", case(common(LOYALTY_LEFT), customer_id=""), "out_of_range"),
    ("survey-responses", case(NPS, customer_id=DROP), "missing_field"),
    # orders
    ("orders", case(ORDER, order_id=DROP), "missing_field"),
    ("orders", case(ORDER, order_id=[]), "wrong_type"),
    ("orders", case(ORDER, order_id="x" * 129), "out_of_range"),
    ("orders", case(ORDER, amount=DROP), "missing_field"),
    ("orders", case(ORDER, amount=None), "missing_field"),
    ("orders", case(ORDER, amount=-1), "bad_amount"),
    ("orders", case(ORDER, amount="-1.00"), "bad_amount"),
    ("orders", case(ORDER, amount=-0.5), "bad_amount"),
    ("orders", case(ORDER, amount="abc"), "bad_amount"),
    ("orders", case(ORDER, amount="1e3"), "bad_amount"),
    ("orders", case(ORDER, amount="0.0000001"), "bad_amount"),
    ("orders", case(ORDER, amount=1e-7), "bad_amount"),
    ("orders", case(ORDER, amount=True), "bad_amount"),
    ("orders", case(ORDER, amount=[1]), "bad_amount"),
    ("orders", case(ORDER, amount={"value": 1}), "bad_amount"),
    ("orders", case(ORDER, amount=10**12 + 1), "bad_amount"),
    ("orders", case(ORDER, amount=1e13), "bad_amount"),
    ("orders", case(ORDER, amount="1000000000000.000001"), "bad_amount"),
    ("orders", case(ORDER, currency=DROP), "missing_field"),
    ("orders", case(ORDER, currency="eur"), "bad_currency"),
    ("orders", case(ORDER, currency="EURO"), "bad_currency"),
    ("orders", case(ORDER, currency="E1R"), "bad_currency"),
    ("orders", case(ORDER, currency="ÉUR"), "bad_currency"),
    ("orders", case(ORDER, currency=978), "bad_currency"),
    # spend
    ("marketing-spend", case(SPEND, amount="abc"), "bad_amount"),
    ("marketing-spend", case(SPEND, currency="usd"), "bad_currency"),
    ("marketing-spend", case(SPEND, channel=""), "out_of_range"),
    ("marketing-spend", case(SPEND, channel=3), "wrong_type"),
    # signups
    ("signups", case(SIGNUP, channel=""), "out_of_range"),
    ("signups", case(SIGNUP, channel="x" * 65), "out_of_range"),
    ("signups", case(SIGNUP, channel=["web"]), "wrong_type"),
    # surveys
    ("survey-responses", case(NPS, survey=DROP), "missing_field"),
    ("survey-responses", case(NPS, survey="xyz"), "unknown_survey"),
    ("survey-responses", case(NPS, survey="NPS"), "unknown_survey"),
    ("survey-responses", case(NPS, survey=5), "wrong_type"),
    ("survey-responses", case(NPS, score=DROP), "missing_field"),
    ("survey-responses", case(NPS, score=11), "out_of_range"),
    ("survey-responses", case(NPS, score=-1), "out_of_range"),
    ("survey-responses", case(NPS, score=7.0), "wrong_type"),
    ("survey-responses", case(NPS, score=True), "wrong_type"),
    ("survey-responses", case(NPS, score="7"), "wrong_type"),
    ("survey-responses", case(CSAT, scale=6), "out_of_range"),
    ("survey-responses", case(CSAT, scale="5"), "wrong_type"),
    ("survey-responses", case(CSAT, score=6), "out_of_range"),
    ("survey-responses", case(CSAT, score=8, scale=7), "out_of_range"),
    ("survey-responses", case(CSAT, score=0), "out_of_range"),
    ("survey-responses", case(CES, score=8), "out_of_range"),
    ("survey-responses", case(CES, score=0), "out_of_range"),
    ("survey-responses", case(CLI, answers=DROP), "missing_field"),
    ("survey-responses", case(CLI, answers=[1, 2, 3]), "wrong_type"),
    ("survey-responses", case(CLI, answers={"recommend": 7, "repurchase": 1, "try_other": 1}), "out_of_range"),
    ("survey-responses", case(CLI, answers={"recommend": 0, "repurchase": 1, "try_other": 1}), "out_of_range"),
    ("survey-responses", case(CLI, answers={"recommend": 1, "repurchase": 1}), "missing_field"),
    ("survey-responses", case(CLI, answers={"recommend": 1, "repurchase": 1.0, "try_other": 1}), "wrong_type"),
    # rewards
    ("loyalty-activity", case(REWARD, reward_id=DROP), "missing_field"),
    ("loyalty-activity", case(REWARD, reward_id=""), "out_of_range"),
    ("loyalty-activity", case(REWARD, points=-1), "out_of_range"),
    ("loyalty-activity", case(REWARD, points=1.5), "wrong_type"),
    ("loyalty-activity", case(REWARD, points=True), "wrong_type"),
    ("loyalty-activity", case(REWARD, points=2**63), "out_of_range"),
]


@pytest.mark.parametrize(("topic", "event", "reason"), INVALID)
def test_invalid_event_maps_to_its_reason(topic: str, event: dict[str, object], reason: str) -> None:
    """Each invalid single-event message is one rejection with the right reason, raw bytes and no index."""
    raw = orjson.dumps(event)
    (result,) = parse(raw, topic)
    rejection = rejected(result, reason)
    assert rejection.raw == raw
    assert rejection.index is None


@pytest.mark.parametrize(
    ("event", "field"),
    [
        (case(ORDER, event_id=""), "event_id"),
        (case(ORDER, currency="eur"), "currency"),
        (case(ORDER, amount="x"), "amount"),
        (case(ORDER, occurred_at="yesterday"), "occurred_at"),
        (case(CLI, type=SURVEY_RESPONDED, answers={"recommend": 9, "repurchase": 1, "try_other": 1}), "recommend"),
    ],
)
def test_detail_names_the_field(event: dict[str, object], field: str) -> None:
    """The rejection detail says which field was wrong."""
    topic = TYPE_TOPIC[str(event["type"])]
    result = parse_one(event, topic)
    assert isinstance(result, Rejection)
    assert field in result.detail


MESSAGES = [
    (None, "null_message"),
    (b"\xff\xfe{}", "invalid_utf8"),
    (b'{"event_id": "\xc3"}', "invalid_utf8"),
    (b"", "invalid_json"),
    (b"{", "invalid_json"),
    (b"{'a': 1}", "invalid_json"),
    (b'{"a": NaN}', "invalid_json"),
    (b"\xef\xbb\xbf{}", "invalid_json"),
    (b'"\\ud800"', "invalid_json"),
    (b"1", "not_an_object"),
    (b'"order.placed"', "not_an_object"),
    (b"null", "not_an_object"),
    (b"true", "not_an_object"),
    (b"[]", "empty_batch"),
    (b"  [ ]  ", "empty_batch"),
    (b" " * MAX_EVENT_BYTES + b"{}", "message_too_large"),
    (b"[" + b" " * MAX_BATCH_BYTES + b"1]", "message_too_large"),
    (b"[" + b"{}," * MAX_BATCH_EVENTS + b"{}]", "batch_too_large"),
]


@pytest.mark.parametrize(("value", "reason"), MESSAGES, ids=lambda v: repr(v)[:30] if isinstance(v, bytes) else v)
def test_whole_message_rejections(value: bytes | None, reason: str) -> None:
    """Messages that cannot be split into events are one rejection carrying the original bytes."""
    result = parse(value, "orders")
    assert len(result) == 1
    rejection = rejected(result[0], reason)
    assert rejection.raw == (value or b"")
    assert rejection.index is None


def test_event_at_exactly_64_kib_is_accepted() -> None:
    """A one-event message of exactly 64 KiB passes; one byte more is too large."""
    raw = orjson.dumps(ORDER)
    padded = b" " * (MAX_EVENT_BYTES - len(raw)) + raw
    assert len(padded) == MAX_EVENT_BYTES
    assert type(parse(padded, "orders")[0]) is Event
    rejected(parse(b" " + padded, "orders")[0], "message_too_large")


def test_batch_limits_exactly() -> None:
    """10,000 events in exactly 1 MiB pass; 10,001 elements or one byte more are one rejection."""
    events = [
        {"event_id": f"e{i}", "type": LOYALTY_LEFT, "occurred_at": 0, "store_id": "s", "customer_id": "c"}
        for i in range(MAX_BATCH_EVENTS)
    ]
    raw = orjson.dumps(events)
    padded = raw[:-1] + b" " * (MAX_BATCH_BYTES - len(raw)) + b"]"
    assert len(padded) == MAX_BATCH_BYTES
    results = parse(padded, "loyalty-activity")
    assert len(results) == MAX_BATCH_EVENTS
    assert all(type(r) is Event for r in results)
    assert [r.event_id for r in results if isinstance(r, Event)] == [f"e{i}" for i in range(MAX_BATCH_EVENTS)]
    (over,) = parse(b" " + padded, "loyalty-activity")
    rejected(over, "message_too_large")
    (many,) = parse(orjson.dumps([*events, events[0]]), "loyalty-activity")
    rejected(many, "batch_too_large")


def test_batch_keeps_order_and_indexes() -> None:
    """A mixed batch gives one result per element, in order, rejections with their index and own JSON."""
    elements: list[object] = [
        ORDER,
        case(ORDER, event_id="e-2", amount="-1"),
        7,
        case(ORDER, event_id="e-4", amount=3),
        common(CUSTOMER_CLOSED),
        None,
        case(ORDER, event_id="e-7", currency="usd"),
    ]
    results = parse(orjson.dumps(elements), "orders")
    assert [r.reason if isinstance(r, Rejection) else r.event_id for r in results] == [
        "e-1",
        "bad_amount",
        "not_an_object",
        "e-4",
        "wrong_topic",
        "not_an_object",
        "bad_currency",
    ]
    for index, result in enumerate(results):
        if isinstance(result, Rejection):
            assert result.index == index
            assert result.raw == orjson.dumps(elements[index])
            assert orjson.loads(result.raw) == elements[index]


def test_batch_equals_elements_one_by_one() -> None:
    """Each element of a batch gets the same result as when sent alone (index aside)."""
    elements = [event for _, event, _ in VALID if TYPE_TOPIC[str(event["type"])] == "orders"]
    elements += [event for topic, event, _ in INVALID if topic == "orders"]
    batch = parse(orjson.dumps(elements), "orders")
    alone = [parse_one(element, "orders") for element in elements]
    assert len(batch) == len(alone) == len(elements)
    for index, (in_batch, single) in enumerate(zip(batch, alone, strict=True)):
        if isinstance(single, Rejection):
            assert in_batch == dataclasses.replace(single, index=index)
        else:
            assert in_batch == single


def test_scalars_array_gives_one_rejection_each() -> None:
    """``[1,2,3]`` makes three not_an_object rejections with indexes 0, 1, 2."""
    results = parse(b"[1,2,3]", "orders")
    assert [(rejected(r, "not_an_object").index, r.raw) for r in results if isinstance(r, Rejection)] == [
        (0, b"1"),
        (1, b"2"),
        (2, b"3"),
    ]
    assert len(results) == 3


def test_empty_array_is_one_rejection() -> None:
    """``[]`` is exactly one empty_batch rejection."""
    assert parse(b"[]", "orders") == [Rejection("empty_batch", "empty array", b"[]", None)]


def test_nested_array_element_is_not_an_event() -> None:
    """A batch element that is itself an array is rejected (``not_an_event``), not flattened."""
    (result,) = parse(orjson.dumps([[ORDER]]), "orders")
    assert rejected(result, "not_an_event").index == 0
    assert orjson.loads(result.raw) == [ORDER]


def nested_array(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def nested_object(depth: int, leaf: object = 1) -> dict[str, Any]:
    value: Any = leaf
    for _ in range(depth):
        value = {"a": value}
    return value  # type: ignore[no-any-return]


def test_a_300_deep_array_is_one_dead_letter_not_an_exception() -> None:
    """``[[[...]]]`` 300 levels deep is a batch whose one element is an array: one ``not_an_event``, its exact text."""
    (result,) = parse(nested_array(300), "orders")
    assert rejected(result, "not_an_event").index == 0
    assert result.raw == nested_array(299)


@pytest.mark.parametrize(("depth", "too_deep"), [(32, False), (33, True), (300, True)])
def test_an_event_nested_deeper_than_32_levels_is_too_deep(depth: int, too_deep: bool) -> None:
    """An otherwise valid event with a field nested past 32 levels is ``too_deep``; 32 levels are fine."""
    head = orjson.dumps(ORDER)[:-1]  # the event object is the first level, "extra" adds the rest
    value = head + b',"extra":' + b'{"a":' * (depth - 1) + b"1" + b"}" * depth
    decoded = orjson.loads(value)
    assert validation.deeper_than(decoded, depth - 1) and not validation.deeper_than(decoded, depth)
    (result,) = parse(value, "orders")
    if too_deep:
        assert rejected(result, "too_deep").index is None
        assert result.raw == value
    else:
        assert isinstance(result, Event)


def test_a_deep_element_is_dead_lettered_alone_and_its_neighbours_pass() -> None:
    """In a batch, a too-deep element is rejected with its own text; the elements around it are events."""
    deep = {**ORDER, "event_id": "deep", "extra": nested_object(40)}
    results = parse(orjson.dumps([ORDER, deep, {**ORDER, "event_id": "e-3"}]), "orders")
    assert [type(r) for r in results] == [Event, Rejection, Event]
    assert rejected(results[1], "too_deep").index == 1
    assert orjson.loads(results[1].raw) == deep


def test_a_message_too_deep_to_decode_is_too_deep() -> None:
    """Past the decoder's own limit (1,024 levels) the whole message is one ``too_deep`` with its bytes."""
    value = nested_array(2000)
    (result,) = parse(value, "orders")
    assert rejected(result, "too_deep").index is None
    assert result.raw == value


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(json_values, st.integers(min_value=0, max_value=400))
def test_json_text_writes_any_decoded_value_back_exactly(value: object, wrap: int) -> None:
    """``json_text`` gives text that decodes to the same value, also nested deeper than orjson writes."""
    for _ in range(wrap):
        value = [value]
    assert orjson.loads(json_text(value)) == value


def test_oversized_element_in_batch_is_rejected_alone() -> None:
    """An element whose JSON is over 64 KiB is rejected as it would be alone; its neighbours pass."""
    big = {**ORDER, "event_id": "big", "padding": "x" * MAX_EVENT_BYTES}
    results = parse(orjson.dumps([ORDER, big, ORDER]), "orders")
    assert [type(r) for r in results] == [Event, Rejection, Event]
    rejection = rejected(results[1], "message_too_large")
    assert rejection.index == 1
    assert rejection.raw == orjson.dumps(big)


FUTURE_CASES = [
    (NOW_MS + SKEW_MS, None),
    (NOW_MS + SKEW_MS + 1, "future_event"),
    (NOW_MS + SKEW_MS - 1, None),
    (0, None),
]


@pytest.mark.parametrize(("occurred_at", "reason"), FUTURE_CASES)
def test_future_skew_edge(occurred_at: int, reason: str | None) -> None:
    """An event exactly at now + skew is accepted; 1 ms later is future_event."""
    result = parse_one(case(ORDER, occurred_at=occurred_at), "orders")
    if reason is None:
        assert type(result) is Event
        assert result.occurred_at_ms == occurred_at
    else:
        rejected(result, reason)


def test_future_skew_applies_to_strings_and_batches() -> None:
    """The skew edge holds for RFC 3339 strings and per batch element."""
    at_limit = "2024-03-01T12:05:00.000Z"
    over = "2024-03-01T12:05:00.001Z"
    results = parse(orjson.dumps([case(ORDER, occurred_at=at_limit), case(ORDER, occurred_at=over)]), "orders")
    assert type(results[0]) is Event
    assert rejected(results[1], "future_event").index == 1


def test_future_event_is_checked_after_fields() -> None:
    """A future event with a bad field reports the field, not the time."""
    result = parse_one(case(ORDER, occurred_at=NOW_MS + SKEW_MS + 1, amount="x"), "orders")
    rejected(result, "bad_amount")


TIMESTAMPS = [
    ("2024-03-01T12:00:00Z", datetime(2024, 3, 1, 12, tzinfo=UTC)),
    ("2024-03-01T12:00:00z", datetime(2024, 3, 1, 12, tzinfo=UTC)),
    ("2024-03-01t12:00:00Z", datetime(2024, 3, 1, 12, tzinfo=UTC)),
    ("2024-03-01 12:00:00Z", datetime(2024, 3, 1, 12, tzinfo=UTC)),
    ("2024-03-01T12:00:00+00:00", datetime(2024, 3, 1, 12, tzinfo=UTC)),
    ("2024-03-01T12:00:00-00:00", datetime(2024, 3, 1, 12, tzinfo=UTC)),
    ("2024-03-01T14:30:00+02:30", datetime(2024, 3, 1, 12, tzinfo=UTC)),
    ("2024-03-01T07:00:00-05:00", datetime(2024, 3, 1, 12, tzinfo=UTC)),
    ("2024-03-01T12:00:00.5Z", datetime(2024, 3, 1, 12, 0, 0, 500_000, tzinfo=UTC)),
    ("2024-03-01T12:00:00.12Z", datetime(2024, 3, 1, 12, 0, 0, 120_000, tzinfo=UTC)),
    ("2024-03-01T12:00:00.123Z", datetime(2024, 3, 1, 12, 0, 0, 123_000, tzinfo=UTC)),
    ("2024-03-01T12:00:00.1239Z", datetime(2024, 3, 1, 12, 0, 0, 123_000, tzinfo=UTC)),
    ("2024-03-01T12:00:00.123999999Z", datetime(2024, 3, 1, 12, 0, 0, 123_000, tzinfo=UTC)),
    ("2024-03-01T12:00:00.000999+03:00", datetime(2024, 3, 1, 9, tzinfo=UTC)),
    ("2024-02-29T23:59:59.999+23:59", datetime(2024, 2, 29, 0, 0, 59, 999_000, tzinfo=UTC)),
    ("2024-12-31T23:59:59-23:59", datetime(2025, 1, 1, 23, 58, 59, tzinfo=UTC)),
    ("1970-01-01T00:00:00Z", EPOCH),
    ("1969-12-31T23:59:59.9995Z", datetime(1969, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC)),
    ("0001-01-01T00:00:00Z", datetime(1, 1, 1, tzinfo=UTC)),
    ("9999-12-31T23:59:59.999999Z", datetime(9999, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC)),
    (
        "2024-03-01T12:00:00.123+05:45",
        datetime(2024, 3, 1, 12, 0, 0, 123_000, tzinfo=timezone(timedelta(hours=5, minutes=45))),
    ),
]


@pytest.mark.parametrize(("text", "moment"), TIMESTAMPS)
def test_rfc3339_to_epoch_ms(text: str, moment: datetime) -> None:
    """RFC 3339 strings with offsets and fractions give the exact epoch ms (sub-ms truncated)."""
    assert parse_timestamp(text) == ms(moment)


def test_pre_epoch_fraction_truncates_toward_earlier_ms() -> None:
    """Truncation is a floor: half a ms before the epoch is -1, not 0."""
    assert parse_timestamp("1969-12-31T23:59:59.9995Z") == -1


BAD_TIMESTAMPS = [
    "2024-03-01T12:00:00",
    "2024-03-01T12:00:00.123456",
    "2024-03-01",
    "2024-03-01T12:00Z",
    "20240301T120000Z",
    "2024-W09-5T12:00:00Z",
    "2024-03-01T12:00:00+0100",
    "2024-03-01T12:00:00+01",
    "2024-03-01T12:00:00+24:00",
    "2024-03-01T12:00:00+01:60",
    "2024-03-01T12:00:00.Z",
    "2024-03-01T12:00:00,5Z",
    "2024-03-01T12:00:00.12a4Z",
    "2024-03-01T12:00:60Z",
    "2024-03-01T24:00:00Z",
    "2024-02-30T12:00:00Z",
    "2023-02-29T12:00:00Z",
    "2024-13-01T12:00:00Z",
    "0000-01-01T00:00:00Z",
    "0001-01-01T00:00:00+00:01",
    "\uff12024-03-01T12:00:00Z",
    "2024-03-01T12:00:0\uff15Z",
    "2024-03-01T12:00:00.\uff11Z",
    " 2024-03-01T12:00:00Z",
    "2024-03-01T12:00:00Z ",
    "2024-03-01T12:00:00ZZ",
    "2024-03-01X12:00:00Z",
    "+2024-03-01T12:00:00Z",
    "",
    "Z",
    "x" * 40,
]


@pytest.mark.parametrize("text", BAD_TIMESTAMPS)
def test_bad_timestamps_raise(text: str) -> None:
    """Naive, partial, ISO-8601-only, out-of-range and non-ASCII forms raise ValueError."""
    with pytest.raises(ValueError):
        parse_timestamp(text)
    rejected(parse_one(case(ORDER, occurred_at=text), "orders"), "bad_timestamp")


@pytest.mark.parametrize("value", [1.7e12, True, False, None, [], {}, 10**15, -(10**15)])
def test_timestamp_non_strings_raise(value: object) -> None:
    """Floats, booleans, null and ints outside years 1..9999 are not timestamps."""
    with pytest.raises(ValueError):
        parse_timestamp(value)


def test_minute_cache_overflow_keeps_results_exact() -> None:
    """More distinct minutes than the cache holds still parse exactly."""
    start = datetime(2020, 1, 1, tzinfo=UTC)
    for step in range(validation._MINUTE_CACHE_LIMIT + 500):
        moment = start + timedelta(minutes=step * 7, seconds=step % 60, milliseconds=step % 1000)
        text = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        assert parse_timestamp(text) == ms(moment)
    assert len(validation._MINUTE_CACHE) <= validation._MINUTE_CACHE_LIMIT


AMOUNTS = [
    ("19.99", 19_990_000),
    (19.99, 19_990_000),
    ("0.1", 100_000),
    (0.1, 100_000),
    ("0", 0),
    (0, 0),
    (0.0, 0),
    (-0.0, 0),
    ("-0.00", 0),
    ("5", 5_000_000),
    (5, 5_000_000),
    ("007.50", 7_500_000),
    ("1.000001", 1_000_001),
    ("1.50000000", 1_500_000),
    ("0.000001", 1),
    (1e-6, 1),
    (5e-05, 50),
    (1.5e-05, 15),
    (123456.789012, 123_456_789_012),
    ("1000000000000", 10**18),
    ("1000000000000.000000", 10**18),
    (10**12, 10**18),
    (1e12, 10**18),
    (999999999.999999, 999_999_999_999_999),
    (1234567890.5, 1_234_567_890_500_000),
    (0.30000000000000004, None),  # the double 0.1 + 0.2: 17 fractional digits
]


@pytest.mark.parametrize(("value", "micros"), AMOUNTS)
def test_amount_exact_micros(value: object, micros: int | None) -> None:
    """Amounts convert exactly to micro-units (floats by their shortest repr)."""
    if micros is None:
        with pytest.raises(ValueError):
            parse_amount(value)
    else:
        assert parse_amount(value) == micros


def test_amount_sums_are_exact() -> None:
    """ "0.1" + "0.2" is exactly 300000 micros, and float 19.99 is 19990000."""
    assert parse_amount("0.1") + parse_amount("0.2") == 300_000
    assert parse_amount(0.1) + parse_amount(0.2) == 300_000
    assert parse_amount(19.99) == 19_990_000
    assert sum(parse_amount("0.01") for _ in range(100)) == 1_000_000


BAD_AMOUNTS = [
    "-1",
    "-0.01",
    -1,
    -0.01,
    "abc",
    "",
    ".5",
    "5.",
    "+5",
    " 5",
    "5 ",
    "1,5",
    "1_000",
    "1e3",
    "1E3",
    "0x10",
    "NaN",
    "Infinity",
    "\u0661\u0662",
    "\uff11\uff12",
    "1.2.3",
    "0.0000001",
    "0.1234567",
    1e-7,
    0.1234567,
    10**12 + 1,
    "1000000000000.000001",
    "9" * 5000,
    "0." + "0" * 5000 + "1",
    1e13,
    float("nan"),
    float("inf"),
    float("-inf"),
    True,
    False,
    None,
    [1],
    {"amount": 1},
]


@pytest.mark.parametrize("value", BAD_AMOUNTS, ids=lambda v: repr(v)[:20])
def test_bad_amounts_raise(value: object) -> None:
    """Negative, non-decimal, over-precise, non-finite, oversized and non-numeric amounts raise."""
    with pytest.raises(ValueError):
        parse_amount(value)


def test_long_zero_padded_amount_string_is_exact() -> None:
    """Leading and trailing zeros never change or reject an amount."""
    assert parse_amount("0" * 5000 + "12.5" + "0" * 5000) == 12_500_000


def reference_float_micros(value: float) -> int | None:
    """Micros of a float by the rule of the spec (its shortest repr), via Decimal."""
    scaled = Decimal(repr(value)) * 1_000_000
    if scaled != scaled.to_integral_value() or scaled > 10**18 or scaled < 0:
        return None
    return int(scaled)


@settings(max_examples=2000, deadline=None)
@given(st.floats(min_value=0, max_value=2e12, allow_nan=False))
def test_float_amounts_follow_shortest_repr(value: float) -> None:
    """For any float, parse_amount equals the decimal value of repr(float) (or rejects where it must)."""
    expected = reference_float_micros(value)
    if expected is None:
        with pytest.raises(ValueError):
            parse_amount(value)
    else:
        assert parse_amount(value) == expected


@settings(max_examples=1000, deadline=None)
@given(st.integers(min_value=0, max_value=10**12 * 10**6), st.integers(min_value=0, max_value=6))
def test_decimal_strings_round_trip(micros: int, decimals: int) -> None:
    """Any micros amount written as a decimal string with at most 6 places parses back exactly."""
    micros -= micros % 10 ** (6 - decimals)
    whole, fraction = divmod(micros, 1_000_000)
    text = f"{whole}.{fraction:06d}"[: len(str(whole)) + 1 + decimals].rstrip(".")
    assert parse_amount(text) == micros
    if micros % 10_000 == 0 and micros <= 10**15:  # cents-exact floats below 1e9 units
        assert parse_amount(float(text)) == micros


def test_validate_event_passes_raw_and_index() -> None:
    """validate_event copies raw and index into a rejection and validates like parse_message."""
    kwargs: dict[str, Any] = {"now_ms": NOW_MS, "max_future_skew_ms": SKEW_MS}
    result = validate_event(case(ORDER, amount="-1"), "orders", raw=b"RAW", index=4, **kwargs)
    assert result == Rejection("bad_amount", rejected(result, "bad_amount").detail, b"RAW", 4)
    assert validate_event(ORDER, "orders", raw=b"", index=None, **kwargs) == VALID[0][2]
    rejected(validate_event("x", "orders", raw=b"x", index=None, **kwargs), "not_an_object")


def test_unknown_topic_is_a_programming_error() -> None:
    """An unknown topic name raises ValueError instead of rejecting every event."""
    clock: dict[str, Any] = {"now_ms": NOW_MS, "max_future_skew_ms": SKEW_MS}
    with pytest.raises(ValueError, match="unknown input topic"):
        parse_message(orjson.dumps(ORDER), "loyalty-orders", **clock)
    with pytest.raises(ValueError, match="unknown input topic"):
        validate_event(ORDER, "loyalty-orders", raw=b"", index=None, **clock)


def test_bytes_like_values_are_accepted() -> None:
    """bytearray and memoryview values parse like bytes; raw is always bytes."""
    raw = orjson.dumps(case(ORDER, amount="x"))
    for value in (bytearray(raw), memoryview(raw)):
        (result,) = parse_message(value, "orders", now_ms=NOW_MS, max_future_skew_ms=SKEW_MS)
        rejection = rejected(result, "bad_amount")
        assert type(rejection.raw) is bytes
        assert rejection.raw == raw


def test_input_topics_all_accept_their_types() -> None:
    """Every input topic accepts exactly the types that belong to it."""
    for topic in INPUT_TOPICS:
        for etype, home in TYPE_TOPIC.items():
            result = parse_one(
                common(etype, order_id="o", amount=1, currency="EUR", reward_id="r", survey="nps", score=1), topic
            )
            assert (type(result) is Event) == (home == topic), (topic, etype, result)


# --------------------------------------------------------------------------- property: round trip

TEXT = st.text(min_size=1, max_size=20)


@st.composite
def timestamps(draw: st.DrawFn) -> tuple[object, int]:
    """An occurred_at value (int ms or RFC 3339 text) and the epoch ms it must parse to."""
    at = draw(st.integers(min_value=0, max_value=NOW_MS + SKEW_MS))
    if draw(st.booleans()):
        return at, at
    offset = draw(st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59))
    digits = draw(st.integers(min_value=0, max_value=9))
    extra = draw(st.integers(min_value=0, max_value=999_999))
    local = EPOCH.astimezone(timezone(timedelta(minutes=offset))) + timedelta(milliseconds=at)
    text = local.strftime("%Y-%m-%d") + draw(st.sampled_from("Tt ")) + local.strftime("%H:%M:%S")
    fraction = f"{at % 1000:03d}{extra:06d}"[:digits]
    if digits:
        text += "." + fraction
    if offset == 0 and draw(st.booleans()):
        text += draw(st.sampled_from("Zz"))
    else:
        sign = "-" if offset < 0 else "+"
        text += f"{sign}{abs(offset) // 60:02d}:{abs(offset) % 60:02d}"
    return text, at - at % 1000 + (int(fraction[:3].ljust(3, "0")) if digits else 0)


@st.composite
def amounts(draw: st.DrawFn) -> tuple[object, int]:
    """An amount (int, float or decimal string) and its exact micros."""
    form = draw(st.sampled_from(["int", "float", "string"]))
    if form == "int":
        units = draw(st.integers(min_value=0, max_value=10**12))
        return units, units * 1_000_000
    if form == "float":
        cents = draw(st.integers(min_value=0, max_value=10**11))
        return float(f"{cents // 100}.{cents % 100:02d}"), cents * 10_000
    micros = draw(st.integers(min_value=0, max_value=10**18))
    whole, fraction = divmod(micros, 1_000_000)
    zeros = "0" * draw(st.integers(min_value=0, max_value=3))
    return f"{whole}.{fraction:06d}{zeros}", micros


@st.composite
def valid_events(draw: st.DrawFn) -> tuple[str, dict[str, object], Event]:
    """A random valid event of any type, its topic, and the Event it must become."""
    etype = draw(st.sampled_from(sorted(TYPE_TOPIC)))
    stamp, at = draw(timestamps())
    fields: dict[str, Any] = {
        "event_id": draw(st.text(min_size=1, max_size=128)),
        "type": etype,
        "occurred_at_ms": at,
        "store_id": draw(st.text(min_size=1, max_size=64)),
        "customer_id": draw(st.text(min_size=1, max_size=128)),
    }
    event: dict[str, object] = {
        "event_id": fields["event_id"],
        "type": etype,
        "occurred_at": stamp,
        "store_id": fields["store_id"],
        "customer_id": fields["customer_id"],
    }
    if etype in (ORDER_PLACED, ORDER_REFUNDED, SPEND_RECORDED):
        amount, micros = draw(amounts())
        currency = draw(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=3, max_size=3))
        event.update(amount=amount, currency=currency)
        fields.update(amount_micros=micros, currency=currency)
    if etype in (ORDER_PLACED, ORDER_REFUNDED):
        event["order_id"] = fields["order_id"] = draw(st.text(min_size=1, max_size=128))
    if etype == SPEND_RECORDED:
        fields["customer_id"] = None
        if draw(st.booleans()):
            event.pop("customer_id")
    if etype in (SPEND_RECORDED, CUSTOMER_SIGNED_UP):
        channel = draw(st.none() | st.text(min_size=1, max_size=64))
        fields["channel"] = channel
        if channel is not None or draw(st.booleans()):
            event["channel"] = channel
    if etype == SURVEY_RESPONDED:
        survey = draw(st.sampled_from(["nps", "csat", "ces", "cli"]))
        event["survey"] = fields["survey"] = survey
        if survey == "nps":
            event["score"] = fields["score"] = draw(st.integers(0, 10))
        elif survey == "ces":
            event["score"] = fields["score"] = draw(st.integers(1, 7))
        elif survey == "csat":
            scale = draw(st.sampled_from([None, 5, 7, 10]))
            if scale is not None:
                event["scale"] = scale
            fields["scale"] = scale or 5
            event["score"] = fields["score"] = draw(st.integers(1, scale or 5))
        else:
            answers = draw(st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6)))
            event["answers"] = dict(zip(("recommend", "repurchase", "try_other"), answers, strict=True))
            fields["answers"] = answers
    if etype in (REWARD_ISSUED, REWARD_REDEEMED):
        event["reward_id"] = fields["reward_id"] = draw(st.text(min_size=1, max_size=128))
        points = draw(st.none() | st.integers(min_value=0, max_value=2**63 - 1))
        fields["points"] = points
        if points is not None or draw(st.booleans()):
            event["points"] = points
    extras = draw(
        st.dictionaries(
            st.text(max_size=8).map("x-".__add__), st.integers(-(2**63), 2**63 - 1) | TEXT | st.none(), max_size=3
        )
    )
    event.update(extras)
    return TYPE_TOPIC[etype], event, Event(**fields)


@settings(max_examples=400, deadline=None)
@given(valid_events())
def test_generated_valid_events_round_trip(generated: tuple[str, dict[str, object], Event]) -> None:
    """Any valid generated event, serialized to JSON, parses back to the same fields, alone and in a batch."""
    topic, event, expected = generated
    raw = orjson.dumps(event)
    assert parse(raw, topic) == [expected]
    assert parse(orjson.dumps([event, event]), topic) == [expected, expected]


def test_every_reason_is_documented_and_exercised() -> None:
    """Every reason in REASONS is in the module docstring and produced by some test above."""
    # from the source: a compiled module keeps no module docstring
    doc = ast.get_docstring(ast.parse((Path(metrics.__file__).parent / "validation.py").read_text())) or ""
    for reason in REASONS:
        assert f"``{reason}``" in doc
    for value, reason in MESSAGES:
        rejected(parse(value, "orders")[0], reason)
    for topic, event, reason in INVALID:
        rejected(parse_one(event, topic), reason)
    rejected(parse_one(case(ORDER, occurred_at=NOW_MS + SKEW_MS + 1), "orders"), "future_event")
    assert set(REASONS) == SEEN_REASONS


@pytest.mark.parametrize("topic_event", [("signups", SIGNUP), ("marketing-spend", SPEND)], ids=["signup", "spend"])
@pytest.mark.parametrize(("channel", "reason"), [
    ("c" * 64, None), ("\U0001f600" * 64, None), ("c" * 65, "out_of_range"), ("", "out_of_range"), (7, "wrong_type"),
])
def test_channel_is_at_most_64_characters(topic_event: tuple[str, dict[str, object]], channel: object,
                                          reason: str | None) -> None:
    """A free-text channel of 1..64 characters (code points, not bytes) passes; longer, empty or not text fails."""
    topic, event = topic_event
    result = parse_one({**event, "channel": channel}, topic)
    if reason is None:
        assert isinstance(result, Event) and result.channel == channel
    else:
        assert rejected(result, reason).detail.startswith("channel")


# --------------------------------------------------------------------------- property: never raises

#: timestamps at and just beyond every edge validation knows (years 0001..9999, offsets, fractions, leap seconds)
EDGE_TIMES: list[object] = [
    0, -1, 1, -62_135_596_800_000, -62_135_596_800_001, 253_402_300_799_999, 253_402_300_800_000,
    2**63 - 1, -(2**63), 2**64, 1.0, 1e300, True, None, "", "0001-01-01T00:00:00Z", "0000-12-31T23:59:59Z",
    "9999-12-31T23:59:59.999Z", "9999-12-31T23:59:59.999-00:01", "0001-01-01T00:00:00+00:01", "10000-01-01T00:00:00Z",
    "2024-02-29T12:00:00Z", "2023-02-29T12:00:00Z", "2024-03-01T23:59:60Z", "2024-03-01T24:00:00Z",
    "2024-03-01t12:00:00z", "2024-03-01 12:00:00+23:59", "2024-03-01T12:00:00+24:00", "2024-03-01T12:00:00-00:00",
    "2024-03-01T12:00:00." + "9" * 40 + "Z", "2024-03-01T12:00:00.Z", "2024-03-01T12:00Z", "2024-03-01",
    "2024-03-01T12:00:00", "\uff12\uff10\uff12\uff14-03-01T12:00:00Z", "2024-03-01T12:00:00\x00Z",
    "1970-01-01T00:00:00.000001-23:59",
]
#: unicode at the edges, as decoded strings (NUL, BOM, the last BMP point, astral points, RTL, a combining mark)
EDGE_TEXT = [
    "\x00", "\ufeff", "\uffff", "\U0010ffff", "\U00010000", "\u202e", "e\u0301", "\U0001d4b3" * 65, "x" * 129, "",
]
#: JSON texts no JSON encoder writes: NaN and infinities, lone surrogate escapes, a BOM, duplicate keys,
#: numbers beyond a double or an int64, control characters, truncations
RAW_PIECES = [
    b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"123456789012345678901234567890", b"-0", b"1E-400",
    b'"\\ud800"', b'"\\udfff\\ud800"', b'"\\ud83d\\ude00"', b'"\\u0000"', b'"\x00"', b'"\x1f"', b'"\xed\xa0\x80"',
    b"\xef\xbb\xbf{}", b'{"a":1,"a":2}', b"[", b"{", b'{"a"', b'"\\', b"tru", b"nul", b"", b" ", b"\xff", b"\xc3",
    b"18446744073709551616", b"-9223372036854775809", b"0.1e-7",
]


def _json_piece(value: object) -> bytes:
    return orjson.dumps(value)


@st.composite
def hostile_events(draw: st.DrawFn) -> bytes:
    """A real event of some type, then fields dropped, retyped, replaced by edge values or by raw JSON pieces."""
    event = dict(draw(st.sampled_from([ORDER, SPEND, SIGNUP, NPS, CSAT, CES, CLI, REWARD, common(CUSTOMER_CLOSED)])))
    fields = sorted(event)
    if draw(st.booleans()):
        event["occurred_at"] = draw(st.sampled_from(EDGE_TIMES))
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.sampled_from([*fields, "points", "scale", "answers", "extra"]))
        event[field] = draw(st.one_of(
            st.sampled_from(EDGE_TIMES), st.sampled_from(EDGE_TEXT), json_values,
            st.integers(-(2**64), 2**64), st.floats(), st.just(DROP),
        ))
    # written by hand: orjson writes no NaN, infinity or integer past 64 bits, hostile producers do
    text = b"{" + b",".join(orjson.dumps(k) + b":" + _literal(v) for k, v in event.items() if v is not DROP) + b"}"
    if draw(st.booleans()):  # one value swapped for a raw piece, or a duplicate key added
        piece = draw(st.sampled_from(RAW_PIECES))
        text = text[:-1] + (b"," if len(text) > 2 else b"") + b'"' + draw(st.sampled_from(fields)).encode() + b'":' \
            + piece + b"}"
    return text


def _literal(value: object) -> bytes:
    """JSON-ish text of a value as a careless producer writes it: NaN and infinities bare, any integer in full."""
    if isinstance(value, float):
        return repr(value).replace("nan", "NaN").replace("inf", "Infinity").encode()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value).encode()
    try:
        return orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):
        return b"null"


@st.composite
def nested(draw: st.DrawFn) -> bytes:
    """Arrays or objects nested 0..3,000 deep, alone, inside an event or inside a batch."""
    depth = draw(st.sampled_from([0, 1, 31, 32, 33, 254, 255, 300, 1023, 1024, 1025, 3000]) | st.integers(0, 400))
    inner = b"[" * depth + b"]" * depth if draw(st.booleans()) else b'{"a":' * depth + b"1" + b"}" * depth
    shape = draw(st.sampled_from(["alone", "in_event", "in_batch", "element"]))
    if shape == "alone":
        return inner
    event = orjson.dumps(ORDER)[:-1] + b',"extra":' + inner + b"}"
    if shape == "in_event":
        return event
    if shape == "in_batch":
        return b"[" + orjson.dumps(ORDER) + b"," + event + b"]"
    return b"[" + inner + b"," + orjson.dumps(ORDER) + b"]"


@st.composite
def wide(draw: st.DrawFn) -> bytes:
    """Batches at and past the element count, and messages at and past the byte limits."""
    count = draw(st.sampled_from([1, 2, MAX_BATCH_EVENTS - 1, MAX_BATCH_EVENTS, MAX_BATCH_EVENTS + 1]))
    element = draw(st.sampled_from([b"{}", b"1", b"[]", b"null", orjson.dumps(ORDER)]))
    body = b"[" + b",".join([element] * count) + b"]"
    pad = draw(st.sampled_from([0, 1, MAX_EVENT_BYTES, MAX_BATCH_BYTES]))
    if pad and len(body) + pad > MAX_BATCH_BYTES + 2:
        pad = MAX_BATCH_BYTES - len(body) + draw(st.integers(-1, 1))
    body = body[:-1] + b" " * max(0, pad) + b"]"
    if draw(st.booleans()):  # one long string instead
        body = orjson.dumps({**ORDER, "event_id": "x" * draw(st.sampled_from([128, 129, MAX_EVENT_BYTES]))})
    return body


HOSTILE_MESSAGES = st.one_of(
    st.binary(max_size=200),
    json_values.map(_json_piece),
    st.lists(json_values | st.sampled_from([ORDER, SIGNUP, NPS]), max_size=5).map(_json_piece),
    hostile_events(),
    st.lists(hostile_events(), min_size=1, max_size=4).map(lambda events: b"[" + b",".join(events) + b"]"),
    st.sampled_from(RAW_PIECES),
    st.tuples(st.sampled_from(RAW_PIECES), st.binary(max_size=20)).map(lambda pair: pair[0] + pair[1]),
    st.builds(lambda text, cut: text[:cut], hostile_events(), st.integers(0, 400)),  # truncated
    nested(),
    wide(),
    st.none(),
)


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(HOSTILE_MESSAGES, st.data())
def test_validation_never_raises_on_hostile_input(value: bytes | None, data: st.DataObject) -> None:
    """Any bytes, JSON or near-JSON gives events and known dead letters only, one per batch element or one for all."""
    from streams.stages.ingest import IngestStage
    from streams.stages.routed import Routed

    try:
        decoded = orjson.loads(value) if value is not None else None
    except orjson.JSONDecodeError:
        decoded = None
    first = decoded[0] if type(decoded) is list and decoded else decoded
    home = TYPE_TOPIC.get(first.get("type")) if type(first) is dict and type(first.get("type")) is str else None
    # mostly the event's own topic, so that validation goes past the type check; sometimes any topic
    topic = home if home is not None and data.draw(st.integers(0, 4)) else data.draw(st.sampled_from(INPUT_TOPICS))
    results = parse(value, topic)
    assert results
    for result in results:
        assert type(result) is Event or (type(result) is Rejection and result.reason in REASONS and result.detail)
        note(result.reason if isinstance(result, Rejection) else "event")  # the statistics show what was reached
    splits = (type(decoded) is list and 0 < len(decoded) <= MAX_BATCH_EVENTS and len(value or b"") <= MAX_BATCH_BYTES)
    if splits:
        assert len(results) == len(decoded)  # type: ignore[arg-type]
        assert [getattr(r, "index", i) for i, r in enumerate(results)] == list(range(len(results)))
    else:
        assert len(results) == 1
        assert isinstance(results[0], Event) or (results[0].index is None and results[0].raw == (value or b""))
    # the worker's own stage around it: nothing unprocessable, every element accounted for
    routed = Routed()
    IngestStage(3, SKEW_MS).process(topic, (topic, 0, 0), value, NOW_MS, routed)
    assert "unprocessable" not in {letter["reason"] for letter in routed.dead_letters}
    assert routed.accepted + len(routed.dead_letters) == len(results)
