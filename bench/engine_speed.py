"""Micro-benchmark (not a test): validation plus incremental update, events per second on one core.

    python bench/engine_speed.py [--customers N] [--days D] [--profile]

It generates a storefront history (``streams.tools.history``), then times, on this
process's CPU clock: validating the JSON messages, and folding the events into
the incremental engine (``metrics.engine``) with every default window on.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import orjson

from metrics.engine import LoyaltyEngine
from metrics.timegrid import DAY_MS, Grid
from metrics.validation import parse_message
from streams.tools.history import generate_history, wire_body

WINDOWS_MS = (3_600_000, DAY_MS, 7 * DAY_MS, 30 * DAY_MS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=1400, help="customers per store (3 stores)")
    parser.add_argument("--days", type=int, default=120)
    parser.add_argument("--profile", action="store_true", help="print the top functions of the update")
    args = parser.parse_args()

    history = generate_history(customers_per_store=args.customers, days=args.days)
    messages = [(event.topic, orjson.dumps(wire_body(event))) for event in history]
    now_ms = max(event.occurred_at_ms for event in history) + DAY_MS

    started = time.process_time()
    events = []
    for topic, value in messages:
        events.extend(parse_message(value, topic, now_ms=now_ms, max_future_skew_ms=300_000))
    validation_s = time.process_time() - started

    engine = LoyaltyEngine(Grid(60_000, 90 * DAY_MS, WINDOWS_MS))
    profiler = cProfile.Profile() if args.profile else None
    started = time.process_time()
    if profiler:
        profiler.enable()
    for event in events:
        engine.ingest(event)  # type: ignore[arg-type]
    if profiler:
        profiler.disable()
    update_s = time.process_time() - started

    started = time.process_time()
    for store in engine.store_ids():
        for window_ms in WINDOWS_MS:
            engine.snapshot(store, window_ms)
    snapshot_s = time.process_time() - started

    count = len(events)
    print(f"events                 {count}")
    print(f"validation             {count / validation_s:12,.0f} events/s")
    print(f"incremental update     {count / update_s:12,.0f} events/s")
    print(f"validation + update    {count / (validation_s + update_s):12,.0f} events/s")
    scopes = len(engine.store_ids())
    print(f"all snapshots          {snapshot_s * 1000:12,.1f} ms ({scopes} scopes x {len(WINDOWS_MS)} windows)")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
