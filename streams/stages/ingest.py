"""Stage 1, ingest (input topics, any key): validate a message, dead-letter what fails, route events by store.

An event whose gate decisions are taken already (:class:`streams.stages.gate.GateDecisions`) skips
the gate: it goes straight to its customer's partition, as the gate would have sent it. One customer's
events keep their input order on the way to the facts stage: while an earlier event of the customer is
on the gate's path (:attr:`AroundGate.on_gate_path`), the next ones take that path too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from metrics import events as ev
from metrics.catalog import ALL_STORES
from metrics.validation import Rejection, parse_message
from streams.sinks.dead_letters import dead_letter
from streams.stages.gate import GateDecisions
from streams.stages.routed import Routed
from streams.worker.wire import customer_route_key, event_to_list, route

#: the reasons added by this stage to those of :mod:`metrics.validation`
RESERVED_STORE_ID = "reserved_store_id"
#: validation failed in a way it never should (a bug): the message is dead-lettered, the worker goes on
UNPROCESSABLE = "unprocessable"


@dataclass
class AroundGate:
    """What the ingest needs to send events around the gate."""

    #: the gate's decisions known so far
    decisions: GateDecisions
    #: the by-customer output, for the events the decisions settle
    direct: Routed
    #: the gate holds events later than this (wall clock: now; ``None``: it holds none)
    hold_after_ms: int | None
    #: customer key -> [by-store partition, offset of the last message that took one of its events to the
    #: gate, -1 until Kafka acknowledged it]: kept until the gate has committed past it
    on_gate_path: dict[str, list[int]]
    #: the customer keys this slice sent to the gate (their offsets are filled in once it is sent)
    sent_to_gate: list[str] = field(default_factory=list)


class IngestStage:
    """Validate one input message; route its events by store."""

    def __init__(self, partitions: int, max_future_skew_ms: int) -> None:
        self.partitions = partitions
        self.max_future_skew_ms = max_future_skew_ms

    def process(
        self, topic: str, source: tuple[str, int, int], value: bytes | None, now_ms: int, out: Routed,
        around: AroundGate | None = None,
    ) -> int | None:
        """Add the message's events to ``out`` (``topic`` is the unprefixed input topic name).

        Returns the largest event time of the events routed (``None``: none), for the watermark marks.

        Each routed item is ``[event, origin]``: ``origin`` is ``[topic,
        partition, offset, index, raw text]`` for money events, so that the
        gate can still dead-letter them with their original text, else ``None``.

        With ``around``, an event the gate's decisions settle goes to the by-customer output instead,
        as the gate forwards it (the event alone, its channel decided), unless its customer has an
        event on the gate's path still or it is later than the hold time (the gate holds it).
        """
        try:
            items = parse_message(value, topic, now_ms=now_ms, max_future_skew_ms=self.max_future_skew_ms)
        except Exception as error:  # no message may stop the worker, not even one that finds a bug
            detail = f"validation failed: {type(error).__name__}: {error}"[:200]
            out.dead_letters.append(dead_letter(UNPROCESSABLE, detail, value or b"", source, None, now_ms))
            return None
        is_batch = len(items) > 1 or (bool(items) and _is_array(value))
        elements: list[Any] | None = None
        latest: int | None = None

        def original(index: int) -> bytes:
            # the message's bytes, or a batch element's JSON text; the batch is parsed once, on demand
            nonlocal elements
            if not is_batch:
                return value or b""
            if elements is None:
                elements = orjson.loads(value or b"[]")
            return orjson.dumps(elements[index])

        for index, item in enumerate(items):
            if isinstance(item, Rejection):
                out.dead_letters.append(dead_letter(item.reason, item.detail, item.raw, source, item.index, now_ms))
                continue
            if item.store_id == ALL_STORES:
                raw = original(index)
                detail = f"store_id {ALL_STORES!r} is reserved for all stores together"
                out.dead_letters.append(
                    dead_letter(RESERVED_STORE_ID, detail, raw, source, index if is_batch else None, now_ms)
                )
                continue
            fields = event_to_list(item)
            if around is not None:
                customer = "" if item.type == ev.SPEND_RECORDED else fields[4]  # as the gate routes it
                key = customer_route_key(item.store_id, customer)
                admitted, channel = around.decisions.settled(item.type, item.store_id, item.currency, item.channel)
                if (admitted and key not in around.on_gate_path
                        and (around.hold_after_ms is None or item.occurred_at_ms <= around.hold_after_ms)):
                    fields[8] = channel
                    around.direct.add(route(key, self.partitions), fields)
                    around.direct.accepted += 1
                    if latest is None or item.occurred_at_ms > latest:
                        latest = item.occurred_at_ms
                    continue
                around.on_gate_path[key] = [route(item.store_id, self.partitions), -1]
                around.sent_to_gate.append(key)
            origin = None
            if item.type in ev.MONEY_TYPES:
                raw = original(index)
                origin = [source[0], source[1], source[2], index if is_batch else None, raw.decode()]
            out.add(route(item.store_id, self.partitions), [fields, origin])
            out.accepted += 1
            if latest is None or item.occurred_at_ms > latest:
                latest = item.occurred_at_ms
        return latest


def _is_array(value: bytes | None) -> bool:
    return bool(value) and value.lstrip()[:1] == b"["  # type: ignore[union-attr]
