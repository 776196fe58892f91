"""The ingest's path around the gate: events whose gate decisions are taken already skip the gate, and
everything comes out as if every event had passed it (same events, same channels, same partitions, the
same dead letters, each customer's events in input order), however far behind the ingest's copy of the
decisions is and however late the gate runs."""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.stages.gate import CURRENCY_MISMATCH, GateDecisions, GateStage
from streams.stages.ingest import AroundGate, IngestStage
from streams.stages.routed import Routed

PARTITIONS = 3
LIMIT = 2
NOW = 1_800_000_000_000
OCCURRED = 1_700_000_000_000
#: the gate's "now" (wall clock): events later than it are held
HOLD = OCCURRED + 10**8

# one input message: (kind, store, customer, currency, channel, occurred_at offset); then what happens after it
MESSAGES = st.tuples(
    st.sampled_from(["order", "spend", "signup", "survey"]),
    st.sampled_from(["s1", "s2"]),
    st.sampled_from(["c1", "c2", "c3"]),
    st.sampled_from(["EUR", "USD"]),
    st.sampled_from([None, "web", "app", "mail", "other"]),
    st.sampled_from([0, 0, 0, 10**9]),  # now and then an event later than the gate's hold time
)
STEPS = st.lists(st.tuples(MESSAGES, st.booleans(), st.booleans()), min_size=1, max_size=60)


def body(number: int, kind: str, store: str, customer: str, currency: str, channel: str | None,
         later_ms: int) -> tuple[str, bytes]:
    """(input topic, message) of one generated event."""
    common = {"event_id": f"e{number}", "occurred_at": OCCURRED + later_ms, "store_id": store}
    if kind == "order":
        event = {**common, "type": "order.placed", "customer_id": customer, "order_id": f"o{number}",
                 "amount": "1.25", "currency": currency}
        return "orders", orjson.dumps(event)
    if kind == "spend":
        event = {**common, "type": "spend.recorded", "amount": "3", "currency": currency, "channel": channel}
        return "marketing-spend", orjson.dumps({k: v for k, v in event.items() if v is not None})
    if kind == "signup":
        event = {**common, "type": "customer.signed_up", "customer_id": customer, "channel": channel}
        return "signups", orjson.dumps({k: v for k, v in event.items() if v is not None})
    event = {**common, "type": "survey.responded", "customer_id": customer, "survey": "nps", "score": 9}
    return "survey-responses", orjson.dumps(event)


def outcome(out: Routed, held: list[Any]) -> tuple[Counter[str], Counter[tuple[str, int, int]]]:
    """What left the gate: (partition and event, as JSON) counted, and the dead letters' reasons and sources."""
    forwarded = Counter(orjson.dumps([partition, fields]).decode()
                        for partition, items in out.by_partition.items() for fields in items)
    forwarded.update(orjson.dumps(["held", item[0]]).decode() for item in held)
    letters = Counter((letter["reason"], letter["partition"], letter["offset"]) for letter in out.dead_letters)
    return forwarded, letters


@settings(max_examples=300, deadline=None)
@given(STEPS)
def test_events_around_the_gate_come_out_as_through_it(steps: list[tuple[Any, bool, bool]]) -> None:
    """Fast path plus gate forwards the same events (channels, partitions), holds and dead letters as the gate alone."""
    ingest = IngestStage(PARTITIONS, 300_000)
    messages = [body(number, *message) for number, (message, _, _) in enumerate(steps)]

    # every event through the gate, in input order
    alone_out, alone_held = Routed(), []
    alone_currencies: dict[str, str] = {}
    alone_channels: dict[str, list[str]] = {}
    gate = GateStage(PARTITIONS, max_channels=LIMIT)
    for offset, (topic, value) in enumerate(messages):
        routed = Routed()
        ingest.process(topic, (topic, 0, offset), value, NOW, routed)
        assert routed.dead_letters == [] and routed.accepted == 1  # the generated events are valid
        for items in routed.by_partition.values():
            gate.process(items, alone_currencies, HOLD, alone_held, alone_out, alone_channels)

    # the fast path, with the gate behind it: it works through its input (and commits) when ``run_gate``
    # says so, and the ingest's copy of its tables catches up when ``sync`` says so
    decisions = GateDecisions(max_channels=LIMIT)
    out, held, queue = Routed(), [], []
    on_gate_path: dict[str, list[int]] = {}
    currencies: dict[str, str] = {}
    channels: dict[str, list[str]] = {}
    for offset, ((topic, value), (_, run_gate, sync)) in enumerate(zip(messages, steps, strict=True)):
        routed = Routed()
        around = AroundGate(decisions, out, HOLD, on_gate_path)
        ingest.process(topic, (topic, 0, offset), value, NOW, routed, around)
        for key in around.sent_to_gate:  # sent: the by-store offset is this message's number
            on_gate_path[key][1] = offset
        queue.extend(item for items in routed.by_partition.values() for item in items)
        if run_gate:
            gate.process(queue, currencies, HOLD, held, out, channels)
            queue = []
            on_gate_path.clear()  # the gate committed past everything sent to it
        if sync:
            for store, currency in currencies.items():
                decisions.learn_currency(store, currency)
            for store, names in channels.items():
                decisions.learn_channels(store, list(names))
    gate.process(queue, currencies, HOLD, held, out, channels)

    assert outcome(out, held) == outcome(alone_out, alone_held)
    assert (currencies, channels) == (alone_currencies, alone_channels)
    assert arrivals_by_customer(out) == arrivals_by_customer(alone_out)


def arrivals_by_customer(out: Routed) -> dict[tuple[str, str], list[str]]:
    """Each (store, customer)'s event ids in the order they reach the facts stage."""
    arrivals: dict[tuple[str, str], list[str]] = {}
    for items in out.by_partition.values():
        for fields in items:
            arrivals.setdefault((fields[3], fields[4]), []).append(fields[0])
    return arrivals


def test_settled_events_skip_the_gate_and_the_rest_go_through_it() -> None:
    """Known currency and channel: straight to the customer's partition; a new channel, another currency or a
    future event (wall clock): through the gate, which dead-letters the wrong currency."""
    ingest = IngestStage(PARTITIONS, 300_000)
    decisions = GateDecisions(max_channels=LIMIT)
    decisions.learn_currency("s1", "EUR")
    decisions.learn_channels("s1", ["web"])
    cases = [body(0, "spend", "s1", "", "EUR", "web", 0), body(1, "spend", "s1", "", "USD", "web", 0),
             body(2, "signup", "s1", "c1", "EUR", "app", 0), body(3, "survey", "s1", "c1", "EUR", None, 10**9),
             body(4, "survey", "s2", "c1", "EUR", None, 0)]
    direct, slow = Routed(), Routed()
    for offset, (topic, value) in enumerate(cases):
        ingest.process(topic, (topic, 0, offset), value, NOW, slow, AroundGate(decisions, direct, HOLD, {}))
    assert sorted(fields[0] for items in direct.by_partition.values() for fields in items) == ["e0", "e4"]
    through = [item for items in slow.by_partition.values() for item in items]
    assert sorted(item[0][0] for item in through) == ["e1", "e2", "e3"]
    out = Routed()
    GateStage(PARTITIONS, max_channels=LIMIT).process(through, {"s1": "EUR"}, HOLD, [], out,
                                                      {"s1": ["web"]})
    assert [letter["reason"] for letter in out.dead_letters] == [CURRENCY_MISMATCH]


def test_a_customer_with_an_event_on_the_gate_path_keeps_to_it() -> None:
    """After one of its events went to the gate, a customer's settled events follow it there, until the gate
    has committed past it; other customers' settled events go around."""
    ingest = IngestStage(PARTITIONS, 300_000)
    decisions = GateDecisions(max_channels=LIMIT)
    decisions.learn_currency("s1", "EUR")
    decisions.learn_channels("s1", ["web"])
    on_gate_path: dict[str, list[int]] = {}
    direct, slow = Routed(), Routed()
    cases = [body(0, "signup", "s1", "c1", "EUR", "app", 0), body(1, "order", "s1", "c1", "EUR", None, 0),
             body(2, "order", "s1", "c2", "EUR", None, 0)]
    for offset, (topic, value) in enumerate(cases):
        ingest.process(topic, (topic, 0, offset), value, NOW, slow, AroundGate(decisions, direct, HOLD, on_gate_path))
    assert [item[0][0] for items in slow.by_partition.values() for item in items] == ["e0", "e1"]
    assert [fields[0] for items in direct.by_partition.values() for fields in items] == ["e2"]
    assert list(on_gate_path) == ['["s1","c1"]']
