"""The Faust application: one factory, configured from :class:`streams.settings.Settings`.

Agents, tables and timers are not defined here: :func:`create_app` hands the app to
:func:`streams.worker.pipeline.register_pipeline`, the one place where the pipeline is wired.
"""

from __future__ import annotations

from typing import Any

import faust
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread, Consumer, Producer

from streams.connections import faust_credentials
from streams.settings import Settings, load_settings
from streams.worker.pipeline import register_pipeline

#: Faust store URLs; faust-streaming's ``rocksdb://`` store runs on rocksdict
STORES = {"rocksdb": "rocksdb://", "memory": "memory://"}


def faust_options(settings: Settings) -> dict[str, object]:
    """Keyword arguments of :class:`faust.App` for ``settings`` (separate so tests can inspect them)."""
    return {
        "broker": settings.broker_urls,
        # SASL and TLS of KAFKA_SECURITY_PROTOCOL (None: PLAINTEXT)
        "broker_credentials": faust_credentials(settings),
        "store": STORES[settings.store],
        # A standby copies another worker's table partitions record by record as they are written
        # (Faust's default is one), a large share of each worker's time, so that a failover skips
        # reading the changelog. Kafka Streams' default is none, and so is ours.
        "table_standby_replicas": settings.standby_replicas,
        "datadir": str(settings.state_dir / "worker" / f"{settings.app_id}-{settings.web_port}"),
        "autodiscover": False,
        "web_enabled": True,
        "web_port": settings.web_port,
        # Faust's own views (its tables among them) are for this machine's operator only
        "web_bind": "127.0.0.1",
        "topic_partitions": settings.partitions,
        "topic_replication_factor": settings.replication_factor,
        "consumer_auto_offset_reset": "earliest",
        # A short linger: every stage sends a few packed messages per batch (the input reader's
        # fetches gather 25 ms of live traffic), and each of the four hops waits for it, so the
        # linger adds to a live event's latency four times over.
        "producer_linger": 0.005,
        "producer_max_batch_size": 256 * 1024,
        "producer_max_request_size": 2 * 1024 * 1024,
        # Faust reads only the internal topics, whose messages are packed batches of at most 900 KB
        # (the input topics have their own reader): a message or two per partition and fetch are
        # plenty, and what the fetcher holds is this times the worker's partitions.
        "consumer_max_fetch_size": 1024 * 1024,
        "broker_max_poll_records": 500,
        # A worker that dies (SIGKILL, a lost machine) keeps its partitions until its session
        # expires: with Faust's 60 s nothing of them moves for a minute. 10 s (heartbeats every
        # 3 s) hands them over quickly; the worker never blocks its loop that long.
        "broker_session_timeout": 10.0,
        "broker_heartbeat_interval": 3.0,
        # messages an agent's stream may hold before the fetcher pauses: packed ones, so a few dozen
        # hold thousands of events, and a backlog keeps the buffers full
        "stream_buffer_maxsize": 32,
    }


class IdempotentProducer(Producer):
    """Faust's producer with ``enable_idempotence``: a send retried after a lost acknowledgement
    (a broker restarting mid-request) is written once, not twice."""

    def _settings_extra(self) -> dict[str, Any]:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


#: how long the broker may hold the worker's fetch when none of its partitions has new data. aiokafka
#: keeps one fetch in flight per broker, and a partition whose records were just handed to an agent
#: joins only the next fetch: with Faust's 1.5 s, the in-flight fetch of the quiet partitions held
#: the busy ones back for up to 1.5 s at every hop (the stages of a live event stood idle for seconds).
FETCH_MAX_WAIT_MS = 20


class ShortFetchConsumerThread(AIOKafkaConsumerThread):
    """Faust's consumer thread, its aiokafka consumer fetching with :data:`FETCH_MAX_WAIT_MS`."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # read by the consumer's fetcher when it starts (Faust passes a fixed 1,500 ms)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer


class ShortFetchConsumer(Consumer):
    """Faust's consumer with :class:`ShortFetchConsumerThread`."""

    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        return ShortFetchConsumerThread(self, loop=self.loop, beacon=self.beacon)


def create_app(settings: Settings | None = None) -> faust.App:
    """A new Faust app for ``settings`` (read from the environment when omitted), pipeline registered."""
    settings = settings if settings is not None else load_settings()
    app = faust.App(settings.app_id, **faust_options(settings))  # type: ignore[arg-type]
    # every stage, table and dead letter goes through this one producer
    app.transport.Producer = IdempotentProducer  # type: ignore[misc]
    app.transport.Consumer = ShortFetchConsumer  # type: ignore[misc]
    register_pipeline(app, settings)
    return app
