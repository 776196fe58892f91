"""The gate: the by-store agent (one currency and at most 100 channels per store) and, with the wall clock, the
release of held events."""

from __future__ import annotations

from typing import Any

from streams.sinks.dead_letters import StageLedger
from streams.stages.gate import CURRENCY_MISMATCH, GateStage
from streams.stages.routed import Routed
from streams.stages.watermarks import MARKS, Mark, is_marks
from streams.worker.acks import acknowledged
from streams.worker.tables import changelog_written
from streams.worker.topics import DEAD_LETTER_TOPIC
from streams.worker.topology import BATCH_MAX, BATCH_WITHIN_S, Topology, wall_ms
from streams.worker.wire import pack, unpack


class CurrencyView:
    """The currency table as ``store -> currency`` strings."""

    def __init__(self, table: Any) -> None:
        self.table = table

    def get(self, store_id: str) -> str | None:
        value = self.table.get_raw(store_id.encode())
        return None if value is None else bytes(value).decode()

    def __setitem__(self, store_id: str, currency: str) -> None:
        self.table[store_id.encode()] = currency.encode()


class ChannelsView:
    """The channels table as ``store -> [channel, ...]``, each store's list decoded once per view (one batch)."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self.decoded: dict[str, list[str]] = {}

    def get(self, store_id: str) -> list[str] | None:
        channels = self.decoded.get(store_id)
        if channels is None:
            value = self.table.get_raw(store_id.encode())
            if value is None:
                return None
            channels = self.decoded[store_id] = unpack(bytes(value))
        return channels

    def __setitem__(self, store_id: str, channels: list[str]) -> None:
        self.table[store_id.encode()] = pack(channels)
        self.decoded[store_id] = channels


class Gate:
    """Admits events by store to the by-customer topic; holds (wall clock) those later than now."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.stage = GateStage(topology.partitions)
        self.currencies = CurrencyView(topology.currencies)
        self.input = topology.contiguous(topology.by_store, committed=True)
        settings = topology.settings
        #: the ledger's commit metadata as of the last batch marked done (what a commit carries)
        self.done_metadata = ""
        self.ledger = StageLedger(settings, settings.topic(DEAD_LETTER_TOPIC),
                                  topology.partitions, {CURRENCY_MISMATCH})

    async def run(self, stream: Any) -> None:
        """The agent: each batch of by-store messages through the gate, held events added to their store's."""
        topology = self.topology
        held = topology.held
        await topology.outputs.declare()
        async for batch in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            routed = Routed()
            now = None if topology.event_clock else wall_ms()
            newly_held: dict[str, list[Any]] = {}
            #: by-store partition -> the watermark marks that arrived on it, relayed after the batch's events
            marks: dict[int, dict[str, Mark]] = {}
            # the table is read afresh each batch: a rebalance may have recovered it meanwhile
            channels = ChannelsView(topology.channels)
            messages = await self.input.in_order(batch)
            started = self.input.take_started()
            if started:  # partitions read again from their commits: learn what they dead-lettered since
                await self.ledger.learn(list(started.values()))
            events_in_slice = 0
            slice_events = topology.settings.slice_events
            for partition, _, value in messages:
                message = unpack(value)
                if is_marks(message):
                    marks.setdefault(partition, {}).update(message[MARKS])
                    continue
                pending: list[Any] = []
                self.stage.process(message, self.currencies, now, pending, routed, channels)  # type: ignore[arg-type]
                for item in pending:
                    newly_held.setdefault(item[0][3], []).append(item)
                events_in_slice += len(message)
                if events_in_slice >= slice_events:
                    # a long batch goes on in slices (LOYALTY_SLICE_EVENTS): internal messages are
                    # packed, so a batch of them can hold a backlog's worth of events
                    await self.forward(routed)
                    routed, events_in_slice = Routed(), 0
            for store_id, items in newly_held.items():
                key = store_id.encode()
                previous = held.get(key)
                held[key] = pack((unpack(previous) if previous else []) + items)
            await self.forward(routed)
            await self.relay_marks(marks)
            await changelog_written(topology.currencies, topology.channels, held)
            self.input.mark_done()
            # the ledger's positions now, with no await since the batch was marked done: a commit
            # of the done offsets must not carry a position past a dead letter of a batch after them
            # (the tick commits while the next batch is under way; that batch's dead letters would
            # then be neither read again from the commit nor known after a crash, and sent twice)
            self.done_metadata = self.ledger.commit_metadata()
            await self.input.commit(metadata=self.done_metadata)

    async def forward(self, routed: Routed) -> None:
        """Send admitted events and new dead letters on, until Kafka has them all.

        Kafka has the forwarded events and the tables before the offsets are committed: a crash
        after a commit must not lose what was only queued. A crash before it forwards them again
        (the facts stage deduplicates events, the ledger dead letters).
        """
        routed.dead_letters = [letter for letter in routed.dead_letters if not self.ledger.already_sent(letter)]
        for metadata in await self.topology.send_routed(self.topology.by_customer, routed, wait=True):
            self.ledger.record(metadata.partition, metadata.offset)
        self.ledger.remember(routed.dead_letters)

    async def relay_marks(self, marks: dict[int, dict[str, Mark]]) -> None:
        """Relay the marks of each by-store partition to every by-customer partition, naming where they came from.

        Sent after the batch's events were acknowledged, so they are behind them. The held events
        (wall clock) are later than now, so later than any boundary a mark can make due.
        """
        topology = self.topology
        sent = []
        for source, received in marks.items():
            message = pack({MARKS: received, "from": source})
            for partition in range(topology.partitions):
                sent.append(await topology.by_customer.send(value=message, partition=partition))
        if sent:
            await acknowledged(sent)

    async def tick(self) -> None:
        """The once-a-second timer: release held events, commit what is done, seek back a stalled partition."""
        await self.release_held()
        await self.input.commit(force=True, metadata=self.done_metadata)
        await self.input.unstall()

    async def release_held(self) -> None:
        """The timer (wall clock only): forward the held events that now has reached."""
        topology = self.topology
        if topology.event_clock:
            return
        held = topology.held
        await topology.outputs.declare()
        now = wall_ms()
        routed = Routed()
        for key in list(held.keys()):
            value = held.get(key)
            if not value:
                continue
            keep = self.stage.release(unpack(value), now, routed)
            if keep:
                held[key] = pack(keep)
            else:
                del held[key]
        # forwarded before the table forgets them: a crash in between sends them again (deduplicated
        # by the facts stage), never loses them
        await topology.send_routed(topology.by_customer, routed, wait=True)
        await changelog_written(held)


def register(topology: Topology) -> Gate:
    """The gate agent on the by-store topic and its once-a-second release timer."""
    gate = Gate(topology)
    app = topology.app

    @app.agent(topology.by_store, name=topology.internal + "gate")
    async def gate_agent(stream: Any) -> None:
        await gate.run(stream)

    topology.timer(1.0, "release-held", gate.tick)

    return gate
