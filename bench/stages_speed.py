"""Micro-benchmark (not a test): the worker's four stages in one process, without Kafka.

    python -m bench.stages_speed [--events N] [--customers C] [--fetch M] [--profile]

The bench's workload (``bench.run.make_workload``: simulated storefront traffic
over 60 days, one event per message) goes through what a worker does with it:
ingest (validation, routing by store), the gate, the facts stage (facts read
from and written to a dict of encoded records, as the table holds them, a message's at once), the
delta messages, and the store shards with an emit's reads after every fetch, each internal
message packed and unpacked as on the wire. It prints events per second per stage on this
process's CPU clock, so that a change to one stage shows in its own line, and
with ``--profile`` the top functions of the whole chain.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import time
from collections import defaultdict
from typing import Any

import orjson

from bench.run import BenchOptions, make_workload
from metrics.catalog import ALL_STORES
from metrics.store import ReadPoints
from streams.settings import load_settings
from streams.stages.aggregate import StoreShard, apply_message
from streams.stages.facts import (
    BatchCustomers,
    CustomerOutput,
    CustomerStage,
    apply_records,
    delta_messages,
)
from streams.stages.gate import GateDecisions, GateStage
from streams.stages.ingest import AroundGate, IngestStage
from streams.stages.routed import Routed
from streams.worker.agents.facts import CUSTOMER_CACHE_SIZE
from streams.worker.topology import grid_of
from streams.worker.wire import pack_chunks, unpack

PARTITIONS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--customers", type=int, default=200_000)
    parser.add_argument("--fetch", type=int, default=5000, help="input messages per fetch (one batch)")
    parser.add_argument("--progress", type=int, default=0, help="print the time per stage every N events")
    parser.add_argument("--profile", action="store_true", help="print the top functions")
    parser.add_argument("--profile-from", type=int, default=0, metavar="N",
                        help="with --profile: profile from the Nth event on (state grows with a run)")
    args = parser.parse_args()

    settings = load_settings()
    options = BenchOptions(events=args.events, customers=args.customers, sample_stores=0)
    workload = make_workload(options, settings)
    grid = grid_of(settings)
    ingest = IngestStage(PARTITIONS, settings.max_future_skew_ms)
    gate = GateStage(PARTITIONS)
    decisions = GateDecisions()
    customers = CustomerStage(grid, cache_size=CUSTOMER_CACHE_SIZE)
    table: dict[bytes, bytes] = {}
    currencies: dict[str, str] = {}
    channels: dict[str, list[str]] = {}
    shards: dict[str, StoreShard] = {}
    clock_ms = 0
    rows = 0
    partials: dict[int, StoreShard] = {}
    spent: dict[str, float] = defaultdict(float)

    def read_many(keys: list[str]) -> dict[str, bytes | None]:
        # as the worker reads: a message's customers at once, each decoded when its events are applied
        return {key: table.get(key.encode()) for key in keys}

    gc.set_threshold(50_000, 20, 100)  # as the worker does
    profiler = cProfile.Profile() if args.profile else None
    now_ms = time.time_ns() // 1_000_000
    bodies = workload.bodies
    for start in range(0, len(bodies), args.fetch):
        if profiler and start >= args.profile_from and start - args.fetch < args.profile_from:
            profiler.enable()
        tick = time.process_time()
        routed = Routed()
        direct = AroundGate(decisions, Routed(), None, {})
        for offset, (topic, value) in enumerate(bodies[start:start + args.fetch], start):
            ingest.process(topic, (topic, 0, offset), value, now_ms, routed, direct)
        by_store = [chunk for items in routed.by_partition.values() for chunk in pack_chunks(items)]
        # the gate below handles the by-store messages at once: no customer stays on its path
        around = [(p, chunk) for p, items in direct.direct.by_partition.items() for chunk in pack_chunks(items)]
        spent["ingest"] += time.process_time() - tick

        tick = time.process_time()
        routed = Routed()
        for message in by_store:
            gate.process(unpack(message), currencies, None, [], routed, channels)
        by_customer = around + [(p, chunk) for p, items in routed.by_partition.items() for chunk in pack_chunks(items)]
        # the worker's ingest follows the gate's changelogs; here it learns the decisions after each fetch
        for store, currency in currencies.items():
            decisions.learn_currency(store, currency)
        for store, names in channels.items():
            decisions.learn_channels(store, names)
        spent["gate"] += time.process_time() - tick

        tick = time.process_time()
        batch = BatchCustomers()
        outgoing: dict[int, list[dict[str, Any]]] = {}
        for offset, (partition, message) in enumerate(by_customer, start):
            items = unpack(message)
            clock_ms = max(clock_ms, max(item[2] for item in items))
            output = CustomerOutput(customers=batch)
            customers.process(items, table.get, clock_ms, output, now_ms, read_many)
            for target, parts in delta_messages(output, (partition, offset), PARTITIONS).items():
                outgoing.setdefault(target, []).extend(parts)
        deltas = [(target, chunk) for target, parts in outgoing.items() for chunk in pack_chunks(parts)]
        apply_records(table, customers.table_writes(batch))
        spent["facts"] += time.process_time() - tick

        tick = time.process_time()
        for partition, message in deltas:
            parts = unpack(message)
            rows += sum(len(pairs) // 2 for part in parts for entry in part["stores"].values()
                        for pairs in entry["g"][1::2])
            partial = partials.get(partition)
            if partial is None:
                partial = partials[partition] = StoreShard(ALL_STORES)
            apply_message(shards, partial, parts)
        spent["aggregate"] += time.process_time() - tick

        # an emit after every fetch (the worker emits every 250 ms, about as often at its rate); ``*`` is the
        # sum of the partials' read points, as its publisher makes it
        tick = time.process_time()
        as_of = grid.bucket(clock_ms)
        for shard in shards.values():
            for window in grid.windows:
                shard.metrics(grid, window, as_of)
            shard.cohorts(grid, as_of)
            shard.fold(as_of, grid.longest, grid.cohort_reach)
        star = ReadPoints()
        for partial in partials.values():
            star.merge(ReadPoints.from_record(orjson.loads(orjson.dumps(
                partial.read_points(grid, as_of).to_record()))))
        for window in grid.windows:
            star.metrics(grid, window, as_of)
        star.cohorts(grid, as_of)
        spent["emit"] += time.process_time() - tick
        done = start + args.fetch
        if args.progress and done % args.progress < args.fetch:
            rates = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in spent.items())
            print(f"{done:>10,} events: {rates}", flush=True)
    if profiler:
        profiler.disable()

    count = len(bodies)
    total = sum(spent.values())
    print(f"events      {count:>12,}")
    for stage, seconds in spent.items():
        print(f"{stage:<11} {count / seconds:12,.0f} events/s  ({seconds:.2f} s)")
    print(f"all stages  {count / total:12,.0f} events/s")
    print(f"delta rows  {rows / count:12,.1f} per event")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
