"""Wire formats of the internal topics and the routing of keys to partitions.

Faust's cost is per Kafka message (see the README), so every internal topic
carries *packed batches*: one message holds every event (or delta) of a
processing batch that goes to the same partition. Messages are orjson.

Routing is ours, not the producer's: a key's partition is ``crc32(key) % N``
for every internal topic *and* for the changelog of the table that the
consuming stage keeps, so a worker that owns partition p of a stage's input
also recovers exactly the table state of the keys routed to p.
"""

from __future__ import annotations

import zlib
from typing import Any

import orjson

from metrics.events import Event, new_event


def route(key: str, partitions: int) -> int:
    """The partition of a routing key (stable across processes and versions).

    >>> route("store-1", 8) == route("store-1", 8), 0 <= route("x", 3) < 3
    (True, True)
    """
    return zlib.crc32(key.encode()) % partitions


def customer_route_key(store_id: str, customer_id: str) -> str:
    """The routing and table key of a (store, customer); spend uses customer ``""``.

    >>> customer_route_key("s1", "c9")
    '["s1","c9"]'
    """
    return orjson.dumps([store_id, customer_id]).decode()


def event_to_list(event: Event) -> list[Any]:
    """An event as a compact list (field order of :class:`~metrics.events.Event`)."""
    return [
        event.event_id,
        event.type,
        event.occurred_at_ms,
        event.store_id,
        event.customer_id,
        event.order_id,
        event.amount_micros,
        event.currency,
        event.channel,
        event.survey,
        event.score,
        event.scale,
        event.answers,
        event.reward_id,
        event.points,
    ]


def event_from_list(fields: list[Any]) -> Event:
    """The inverse of :func:`event_to_list` after a JSON round trip.

    >>> e = Event("e1", "survey.responded", 5, "s", "c", survey="cli", answers=(1, 2, 3))
    >>> event_from_list(orjson.loads(orjson.dumps(event_to_list(e)))) == e
    True
    """
    answers = fields[12]
    if answers is not None:
        fields = list(fields)
        fields[12] = (answers[0], answers[1], answers[2])
    return new_event(*fields)


def pack(payload: object) -> bytes:
    """Encode one internal message."""
    return orjson.dumps(payload)


def kept(encoded: bytes) -> bytes:
    """An exact-size copy of orjson's bytes, for bytes that will be kept in memory.

    orjson writes into a buffer of a few kilobytes and returns it shrunk in place: glibc can reuse
    the freed tail only for smaller allocations, so while the result lives it holds the whole
    buffer's memory. A short message kept this way costs about 4 KiB of resident memory rather
    than its size, which adds up over millions of kept messages (a bench's pre-generated events).

    >>> kept(b'{"a":1}')
    b'{"a":1}'
    """
    return memoryview(encoded).tobytes()


def pack_kept(payload: object) -> bytes:
    """Encode a value that will be kept in memory: :func:`pack`'s bytes, copied by :func:`kept`.

    >>> pack_kept({"a": [1, 2]}) == pack({"a": [1, 2]})
    True
    """
    return kept(pack(payload))


def unpack(value: bytes) -> Any:
    """Decode one internal message."""
    return orjson.loads(value)


#: the most bytes one internal message may carry (Kafka's default limit is 1 MiB)
MAX_MESSAGE_BYTES = 900_000


def pack_chunks(items: list[Any], max_bytes: int = MAX_MESSAGE_BYTES) -> list[bytes]:
    """Pack a list into as few messages as fit ``max_bytes`` each, keeping order.

    >>> chunks = pack_chunks(list(range(1000)), max_bytes=1000)
    >>> sum(len(unpack(chunk)) for chunk in chunks), max(len(chunk) for chunk in chunks) <= 1000
    (1000, True)
    """
    encoded = orjson.dumps(items)
    if len(encoded) <= max_bytes or len(items) <= 1:
        return [encoded]
    # cut by the average item size, with room for uneven items, rather than halving (each level
    # of halving encodes everything again); a piece that still does not fit is cut again
    pieces = min(len(items), -(-len(encoded) * 5 // (max_bytes * 4)))
    size = -(-len(items) // pieces)
    chunks: list[bytes] = []
    for start in range(0, len(items), size):
        chunks.extend(pack_chunks(items[start:start + size], max_bytes))
    return chunks
