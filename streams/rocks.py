"""A RocksDB table store that finds a key's partition from the table's routing, not from "the current event".

faust-streaming's RocksDB store keeps one database per changelog partition and
picks the database of a write from the partition of the event being processed
(``current_event()``): it asserts there is one (issue 497), so writes from a
``take`` batch or a timer crash, and a write would land in the database of the
*input* partition rather than of the key's changelog partition. Our tables
route every key themselves (``partition_for_key``, see ``streams.topology``),
so this store asks the table, for reads, writes and deletes alike: a key lives
in exactly one database, the one its changelog partition recovers into.
"""

from __future__ import annotations

from typing import Any

from faust.stores.rocksdb import Store


class RoutedRocksDBStore(Store):
    """RocksDB store of a table with ``partition_for_key`` (one database per changelog partition)."""

    def _partition(self, key: bytes) -> int:
        partition: Any = self.table.partition_for_key(key)
        return int(partition)

    def _set(self, key: bytes, value: bytes | None) -> None:
        self._db_for_partition(self._partition(key)).put(key, value)

    def _get(self, key: bytes) -> bytes | None:
        value: Any = self._db_for_partition(self._partition(key)).get(key)
        return None if value is None else bytes(value)

    def _del(self, key: bytes) -> None:
        self._db_for_partition(self._partition(key)).delete(key)

    def _contains(self, key: bytes) -> bool:
        return self._get(key) is not None
