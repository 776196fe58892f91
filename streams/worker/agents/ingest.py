"""Ingest: the input topics, read in bulk by :mod:`streams.worker.input_reader`, validated and routed by store.

Events whose gate decisions are taken already go straight to the by-customer topic
(:mod:`streams.worker.gate_decisions`); the watermark marks then go both ways: to every by-store
partition, which the gate relays, and to every by-customer partition as the upstream ``P`` (the
number of partitions), after the gate's ``0 .. P-1``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from metrics.events import INPUT_TOPICS
from streams.connections import kafka_client_options
from streams.logs import get_logger
from streams.sinks.dead_letters import DeadLetterLedger
from streams.stages.gate import GateDecisions
from streams.stages.ingest import AroundGate, IngestStage
from streams.stages.routed import Routed
from streams.stages.watermarks import MARKS, MARKS_INTERVAL_S, MARKS_REPEAT_S, InputMarks, Mark
from streams.worker.acks import acknowledged
from streams.worker.gate_decisions import GateDecisionsReader
from streams.worker.input_reader import read_inputs
from streams.worker.restarts import run_restarting
from streams.worker.topics import DEAD_LETTER_TOPIC
from streams.worker.topology import Topology, wall_ms
from streams.worker.wire import pack, pack_chunks

log = get_logger(__name__)

#: how often the gate's commits are read while customers are on its path
GATE_PATH_POLL_S = 0.2
#: while the gate's commits cannot be read (Kafka away), a failure is logged at most this often
GATE_PATH_LOG_EVERY_S = 30.0


class InputCommits:
    """What the ingest commits with each input offset: its dead-letter position and its largest event time.

    The metadata is ``"<dead-letter position>|<largest event time routed, ms>"`` (just the position
    with alerts off, or before the partition routed an event; commits of earlier releases carry
    the position alone). A reader assigned the partition hands the position to the
    :class:`~streams.sinks.dead_letters.DeadLetterLedger` and the time to the marks
    (:meth:`streams.stages.watermarks.InputMarks.restore`).
    """

    def __init__(self, ledger: DeadLetterLedger, marks: InputMarks | None) -> None:
        self.ledger = ledger
        self.marks = marks

    def commit_metadata(self, topic: str, partition: int, offset: int) -> str:
        """The metadata committed with ``offset`` (the next to read) of the input partition."""
        position = self.ledger.commit_metadata(topic, partition, offset)
        latest = None if self.marks is None else self.marks.latest.get(InputMarks.key(topic, partition))
        return position if latest is None else f"{position}|{latest}"

    async def on_assigned(self, committed: dict[tuple[str, int], tuple[int, str | None]]) -> None:
        """Input partitions assigned with their committed ``(offset, metadata)``: restore both parts."""
        positions: dict[tuple[str, int], tuple[int, str | None]] = {}
        now = time.monotonic() * 1000
        for (topic, partition), (offset, metadata) in committed.items():
            position, _, latest = (metadata or "").partition("|")
            positions[(topic, partition)] = (offset, position or None)
            if self.marks is not None and latest.lstrip("-").isdigit():
                self.marks.restore(InputMarks.key(topic, partition), int(latest), now)
        await self.ledger.on_assigned(positions)

    def on_revoked(self, topic: str, partition: int) -> None:
        """The input partition is no longer this reader's."""
        self.ledger.on_revoked(topic, partition)


class Ingest:
    """Validates each fetch of input records and sends its events to the by-store topic."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        settings = topology.settings
        self.stage = IngestStage(topology.partitions, settings.max_future_skew_ms)
        self.prefix = settings.topic_prefix
        self.input_topics = [settings.topic(name) for name in INPUT_TOPICS]
        self.ledger = DeadLetterLedger(
            settings, settings.topic(DEAD_LETTER_TOPIC), topology.partitions
        )
        config = settings.alert_config()
        #: the input partitions' progress, for the alerts' low watermark (None: alerts off)
        self.marks = InputMarks(config.idle_ms) if config is not None else None
        #: the commits' metadata: dead-letter positions and the marks' event times
        self.commits = InputCommits(self.ledger, self.marks)
        self._marks_sent: dict[str, Mark] | None = None
        self._marks_sent_at = 0.0
        #: the gate's decisions taken so far, followed by :attr:`decisions_reader`
        self.decisions = GateDecisions()
        self.decisions_reader = GateDecisionsReader(
            settings, topology.currencies.changelog_topic.get_topic_name(),
            topology.channels.changelog_topic.get_topic_name(), topology.partitions, self.decisions)
        #: the customers with events on the gate's path (see streams.stages.ingest.AroundGate)
        self.on_gate_path: dict[str, list[int]] = {}

    async def handle(self, records: Sequence[ConsumerRecord]) -> None:
        """Validate one fetch of input records and route its events by store (acknowledged by Kafka)."""
        topology = self.topology
        await topology.outputs.declare()
        routed = Routed()
        now = wall_ms()
        # the gate holds events later than now with the wall clock: those go through it
        hold_after_ms = None if topology.event_clock else now
        bypass = topology.settings.gate_bypass
        around = AroundGate(self.decisions, Routed(), hold_after_ms, self.on_gate_path) if bypass else None
        prefix = self.prefix
        slice_events = topology.settings.slice_events
        latest: dict[str, int] = {}
        for record in records:
            topic_name = record.topic
            name = topic_name[len(prefix):] if topic_name.startswith(prefix) else topic_name
            time_ms = self.stage.process(name, (topic_name, record.partition, record.offset), record.value, now, routed,
                                         around)
            if time_ms is not None:
                key = InputMarks.key(topic_name, record.partition)
                if time_ms > latest.get(key, time_ms - 1):
                    latest[key] = time_ms
            if routed.accepted + (around.direct.accepted if around else 0) + len(routed.dead_letters) >= slice_events:
                # a fetch of batch messages holds many events: sent on in slices (LOYALTY_SLICE_EVENTS)
                await self.forward(routed, around)
                routed = Routed()
                around = AroundGate(self.decisions, Routed(), hold_after_ms, self.on_gate_path) if bypass else None
        await self.forward(routed, around)
        if self.marks is not None:
            # only now that Kafka has the events: a mark sent later is behind them in every partition
            self.marks.routed(latest, time.monotonic() * 1000)

    async def forward(self, routed: Routed, around: AroundGate | None) -> None:
        """Send validated events and new dead letters to the by-store topic, and the events the gate's
        decisions settle to the by-customer topic, until Kafka has them all."""
        topology = self.topology
        direct = around.direct if around is not None else Routed()
        topology.health.count("events_received", routed.accepted + direct.accepted + len(routed.dead_letters))
        topology.health.count("events_through_gate", routed.accepted)
        topology.health.count("events_around_gate", direct.accepted)
        ledger = self.ledger
        # elements read again after a crash whose dead letters are in the topic already
        routed.dead_letters = [letter for letter in routed.dead_letters if not ledger.already_sent(letter)]
        sent = [await topology.by_customer.send(value=chunk, partition=partition)
                for partition, items in direct.by_partition.items() for chunk in pack_chunks(items)]
        offsets: dict[int, int] = {}
        try:
            if routed.by_partition:
                # a customer's next events go to the gate after these: Kafka has these first
                await acknowledged(sent)
            for metadata in await topology.send_routed(topology.by_store, routed, wait=True, offsets=offsets):
                ledger.record(metadata.partition, metadata.offset)
        finally:
            # every send settles before a failure goes up: the reader that starts again must not race them
            results = await acknowledged(sent, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        for key in around.sent_to_gate if around is not None else ():
            entry = self.on_gate_path.get(key)
            if entry is not None and entry[1] < 0:
                entry[1] = offsets[entry[0]]

    def leave_gate_path(self, committed: dict[int, int]) -> None:
        """The gate has committed by-store partitions up to ``committed`` (next offsets): the customers
        whose last event on its path is below are free to go around it again (changed in place: a
        slice being routed holds the same map)."""
        on_gate_path = self.on_gate_path
        for key in [key for key, (partition, offset) in on_gate_path.items()
                    if 0 <= offset < committed.get(partition, 0)]:
            del on_gate_path[key]

    async def run_gate_path(self) -> None:
        """While customers are on the gate's path: read the gate's commits every :data:`GATE_PATH_POLL_S`."""
        topology = self.topology
        admin: AIOKafkaAdminClient | None = None
        topic = topology.by_store.get_topic_name()
        #: failures in a row, and when one was last logged (a Kafka outage fails every poll)
        failures, logged_at = 0, 0.0
        try:
            while True:
                await asyncio.sleep(GATE_PATH_POLL_S)
                if not self.on_gate_path:
                    continue
                try:
                    if admin is None:
                        admin = AIOKafkaAdminClient(**kafka_client_options(topology.settings))
                        await admin.start()
                    partitions = [TopicPartition(topic, partition) for partition in range(topology.partitions)]
                    found = await admin.list_consumer_group_offsets(topology.settings.app_id, partitions=partitions)
                    self.leave_gate_path({tp.partition: meta.offset for tp, meta in found.items()
                                          if meta is not None and meta.offset >= 0})
                    if failures:
                        log.info("ingest.gate_commits_read_again", failures=failures)
                    failures = 0
                except asyncio.CancelledError:
                    raise
                except Exception as error:  # Kafka away: the customers stay on the gate's path meanwhile
                    # polled on at the same pace: customers wait on the gate's path for the next read
                    # that succeeds (a backoff held a new group's first customers for seconds)
                    failures += 1
                    if failures == 1 or time.monotonic() - logged_at >= GATE_PATH_LOG_EVERY_S:
                        logged_at = time.monotonic()
                        log.warning("ingest.gate_commits_failed", error=str(error) or type(error).__name__,
                                    failures=failures)
                    if admin is not None:
                        await admin.close()
                        admin = None
        finally:
            if admin is not None:
                await admin.close()

    async def send_marks(self) -> None:
        """Send the input partitions' marks to every by-store partition, when changed (or now and then)."""
        marks = self.marks
        if marks is None:
            return
        topology = self.topology
        current = marks.marks(time.monotonic() * 1000, None if topology.event_clock else wall_ms())
        if current is None:
            return
        if current == self._marks_sent and time.monotonic() - self._marks_sent_at < MARKS_REPEAT_S:
            return
        message = pack({MARKS: current})
        sent = [await topology.by_store.send(value=message, partition=p) for p in range(topology.partitions)]
        # the events that skipped the gate: the facts stage counts this path as one more upstream. Sent
        # with the path switched off too (it then carries no event), so that workers whose settings differ
        # (or a rolling change of the setting) never leave a facts stage waiting for it
        direct = pack({MARKS: current, "from": topology.partitions})
        sent.extend([await topology.by_customer.send(value=direct, partition=p) for p in range(topology.partitions)])
        await acknowledged(sent)
        self._marks_sent, self._marks_sent_at = current, time.monotonic()

    async def run_marks(self) -> None:
        """The marks loop (alerts on): a failure is logged and tried again at the next round."""
        while True:
            await asyncio.sleep(MARKS_INTERVAL_S)
            try:
                await self.send_marks()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # Kafka unreachable: marks are sent again when it answers
                log.warning("ingest.marks_failed", error=str(error) or type(error).__name__)

    def report_lags(self, lags: dict[tuple[str, int], int]) -> None:
        """The input partitions' consumer lag, as health gauges ``consumer_lag:{topic}:{partition}``."""
        for (topic, partition), lag in lags.items():
            if lag >= 0:  # -1: not known yet
                self.topology.health.gauge(f"consumer_lag:{topic}:{partition}", lag)
        if self.marks is not None:
            self.marks.report_lags({InputMarks.key(topic, partition): lag for (topic, partition), lag in lags.items()})

    async def run(self) -> None:
        """Read the input topics until cancelled, in the consumer group ``<app id>-ingest``.

        A failure of the reader (Kafka unreachable, a broker restart) does not stop the worker:
        the reader starts again after a growing delay and reads on from the committed offsets
        (what it had handled since is read again, and deduplicated downstream).
        """
        topology = self.topology

        async def read() -> None:
            await read_inputs(
                topology.settings,
                self.input_topics,
                topology.internal + "ingest",
                self.handle,
                self.commits,
                self.report_lags,
            )

        # customers of a slice that was not sent would stay on the gate's path for ever: the input
        # is read again from the commits, and their events may take either path
        await run_restarting(read, "ingest.failed", on_failure=self.on_gate_path.clear)


def register(topology: Topology) -> Ingest:
    """Start the input reader as an app task (after the worker is ready; Faust cancels it on shutdown)."""
    ingest = Ingest(topology)

    @topology.app.task  # type: ignore[untyped-decorator]
    async def read_input_topics() -> None:
        await ingest.run()

    if topology.settings.gate_bypass:

        @topology.app.task  # type: ignore[untyped-decorator]
        async def follow_gate_decisions() -> None:
            await ingest.decisions_reader.run()

        @topology.app.task  # type: ignore[untyped-decorator]
        async def follow_gate_commits() -> None:
            await ingest.run_gate_path()

    if ingest.marks is not None:

        @topology.app.task  # type: ignore[untyped-decorator]
        async def send_watermark_marks() -> None:
            await ingest.run_marks()

    return ingest
