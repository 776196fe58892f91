"""Where a live event's latency goes: its time in each hop, from the record timestamps of the topics it crossed.

Part of the bench's latency runs (``bench.run.latency_run``). Every record a producer of this
machine writes carries its producer's wall-clock time (Kafka's ``CreateTime``), so an event's path
through the worker can be read back from the topics after a run:

- ``ingest``: from the input record (the load generator's ``produce`` call) to the by-customer
  record that carries the event: the generator's linger, the broker, the input reader's fetch,
  validation and routing;
- ``facts``: from that by-customer record to the first deltas record with a part of it (a part's
  ``src`` names the by-customer partition and offset it came from): the facts stage's fetch, batch
  wait and work, up to its send;
- ``aggregate_emit``: the rest of the order's end-to-end latency (the bench's own measure, from just
  before ``produce`` to the Redis poll that saw it): the aggregation, the wait for the next emit
  (``LOYALTY_EMIT_INTERVAL``), Redis and the poll.

The worker purges the records of its repartition topics once they are committed (every
``PURGE_INTERVAL_S``), so only the events of the run's last half minute or so are still there to
read: the breakdown covers those, and says how many.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.run import _percentile
from streams.connections import kafka_client_options
from streams.settings import Settings
from streams.worker.log_reader import read_to_end

#: the hops, in the order an event crosses them
HOPS = ("ingest", "facts", "aggregate_emit")

#: a record as read back: (partition, offset, timestamp in ms, value)
Record = tuple[int, int, int, bytes]


def hop_breakdown(
    sent_ms: dict[str, int], total_s: dict[str, float], by_customer: Iterable[Record], deltas: Iterable[Record]
) -> dict[str, Any]:
    """Each order's seconds per hop and their percentiles.

    ``sent_ms``: event id -> its input record's timestamp; ``total_s``: order event id -> its
    end-to-end latency; ``by_customer`` and ``deltas``: the records of those topics still held.
    Orders missing from either topic (purged, or not in a deltas part) are left out.

    >>> sent = {"o1": 1_000, "o2": 1_010}
    >>> carried = [(3, 7, 1_030, orjson.dumps([["o1", "order.placed"], ["o2", "order.placed"]]))]
    >>> parts = [(0, 0, 1_045, orjson.dumps([{"src": [3, 7, 0], "t": 1, "stores": {}}]))]
    >>> result = hop_breakdown(sent, {"o1": 0.3, "o2": 0.25}, carried, parts)
    >>> result["orders"], result["ingest"]["max_s"], result["facts"]["p50_s"], result["aggregate_emit"]["max_s"]
    (2, 0.03, 0.015, 0.255)
    """
    carried_at: dict[str, tuple[int, int, int]] = {}  # event id -> (partition, offset, timestamp)
    for partition, offset, stamp, value in by_customer:
        items = orjson.loads(value)
        if isinstance(items, list):  # events; a dict is a mark message
            for fields in items:
                carried_at[fields[0]] = (partition, offset, stamp)
    deltas_at: dict[tuple[int, int], int] = {}  # (by-customer partition, offset) -> first deltas timestamp
    for _partition, _offset, stamp, value in deltas:
        parts = orjson.loads(value)
        if isinstance(parts, list):  # deltas parts; a dict is the clock or marks
            for part in parts:
                source = (part["src"][0], part["src"][1])
                if source not in deltas_at or stamp < deltas_at[source]:
                    deltas_at[source] = stamp
    seconds: dict[str, list[float]] = {hop: [] for hop in HOPS}
    for event_id, total in total_s.items():
        carried = carried_at.get(event_id)
        if carried is None or event_id not in sent_ms:
            continue
        applied = deltas_at.get((carried[0], carried[1]))
        if applied is None:
            continue
        ingest = (carried[2] - sent_ms[event_id]) / 1000
        facts = (applied - carried[2]) / 1000
        seconds["ingest"].append(ingest)
        seconds["facts"].append(facts)
        seconds["aggregate_emit"].append(total - ingest - facts)
    result: dict[str, Any] = {"orders": len(seconds["ingest"])}
    for hop, values in seconds.items():
        result[hop] = ({"p50_s": _percentile(values, 0.5), "p99_s": _percentile(values, 0.99), "max_s": max(values)}
                       if values else None)
    return result


async def read_records(settings: Settings, topics: list[str], timeout_s: float = 60.0) -> dict[str, list[Record]]:
    """Every record the topics hold now, by topic (each partition from its start, after the purge, to
    its end), or those read within ``timeout_s``."""
    consumer = AIOKafkaConsumer(**kafka_client_options(settings), enable_auto_commit=False,
                                max_partition_fetch_bytes=4 * 1024 * 1024)
    await consumer.start()
    found: dict[str, list[Record]] = {topic: [] for topic in topics}
    try:
        partitions = [TopicPartition(topic, p) for topic in topics for p in range(settings.partitions)]
        consumer.assign(partitions)
        starts = await consumer.beginning_offsets(partitions)
        ends = await consumer.end_offsets(partitions)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                async for record in read_to_end(consumer, starts, ends, max_records=20_000):
                    found[record.topic].append((record.partition, record.offset, record.timestamp,
                                                record.value or b""))
        return found
    finally:
        await consumer.stop()
