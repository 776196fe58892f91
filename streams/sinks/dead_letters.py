"""Dead letters: the record of SPEC section 3 for an input element that was not accepted.

The stages build these records (:func:`dead_letter`); the worker sends them to the
``loyalty-dead-letters`` topic with the rest of what a stage routes
(:meth:`streams.worker.topology.Topology.send_routed`), keyed by the element's identity
(:func:`dead_letter_key`), all those of one input partition to one dead-letter partition
(:func:`dead_letter_partition`), so that :class:`DeadLetterLedger` can send each once.
"""

from __future__ import annotations

import base64
import bisect
import time
import zlib
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

from streams.connections import KafkaTarget, kafka_client_options

DEAD_LETTER_SCHEMA = "loyalty.dead_letter.v1"
#: the most original bytes a dead letter carries. Their base64 (4/3 as long) and the rest of the record stay
#: under Kafka's default message limit of 1 MiB: a message of up to 1 MiB (or more, when it came compressed)
#: could not be dead-lettered whole, the send would fail and the input reader would try again for ever.
#: Longer originals are cut here: ``raw_bytes`` is their whole length, ``raw_truncated`` says they were cut.
MAX_DEAD_LETTER_RAW = 512 * 1024
#: how long (wall clock) after a stage's dead letter a second copy of its element can still arrive: the
#: ingest, restarted, forwards again only what it forwarded since its last commit (about every second)
REFORWARD_WINDOW_S = 60.0


def dead_letter(
    reason: str,
    detail: str,
    raw: bytes,
    source: tuple[str, int, int],
    index: int | None,
    now_ms: int,
) -> dict[str, Any]:
    """The dead-letter record of SPEC section 3 (original bytes in base64, at most :data:`MAX_DEAD_LETTER_RAW`).

    >>> letter = dead_letter("invalid_json", "x", b"{" * (MAX_DEAD_LETTER_RAW + 1), ("orders", 0, 7), None, 0)
    >>> letter["raw_bytes"], letter["raw_truncated"], len(base64.b64decode(letter["raw_base64"])) == MAX_DEAD_LETTER_RAW
    (524289, True, True)
    """
    topic, partition, offset = source
    size = len(raw)
    return {
        "schema": DEAD_LETTER_SCHEMA,
        "reason": reason,
        "detail": detail,
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "index": index,
        "raw_base64": base64.b64encode(raw[:MAX_DEAD_LETTER_RAW]).decode(),
        "raw_bytes": size,
        "raw_truncated": size > MAX_DEAD_LETTER_RAW,
        "rejected_at_ms": now_ms,
    }



def dead_letter_key(letter: dict[str, Any]) -> bytes:
    """The identity of a dead letter, its message key: ``topic|partition|offset|index`` (index empty when none).

    >>> dead_letter_key({"topic": "orders", "partition": 2, "offset": 41, "index": None})
    b'orders|2|41|'
    """
    index = letter["index"]
    return f"{letter['topic']}|{letter['partition']}|{letter['offset']}|{'' if index is None else index}".encode()


def dead_letter_partition(topic: str, partition: int, partitions: int) -> int:
    """The dead-letter partition of every dead letter of one input partition (so a reader can find them).

    >>> dead_letter_partition("orders", 2, 8) == dead_letter_partition("orders", 2, 8)
    True
    """
    return zlib.crc32(f"{topic}|{partition}".encode()) % partitions


class _Positions:
    """Per dead-letter partition, a position at or before every dead letter a reader sends from now on."""

    kafka: KafkaTarget
    topic: str

    def __init__(self) -> None:
        #: dead-letter partition -> a position at or before every dead letter sent from now on
        self.positions: dict[int, int] = {}

    def record(self, partition: int, offset: int) -> None:
        """A dead letter Kafka acknowledged at ``offset`` of dead-letter ``partition``."""
        if offset + 1 > self.positions.get(partition, 0):
            self.positions[partition] = offset + 1

    async def _read_since(self, partitions: set[int], wanted: dict[int, int]) -> list[Any]:
        """Move the positions of ``partitions`` to their ends; the records from ``wanted`` positions up to them."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        from streams.worker.log_reader import read_to_end

        if not partitions:
            return []
        consumer = AIOKafkaConsumer(**kafka_client_options(self.kafka), enable_auto_commit=False)
        await consumer.start()
        try:
            ends = await consumer.end_offsets([TopicPartition(self.topic, p) for p in sorted(partitions)])
            for tp, end in ends.items():
                self.positions[tp.partition] = max(self.positions.get(tp.partition, 0), end)
            reading = [tp for tp in ends if tp.partition in wanted and wanted[tp.partition] < ends[tp]]
            if not reading:
                return []
            consumer.assign(reading)
            starts = {tp: wanted[tp.partition] for tp in reading}
            return [record async for record in read_to_end(consumer, starts, ends)]
        finally:
            await consumer.stop()


class DeadLetterLedger(_Positions):
    """What the dead-letter topic already holds of the input partitions a reader owns: each bad element once.

    After a crash, the input is read again from the committed offsets, and so are its bad
    elements. With each offset commit the reader stores, as the commit's metadata, a position
    in the dead-letter partition of that input partition that is at or before every dead letter
    it sends later (:meth:`commit_metadata`). When a reader is assigned the input partition, it
    reads the dead-letter partition from that position to its end (:meth:`on_assigned`): those are
    the dead letters sent after the commit, whose elements it is about to read again, and
    :meth:`already_sent` keeps them from being sent twice.

    Until the reader has committed past the element of such a dead letter, its commits keep a
    position at or before that letter too: a reader that dies halfway through reading again
    leaves its successor the same knowledge.
    """

    def __init__(self, kafka: KafkaTarget, dead_letter_topic: str, partitions: int) -> None:
        super().__init__()
        self.kafka = kafka
        self.topic = dead_letter_topic
        self.partitions = partitions
        #: input (topic, partition) -> identities (offset, index) of dead letters already in the topic
        self.sent: dict[tuple[str, int], set[tuple[int, int | None]]] = {}
        #: input (topic, partition) -> (element offset, dead-letter offset) of the dead letters read back on
        #: assignment whose elements are not committed past yet, in element order
        self.learnt: dict[tuple[str, int], list[tuple[int, int]]] = {}

    def partition_of(self, topic: str, partition: int) -> int:
        """The dead-letter partition of an input partition."""
        return dead_letter_partition(topic, partition, self.partitions)

    def commit_metadata(self, topic: str, partition: int, offset: int) -> str:
        """The metadata to commit with ``offset`` (the next to read) of the input partition: a dead-letter
        position at or before every dead letter of an element from ``offset`` on, read back or sent later.

        The reader is past the elements before ``offset``: their read-back dead letters are forgotten here.
        """
        position = self.positions.get(self.partition_of(topic, partition), 0)
        learnt = self.learnt.get((topic, partition))
        if learnt:
            passed = bisect.bisect_left(learnt, (offset, -1))
            del learnt[:passed]
            if learnt:
                position = min(position, min(letter_offset for _, letter_offset in learnt))
        return str(position)

    def already_sent(self, letter: dict[str, Any]) -> bool:
        """Whether the dead letter of this element is in the topic already (sent before a crash)."""
        sent = self.sent.get((letter["topic"], letter["partition"]))
        return sent is not None and (letter["offset"], letter["index"]) in sent

    def on_revoked(self, topic: str, partition: int) -> None:
        """The input partition is no longer this reader's."""
        self.sent.pop((topic, partition), None)
        self.learnt.pop((topic, partition), None)

    async def on_assigned(self, committed: dict[tuple[str, int], tuple[int, str | None]]) -> None:
        """Learn the dead letters sent since each assigned input partition's commit (``(offset, metadata)``).

        Input partitions without a commit, or whose commit carries no position, start from the
        current end of their dead-letter partition.
        """
        wanted: dict[int, int] = {}
        for (topic, partition), (_, metadata) in committed.items():
            self.sent[(topic, partition)] = set()
            self.learnt[(topic, partition)] = []
            if metadata and metadata.isdigit():
                dead_partition = self.partition_of(topic, partition)
                wanted[dead_partition] = min(int(metadata), wanted.get(dead_partition, int(metadata)))
        for record in await self._read_since({self.partition_of(*tp) for tp in committed}, wanted):
            self._learn(record.key, record.offset, committed)
        for source in committed:
            self.learnt[source].sort()

    def _learn(self, key: bytes | None, letter_offset: int,
               committed: dict[tuple[str, int], tuple[int, str | None]]) -> None:
        if not key:
            return
        parts = key.decode(errors="replace").rsplit("|", 3)
        if len(parts) != 4 or not parts[1].isdigit() or not parts[2].isdigit():
            return
        source = (parts[0], int(parts[1]))
        if source not in committed:
            return
        offset = int(parts[2])
        if offset < committed[source][0]:
            return  # before the commit: that element is not read again
        index = int(parts[3]) if parts[3].isdigit() else None
        self.sent[source].add((offset, index))
        self.learnt[source].append((offset, letter_offset))


class StageLedger(_Positions):
    """The dead letters a stage after the ingest sends (the gate's currency mismatches), each once.

    A stage sees an element twice in two ways. (1) Its own input is read again from its committed
    offsets after a crash. (2) The ingest, after its own crash, forwards again what it had
    forwarded since its last commit: the same element arrives at a second, later offset, possibly
    after the stage committed past the first one. The ingest commits about every second, so
    such a second copy follows the first within :data:`REFORWARD_WINDOW_S` of wall-clock time.

    So the stage commits, as its offsets' metadata, a position per dead-letter partition at or
    before every dead letter it sent in the last :data:`REFORWARD_WINDOW_S` or sends later
    (:meth:`commit_metadata`). On an assignment it reads each dead-letter partition from the
    earliest such position of the partitions it starts (:meth:`learn`); it also remembers what it
    sends itself (:meth:`remember`), for the same window. :meth:`already_sent` keeps the dead
    letters known either way, of its ``reasons``, from being sent twice.
    """

    def __init__(self, kafka: KafkaTarget, dead_letter_topic: str, partitions: int, reasons: set[str],
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.kafka = kafka
        self.topic = dead_letter_topic
        self.partitions = partitions
        self.reasons = reasons
        self.clock = clock
        #: identities ``topic|partition|offset|index`` of dead letters in the topic -> when they became known
        self.sent: dict[bytes, float] = {}
        #: (clock, positions then), oldest first: the first is the newest at least the window old, if any
        self.snapshots: deque[tuple[float, dict[int, int]]] = deque()

    def commit_metadata(self) -> str:
        """The metadata to commit with the stage's offsets: ``{dead-letter partition: position}`` as JSON.

        The positions as they were :data:`REFORWARD_WINDOW_S` ago (or the oldest known).
        """
        now = self.clock()
        self.snapshots.append((now, dict(self.positions)))
        while len(self.snapshots) > 1 and self.snapshots[1][0] <= now - REFORWARD_WINDOW_S:
            self.snapshots.popleft()
        # a second copy of those elements can no longer come. Keys are in the order they became known (a
        # key known again keeps its place, and so is kept a little longer): the expired ones lead
        sent = self.sent
        while sent:
            key = next(iter(sent))
            if sent[key] >= now - REFORWARD_WINDOW_S:
                break
            del sent[key]
        return orjson.dumps({str(partition): position for partition, position in self.snapshots[0][1].items()}).decode()

    def already_sent(self, letter: dict[str, Any]) -> bool:
        """Whether this element's dead letter is in the topic already (sent before, by this stage or its last run)."""
        return dead_letter_key(letter) in self.sent

    def remember(self, letters: list[dict[str, Any]]) -> None:
        """Dead letters this stage has just sent: a re-forwarded copy of their elements is not sent again."""
        now = self.clock()
        for letter in letters:
            self.sent[dead_letter_key(letter)] = now

    async def learn(self, metadata: list[str]) -> None:
        """Read the dead letters sent since the commits whose ``metadata`` the started partitions carry."""
        wanted: dict[int, int] = {}
        for text in metadata:
            try:
                found = orjson.loads(text) if text else {}
            except orjson.JSONDecodeError:
                continue  # not ours (an older commit): nothing to learn from it
            if not isinstance(found, dict):
                continue
            for partition, position in found.items():
                if str(partition).isdigit() and isinstance(position, int):
                    wanted[int(partition)] = min(position, wanted.get(int(partition), position))
        now = self.clock()
        for record in await self._read_since(set(range(self.partitions)), wanted):
            if record.key and record.value:
                try:
                    reason = orjson.loads(record.value).get("reason")
                except (orjson.JSONDecodeError, AttributeError):
                    continue
                if reason in self.reasons:
                    self.sent[record.key] = now
        # until a snapshot is the window old, commits keep the positions this learnt from: the dead
        # letters read here may still get second copies, from an ingest that restarted with this stage
        started_from = {**self.positions, **wanted}
        for _, positions in self.snapshots:  # an earlier assignment's window is not over yet either
            for partition, position in positions.items():
                started_from[partition] = min(position, started_from.get(partition, position))
        self.snapshots = deque([(now - REFORWARD_WINDOW_S, started_from)])
