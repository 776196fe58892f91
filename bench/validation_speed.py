"""Throughput of ``metrics.validation.parse_message`` on generated order events.

Run with the project installed (``pip install -e .``): ``python bench/validation_speed.py [N]``.
Prints events/s for N (default 200,000) ~200-byte ``order.placed`` events sent
one per message and in batches of 500 per message, per CPU second of this
process (one core; steady on a shared machine) and per wall-clock second.
"""

from __future__ import annotations

import random
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

import orjson

from metrics.events import Event
from metrics.validation import parse_message

NOW = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
SKEW_MS = 300_000
BATCH = 500


def make_events(count: int, seed: int = 7) -> list[dict[str, object]]:
    """``count`` valid order events over the last day, amounts as numbers and strings."""
    rng = random.Random(seed)
    events: list[dict[str, object]] = []
    for _ in range(count):
        at = NOW - timedelta(milliseconds=rng.randrange(86_400_000))
        cents = rng.randrange(100, 50_000)
        amount: object = f"{cents // 100}.{cents % 100:02d}" if rng.random() < 0.5 else cents / 100
        events.append(
            {
                "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "type": "order.placed" if rng.random() < 0.95 else "order.refunded",
                "occurred_at": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "store_id": f"store-{rng.randrange(50):04d}",
                "customer_id": f"cust-{rng.randrange(1_000_000):07d}",
                "order_id": f"ord-{rng.randrange(10**9):010d}",
                "amount": amount,
                "currency": "EUR",
            }
        )
    return events


def run(messages: list[bytes], expected: int) -> tuple[float, float]:
    """Parse every message once; return (events/s of CPU time, events/s of wall time)."""
    cpu, wall = time.process_time(), time.perf_counter()
    valid = 0
    for message in messages:
        for item in parse_message(message, "orders", now_ms=NOW_MS, max_future_skew_ms=SKEW_MS):
            valid += type(item) is Event
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if valid != expected:
        raise SystemExit(f"expected {expected} valid events, got {valid}")
    return expected / cpu, expected / wall


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    events = make_events(count)
    singles = [orjson.dumps(event) for event in events]
    batches = [orjson.dumps(events[i : i + BATCH]) for i in range(0, count, BATCH)]
    mean = sum(map(len, singles)) / count
    print(f"parse_message on {count:,} order events, mean {mean:.0f} bytes each (best of 3 runs)")
    print(f"{'':>22}  {'events/s (CPU)':>15}  {'events/s (wall)':>15}")
    for label, messages in (("1 event per message", singles), (f"{BATCH} per message", batches)):
        runs = [run(messages, count) for _ in range(3)]
        cpu = max(r[0] for r in runs)
        wall = max(r[1] for r in runs)
        print(f"{label:>22}  {cpu:>15,.0f}  {wall:>15,.0f}")


if __name__ == "__main__":
    main()
