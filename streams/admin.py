"""Kafka topic administration shared by the producers (replay, simulate) and the tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from metrics.events import INPUT_TOPICS
from streams.settings import Settings


async def ensure_topics(bootstrap: str, names: Iterable[str], partitions: int, replication: int = 1) -> None:
    """Create the topics that do not exist yet (existing ones are left as they are)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(name, num_partitions=partitions, replication_factor=replication)
                   for name in names if name not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # created concurrently by a worker: fine
                await admin.create_topics(missing)
    finally:
        await admin.close()


async def ensure_input_topics(settings: Settings) -> None:
    """The five input topics with ``LOYALTY_PARTITIONS`` partitions, so that producers never auto-create them."""
    await ensure_topics(
        settings.kafka_bootstrap_servers,
        [settings.topic(name) for name in INPUT_TOPICS],
        settings.partitions,
        settings.replication_factor,
    )
