"""The metric pipeline on a Faust app: one :class:`Topology` shared by the parts in :mod:`streams.worker.agents`.

::

    input topics --ingest--> by-store --gate--> by-customer --facts--> deltas --aggregate--> loyalty-metrics + Redis
         |          \\____________________________/^
         |           (events the gate has decided already skip it)
         \\____________________\\_______________________________________________________--> loyalty-dead-letters

Each part wires one stage of :mod:`streams.stages` (the logic) to its topics, tables and
timers; what they share (topics, tables, the clock, the store shards, the sinks) is this
module's :class:`Topology`, built once per app by :func:`streams.worker.pipeline.register_pipeline`.

Ingest is not a Faust agent: the input topics, the only ones that may carry
one event per message, are read in bulk by :mod:`streams.worker.input_reader`
(its own consumer group; offsets committed once the routed messages are
acknowledged). Every internal message is a packed batch (Faust costs per
message). Each Faust stage reads batches with ``take_events`` and writes each
table key once per batch. Tables route keys with our own partitioner
(:func:`streams.worker.wire.route`), the same that routes the stage's input, so
they never need Faust's "current event" (faust-streaming issue 497) and recover
where their input lives: a worker keeps only the changelog partitions of its
input partitions after a rebalance.

Idempotency, so that at-least-once delivery counts nothing twice:

* the facts stage remembers applied event ids in the customer's own record;
  it writes a batch's facts only *after* Kafka has acknowledged the deltas
  they caused (behind the stage, in order: :mod:`streams.worker.write_behind`),
  so facts are never ahead of the deltas they caused;
* every delta message part carries (input partition, offset, part); the
  aggregation has no table: the deltas topic is its log, checkpointed (and
  deleted below each checkpoint) by :mod:`streams.worker.checkpoints`, and a
  worker that gets a deltas partition restores its checkpoints and folds the
  deltas after them; each store shard keeps, per input partition, the last
  part applied, so a part sent or read again is skipped;
* a stage waits for Kafka to acknowledge its table writes and its output
  before it commits its input offsets (:func:`streams.worker.tables.changelog_written`);
  the stages commit those offsets themselves, not through Faust, and process
  every offset once and in order (:mod:`streams.worker.contiguous`), so no
  committed offset is ahead of the table state that a worker taking the
  partition over recovers.

The clock (``LOYALTY_CLOCK``): ``wall`` is the wall clock; ``event`` is the
latest event time seen, which the facts stage broadcasts as a watermark to
every aggregation partition, so that a store whose partition sees no new
events still advances to the global "now".
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import faust

from metrics.timegrid import Grid
from streams.logs import get_logger
from streams.settings import Settings
from streams.sinks.health import HealthCounters
from streams.sinks.kafka_outputs import KafkaOutputs
from streams.stages.routed import Routed
from streams.worker.acks import acknowledged
from streams.worker.contiguous import Contiguous
from streams.worker.tables import make_table
from streams.worker.topics import STAR_PARTIALS_TOPIC, STAR_SAMPLES_TOPIC, TOPIC_CONFIGS
from streams.worker.wire import pack_chunks

log = get_logger(__name__)

#: messages per processing batch, and how long a batch may wait to fill
BATCH_MAX = 4000
BATCH_WITHIN_S = 0.01


def wall_ms() -> int:
    """The wall clock in epoch milliseconds."""
    return time.time_ns() // 1_000_000


def next_tick_at(started_at: float, interval_s: float, now: float) -> float:
    """When a fixed-rate timer started at ``started_at`` ticks next after ``now``: the first later point
    of its grid ``started_at + k * interval_s``, so the ticks missed while one ran long are skipped.

    >>> next_tick_at(0.0, 0.25, 0.06), next_tick_at(0.0, 0.25, 0.25), next_tick_at(0.0, 0.25, 0.61)
    (0.25, 0.5, 0.75)
    """
    return started_at + (math.floor((now - started_at) / interval_s) + 1) * interval_s


async def run_fixed_rate(
    interval_s: float,
    tick: Callable[[], Awaitable[None]],
    *,
    stopping: Callable[[], bool],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Await ``tick`` at every point of a grid of ``interval_s`` from now, one at a time, until ``stopping()``.

    Faust's timers (mode's ``Timer``) sleep the interval *after* each run, so a timer whose run
    takes 60 ms of a 250 ms interval ticks every 310 ms. The emit ticks on its interval instead,
    like Kafka Streams' wall-clock punctuation: a run that outlasts the interval is followed at
    the next grid point after it ends, never at once and never twice.
    """
    started_at = clock()
    while not stopping():
        now = clock()
        await sleep(max(0.0, next_tick_at(started_at, interval_s, now) - now))
        if stopping():
            return
        await tick()


def grid_of(settings: Settings) -> Grid:
    """The time grid of the settings."""
    windows = tuple(settings.window_ms.values())
    return Grid(settings.bucket_ms, settings.active_horizon_ms, windows, settings.dedupe_ttl_ms)


class PipelineClock:
    """The metric clock of one worker: wall time, or the latest event time seen; never back.

    The store shards fold what no read as of "now" or later needs, so "now" must
    not step back, not even when the system clock does.
    """

    def __init__(self, event_clock: bool) -> None:
        self.event_clock = event_clock
        #: the latest event time seen (event clock)
        self.clock_ms: int | None = None
        self.wall_high_ms = 0
        #: the latest event time the facts stage broadcast as a watermark
        self.broadcast_ms: int | None = None

    def now_ms(self) -> int | None:
        """Now: wall time, or the latest event time seen (``None`` before any)."""
        if self.event_clock:
            return self.clock_ms
        self.wall_high_ms = max(self.wall_high_ms, wall_ms())
        return self.wall_high_ms

    def advance(self, time_ms: int | None) -> None:
        """Move the event clock forward (never back)."""
        if time_ms is not None and (self.clock_ms is None or time_ms > self.clock_ms):
            self.clock_ms = time_ms


class Topology:
    """What the parts of one worker's pipeline share: app, settings, topics, tables, clock, sinks."""

    def __init__(self, app: faust.App, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.grid = grid_of(settings)
        self.partitions = settings.partitions
        #: prefix of the internal topics and agents of this app id
        self.internal = f"{settings.app_id}-"
        self.clock = PipelineClock(settings.clock == "event")
        self.health = HealthCounters()
        self.outputs = KafkaOutputs(app, settings)
        # acks=False: Faust neither tracks nor commits these topics' offsets; each stage does
        # (streams.worker.contiguous explains why)
        self.by_store = self._internal_topic("events-by-store", acks=False)
        self.by_customer = self._internal_topic("events-by-customer", acks=False)
        # the deltas are the aggregation's log, deleted below each checkpoint by the worker
        self.deltas = self._internal_topic("deltas", acks=False, config=dict(TOPIC_CONFIGS["deltas"]))
        self.checkpoints_topic = self.settings.topic(self.internal + "checkpoints")
        self.star_partials_topic = self.settings.topic(self.internal + STAR_PARTIALS_TOPIC)
        self.star_samples_topic = self.settings.topic(self.internal + STAR_SAMPLES_TOPIC)
        self.currencies = make_table(app, "store-currency", self.partitions)
        #: store -> its channels (JSON list, the first 100 to arrive: the gate's channel cap)
        self.channels = make_table(app, "store-channels", self.partitions)
        self.held = make_table(app, "held-events", self.partitions)
        self.facts = make_table(app, "customer-facts", self.partitions)

    @property
    def event_clock(self) -> bool:
        """Whether "now" is the latest event time (``LOYALTY_CLOCK=event``)."""
        return self.clock.event_clock

    def timer(self, interval_s: float, name: str, tick: Callable[[], Awaitable[None]]) -> None:
        """Run ``tick`` every ``interval_s`` as the timer ``name``; a failure is logged, and tried at the next tick.

        An exception that escapes a Faust timer crashes the app: a send to a broker that is away,
        or to the producer already stopped at shutdown, must not.
        """

        async def guarded() -> None:
            try:
                await tick()
            except Exception as error:
                log.warning("timer.failed", timer=name, error=str(error) or type(error).__name__)

        self.app.timer(interval_s, name=self.internal + name)(guarded)

    def contiguous(self, topic: Any, *, committed: bool) -> Contiguous:
        """The in-order guard of a stage input (``committed``: it starts from the group's commits)."""
        return Contiguous(self.app, topic, self.settings, self.partitions,
                          group_id=self.settings.app_id if committed else None)

    def _internal_topic(self, name: str, **options: Any) -> Any:
        return self.app.topic(
            self.settings.topic(self.internal + name),
            key_serializer="raw",
            value_serializer="raw",
            partitions=self.partitions,
            internal=True,
            **options,
        )

    async def send_routed(self, target: Any, routed: Routed, wait: bool = False,
                          offsets: dict[int, int] | None = None) -> list[Any]:
        """Send packed items and dead letters; with ``wait``, until Kafka has acknowledged them all.

        Returns the record metadata of the dead letters (with ``wait``; else their futures). With
        ``wait`` and ``offsets``, sets ``offsets[partition]`` to the last offset of the items sent to it.
        """
        sent = []
        for partition, items in routed.by_partition.items():
            for chunk in pack_chunks(items):
                sent.append(await target.send(value=chunk, partition=partition))
        letters = await self.outputs.send_dead_letters(routed.dead_letters)
        self.health.count("dead_letters", len(routed.dead_letters))
        for letter in routed.dead_letters:
            self.health.count(f"dead_letters:{letter['reason']}")
        if not wait:
            return letters
        # every send settles (delivered or failed) before a failure is raised: a caller that starts
        # again must not race its own sends still in flight (the dead-letter ledger reads them back)
        results = await acknowledged([*sent, *letters], return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        if offsets is not None:
            for metadata in results[:len(sent)]:
                offsets[metadata.partition] = max(metadata.offset, offsets.get(metadata.partition, -1))
        return list(results[len(sent):])
