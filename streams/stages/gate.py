"""Stage 2, the gate (by store): one currency per store, at most 100 channels per store and, with the wall
clock, events held until "now".

The channel cap (SPEC 3) is here because one store's events pass one gate partition in one order: a
store's first ``max_channels`` distinct channels to arrive here (on events that passed the currency
gate, duplicates included: deduplication is the next stage's) keep their names, a later new one is
rewritten to ``other`` before the event goes on, so the facts stage and the aggregation never see more.
:class:`metrics.engine.ChannelCap` decides, on the store's list of channels in the ``store-channels``
table; the in-process engine uses the same class and the batch reference decides on its own.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from typing import Any

from metrics import events as ev
from metrics.engine import ChannelCap, CurrencyGate
from streams.sinks.dead_letters import dead_letter
from streams.stages.routed import Routed
from streams.worker.wire import customer_route_key, route

#: the reason added by this stage to those of :mod:`metrics.validation`
CURRENCY_MISMATCH = "currency_mismatch"


class GateStage:
    """Per store: currency gate, channel cap, and (wall clock) holding events later than now."""

    def __init__(self, partitions: int, max_channels: int = ev.MAX_STORE_CHANNELS) -> None:
        self.partitions = partitions
        self.max_channels = max_channels

    def process(
        self,
        items: Iterable[list[Any]],
        currencies: MutableMapping[str, str],
        now_ms: int | None,
        pending: list[list[Any]],
        out: Routed,
        channels: MutableMapping[str, list[str]],
    ) -> None:
        """Admit ``items`` (``[event, origin]``) to ``out``, routed by customer.

        ``channels`` is the stores' channels (``store -> [channel, ...]``, the first to arrive); an
        event with a channel beyond them goes on with the channel ``other``. With ``now_ms`` (wall
        clock) events later than it go to ``pending``, their channels already decided.
        """
        gate = CurrencyGate(currencies)
        cap = ChannelCap(channels, self.max_channels)
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
            channel = fields[8]
            if channel is not None:
                fields[8] = cap.admit(store_id, channel)
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
