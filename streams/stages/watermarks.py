"""In-band watermark marks: the low watermark of the input partitions, carried through every stage (SPEC 7).

A boundary B is sampled once every input partition that has data has passed B + grace (its
largest event time), or has been idle for ``LOYALTY_ALERT_IDLE`` of processing time. Only the
ingest sees the input partitions, and every stage reads its input in order, so the ingest sends
a *mark* after the events it routed, to every by-store partition, and to every by-customer
partition for the events it sent there around the gate (``from`` = the number of partitions);
each later stage forwards what it knows after the outputs of the same batch. A mark that reaches
a stage is therefore behind every event it speaks for, on every path.

A mark message (an internal message, packed like the others) is::

    {"marks": {"<topic>|<partition>": [largest event time ms, idle] | null, ...}, "from": upstream partition}

``null`` means the input partition has data that has not been routed yet (it holds the
watermark back); an input partition without any data is not listed. ``from`` is the partition
of the stage that sent it (absent from the ingest's marks: the gate relays them with its own).

A stage merges, per input partition, the marks of every upstream partition: the smallest
time, idle only when idle on every path, unknown (``null``) until every upstream partition
has sent one. A stage that restarted knows nothing until marks come again: it holds the
watermark back rather than guessing it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: a mark of one input partition: [largest event time, idle], or None (data not routed yet)
Mark = list[Any] | None
MARKS = "marks"
#: a stage sends marks at most this often per path, only when changed, or every MARKS_REPEAT_S anyway
#: (a downstream stage that restarted learns them again while no event comes). Each send is a message
#: to every downstream partition (P x P per hop), and a boundary waits ``LOYALTY_ALERT_GRACE`` (an
#: hour by default) anyway: a second's delay changes no sample
MARKS_INTERVAL_S = 1.0
MARKS_REPEAT_S = 5.0
#: with the wall clock an idle input partition's time moves with it, in steps of this much: a
#: quiet system's marks then change, and go out, once per step instead of at every interval
IDLE_WALL_STEP_MS = 5_000


def is_marks(message: object) -> bool:
    """Whether an internal message is a mark message (events and deltas are lists, the clock is ``{"wm"}``).

    >>> is_marks({"marks": {}}), is_marks([]), is_marks({"wm": 1})
    (True, False, False)
    """
    return isinstance(message, dict) and MARKS in message


def combine(marks: list[Mark]) -> Mark:
    """One input partition's marks from several paths: the smallest time, idle only if idle on all.

    >>> combine([[5, False], [3, True]]), combine([[5, True], [3, True]]), combine([[5, False], None])
    ([3, False], [3, True], None)
    """
    if any(mark is None for mark in marks):
        return None
    times = [mark[0] for mark in marks if mark is not None]
    return [min(times), all(mark[1] for mark in marks if mark is not None)]


class MarkMerger:
    """The marks of one stage: per own partition, the latest marks of each upstream partition."""

    def __init__(self, upstream_partitions: int) -> None:
        self.upstream_partitions = upstream_partitions
        #: own partition -> upstream partition -> input partition -> mark
        self.received: dict[int, dict[int, dict[str, Mark]]] = {}

    def receive(self, partition: int, upstream: int, marks: Mapping[str, Mark]) -> None:
        """Marks from ``upstream`` arrived on ``partition`` (later marks of an input partition replace earlier)."""
        self.received.setdefault(partition, {}).setdefault(upstream, {}).update(marks)

    def forget(self, partition: int | None = None) -> None:
        """Forget what arrived (on one partition, or all): after a restart or a reassignment."""
        if partition is None:
            self.received.clear()
        else:
            self.received.pop(partition, None)

    def merged(self, partition: int) -> dict[str, Mark]:
        """Per input partition: the marks of every upstream partition combined (``None`` until all sent one).

        >>> merger = MarkMerger(2)
        >>> merger.receive(0, 0, {"o|0": [10, False]}); merger.merged(0)
        {'o|0': None}
        >>> merger.receive(0, 1, {"o|0": [7, False]}); merger.merged(0)
        {'o|0': [7, False]}
        """
        by_upstream = self.received.get(partition, {})
        keys: set[str] = set()
        for marks in by_upstream.values():
            keys.update(marks)
        # :func:`combine` of every upstream partition's mark, inline: called after every batch of a stage
        paths = [by_upstream.get(upstream) for upstream in range(self.upstream_partitions)]
        merged: dict[str, Mark] = {}
        for key in sorted(keys):
            smallest: Any = None
            idle = True
            for path in paths:
                mark = None if path is None else path.get(key)
                if mark is None:
                    smallest = None
                    break
                if smallest is None or mark[0] < smallest:
                    smallest = mark[0]
                idle = idle and bool(mark[1])
            merged[key] = None if smallest is None else [smallest, idle]
        return merged


def low_watermark(marks: Mapping[str, Mark]) -> int | None:
    """The low watermark of merged marks: the smallest time of the busy input partitions.

    ``None`` while an input partition's mark is unknown, or when there are none. When every
    input partition is idle, the largest time: nothing more is known to come.

    >>> low_watermark({"o|0": [10, False], "o|1": [4, False], "r|0": [2, True]})
    4
    >>> low_watermark({"o|0": [10, True], "o|1": [4, True]}), low_watermark({"o|0": [1, False], "o|1": None})
    (10, None)
    """
    if not marks or any(mark is None for mark in marks.values()):
        return None
    busy = [mark[0] for mark in marks.values() if mark is not None and not mark[1]]
    if busy:
        return int(min(busy))
    return int(max(mark[0] for mark in marks.values() if mark is not None))


class InputMarks:
    """What the ingest knows of its input partitions: largest event time routed, last data, lag."""

    def __init__(self, idle_ms: int) -> None:
        self.idle_ms = idle_ms
        #: "topic|partition" -> largest event time routed (acknowledged by Kafka)
        self.latest: dict[str, int] = {}
        #: "topic|partition" -> processing time (monotonic ms) of its last routed data
        self.last_data: dict[str, float] = {}
        #: "topic|partition" -> its lag at the last report (None before the first report)
        self.lags: dict[str, int] | None = None

    @staticmethod
    def key(topic: str, partition: int) -> str:
        """The name of an input partition in marks (the topic as in Kafka, prefix included)."""
        return f"{topic}|{partition}"

    def routed(self, times: Mapping[str, int], now: float) -> None:
        """A fetch's largest event time per input partition, now acknowledged downstream."""
        for key, time_ms in times.items():
            if key not in self.latest or time_ms > self.latest[key]:
                self.latest[key] = time_ms
            self.last_data[key] = now

    def restore(self, key: str, latest_ms: int, now: float) -> None:
        """The largest event time routed from an input partition before this reader had it (its commit's).

        A reader that takes a partition over (a restart, a rebalance) knows it from the offset
        commit: without it, a partition read to its end before a crash would be marked by no one,
        and the stale "busy" marks of the reader that crashed would hold every watermark back for
        ever (event clock). Idle from ``now`` on, like a partition that just routed data.

        >>> marks = InputMarks(idle_ms=1000); marks.report_lags({"o|0": 0})
        >>> marks.restore("o|0", 70, now=0.0); marks.marks(500.0, None), marks.marks(1000.0, None)
        ({'o|0': [70, False]}, {'o|0': [70, True]})
        >>> marks.routed({"o|0": 60}, now=1000.0); marks.restore("o|0", 50, now=1000.0); marks.latest
        {'o|0': 70}
        """
        if key not in self.latest or latest_ms > self.latest[key]:
            self.latest[key] = latest_ms
        self.last_data.setdefault(key, now)

    def report_lags(self, lags: Mapping[str, int]) -> None:
        """The assigned input partitions and their lags, -1 when not known yet (replaces the previous report)."""
        self.lags = dict(lags)

    def marks(self, now: float, wall_now_ms: int | None) -> dict[str, Mark] | None:
        """The marks to send, ``None`` before the assignment is known (a first fetch may hold one partition only).

        ``now`` is processing time (monotonic ms); with ``wall_now_ms`` (the wall clock) an idle
        partition's time moves with the wall clock, in steps of :data:`IDLE_WALL_STEP_MS`, so
        samples go on while no event comes.

        >>> marks = InputMarks(idle_ms=1000); marks.report_lags({"o|0": 5, "o|1": 0, "o|2": 0})
        >>> marks.routed({"o|2": 70}, now=0.0); marks.marks(500.0, None)
        {'o|0': None, 'o|2': [70, False]}
        >>> marks.routed({"o|0": 90}, now=600.0); marks.lags = {"o|0": 0, "o|1": 0, "o|2": 0}
        >>> marks.marks(1200.0, None)
        {'o|0': [90, False], 'o|2': [70, True]}
        >>> marks.marks(1200.0, 12_345)  # the wall clock: idle partitions, and those without data, are at least now
        {'o|0': [90, False], 'o|1': [10000, True], 'o|2': [10000, True]}
        >>> marks.report_lags({"o|0": 0, "o|1": -1, "o|2": 0}); marks.marks(1200.0, None)  # o|1: end not known
        {'o|0': [90, False], 'o|1': None, 'o|2': [70, True]}
        """
        if self.lags is None:
            return None
        if wall_now_ms is not None:
            wall_now_ms -= wall_now_ms % IDLE_WALL_STEP_MS
        result: dict[str, Mark] = {}
        # only the partitions assigned now: one that moved to another worker is that worker's to mark
        for key in sorted(self.lags):
            lag = self.lags.get(key)
            latest = self.latest.get(key)
            if latest is None:
                if lag:
                    result[key] = None  # data that has not been routed yet (or maybe: lag not known)
                elif wall_now_ms is not None:
                    result[key] = [wall_now_ms, True]  # wall clock: a quiet system still samples as time passes
                continue  # event clock: no data at all is not a partition that holds samples back
            idle = lag == 0 and now - self.last_data.get(key, now) >= self.idle_ms
            if idle and wall_now_ms is not None:
                latest = max(latest, wall_now_ms)
            result[key] = [latest, idle]
        return result
