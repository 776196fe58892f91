"""A stage's table writes made behind it: each once Kafka has the output it caused, in order, while the stage goes on.

The facts stage must never write a customer's facts before Kafka has acknowledged the deltas
they caused (a crash may then replay the events, never lose their deltas), and never commit
its input before the facts' changelog is acknowledged (a worker taking the partition over
recovers the facts the commit claims). Waiting for both acknowledgements before the next batch
put two round trips to the broker into every event's latency. :class:`WriteBehind` keeps the
order and lets the stage go on:

* a batch hands over its deltas' acknowledgements, its table records (serialized when the
  batch ends, so later batches cannot change them) and its input positions;
* one writer task takes the batches in order: it waits for their deltas, writes their records
  (the local table and the changelog), waits for the changelog, then marks the positions done;
* until a batch's records are written, :meth:`WriteBehind.get` and :meth:`WriteBehind.get_many`
  answer from them, so the next batches read what the stage wrote, not the table's older value;
* at most ``most`` batches, and at most ``most_events`` events in them, wait: a stage that
  outruns Kafka waits for the oldest; a batch of ``most_events`` or more (a slice of a backlog)
  is written before the stage goes on, as if it waited for it: a worker reading a backlog holds
  no more than it did (one batch more cost the 1,000,000-customer memory run 54 MiB of peak RSS).

A failed write stops the writer; the stage gets the error at its next :meth:`WriteBehind.add`
(or :meth:`WriteBehind.check`) and must then read its input again from its commits (nothing
after them is durable for sure) with :meth:`WriteBehind.abandon`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from streams.worker.acks import acknowledged

#: a table write: ``None`` deletes the key
Records = dict[bytes, bytes | None]

_MISSING = object()


@dataclass
class UnwrittenBatch:
    """One batch's output on its way: deltas sent, records to write after them, positions to mark done."""

    delta_acks: list[asyncio.Future[Any]]
    records: Records
    #: the input's next offsets once these records are durable (``None``: a slice of a batch)
    positions: dict[int, int] | None
    #: the events the batch applied
    events: int


class WriteBehind:
    """Writes batches' table records in order, each after its deltas are acknowledged (see the module docstring)."""

    def __init__(
        self,
        write: Callable[[Records], Awaitable[None]],
        confirm: Callable[[], Awaitable[None]],
        mark_done: Callable[[dict[int, int]], None],
        most: int,
        most_events: int,
    ) -> None:
        self._write = write
        self._confirm = confirm
        self._mark_done = mark_done
        self.most = most
        self.most_events = most_events
        self._queue: deque[UnwrittenBatch] = deque()
        #: key -> its newest record not written yet (``None``: a delete)
        self._unwritten: Records = {}
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        #: set whenever the writer finishes a batch or stops
        self._moved = asyncio.Event()

    @property
    def waiting(self) -> int:
        """Batches handed over and not yet durable."""
        return len(self._queue)

    def get(self, key: bytes, read: Callable[[bytes], bytes | None]) -> bytes | None:
        """The value of ``key``: its unwritten record if there is one, else ``read(key)`` (the table)."""
        value = self._unwritten.get(key, _MISSING)
        if value is _MISSING:
            return read(key)
        return value  # type: ignore[return-value]

    def get_many(self, keys: list[bytes], read_many: Callable[[list[bytes]], list[bytes | None]]) -> list[bytes | None]:
        """The values of ``keys`` as :meth:`get` gives them, the table's read with one ``read_many``."""
        unwritten = self._unwritten
        from_table = [key for key in keys if key not in unwritten]
        found = dict(zip(from_table, read_many(from_table), strict=True)) if from_table else {}
        return [unwritten[key] if key in unwritten else found[key] for key in keys]

    def check(self) -> None:
        """Raise the error that stopped the writer, if any."""
        if self._failure is not None:
            raise self._failure

    async def add(
        self, delta_acks: list[asyncio.Future[Any]], records: Records, positions: dict[int, int] | None,
        events: int,
    ) -> None:
        """Hand over a batch of ``events`` (after its deltas are sent); waits while ``most`` batches,
        or with this one more than ``most_events`` events, are unwritten (never for the only one),
        and for the batch itself when it has ``most_events`` or more."""
        self.check()
        while self._queue and (
            len(self._queue) >= self.most or sum(batch.events for batch in self._queue) + events > self.most_events
        ):
            await self._wait_moved()
        self._queue.append(UnwrittenBatch(delta_acks, records, positions, events))
        self._unwritten.update(records)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        if events >= self.most_events:
            await self.drain()

    async def drain(self) -> None:
        """Wait until every batch handed over so far is durable (or raise the writer's error)."""
        while self._queue:
            await self._wait_moved()

    async def _wait_moved(self) -> None:
        # a writer that stopped already never sets the event again
        self.check()
        self._moved.clear()
        await self._moved.wait()
        self.check()

    def abandon(self) -> None:
        """Stop the writer and drop every batch not written: the stage reads them again from its input."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._task = None
        self._queue.clear()
        self._unwritten.clear()
        self._failure = None
        self._moved.set()

    async def _run(self) -> None:
        try:
            while self._queue:
                batch = self._queue[0]
                if batch.delta_acks:
                    await acknowledged(batch.delta_acks)
                await self._write(batch.records)
                unwritten = self._unwritten
                for key, value in batch.records.items():
                    # a later batch's record of the key stays until that batch is written
                    if unwritten.get(key, _MISSING) is value:
                        del unwritten[key]
                await self._confirm()
                self._queue.popleft()
                if batch.positions is not None:
                    self._mark_done(batch.positions)
                self._moved.set()
        except asyncio.CancelledError:
            raise
        except BaseException as error:
            self._failure = error
        finally:
            self._moved.set()
