"""The gate's decisions for the ingest: the ``store-currency`` and ``store-channels`` changelogs, tailed.

The ingest sends an event straight to the facts stage when its gate decisions are taken already
(:class:`streams.stages.gate.GateDecisions`), so that the by-store topic carries only the few events
that may take one, and no partition of it carries a large store's whole traffic. This reader keeps
the ingest's copy of the decisions: it reads every partition of both changelogs from the start and
then follows them. Being behind only sends more events through the gate, which decides them right;
a record it cannot read is skipped (its events then go through the gate too).
"""

from __future__ import annotations

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.connections import KafkaTarget, kafka_client_options
from streams.logs import get_logger
from streams.stages.gate import GateDecisions
from streams.worker.restarts import run_restarting

log = get_logger(__name__)


class GateDecisionsReader:
    """Follows the two changelogs into :attr:`decisions`."""

    def __init__(self, kafka: KafkaTarget, currency_topic: str, channels_topic: str, partitions: int,
                 decisions: GateDecisions) -> None:
        self.kafka = kafka
        self.currency_topic = currency_topic
        self.channels_topic = channels_topic
        self.partitions = partitions
        self.decisions = decisions

    def apply(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        """One changelog record (a store's currency, or its channel list packed as JSON).

        >>> reader = GateDecisionsReader("k:9092", "cur", "chan", 1, GateDecisions())
        >>> reader.apply("cur", b"s", b"EUR"); reader.apply("chan", b"s", b'["web"]'); reader.apply("chan", b"t", b"{")
        >>> reader.decisions.currencies, reader.decisions.channels
        ({'s': 'EUR'}, {'s': frozenset({'web'})})
        """
        if not key or not value:
            return  # the tables never delete: a tombstone is not a decision
        try:
            store_id = key.decode()
            if topic == self.currency_topic:
                self.decisions.learn_currency(store_id, value.decode())
                return
            channels = orjson.loads(value)
        except (UnicodeDecodeError, orjson.JSONDecodeError):
            return
        if isinstance(channels, list) and all(isinstance(channel, str) for channel in channels):
            self.decisions.learn_channels(store_id, channels)

    async def follow(self) -> None:
        """Read both changelogs from the start, then follow them (until cancelled or failed)."""
        consumer = AIOKafkaConsumer(**kafka_client_options(self.kafka), enable_auto_commit=False)
        await consumer.start()
        try:
            partitions = [TopicPartition(topic, partition) for topic in (self.currency_topic, self.channels_topic)
                          for partition in range(self.partitions)]
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            while True:
                batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
                for tp, records in batches.items():
                    for record in records:
                        self.apply(tp.topic, record.key, record.value)
        finally:
            await consumer.stop()

    async def run(self) -> None:
        """Follow the changelogs until cancelled; a failure (Kafka away) starts again after a growing delay."""
        await run_restarting(self.follow, "gate_decisions.failed")
