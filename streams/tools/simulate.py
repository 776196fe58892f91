"""``loyalty simulate``: the storefront traffic model (:mod:`streams.tools.storefront`) sent to the input topics.

:func:`run_simulation` publishes the generated events to Kafka, live (event time is the
wall clock when the event is made, sending paced by a token bucket on the monotonic
clock) or historical (event times from ``start_ms``, as fast as Kafka acknowledges), one
event per message or batches of ``batch`` events per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from metrics.events import INPUT_TOPICS
from metrics.timegrid import parse_duration
from metrics.validation import MAX_BATCH_EVENTS, parse_timestamp
from streams.settings import Settings
from streams.tools.storefront import DEFAULT_CUSTOMERS, DEFAULT_STORES, ChurnSpike, NpsDrop, Storefronts
from streams.worker.topics import KafkaUnreachable, start_input_producer

__all__ = [
    "SimulationError",
    "SimulationOptions",
    "SimulationStats",
    "TokenBucket",
    "parse_churn_spike",
    "parse_nps_drop",
    "parse_start",
    "run_simulation",
]

DEFAULT_RATE = 200.0
#: byte budget of one batch message: under Kafka's default 1 MiB message limit
MAX_MESSAGE_BYTES = 900 * 1024
#: how many produced messages may wait for their acknowledgement at once
MAX_IN_FLIGHT = 256
#: live batches wait at most this long for more events of their topic
MAX_LINGER_S = 0.5
#: how often the progress callback is called
PROGRESS_INTERVAL_S = 0.1

# -- options ---------------------------------------------------------------------------------


def parse_start(text: str) -> int:
    """``--start``: RFC 3339 with an offset, or epoch milliseconds.

    >>> parse_start("2024-03-01T12:00:00Z"), parse_start("1709294400000")
    (1709294400000, 1709294400000)
    """
    text = text.strip()
    try:
        return parse_timestamp(int(text)) if text.isdigit() else parse_timestamp(text)
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc} (or epoch milliseconds)") from None


@dataclass(frozen=True)
class SpikeSpec:
    """``--churn-spike AT:FACTOR`` as given: ``offset_ms`` after the start, or at ``at_ms``."""

    factor: float
    offset_ms: int | None = None
    at_ms: int | None = None

    def resolve(self, store_index: int, start_ms: int) -> ChurnSpike:
        """The spike on the event-time axis of a run whose (live or historical) start is ``start_ms``."""
        at_ms = self.at_ms if self.at_ms is not None else start_ms + (self.offset_ms or 0)
        return ChurnSpike(store_index, at_ms, self.factor)


def _parse_at(at: str) -> tuple[int | None, int | None]:
    """AT of ``AT:...``: (offset from the start, None) or (None, epoch ms)."""
    if at[-1:].isalpha() and not at[:1].isalpha() and "T" not in at:
        return parse_duration(at), None
    return None, parse_start(at)


@dataclass(frozen=True)
class DropSpec:
    """``--nps-drop AT:DURATION`` as given: from ``offset_ms`` after the start (or ``at_ms``) for ``duration_ms``."""

    duration_ms: int
    offset_ms: int | None = None
    at_ms: int | None = None

    def resolve(self, store_index: int, start_ms: int) -> NpsDrop:
        """The drop on the event-time axis of a run whose (live or historical) start is ``start_ms``."""
        at_ms = self.at_ms if self.at_ms is not None else start_ms + (self.offset_ms or 0)
        return NpsDrop(store_index, at_ms, self.duration_ms)


def parse_nps_drop(text: str) -> DropSpec:
    """``AT:DURATION``; AT as in ``--churn-spike`` (an offset like ``2h``, RFC 3339 or epoch ms), DURATION like ``1d``.

    >>> parse_nps_drop("20d:2d")
    DropSpec(duration_ms=172800000, offset_ms=1728000000, at_ms=None)
    >>> parse_nps_drop("2024-03-01T12:00:00Z:6h").at_ms
    1709294400000
    """
    at, sep, duration_text = text.strip().rpartition(":")
    if not sep or not at:
        raise ValueError(f"{text!r} is not AT:DURATION (e.g. 10m:1h)")
    duration_ms = parse_duration(duration_text)
    offset_ms, at_ms = _parse_at(at)
    return DropSpec(duration_ms, offset_ms=offset_ms, at_ms=at_ms)


def parse_churn_spike(text: str) -> SpikeSpec:
    """``AT:FACTOR``; AT is an offset from the start (``30s``, ``2h``, ``10d``), RFC 3339 or epoch ms.

    >>> parse_churn_spike("30s:8")
    SpikeSpec(factor=8.0, offset_ms=30000, at_ms=None)
    >>> parse_churn_spike("2024-03-01T12:00:00Z:5").at_ms
    1709294400000
    """
    at, sep, factor_text = text.strip().rpartition(":")
    if not sep or not at:
        raise ValueError(f"{text!r} is not AT:FACTOR (e.g. 30s:10)")
    try:
        factor = float(factor_text)
    except ValueError:
        raise ValueError(f"{factor_text!r} is not a number (FACTOR of AT:FACTOR)") from None
    if not math.isfinite(factor) or factor <= 0:
        raise ValueError(f"FACTOR must be a positive number, not {factor_text!r}")
    offset_ms, at_ms = _parse_at(at)
    return SpikeSpec(factor, offset_ms=offset_ms, at_ms=at_ms)


@dataclass(frozen=True)
class SimulationOptions:
    """What ``loyalty simulate`` does (see :func:`run_simulation`)."""

    rate: float = DEFAULT_RATE
    duration_ms: int | None = None
    events: int | None = None
    stores: int = DEFAULT_STORES
    customers: int = DEFAULT_CUSTOMERS
    seed: int = 1
    start_ms: int | None = None
    churn_spike: SpikeSpec | None = None
    nps_drop: DropSpec | None = None
    spike_store: int = 0  # 0-based index, of the churn spike and the NPS drop
    batch: int = 1
    #: live runs only: first publish ``backfill_events`` events covering the ``backfill_ms`` before now,
    #: ``backfill_batch`` events per message (a backfill is a replay: batched, as the SPEC allows)
    backfill_ms: int | None = None
    backfill_events: int = 0
    backfill_batch: int = 500

    def __post_init__(self) -> None:
        if not self.rate > 0 or not math.isfinite(self.rate):
            raise ValueError("--rate must be a positive number of events per second")
        if not 1 <= self.batch <= MAX_BATCH_EVENTS or not 1 <= self.backfill_batch <= MAX_BATCH_EVENTS:
            raise ValueError(f"--batch must be 1..{MAX_BATCH_EVENTS}")
        if self.stores < 1 or self.customers < 1:
            raise ValueError("--stores and --customers must be at least 1")
        if not 0 <= self.spike_store < self.stores:
            raise ValueError(f"the spike store must be one of store-1..store-{self.stores}")
        if self.start_ms is not None and self.historical_events() is None:
            raise ValueError("a historical run (--start) needs --events or --duration")
        if self.start_ms is not None and self.backfill_ms:
            raise ValueError("a historical run (--start) has no backfill")

    @property
    def live(self) -> bool:
        return self.start_ms is None

    def historical_events(self) -> int | None:
        """How many events a historical run sends: ``events``, else ``rate`` x ``duration``."""
        if self.events is not None:
            return self.events
        if self.duration_ms is not None:
            return max(1, round(self.rate * self.duration_ms / 1000))
        return None

    def historical_span_ms(self) -> int:
        """The event-time span of a historical run: ``duration``, else ``events / rate``."""
        if self.duration_ms is not None:
            return self.duration_ms
        return round((self.historical_events() or 0) * 1000 / self.rate)


# -- sending ---------------------------------------------------------------------------------


class TokenBucket:
    """Pacing at ``rate`` tokens per second on a monotonic clock, with bursts of at most ``burst``.

    Tokens accrue from elapsed time (never from fixed sleeps), so a slow iteration is made
    up by the next ones and the long-run rate does not drift.

    >>> now = [0.0]
    >>> bucket = TokenBucket(100.0, burst=10, clock=lambda: now[0])
    >>> bucket.take(50), bucket.take(50)
    ((1, 0.0), (0, 0.01))
    >>> now[0] = 1.0; bucket.take(50)
    (10, 0.0)
    """

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self.clock = clock
        self.tokens = 1.0
        self.last = clock()

    def take(self, want: int) -> tuple[int, float]:
        """Up to ``want`` whole tokens now, or none and the seconds until the next one."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        granted = min(want, int(self.tokens))
        if granted:
            self.tokens -= granted
            return granted, 0.0
        return 0, (1.0 - self.tokens) / self.rate


class SimulationError(Exception):
    """A fatal problem (Kafka unreachable, a bad historical span) with an operator-facing message."""


@dataclass
class SimulationStats:
    """What a run did so far; passed to the progress callback and returned at the end."""

    seed: int
    target: int | None = None  # events expected, when known
    generated: int = 0
    delivered: int = 0
    messages: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    first_ms: int | None = None
    last_ms: int | None = None
    phase: str = "live"
    per_type: Counter[str] = field(default_factory=Counter)
    per_store: Counter[str] = field(default_factory=Counter)
    spike: ChurnSpike | None = None
    drop: NpsDrop | None = None
    store_ids: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def rate(self) -> float:
        """Acknowledged events per second since the start."""
        seconds = self.seconds
        return self.delivered / seconds if seconds > 0 else 0.0

    def text(self) -> str:
        """The summary printed by ``loyalty simulate``."""
        from streams.sinks.snapshots import rfc3339_ms

        lines = [
            f"sent {self.delivered:,} events in {self.messages:,} messages in {self.seconds:.1f}s "
            f"({self.rate:,.0f} events/s), seed {self.seed}"
        ]
        if self.first_ms is not None and self.last_ms is not None:
            lines.append(f"  event times {rfc3339_ms(self.first_ms)} .. {rfc3339_ms(self.last_ms)}")
        if self.per_store:
            lines.append("  " + ", ".join(f"{store}: {count:,}" for store, count in sorted(self.per_store.items())))
        if self.per_type:
            lines.append("  " + ", ".join(f"{kind}: {count:,}" for kind, count in sorted(self.per_type.items())))
        if self.spike is not None:
            lines.append(
                f"  churn spike: {self.store_ids[self.spike.store_index]} from {rfc3339_ms(self.spike.at_ms)}, "
                f"x{self.spike.factor:g} closures, no orders"
            )
        if self.drop is not None:
            lines.append(
                f"  NPS drop: {self.store_ids[self.drop.store_index]} from {rfc3339_ms(self.drop.at_ms)} "
                f"to {rfc3339_ms(self.drop.at_ms + self.drop.duration_ms)}, NPS answers mostly detractors"
            )
        return "\n".join(lines)


def wall_clock_ms() -> int:
    """The wall clock in epoch milliseconds."""
    return time.time_ns() // 1_000_000


class _SwitchClock:
    """Virtual (evenly spaced) event times for a historical phase, then the wall clock."""

    def __init__(self) -> None:
        self.start_ms = 0
        self.step_ms = 0.0
        self.count = 0
        self.virtual = False

    def historical(self, start_ms: int, span_ms: int, events: int) -> None:
        self.start_ms, self.step_ms, self.count, self.virtual = start_ms, span_ms / max(events, 1), 0, True

    def __call__(self) -> int:
        if not self.virtual:
            return wall_clock_ms()
        value = self.start_ms + int(self.count * self.step_ms)
        self.count += 1
        return value


Progress = Callable[[SimulationStats], None]


async def _start_producer(settings: Settings) -> AIOKafkaProducer:
    try:
        return await start_input_producer(settings, linger_ms=5)
    except KafkaUnreachable as exc:
        raise SimulationError(str(exc)) from None


async def run_simulation(
    settings: Settings,
    options: SimulationOptions,
    progress: Progress | None = None,
    stop: asyncio.Event | None = None,
) -> SimulationStats:
    """Publish simulated traffic to the prefixed input topics until done or ``stop`` is set.

    Live (``options.start_ms`` is None): after an optional backfill, each event's time is the
    wall clock when it is made; sending is paced at ``options.rate`` and ends after
    ``duration_ms``, after ``events`` events, or when ``stop`` is set (every buffered event is
    still sent). Historical: ``historical_events()`` events with times evenly spread over
    ``historical_span_ms()`` from ``start_ms``, sent as fast as Kafka acknowledges; the span
    must end before now. ``AT`` of a churn spike or an NPS drop counts from the start of the live
    part (or from ``start_ms``). ``progress(stats)`` is called about every 0.1 s and at the end.
    """
    now = wall_clock_ms()
    clock = _SwitchClock()
    if options.start_ms is not None:
        span = options.historical_span_ms()
        if options.start_ms + span > now + settings.max_future_skew_ms:
            raise SimulationError(
                "a historical run must end before now: --start plus the span "
                f"({span / 1000:,.0f}s) reaches into the future; leave out --start for a live run"
            )
        spike_origin = options.start_ms
    else:
        spike_origin = now
    spike = options.churn_spike.resolve(options.spike_store, spike_origin) if options.churn_spike else None
    drop = options.nps_drop.resolve(options.spike_store, spike_origin) if options.nps_drop else None
    generator = Storefronts(seed=options.seed, stores=options.stores, customers=options.customers,
                            clock=clock, churn_spike=spike, nps_drop=drop)
    stats = SimulationStats(seed=options.seed, spike=spike, drop=drop, store_ids=generator.store_ids)
    stop = stop or asyncio.Event()
    producer = await _start_producer(settings)
    topics = {name: settings.topic(name) for name in INPUT_TOPICS}
    buffers: dict[str, list[bytes]] = {name: [] for name in INPUT_TOPICS}
    sizes: dict[str, int] = dict.fromkeys(INPUT_TOPICS, 1)
    since: dict[str, float] = {}
    pending: deque[tuple[asyncio.Future[Any], int]] = deque()
    last_report = 0.0
    batch = options.batch  # the backfill's own while it runs

    def report(force: bool = False) -> None:
        nonlocal last_report
        if progress is not None and (force or time.monotonic() - last_report >= PROGRESS_INTERVAL_S):
            last_report = time.monotonic()
            progress(stats)

    async def settle(keep: int) -> None:
        while len(pending) > keep:
            future, count = pending.popleft()
            await future
            stats.delivered += count
            report()

    async def send(topic: str, value: bytes, key: bytes | None, count: int) -> None:
        pending.append((await producer.send(topics[topic], value, key=key), count))
        stats.messages += 1
        await settle(MAX_IN_FLIGHT)

    async def flush(topic: str) -> None:
        parts = buffers[topic]
        if parts:
            buffers[topic], sizes[topic] = [], 1
            since.pop(topic, None)
            await send(topic, b"[" + b",".join(parts) + b"]", None, len(parts))

    async def publish_one() -> None:
        topic, body = next(generator)
        stats.generated += 1
        time_ms = generator.last_ms
        if stats.first_ms is None:
            stats.first_ms = time_ms
        stats.last_ms = time_ms
        stats.per_type[body["type"]] += 1
        stats.per_store[body["store_id"]] += 1
        value = orjson.dumps(body)
        if batch == 1:
            key = body.get("customer_id") or body["store_id"]
            await send(topic, value, key.encode(), 1)
            return
        if sizes[topic] + len(value) + 1 > MAX_MESSAGE_BYTES:
            await flush(topic)
        buffers[topic].append(value)
        sizes[topic] += len(value) + 1
        since.setdefault(topic, time.monotonic())
        if len(buffers[topic]) >= batch:
            await flush(topic)

    async def pause(seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=seconds)

    async def historical(start_ms: int, span_ms: int, events: int, phase: str) -> None:
        stats.phase = phase
        clock.historical(start_ms, span_ms, events)
        for _ in range(events):
            if stop.is_set():
                break
            await publish_one()
            if stats.generated % 64 == 0:
                await asyncio.sleep(0)  # let acknowledgements and signals in
                report()
        for topic in INPUT_TOPICS:
            await flush(topic)
        clock.virtual = False

    async def live(limit: int | None, duration_ms: int | None) -> None:
        stats.phase = "live"
        bucket = TokenBucket(options.rate, burst=max(options.rate, 1.0))  # a stall of up to 1 s is made up
        started = time.monotonic()
        deadline = started + duration_ms / 1000 if duration_ms is not None else None
        made = 0
        while not stop.is_set() and (limit is None or made < limit):
            now_s = time.monotonic()
            if deadline is not None and now_s >= deadline:
                break
            for topic, first in list(since.items()):
                if now_s - first >= MAX_LINGER_S:
                    await flush(topic)
            granted, wait = bucket.take(64 if limit is None else min(64, limit - made))
            for _ in range(granted):
                await publish_one()
            made += granted
            report()
            if not granted:
                if deadline is not None:
                    wait = min(wait, max(deadline - now_s, 0.0))
                if since:
                    wait = min(wait, MAX_LINGER_S)
                await pause(wait)
        for topic in INPUT_TOPICS:
            await flush(topic)

    try:
        if options.start_ms is not None:
            stats.target = options.historical_events()
            await historical(options.start_ms, options.historical_span_ms(), stats.target or 0, "history")
        else:
            if options.backfill_ms and options.backfill_events > 0:
                batch = options.backfill_batch
                await historical(now - options.backfill_ms, options.backfill_ms, options.backfill_events,
                                 "backfill")
                batch = options.batch
            if options.events is not None:
                stats.target = stats.generated + options.events
            elif options.duration_ms is not None:
                stats.target = stats.generated + round(options.rate * options.duration_ms / 1000)
            await live(options.events, options.duration_ms)
        await settle(0)
    except KafkaError as exc:
        raise SimulationError(
            f"Kafka at {settings.kafka_bootstrap_servers} failed after {stats.delivered} acknowledged events: {exc}"
        ) from None
    finally:
        stats.finished = time.monotonic()
        for future, _ in pending:
            future.cancel()
        with contextlib.suppress(Exception):
            await producer.stop()
    report(force=True)
    return stats


def progress_bar(stats_target: int | None, description: str = "simulate"):  # type: ignore[no-untyped-def]
    """A rich progress bar on stderr and the callback that updates (and first starts) it: ``(bar, callback)``."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskProgressColumn, TimeElapsedColumn
    from rich.text import Text

    class SendRate(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(f"{int(task.completed):,} events  {task.fields.get('rate', 0.0):,.0f} events/s  "
                        f"{task.fields.get('phase', '')}", style="progress.data.speed")

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        TaskProgressColumn(),
        SendRate(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    task = bar.add_task(description, total=stats_target, rate=0.0, phase="")
    recent: deque[tuple[float, int]] = deque(maxlen=30)

    def update(stats: SimulationStats) -> None:
        if not bar.live.is_started:
            bar.start()  # on the first report: a run that fails at once draws no bar
        now = time.monotonic()
        recent.append((now, stats.delivered))
        then, before = recent[0]
        rate = (stats.delivered - before) / (now - then) if now - then > 0.5 else stats.rate
        bar.update(task, completed=stats.delivered, total=stats.target, rate=rate, phase=stats.phase)

    return bar, update
