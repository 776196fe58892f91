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
