"""What a stage sends on: packed items by destination partition, and dead letters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Routed:
    """What a stage sends on: packed items by destination partition, and dead letters."""

    by_partition: dict[int, list[Any]] = field(default_factory=dict)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    accepted: int = 0

    def add(self, partition: int, item: Any) -> None:
        """Queue one item for a partition."""
        bucket = self.by_partition.get(partition)
        if bucket is None:
            self.by_partition[partition] = [item]
        else:
            bucket.append(item)


#: at most this many delta rows in one message part (well under the message size limit)
MAX_DELTA_ROWS = 20_000


class DeltaParts:
    """The delta message parts bound for one partition, each of at most ``MAX_DELTA_ROWS`` rows.

    A part is ``{"src": [source partition, offset, part number], "t": latest event time,
    "stores": {store: {"g": [series, [bucket, delta, ...], ...], "cur": {store: currency}}}}``.
    """

    def __init__(self, source: tuple[int, int], max_time_ms: int | None) -> None:
        self.source = source
        self.max_time_ms = max_time_ms
        self.parts: list[dict[str, Any]] = []
        #: rows the last part can still take
        self.room = 0

    def entry(self, store_id: str, currencies: dict[str, str] | None) -> list[Any]:
        """The grouped rows of the store in the last part (a new part when it is full)."""
        if self.room == 0:
            src = [self.source[0], self.source[1], len(self.parts)]
            self.parts.append({"src": src, "t": self.max_time_ms, "stores": {}})
            self.room = MAX_DELTA_ROWS
        entry = self.parts[-1]["stores"].setdefault(store_id, {"g": []})
        if currencies:
            entry["cur"] = currencies
        grouped: list[Any] = entry["g"]
        return grouped

    def add(self, store_id: str, groups: list[Any], currencies: dict[str, str] | None) -> None:
        """Add a store's grouped rows, cut across parts where a part is full.

        Every store gets an entry, rows or not: it carries the currency and marks the shard.
        """
        grouped = self.entry(store_id, currencies)
        for index in range(0, len(groups), 2):
            series, pairs = groups[index], groups[index + 1]
            start = 0
            while start < len(pairs):
                if self.room == 0:
                    grouped = self.entry(store_id, currencies)
                taken = pairs[start:start + 2 * self.room]
                grouped.append(series)
                grouped.append(taken)
                self.room -= len(taken) // 2
                start += len(taken)
