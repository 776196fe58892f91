"""Ingest: the input topics, read in bulk by :mod:`streams.worker.input_reader`, validated and routed by store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from aiokafka import ConsumerRecord

from metrics.events import INPUT_TOPICS
from streams.logs import get_logger
from streams.sinks.dead_letters import DeadLetterLedger
from streams.stages.ingest import IngestStage
from streams.stages.routed import Routed
from streams.worker.input_reader import read_inputs
from streams.worker.topics import DEAD_LETTER_TOPIC
from streams.worker.topology import Topology, wall_ms

log = get_logger(__name__)

#: the first and the longest wait before the input reader starts again after a failure
RESTART_FIRST_S = 1.0
RESTART_MAX_S = 30.0


class Ingest:
    """Validates each fetch of input records and sends its events to the by-store topic."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        settings = topology.settings
        self.stage = IngestStage(topology.partitions, settings.max_future_skew_ms)
        self.prefix = settings.topic_prefix
        self.input_topics = [settings.topic(name) for name in INPUT_TOPICS]
        self.ledger = DeadLetterLedger(
            settings.kafka_bootstrap_servers, settings.topic(DEAD_LETTER_TOPIC), topology.partitions
        )

    async def handle(self, records: Sequence[ConsumerRecord]) -> None:
        """Validate one fetch of input records and route its events by store (acknowledged by Kafka)."""
        topology = self.topology
        await topology.outputs.declare()
        routed = Routed()
        now = wall_ms()
        prefix = self.prefix
        for record in records:
            topic_name = record.topic
            name = topic_name[len(prefix):] if topic_name.startswith(prefix) else topic_name
            self.stage.process(name, (topic_name, record.partition, record.offset), record.value, now, routed)
        topology.health.count("events_received", routed.accepted + len(routed.dead_letters))
        ledger = self.ledger
        # elements read again after a crash whose dead letters are in the topic already
        routed.dead_letters = [letter for letter in routed.dead_letters if not ledger.already_sent(letter)]
        for metadata in await topology.send_routed(topology.by_store, routed, wait=True):
            ledger.record(metadata.partition, metadata.offset)

    def report_lags(self, lags: dict[tuple[str, int], int]) -> None:
        """The input partitions' consumer lag, as health gauges ``consumer_lag:{topic}:{partition}``."""
        for (topic, partition), lag in lags.items():
            self.topology.health.gauge(f"consumer_lag:{topic}:{partition}", lag)

    async def run(self) -> None:
        """Read the input topics until cancelled, in the consumer group ``<app id>-ingest``.

        A failure of the reader (Kafka unreachable, a broker restart) does not stop the worker:
        the reader starts again after a growing delay and reads on from the committed offsets
        (what it had handled since is read again, and deduplicated downstream).
        """
        topology = self.topology
        delay_s = 0.0
        while True:
            started = time.monotonic()
            try:
                await read_inputs(
                    topology.settings.kafka_bootstrap_servers,
                    self.input_topics,
                    topology.internal + "ingest",
                    self.handle,
                    self.ledger,
                    self.report_lags,
                )
                return
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if time.monotonic() - started > RESTART_MAX_S:
                    delay_s = 0.0  # it had been running well: a new failure starts the delays over
                delay_s = min(RESTART_MAX_S, max(RESTART_FIRST_S, 2 * delay_s))
                log.warning("ingest.failed", error=str(error) or type(error).__name__, retry_in_s=delay_s)
                await asyncio.sleep(delay_s)


def register(topology: Topology) -> Ingest:
    """Start the input reader as an app task (after the worker is ready; Faust cancels it on shutdown)."""
    ingest = Ingest(topology)

    @topology.app.task  # type: ignore[untyped-decorator]
    async def read_input_topics() -> None:
        await ingest.run()

    return ingest
