"""The facts: the by-customer agent (dedupe, customer facts, contribution deltas) and event-clock watermarks."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from streams.logs import get_logger
from streams.stages.facts import (
    BatchCustomers,
    CustomerOutput,
    CustomerStage,
    delta_messages,
)
from streams.stages.watermarks import MARKS, MARKS_INTERVAL_S, MARKS_REPEAT_S, Mark, MarkMerger, is_marks
from streams.worker.acks import acknowledged
from streams.worker.tables import changelog_written
from streams.worker.topology import BATCH_MAX, BATCH_WITHIN_S, Topology, wall_ms
from streams.worker.wire import pack, pack_chunks, unpack
from streams.worker.write_behind import Records, WriteBehind

log = get_logger(__name__)

#: large customers the facts stage keeps in memory between batches (see ``CustomerStage``)
CUSTOMER_CACHE_SIZE = 20_000
#: batches (or slices of one) whose facts wait for their deltas' acknowledgement, at most (and at most
#: LOYALTY_SLICE_EVENTS events in them): the stage computes the next batch meanwhile, and a stage that
#: outruns Kafka waits for the oldest
UNWRITTEN_BATCHES = 3
#: how long a stopping facts agent waits for the facts of the batches it sent to be written
STOP_DRAIN_S = 5.0


class Facts:
    """Applies events to their customer's facts and sends the differences of contributions as deltas."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.stage = CustomerStage(topology.grid, cache_size=CUSTOMER_CACHE_SIZE)
        self.input = topology.contiguous(topology.by_customer, committed=True)
        #: the marks of every by-store partition and of the ingest's path around the gate (upstream P, sent
        #: whatever LOYALTY_GATE_BYPASS says), per by-customer partition (None: alerts off)
        self.marks = MarkMerger(topology.partitions + 1) if topology.settings.alert_config() is not None else None
        #: by-customer partition -> (merged marks, monotonic time) last forwarded
        self._forwarded: dict[int, tuple[dict[str, Mark], float]] = {}
        #: the facts of sent batches, written once Kafka has their deltas (see streams.worker.write_behind)
        self.writes = WriteBehind(
            topology.facts.write_many, lambda: changelog_written(topology.facts), self.input.mark_done,
            most=UNWRITTEN_BATCHES, most_events=topology.settings.slice_events,
        )

    def forget(self) -> None:
        """Drop the customers kept in memory: the table may have changed under us."""
        self.stage.forget()

    def read(self, key: bytes) -> bytes | None:
        """A facts record: written by a batch still on its way, else from the table (``None``: missing)."""
        return self.writes.get(key, self.topology.facts.get_raw)

    def read_many(self, keys: list[str]) -> dict[str, bytes | None]:
        """Customers' records as :meth:`read` gives them (``None``: a new customer), the table's read in
        one lookup per partition (a by-customer message's customers are all of its partition)."""
        values = self.writes.get_many([key.encode() for key in keys], self.topology.facts.get_many_raw)
        return dict(zip(keys, values, strict=True))

    async def run(self, stream: Any) -> None:
        """The agent: each batch of by-customer messages applied and its deltas sent; its facts are
        written behind it, once Kafka has the deltas.

        Faust restarts a crashed agent in the same process: customers kept in memory, and the facts
        of batches not written yet, may then be ahead of the table, so they are dropped when the
        agent starts and when it fails, and the input is read again from the stage's commits.
        """
        self.forget()
        try:
            await self.process(stream)
        except asyncio.CancelledError:
            # a stopping worker: the facts of the batches sent are written if Kafka answers soon, so
            # that the restarted worker does not apply (and count) their events again
            try:
                await asyncio.wait_for(self.writes.drain(), STOP_DRAIN_S)
            except BaseException as error:
                log.warning("facts.stop_drain_failed", error=str(error) or type(error).__name__)
            self.writes.abandon()
            self.input.forget()
            self.forget()
            raise
        except BaseException:
            self.writes.abandon()
            self.input.forget()
            self.forget()
            raise

    async def drain(self) -> None:
        """Wait until the facts of every batch sent so far are written (partitions are being revoked).

        A batch's facts written after its partition moved would reach the changelog behind the new
        owner's; a failed write is left to the agent, which raises it at its next batch.
        """
        try:
            await self.writes.drain()
        except Exception as error:
            log.warning("facts.drain_failed", error=str(error) or type(error).__name__)

    async def process(self, stream: Any) -> None:
        """Apply the stream's batches (see :meth:`run`)."""
        topology = self.topology
        clock = topology.clock
        health = topology.health
        partitions = topology.partitions
        slice_events = topology.settings.slice_events
        async for batch in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            self.writes.check()
            customers = BatchCustomers()
            outgoing: dict[int, list[dict[str, Any]]] = {}
            held_events = 0
            #: marks of this batch: merged only once its deltas are sent, so that no forwarded mark
            #: (the tick forwards too) is ahead of them
            marks: list[tuple[int, dict[str, Any]]] = []
            for partition, offset, value in await self.input.in_order(batch):
                items = unpack(value)
                if is_marks(items):
                    marks.append((partition, items))
                    continue
                if clock.event_clock:
                    clock.advance(max((item[2] for item in items), default=None))
                now = clock.now_ms()
                if now is None:
                    continue
                output = CustomerOutput(customers=customers)
                self.stage.process(items, self.read, now, output, wall_ms(), self.read_many)
                health.count("events_applied", output.applied)
                health.count("duplicates", output.duplicates)
                source = (partition, offset)
                for partition, parts in delta_messages(output, source, partitions).items():
                    outgoing.setdefault(partition, []).extend(parts)
                held_events += len(items)
                if held_events >= slice_events:
                    # a long batch is sent in slices (LOYALTY_SLICE_EVENTS): the customers and
                    # deltas it holds until then bound the worker's memory
                    await self.send(outgoing, customers, None, held_events)
                    outgoing, customers, held_events = {}, BatchCustomers(), 0
            await self.send(outgoing, customers, self.input.end_batch(), held_events)
            await self.broadcast_clock()
            if self.marks is not None:
                for partition, message in marks:
                    self.marks.receive(partition, int(message["from"]), message[MARKS])
            await self.forward_marks()
            await self.input.commit()

    async def forward_marks(self) -> None:
        """Send each by-customer partition's merged marks to every deltas partition, after its deltas.

        Only the partitions this worker owns: one that moved holds stale marks, which would hold
        the new owner's back.
        """
        marks = self.marks
        if marks is None:
            return
        topology = self.topology
        mine = {tp.partition for tp in topology.app.assignor.assigned_actives()
                if tp.topic == topology.by_customer.get_topic_name()}
        now = time.monotonic()
        sent = []
        for partition in sorted(mine & set(marks.received)):
            last = self._forwarded.get(partition)
            if last is not None and now - last[1] < MARKS_INTERVAL_S:
                continue  # before merging: a live worker calls this after every batch, and merging costs
            merged = marks.merged(partition)
            if last is not None and merged == last[0] and now - last[1] < MARKS_REPEAT_S:
                continue
            message = pack({MARKS: merged, "from": partition})
            for target in range(topology.partitions):
                sent.append(await topology.deltas.send(value=message, partition=target))
            self._forwarded[partition] = (merged, now)
        if sent:
            await acknowledged(sent)

    async def tick(self) -> None:
        """The once-a-second timer: forward merged marks, commit what is done, seek back a stalled partition."""
        await self.forward_marks()
        await self.input.commit(force=True)
        await self.input.unstall()

    async def send(
        self, outgoing: dict[int, list[dict[str, Any]]], customers: BatchCustomers,
        positions: dict[int, int] | None, events: int,
    ) -> None:
        """Send the deltas and hand the facts that caused them to the writer, which writes them once
        Kafka has the deltas (a crash may replay, never lose), then marks ``positions`` done."""
        topology = self.topology
        deltas = topology.deltas
        acks = []
        # one message per partition carries the parts of the whole batch (Faust costs per message);
        # each part keeps its own source, so idempotency does not depend on how batches formed
        for partition, parts in outgoing.items():
            for chunk in pack_chunks(parts):
                acks.append(await deltas.send(value=chunk, partition=partition))
        # serialized now: the next batches change the objects of the customers kept
        records: Records = self.stage.table_writes(customers)
        await self.writes.add(acks, records, positions, events)

    async def broadcast_clock(self) -> None:
        """Send the event clock to every deltas partition, behind the deltas sent so far."""
        topology = self.topology
        clock = topology.clock
        latest = clock.clock_ms
        if clock.event_clock and latest is not None and (clock.broadcast_ms is None or latest > clock.broadcast_ms):
            clock.broadcast_ms = latest
            watermark = pack({"wm": latest})
            for partition in range(topology.partitions):
                await topology.deltas.send(value=watermark, partition=partition)


def register(topology: Topology) -> Facts:
    """The facts agent on the by-customer topic."""
    facts = Facts(topology)

    @topology.app.agent(topology.by_customer, name=topology.internal + "facts")
    async def facts_agent(stream: Any) -> None:
        await facts.run(stream)

    topology.timer(1.0, "facts-tick", facts.tick)

    return facts
