"""The facts: the by-customer agent (dedupe, customer facts, contribution deltas) and event-clock watermarks."""

from __future__ import annotations

import time
from typing import Any

from metrics.customer import CustomerFacts
from streams.stages.facts import (
    CustomerOutput,
    CustomerStage,
    customer_records,
    decode_customer,
    delta_messages,
    load_customer,
)
from streams.stages.watermarks import MARKS, MARKS_INTERVAL_S, MARKS_REPEAT_S, Mark, MarkMerger, is_marks
from streams.worker.acks import acknowledged
from streams.worker.tables import changelog_written
from streams.worker.topology import BATCH_MAX, BATCH_WITHIN_S, Topology, wall_ms
from streams.worker.wire import pack, pack_chunks, unpack

#: customers the facts stage keeps in memory between batches (see ``CustomerStage``)
CUSTOMER_CACHE_SIZE = 20_000


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

    def forget(self) -> None:
        """Drop the customers kept in memory: the table may have changed under us."""
        self.stage.forget()

    def load(self, key: str) -> CustomerFacts | None:
        """A customer's facts from the table (``None``: a new customer)."""
        return load_customer(key, self.topology.facts.get_raw)

    def load_many(self, keys: list[str]) -> dict[str, CustomerFacts | None]:
        """Customers' facts from the table (``None``: a new customer), their records read in one lookup
        per partition (a by-customer message's customers are all of its partition)."""
        table = self.topology.facts
        values = table.get_many_raw([key.encode() for key in keys])
        return {key: decode_customer(key, value, table.get_raw) for key, value in zip(keys, values, strict=True)}

    async def run(self, stream: Any) -> None:
        """The agent: each batch of by-customer messages applied, its deltas sent, then its facts written.

        Faust restarts a crashed agent in the same process: customers kept in memory may then be
        ahead of the table (changed by a batch that was never written), so they are dropped when
        the agent starts and when it fails.
        """
        self.forget()
        try:
            await self.process(stream)
        except BaseException:
            self.forget()
            raise

    async def process(self, stream: Any) -> None:
        """Apply the stream's batches (see :meth:`run`)."""
        topology = self.topology
        clock = topology.clock
        health = topology.health
        partitions = topology.partitions
        slice_events = topology.settings.slice_events
        async for batch in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            cache: dict[str, CustomerFacts] = {}
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
                output = CustomerOutput(facts=cache)
                self.stage.process(items, self.load, now, output, wall_ms(), self.load_many)
                health.count("events_applied", output.applied)
                health.count("duplicates", output.duplicates)
                source = (partition, offset)
                for partition, parts in delta_messages(output, source, partitions).items():
                    outgoing.setdefault(partition, []).extend(parts)
                held_events += len(items)
                if held_events >= slice_events:
                    # a long batch is written in slices (LOYALTY_SLICE_EVENTS): the customers and
                    # deltas it holds until the write bound the worker's memory
                    await self.write(outgoing, cache)
                    outgoing, cache, held_events = {}, {}, 0
            await self.write(outgoing, cache)
            if self.marks is not None:
                for partition, message in marks:
                    self.marks.receive(partition, int(message["from"]), message[MARKS])
            await self.forward_marks()
            self.input.mark_done()
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

    async def write(self, outgoing: dict[int, list[dict[str, Any]]], cache: dict[str, CustomerFacts]) -> None:
        """Send the deltas, then write the facts that caused them, then broadcast the event clock."""
        topology = self.topology
        deltas = topology.deltas
        acks = []
        # one message per partition carries the parts of the whole batch (Faust costs per message);
        # each part keeps its own source, so idempotency does not depend on how batches formed
        for partition, parts in outgoing.items():
            for chunk in pack_chunks(parts):
                acks.append(await deltas.send(value=chunk, partition=partition))
        # facts only after Kafka has the deltas: a crash may replay, never lose
        if acks:
            await acknowledged(acks)
        records: dict[bytes, bytes | None] = {}
        for key, customer in cache.items():
            records.update(customer_records(key, customer, topology.grid))
        await topology.facts.write_many(records)
        await changelog_written(topology.facts)
        clock = topology.clock
        latest = clock.clock_ms
        if clock.event_clock and latest is not None and (clock.broadcast_ms is None or latest > clock.broadcast_ms):
            clock.broadcast_ms = latest
            watermark = pack({"wm": latest})
            for partition in range(topology.partitions):
                await deltas.send(value=watermark, partition=partition)


def register(topology: Topology) -> Facts:
    """The facts agent on the by-customer topic."""
    facts = Facts(topology)

    @topology.app.agent(topology.by_customer, name=topology.internal + "facts")
    async def facts_agent(stream: Any) -> None:
        await facts.run(stream)

    topology.timer(1.0, "facts-tick", facts.tick)

    return facts
