"""Stage 2, the gate (by store): one currency per store and, with the wall clock, events held until "now"."""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from typing import Any

from metrics import events as ev
from metrics.engine import CurrencyGate
from streams.sinks.dead_letters import dead_letter
from streams.stages.routed import Routed
from streams.worker.wire import customer_route_key, route

#: the reason added by this stage to those of :mod:`metrics.validation`
CURRENCY_MISMATCH = "currency_mismatch"


class GateStage:
    """Per store: currency gate, and (wall clock) holding events later than now."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions

    def process(
        self,
        items: Iterable[list[Any]],
        currencies: MutableMapping[str, str],
        now_ms: int | None,
        pending: list[list[Any]],
        out: Routed,
    ) -> None:
        """Admit ``items`` (``[event, origin]``) to ``out``, routed by customer.

        With ``now_ms`` (wall clock) events later than it go to ``pending``.
        """
        gate = CurrencyGate(currencies)
        for item in items:
            fields, origin = item
            event_type, store_id, currency = fields[1], fields[3], fields[7]
            if event_type in ev.MONEY_TYPES and not gate.admit(store_id, currency):
                topic, partition, offset, index, raw = origin
                detail = f"store {store_id!r} uses {currencies.get(store_id)}, not {currency}"
                out.dead_letters.append(
                    dead_letter(CURRENCY_MISMATCH, detail, raw.encode(), (topic, partition, offset), index, 0)
                )
                continue
            if now_ms is not None and fields[2] > now_ms:
                pending.append(item)
                continue
            customer = "" if event_type == ev.SPEND_RECORDED else fields[4]
            out.add(route(customer_route_key(store_id, customer), self.partitions), fields)
            out.accepted += 1

    def release(self, pending: list[list[Any]], now_ms: int, out: Routed) -> list[list[Any]]:
        """Forward the held events that ``now_ms`` reached; returns those still held."""
        keep = []
        for item in pending:
            fields = item[0]
            if fields[2] > now_ms:
                keep.append(item)
                continue
            customer = "" if fields[1] == ev.SPEND_RECORDED else fields[4]
            out.add(route(customer_route_key(fields[3], customer), self.partitions), fields)
            out.accepted += 1
        return keep
