"""``loyalty replay``: publish a JSON-lines file of events to the input topics in batches.

Each non-blank line is one event object. Its input topic comes from its ``type``
(:data:`metrics.events.TYPE_TOPIC`); runs of consecutive events bound for the same
topic are packed into JSON-array batch messages (SPEC section 3) of at most
``batch`` events and at most :data:`MAX_MESSAGE_BYTES`. Replay does not validate
events: the worker does that and dead-letters what is wrong. A line is reported as
invalid here only when no topic can be chosen for it (not JSON, not an object, an
unknown ``type``) or when it cannot fit in a message; it is not sent, and the run
goes on.

The elements of a batch are the lines' own bytes (stripped), so numbers reach the
worker exactly as written in the file.

>>> messages, invalid, events = plan_messages(
...     ['{"type": "order.placed", "event_id": "a"}', "", "oops",
...      '{"type": "order.refunded", "event_id": "b"}', '{"type": "loyalty.enrolled"}'], batch=500)
>>> [(topic, value.count(b"event_id")) for topic, value in messages], events
([('orders', 2), ('loyalty-activity', 0)], 3)
>>> [(line_no, reason.split(":")[0]) for line_no, reason in invalid]
[(3, 'invalid JSON')]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskProgressColumn, TimeElapsedColumn
from rich.text import Text

from metrics.events import INPUT_TOPICS, TYPE_TOPIC
from metrics.validation import MAX_BATCH_EVENTS
from streams.settings import Settings
from streams.worker.topics import KafkaUnreachable, start_input_producer

DEFAULT_BATCH = 500
#: byte budget of one batch message: under Kafka's default 1 MiB message limit, with room for headers
MAX_MESSAGE_BYTES = 900 * 1024
#: how many produced messages may wait for their acknowledgement at once
MAX_IN_FLIGHT = 64

Message = tuple[str, bytes]


class ReplayError(Exception):
    """A fatal replay problem (file unreadable, Kafka unreachable) with an operator-facing message."""


def _topic_of(text: bytes, forced_topic: str | None) -> tuple[str | None, str]:
    """The input topic of one stripped line, or ``None`` and the reason it cannot be sent."""
    try:
        body = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return None, f"invalid JSON: {str(exc)[:160]}"
    if not isinstance(body, dict):
        return None, f"not a JSON object (a JSON {type(body).__name__ if body is not None else 'null'})"
    if len(text) + 2 > MAX_MESSAGE_BYTES:
        return None, f"event of {len(text)} bytes does not fit in a message of {MAX_MESSAGE_BYTES} bytes"
    if forced_topic is not None:
        return forced_topic, ""
    kind = body.get("type")
    if not isinstance(kind, str):
        return None, "no event type (field 'type' missing or not a string)"
    topic = TYPE_TOPIC.get(kind)
    if topic is None:
        return None, f"unknown event type {kind[:80]!r}"
    return topic, ""


@dataclass
class Plan:
    """What :func:`iter_messages` found so far: counts and the invalid lines."""

    lines: int = 0
    events: int = 0
    bytes_read: int = 0
    invalid: list[tuple[int, str]] = field(default_factory=list)


def iter_messages(
    lines: Iterable[str | bytes], batch: int, plan: Plan | None = None, topic: str | None = None
) -> Iterator[tuple[str, bytes, int]]:
    """Yield ``(topic, value, event_count)`` batch messages lazily, in line order.

    ``plan`` (if given) is updated as lines are consumed: line and event counts and
    the invalid lines ``(line_no, reason)`` (1-based; blank lines count as lines but are
    skipped). ``topic`` sends every event to that input topic instead of its type's.
    """
    if not 1 <= batch <= MAX_BATCH_EVENTS:
        raise ValueError(f"batch must be 1..{MAX_BATCH_EVENTS}, not {batch}")
    if topic is not None and topic not in INPUT_TOPICS:
        raise ValueError(f"{topic!r} is not an input topic ({', '.join(INPUT_TOPICS)})")
    plan = plan if plan is not None else Plan()
    current: str | None = None
    parts: list[bytes] = []
    size = 1  # "[" and "]" less one comma

    for line_no, line in enumerate(lines, start=1):
        raw = line.encode("utf-8", "surrogateescape") if isinstance(line, str) else line
        plan.lines = line_no
        plan.bytes_read += len(raw)
        text = raw.strip()
        if not text:
            continue
        target, reason = _topic_of(text, topic)
        if target is None:
            plan.invalid.append((line_no, reason))
            continue
        if parts and (target != current or len(parts) >= batch or size + len(text) + 1 > MAX_MESSAGE_BYTES):
            assert current is not None
            yield current, b"[" + b",".join(parts) + b"]", len(parts)
            parts, size = [], 1
        current = target
        parts.append(text)
        size += len(text) + 1
        plan.events += 1
    if parts:
        assert current is not None
        yield current, b"[" + b",".join(parts) + b"]", len(parts)


def plan_messages(
    lines: Iterable[str | bytes], batch: int = DEFAULT_BATCH, topic: str | None = None
) -> tuple[list[Message], list[tuple[int, str]], int]:
    """All batch messages ``(topic, value)`` of ``lines``, the invalid lines ``(line_no, reason)`` and the event count.

    >>> messages, invalid, events = plan_messages(['{"type": "survey.responded"}'] * 5, batch=2)
    >>> [value.count(b"survey") for _, value in messages], invalid, events
    ([2, 2, 1], [], 5)
    """
    plan = Plan()
    messages = [(target, value) for target, value, _ in iter_messages(lines, batch, plan, topic)]
    return messages, plan.invalid, plan.events


@dataclass
class ReplaySummary:
    """The outcome of a replay."""

    path: Path
    lines: int
    events: int
    messages: int
    invalid: list[tuple[int, str]]
    seconds: float
    per_topic: dict[str, int]

    def text(self, max_invalid: int = 20) -> str:
        """The summary printed by ``loyalty replay``."""
        rate = self.events / self.seconds if self.seconds > 0 else 0.0
        out = [
            f"{self.path}: {self.lines} lines read, {self.events} events sent in {self.messages} messages "
            f"in {self.seconds:.1f}s ({rate:,.0f} events/s)"
        ]
        if self.per_topic:
            out.append("  " + ", ".join(f"{topic}: {count}" for topic, count in self.per_topic.items()))
        if self.invalid:
            noun = "line" if len(self.invalid) == 1 else "lines"
            out.append(f"{len(self.invalid)} invalid {noun} (not sent):")
            out.extend(f"  line {line_no}: {reason}" for line_no, reason in self.invalid[:max_invalid])
            if len(self.invalid) > max_invalid:
                out.append(f"  ... and {len(self.invalid) - max_invalid} more invalid lines")
        else:
            out.append("no invalid lines")
        return "\n".join(out)


def _progress_bar() -> Progress:

    class EventRate(ProgressColumn):
        def render(self, task: Task) -> Text:
            events = task.fields.get("events", 0)
            elapsed = task.elapsed or 0.0
            rate = events / elapsed if elapsed > 0 else 0.0
            return Text(f"{events:,} events {rate:,.0f}/s", style="progress.data.speed")

    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        TaskProgressColumn(),
        EventRate(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )


def _open(path: Path) -> tuple[BinaryIO, int]:
    """The file for reading (a local file: reading it line by line is fast enough for the event loop)."""
    try:
        handle = path.open("rb")
        return handle, os.fstat(handle.fileno()).st_size
    except OSError as exc:
        raise ReplayError(f"cannot read {path}: {exc.strerror or exc}") from None


async def _start_producer(settings: Settings) -> AIOKafkaProducer:
    try:
        return await start_input_producer(settings, linger_ms=20)
    except KafkaUnreachable as exc:
        raise ReplayError(str(exc)) from None


async def replay(
    settings: Settings, path: Path | str, batch: int = DEFAULT_BATCH, progress: bool = True, topic: str | None = None
) -> ReplaySummary:
    """Publish the events of the JSON-lines file ``path`` (see the module docstring).

    Every message is acknowledged by all in-sync replicas before this returns.
    ``progress`` shows a rich progress bar (bytes read, events acknowledged per
    second) on stderr. Raises :class:`ReplayError` when the file cannot be read or
    Kafka cannot be reached.
    """
    path = Path(path)
    handle, total_bytes = _open(path)
    plan = Plan()
    per_topic: dict[str, int] = {}
    messages = delivered = 0
    pending: deque[tuple[asyncio.Future[object], int]] = deque()
    bar = _progress_bar() if progress else None
    task = bar.add_task(f"replay {path.name[:24]}", total=max(total_bytes, 1), events=0) if bar else None

    async def settle(keep: int) -> None:
        """Wait for acknowledgements until at most ``keep`` messages are in flight."""
        nonlocal delivered
        while len(pending) > keep:
            future, count = pending.popleft()
            await future
            delivered += count
            if bar and task is not None:
                bar.update(task, completed=plan.bytes_read, events=delivered)

    with handle:
        producer = await _start_producer(settings)
        started = time.monotonic()
        try:
            if bar:
                bar.start()
            for target, value, count in iter_messages(handle, batch, plan, topic):
                name = settings.topic(target)
                pending.append((await producer.send(name, value), count))
                messages += 1
                per_topic[name] = per_topic.get(name, 0) + count
                await settle(MAX_IN_FLIGHT)
            await settle(0)
            if bar and task is not None:
                bar.update(task, completed=max(total_bytes, 1), events=delivered)
        except KafkaError as exc:
            raise ReplayError(
                f"Kafka at {settings.kafka_bootstrap_servers} failed after {delivered} acknowledged events: {exc}"
            ) from None
        except OSError as exc:
            raise ReplayError(f"cannot read {path}: {exc.strerror or exc}") from None
        finally:
            if bar:
                bar.stop()
            with contextlib.suppress(Exception):
                await producer.stop()
    return ReplaySummary(
        path=path,
        lines=plan.lines,
        events=plan.events,
        messages=messages,
        invalid=plan.invalid,
        seconds=time.monotonic() - started,
        per_topic=per_topic,
    )
