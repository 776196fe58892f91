"""Stage 2, the gate (by store): one currency per store, at most 100 channels per store and, with the wall
clock, events held until "now".

The channel cap (SPEC 3) is here because one store's events pass one gate partition in one order: a
store's first ``max_channels`` distinct channels to arrive here (on events that passed the currency
gate, duplicates included: deduplication is the next stage's) keep their names, a later new one is
rewritten to ``other`` before the event goes on, so the facts stage and the aggregation never see more.
:class:`metrics.engine.ChannelCap` decides, on the store's list of channels in the ``store-channels``
table; the in-process engine uses the same class and the batch reference decides on its own.

Most events need no decision: their store's currency is fixed already and their channel is known
(or the store's list is full). Those decisions never change once taken, so the ingest routes such
events straight to the facts stage (:class:`GateDecisions`, a copy of the two tables read from
their changelogs), and only the events that may take a decision, a store's first money event or a
new channel, come through here, in their input order. The decisions, and so every count, are those
of a gate that sees every event.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from typing import Any

from metrics import events as ev
from metrics.engine import ChannelCap, CurrencyGate, channel_decided
from streams.sinks.dead_letters import dead_letter
from streams.stages.routed import Routed
from streams.worker.wire import customer_route_key, route

#: the reason added by this stage to those of :mod:`metrics.validation`
CURRENCY_MISMATCH = "currency_mismatch"


class GateDecisions:
    """The gate's decisions taken so far (a store's currency, its channels), and the events they settle.

    A copy, possibly behind, of the ``store-currency`` and ``store-channels`` tables. Both only
    grow: a currency, once set, is never replaced, and a channel list only gets longer. So a
    decision found here is final, and an event it settles would come out of the gate exactly as
    :meth:`settled` says. What is not known here yet goes through the gate, which is always right.

    >>> decisions = GateDecisions(max_channels=2)
    >>> decisions.learn_currency("s", "EUR"); decisions.learn_channels("s", ["web"])
    >>> [decisions.settled(t, "s", cur, ch) for t, cur, ch in [
    ...     ("order.placed", "EUR", "web"), ("order.placed", "USD", None), ("customer.signed_up", None, "app"),
    ...     ("customer.signed_up", None, None), ("customer.signed_up", None, "other"), ("order.placed", "EUR", None)]]
    [(True, 'web'), (False, None), (False, None), (True, None), (True, 'other'), (True, None)]
    >>> decisions.learn_channels("s", ["web", "app"]); decisions.settled("customer.signed_up", "s", None, "mail")
    (True, 'other')
    >>> decisions.settled("order.placed", "t", "EUR", None)  # no currency yet: the gate decides
    (False, None)
    """

    def __init__(self, max_channels: int = ev.MAX_STORE_CHANNELS) -> None:
        self.max_channels = max_channels
        #: store -> its currency
        self.currencies: dict[str, str] = {}
        #: store -> its named channels (a set: the lists' order matters only to the gate)
        self.channels: dict[str, frozenset[str]] = {}

    def learn_currency(self, store_id: str, currency: str) -> None:
        """The gate fixed the store's currency."""
        self.currencies[store_id] = currency

    def learn_channels(self, store_id: str, channels: list[str]) -> None:
        """The store's channels as the gate last wrote them (a later list holds every earlier one)."""
        known = self.channels.get(store_id)
        if known is None or len(channels) > len(known):
            self.channels[store_id] = frozenset(channels)

    def settled(
        self, event_type: str, store_id: str, currency: str | None, channel: str | None
    ) -> tuple[bool, str | None]:
        """(whether the gate would admit the event without a new decision, the channel it would count under).

        ``False`` for an event that could take a decision, or that the gate would reject (a currency
        other than the store's: the gate dead-letters it, once, with its ledger).
        """
        if event_type in ev.MONEY_TYPES and currency is not None and self.currencies.get(store_id) != currency:
            return False, None
        return channel_decided(self.channels.get(store_id), channel, self.max_channels)


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
