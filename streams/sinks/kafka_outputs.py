"""The worker's Kafka outputs: the compacted ``loyalty-metrics``, ``loyalty-dead-letters`` and ``loyalty-alerts``."""

from __future__ import annotations

import asyncio
from typing import Any

import faust
import orjson

from streams.settings import Settings
from streams.sinks.dead_letters import dead_letter_key, dead_letter_partition
from streams.worker.topics import ALERTS_TOPIC, DEAD_LETTER_TOPIC, OUTPUT_TOPIC


class KafkaOutputs:
    """The output and dead-letter topics of a worker, declared once before the first send."""

    def __init__(self, app: faust.App, settings: Settings) -> None:
        def topic(name: str, **options: Any) -> Any:
            return app.topic(
                settings.topic(name),
                key_serializer="raw",
                value_serializer="raw",
                partitions=settings.partitions,
                internal=True,
                **options,
            )

        self.partitions = settings.partitions
        self.output = topic(OUTPUT_TOPIC, compacting=True)
        self.dead_letters = topic(DEAD_LETTER_TOPIC)
        self.alerts = topic(ALERTS_TOPIC)
        self._declared: asyncio.Task[None] | None = None

    async def declare(self) -> None:
        """Create the topics if missing (once per worker; every caller waits for the same creation).

        Faust creates only the topics it consumes; a topic the broker auto-creates on the first send
        has one partition and no compaction, and a send racing that creation can wait for its
        metadata for the whole producer request timeout, stalling the agent and every commit.
        """
        if self._declared is None:

            async def declare() -> None:
                for sink_topic in (self.output, self.dead_letters, self.alerts):
                    await sink_topic.maybe_declare()

            self._declared = asyncio.ensure_future(declare())
        await asyncio.shield(self._declared)

    async def send_dead_letters(self, letters: list[dict[str, Any]]) -> list[asyncio.Future[Any]]:
        """Queue dead-letter records, keyed by identity, those of one input partition to one partition.

        Returns the futures of Kafka's acknowledgements (their record metadata).
        """
        partitions = self.partitions
        return [
            await self.dead_letters.send(
                key=dead_letter_key(letter),
                value=orjson.dumps(letter),
                partition=dead_letter_partition(letter["topic"], letter["partition"], partitions),
            )
            for letter in letters
        ]

    async def send_snapshot(self, store_id: str, window: str, encoded: bytes) -> None:
        """Queue one snapshot on the compacted output topic, keyed ``store|window``."""
        await self.output.send(key=f"{store_id}|{window}".encode(), value=encoded)

    async def send_alert(self, alert: dict[str, Any], encoded: bytes) -> Any:
        """Queue one alert on ``loyalty-alerts``, keyed ``store|kind``; returns the future of Kafka's ack."""
        return await self.alerts.send(key=f"{alert['store_id']}|{alert['kind']}".encode(), value=encoded)
