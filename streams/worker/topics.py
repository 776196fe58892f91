"""Kafka topic administration shared by the producers (replay, simulate) and the tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from metrics.events import INPUT_TOPICS
from streams.connections import KafkaAccessError, KafkaTarget, check_kafka, kafka_client_options
from streams.settings import Settings


async def ensure_topics(
    kafka: KafkaTarget,
    names: Iterable[str],
    partitions: int,
    replication: int = 1,
    config: dict[str, str] | None = None,
) -> None:
    """Create the topics that do not exist yet (existing ones are left as they are)."""
    admin = AIOKafkaAdminClient(**kafka_client_options(kafka))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(name, num_partitions=partitions, replication_factor=replication, topic_configs=config or {})
            for name in names
            if name not in existing
        ]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # created concurrently by a worker: fine
                await admin.create_topics(missing)
    finally:
        await admin.close()


def internal_topic(settings: Settings, name: str) -> str:
    """The name of an internal topic of the app (prefixed, and per app id)."""
    return settings.topic(f"{settings.app_id}-{name}")


#: the share of uncompacted bytes in a log's closed segments at which the broker's cleaner compacts
#: it (Kafka's default, 0.5, lets a compacted topic hold twice its live records)
MIN_CLEANABLE_DIRTY_RATIO = "0.1"
#: segments of the compacted topics: the cleaner compacts closed segments only, so a busy log's
#: active segment (at most this size, or a minute of records) is all it leaves uncompacted
COMPACTED_SEGMENT_CONFIG = {"segment.ms": "60000", "segment.bytes": str(16 * 1024 * 1024),
                            "min.cleanable.dirty.ratio": MIN_CLEANABLE_DIRTY_RATIO}
#: internal topics of the pipeline, in processing order
INTERNAL_TOPICS = ("events-by-store", "events-by-customer", "deltas", "checkpoints")
#: segments of the internal topics whose records the worker deletes: Kafka frees disk a whole
#: segment at a time, never the active one, so each partition keeps up to one segment of records
#: already deleted (its default segment, 1 GiB, would keep gigabytes)
INTERNAL_SEGMENT_BYTES = str(8 * 1024 * 1024)
#: topic configs of the internal topics: the two repartition topics are deleted by their readers
#: below their committed offsets (streams.worker.contiguous), and never by time; the deltas topic
#: is the aggregation's log, which the worker deletes below each checkpoint (never by time: a
#: worker down for long would find a hole); the checkpoints topic is compacted, in small segments,
#: so the cleaner keeps it near the size of one checkpoint of every store
TOPIC_CONFIGS = {
    "events-by-store": {"retention.ms": "-1", "segment.bytes": INTERNAL_SEGMENT_BYTES},
    "events-by-customer": {"retention.ms": "-1", "segment.bytes": INTERNAL_SEGMENT_BYTES},
    "deltas": {"retention.ms": "-1", "segment.bytes": INTERNAL_SEGMENT_BYTES},
    "checkpoints": {
        "cleanup.policy": "compact",
        # a checkpoint every few seconds of a busy store would fill a 10-minute segment with
        # hundreds of megabytes that a restore then reads through
        **COMPACTED_SEGMENT_CONFIG,
        "delete.retention.ms": "600000",
    },
}
#: the partial ``*`` read points of every deltas partition (one partition: one worker sums them)
STAR_PARTIALS_TOPIC = "star-partials"
#: the partitions' alert samples of their partial ``*``, summed by the ``*`` owner (one partition);
#: deleted below the ``*`` checkpoint's offset once its round is durable, and kept a week at most:
#: a ``*`` owner away longer than that finds samples gone (they count as nothing)
STAR_SAMPLES_TOPIC = "star-samples"
STAR_SAMPLES_RETENTION_MS = 7 * 86_400_000
OUTPUT_TOPIC = "loyalty-metrics"
DEAD_LETTER_TOPIC = "loyalty-dead-letters"
#: alerts of SPEC section 7, keyed ``{store_id}|{kind}``
ALERTS_TOPIC = "loyalty-alerts"


async def ensure_pipeline_topics(settings: Settings) -> None:
    """Every topic the pipeline reads or writes, before a worker joins its group.

    Faust creates the topics it declares only after the first partition
    assignment; topics missing at that moment are left out of the assignment
    until the next rebalance, and a worker would sit idle. Creating them first
    avoids that race.
    """
    await ensure_input_topics(settings)
    await ensure_topics(
        settings,
        [internal_topic(settings, name) for name in INTERNAL_TOPICS if name not in TOPIC_CONFIGS]
        + [settings.topic(DEAD_LETTER_TOPIC), settings.topic(ALERTS_TOPIC)],
        settings.partitions,
        settings.replication_factor,
    )
    for name, config in TOPIC_CONFIGS.items():
        await ensure_topics(
            settings,
            [internal_topic(settings, name)],
            settings.partitions,
            settings.replication_factor,
            config=config,
        )
    await ensure_topics(
        settings,
        [internal_topic(settings, STAR_PARTIALS_TOPIC)],
        1,
        settings.replication_factor,
        # compacted in small segments, as the checkpoints: the `*` owner reads it from its start
        config={"cleanup.policy": "compact", **COMPACTED_SEGMENT_CONFIG},
    )
    await ensure_topics(
        settings,
        [internal_topic(settings, STAR_SAMPLES_TOPIC)],
        1,
        settings.replication_factor,
        # deleted below the `*` checkpoint in small segments, as the deltas are: Kafka frees a whole
        # closed segment at a time
        config={"retention.ms": str(STAR_SAMPLES_RETENTION_MS), "segment.bytes": INTERNAL_SEGMENT_BYTES},
    )
    await ensure_topics(
        settings,
        [settings.topic(OUTPUT_TOPIC)],
        settings.partitions,
        settings.replication_factor,
        config={"cleanup.policy": "compact"},
    )
    # the tables' changelogs too (Faust names them by app id alone): created by Faust at start,
    # one could still be missing from the metadata of the first assignment and be left out of it
    from streams.worker.tables import TABLE_NAMES

    await ensure_topics(
        settings,
        [f"{settings.app_id}-{name}-changelog" for name in TABLE_NAMES],
        settings.partitions,
        settings.replication_factor,
        config={"cleanup.policy": "compact", **COMPACTED_SEGMENT_CONFIG},
    )


async def ensure_input_topics(settings: Settings) -> None:
    """The five input topics with ``LOYALTY_PARTITIONS`` partitions, so that producers never auto-create them."""
    await ensure_topics(
        settings,
        [settings.topic(name) for name in INPUT_TOPICS],
        settings.partitions,
        settings.replication_factor,
    )


class KafkaUnreachable(Exception):
    """Kafka did not answer: a message for the operator, not a traceback."""


async def start_input_producer(settings: Settings, *, linger_ms: int) -> AIOKafkaProducer:
    """A started, idempotent producer for the input topics, which it creates first when missing."""
    servers = settings.kafka_bootstrap_servers
    try:
        await check_kafka(settings)
    except KafkaAccessError as exc:
        raise KafkaUnreachable(str(exc)) from None
    producer = AIOKafkaProducer(
        **kafka_client_options(settings),
        acks="all",
        enable_idempotence=True,
        max_request_size=2 * 1024 * 1024,
        linger_ms=linger_ms,
        request_timeout_ms=30_000,
    )
    try:
        await ensure_input_topics(settings)
        await producer.start()
    except (KafkaError, OSError) as exc:
        with contextlib.suppress(Exception):
            await producer.stop()
        raise KafkaUnreachable(f"cannot reach Kafka at {servers}: {exc}") from None
    return producer
