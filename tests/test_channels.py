"""The channel cap of SPEC 3 (a store keeps its first 100 channels, the rest count as ``other``): the batch
reference, the in-process engine and the worker's gate stage decide alike."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metrics import events as ev
from metrics.engine import LoyaltyEngine
from metrics.reference import accepted_events
from metrics.timegrid import DAY_MS, Grid
from streams.stages.gate import GateStage
from streams.stages.routed import Routed
from streams.worker.wire import event_to_list

GRID = Grid(60_000, 90 * DAY_MS, (DAY_MS,), dedupe_ttl_ms=10**12)
PARTITIONS = 3
OTHER = ev.OTHER_CHANNEL


def signup(event_id: str, channel: str | None, store: str = "s", customer: str | None = None) -> ev.Event:
    return ev.Event(event_id, ev.CUSTOMER_SIGNED_UP, 1_000, store, customer or event_id, channel=channel)


def spend(event_id: str, channel: str | None, store: str = "s", currency: str = "EUR") -> ev.Event:
    return ev.Event(event_id, ev.SPEND_RECORDED, 1_000, store, amount_micros=1_000_000, currency=currency,
                    channel=channel)


def through_gate(events: list[ev.Event], limit: int) -> list[tuple[Any, ...]]:
    """(store, customer, event id, channel) of what the gate forwards, in arrival order, one message per event."""
    stage = GateStage(PARTITIONS, max_channels=limit)
    currencies: dict[str, str] = {}
    channels: dict[str, list[str]] = {}
    forwarded = []
    for event in events:
        out = Routed()
        stage.process([[event_to_list(event), None if event.currency is None else ["t", 0, 0, None, "{}"]]],
                      currencies, None, [], out, channels)
        for items in out.by_partition.values():
            for fields in items:
                forwarded.append((fields[3], fields[4], fields[0], fields[8]))
    return forwarded


def first_arrivals(forwarded: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """What deduplication keeps of the gate's output: the first arrival of each (store, customer, id)."""
    seen: set[tuple[Any, ...]] = set()
    kept = []
    for item in forwarded:
        if item[:3] not in seen:
            seen.add(item[:3])
            kept.append(item)
    return kept


def as_items(events: list[ev.Event]) -> list[tuple[Any, ...]]:
    return [(e.store_id, e.customer_id, e.event_id, e.channel) for e in events]


#: (case, events in arrival order, cap, the channel each event counts under; "-" = rejected by the currency gate)
CASES = [
    ("the first names keep them", [signup("1", "a"), signup("2", "b"), signup("3", "c"), signup("4", "d")], 3,
     ["a", "b", "c", OTHER]),
    ("a kept name stays kept", [signup("1", "a"), signup("2", "b"), signup("3", "c"), signup("4", "d"),
                                signup("5", "a")], 3, ["a", "b", "c", OTHER, "a"]),
    ("a producer's other takes no slot", [signup("1", OTHER), signup("2", "a"), signup("3", "b"), signup("4", "c"),
                                          signup("5", "d")], 3, [OTHER, "a", "b", "c", OTHER]),
    ("signups and spend share the slots", [signup("1", "a"), spend("2", "b"), signup("3", "c"), spend("4", "d")], 3,
     ["a", "b", "c", OTHER]),
    ("stores count apart", [signup("1", "a"), signup("2", "b"), signup("3", "c", store="t"),
                            signup("4", "c", store="s")], 2, ["a", "b", "c", OTHER]),
    ("money of another currency takes no slot", [spend("1", "a"), spend("2", "b", currency="USD"), signup("3", "c"),
                                                 signup("4", "d")], 3, ["a", "-", "c", "d"]),
    ("a duplicate takes a slot (the gate comes before deduplication)",
     [signup("1", "a"), signup("1", "b"), signup("2", "c"), signup("3", "d")], 3, ["a", "b", "c", OTHER]),
    ("events without a channel take no slot", [signup("1", None), spend("2", None), signup("3", "a")], 1,
     [None, None, "a"]),
    ("a cap of 0 counts everything as other", [signup("1", "a"), spend("2", "b")], 0, [OTHER, OTHER]),
    ("names are case-sensitive: only other itself is the bucket",
     [signup("1", "Other"), signup("2", "OTHER"), signup("3", OTHER)], 1, ["Other", OTHER, OTHER]),
    ("the product's 100", [signup(str(i), f"ch-{i % 101}") for i in range(203)], ev.MAX_STORE_CHANNELS,
     [f"ch-{i % 101}" if i % 101 < 100 else OTHER for i in range(203)]),
]


@pytest.mark.parametrize(("events", "limit", "expected"), [case[1:] for case in CASES], ids=[c[0] for c in CASES])
def test_channel_cap_table(events: list[ev.Event], limit: int, expected: list[str | None]) -> None:
    """Each case's events count under the expected channels in the reference, the engine and the gate stage."""
    admitted = [(event, channel) for event, channel in zip(events, expected, strict=True) if channel != "-"]
    # the gate forwards every admitted event, duplicates too, with its channel decided
    forwarded = through_gate(events, limit)
    assert forwarded == [(e.store_id, e.customer_id, e.event_id, channel) for e, channel in admitted]
    # the reference keeps the first arrival of each id, with the same channel
    reference = as_items(accepted_events(events, max_channels=limit))
    assert reference == first_arrivals(forwarded)
    # the engine counts new customers and spend under those channels
    engine = LoyaltyEngine(GRID, max_channels=limit)
    for event in events:
        engine.ingest(event)
    for store in {e.store_id for e in events}:
        by_channel = engine.snapshot(store, DAY_MS)["cac_by_channel"]
        assert isinstance(by_channel, dict)
        assert set(by_channel) == {item[3] for item in reference if item[0] == store and item[3] is not None}


@st.composite
def channel_logs(draw: st.DrawFn) -> tuple[list[ev.Event], int]:
    """Signups and spend over two stores with channels from a small pool, duplicates and a wrong currency."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    pool = ("a", "b", "c", "d", "e", "f", OTHER, None)
    events = []
    for index in range(draw(st.integers(1, 40))):
        store = rng.choice(("s", "t"))
        channel = rng.choice(pool)
        event_id = f"e{rng.randrange(index)}" if index and rng.random() < 0.2 else f"e{index}"
        if rng.random() < 0.5:
            events.append(signup(event_id, channel, store, customer=f"c{rng.randrange(3)}"))
        else:
            events.append(spend(event_id, channel, store, currency="USD" if rng.random() < 0.1 else "EUR"))
    return events, draw(st.integers(0, 4))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(channel_logs())
def test_gate_stage_decides_as_the_reference(log: tuple[list[ev.Event], int]) -> None:
    """For any arrival order, the gate's forwarded channels, deduplicated, are the reference's accepted ones."""
    events, limit = log
    assert first_arrivals(through_gate(events, limit)) == as_items(accepted_events(events, max_channels=limit))


def test_gate_stage_channel_state_is_a_list_per_store_in_arrival_order() -> None:
    """The gate keeps each store's named channels in arrival order; what it keeps is all it needs after a restart."""
    stage = GateStage(PARTITIONS, max_channels=2)
    channels: dict[str, list[str]] = {}
    out = Routed()
    items = [[event_to_list(signup(str(i), name)), None] for i, name in enumerate(["x", OTHER, "y", "z", "x"])]
    stage.process(items[:3], {}, None, [], out, channels)
    assert channels == {"s": ["x", "y"]}
    # a new gate (a restarted worker) on the same state decides the rest as the first would have
    GateStage(PARTITIONS, max_channels=2).process(items[3:], {}, None, [], out, channels)
    sent = sorted((fields[0], fields[8]) for part in out.by_partition.values() for fields in part)
    assert sent == [("0", "x"), ("1", OTHER), ("2", "y"), ("3", OTHER), ("4", "x")]
    # read again after a crash, from an earlier commit, on the state the changelog kept: the same decisions
    again = Routed()
    GateStage(PARTITIONS, max_channels=2).process(
        [[event_to_list(signup(str(i), name)), None] for i, name in enumerate(["x", OTHER, "y", "z", "x"])],
        {}, None, [], again, channels)
    assert sorted((fields[0], fields[8]) for part in again.by_partition.values() for fields in part) == sent
    assert channels == {"s": ["x", "y"]}
