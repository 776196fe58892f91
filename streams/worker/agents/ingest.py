"""Ingest: the input topics, read in bulk by :mod:`streams.worker.input_reader`, validated and routed by store."""

from __future__ import annotations

from collections.abc import Sequence

from aiokafka import ConsumerRecord

from metrics.events import INPUT_TOPICS
from streams.stages.ingest import IngestStage
from streams.stages.routed import Routed
from streams.worker.input_reader import read_inputs
from streams.worker.topology import Topology, wall_ms


class Ingest:
    """Validates each fetch of input records and sends its events to the by-store topic."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        settings = topology.settings
        self.stage = IngestStage(topology.partitions, settings.max_future_skew_ms)
        self.prefix = settings.topic_prefix
        self.input_topics = [settings.topic(name) for name in INPUT_TOPICS]

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
        await topology.send_routed(topology.by_store, routed, wait=True)

    async def run(self) -> None:
        """Read the input topics until cancelled, in the consumer group ``<app id>-ingest``."""
        topology = self.topology
        await read_inputs(
            topology.settings.kafka_bootstrap_servers, self.input_topics, topology.internal + "ingest", self.handle
        )


def register(topology: Topology) -> Ingest:
    """Start the input reader as an app task (after the worker is ready; Faust cancels it on shutdown)."""
    ingest = Ingest(topology)

    @topology.app.task  # type: ignore[untyped-decorator]
    async def read_input_topics() -> None:
        await ingest.run()

    return ingest
