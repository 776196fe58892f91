"""Stage 4, the aggregation (by store and ``*``): store shards folded from the deltas, read as metrics."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from metrics.alerts import KINDS, AlertConfig, DetectorState, due_boundaries, evaluate, initial_state, sample_bucket
from metrics.catalog import ALL_STORES
from metrics.store import QUIET_FOR_EVER, ReadPoints, StoreAggregate
from metrics.timegrid import Grid
from streams.worker.wire import pack_kept


class PartitionSum:
    """The partial ``*`` of a deltas partition, read from its stores' aggregates rather than kept as a copy.

    ``*``'s partial of a partition is the sum of the partition's stores, and what is read of it
    (read points, alert samples) adds up over stores, so it is read from the stores themselves:
    the partition's deltas are folded once, and a partition with one large store does not hold its
    blocks twice (with a million customers in five stores, the copies were half of the worker's
    series memory). The stores must not fold past a bucket the partial will still read: the
    publisher folds them no further than the partial's next alert sample.
    """

    def __init__(self) -> None:
        #: store -> its shard: every store of the partition
        self.members: dict[str, StoreShard] = {}
        #: the read points as of :attr:`_bucket`: their sum, and each store's nonzero ones (as JSON: a small
        #: store's read points are mostly zeros, 60 KB as dicts) with its shard's version then
        self._bucket: int | None = None
        self._total = ReadPoints()
        self._points: dict[str, tuple[int, bytes]] = {}

    def stores(self) -> Iterable[StoreAggregate]:
        """The aggregates summed."""
        return [shard.aggregate for shard in self.members.values()]

    def read_points(self, grid: Grid, as_of_bucket: int) -> ReadPoints:
        """The stores' read points summed (:meth:`metrics.store.StoreAggregate.read_points`); not to be changed.

        Kept between calls: only a store whose shard changed since is read again (its old points
        taken out of the sum, its new ones added; integers, so exact), and every store once the
        bucket moves, so an emit costs the stores that changed, not the partition's thousands.
        """
        if as_of_bucket != self._bucket:
            self._bucket, self._total, self._points = as_of_bucket, ReadPoints(), {}
        total, points = self._total, self._points
        for store_id, shard in self.members.items():
            known = points.get(store_id)
            if known is not None and known[0] == shard.version:
                continue
            fresh = shard.aggregate.read_points(grid, as_of_bucket)
            if known is not None:
                old = ReadPoints.from_record(orjson.loads(known[1]))
                total.merge(ReadPoints({name: {bucket: -value for bucket, value in values.items()}
                                        for name, values in old.values.items()}))
            total.merge(fresh)
            nonzero = ReadPoints({name: kept for name, values in fresh.values.items()
                                  if (kept := {bucket: value for bucket, value in values.items() if value})})
            points[store_id] = (shard.version, pack_kept(nonzero.to_record()))  # one per store, kept
        return total

    def alert_points(self, window: int, as_of_bucket: int) -> ReadPoints:
        """The stores' alert read points summed (:meth:`metrics.store.StoreAggregate.alert_points`)."""
        total = ReadPoints()
        for aggregate in self.stores():
            total.merge(aggregate.alert_points(window, as_of_bucket))
        return total

    def alert_quiet_until(self, window: int, as_of_bucket: int) -> int | None:
        """The sum's sample is empty only when every store's is (their counts are never negative), and stays
        so until the first store's may not be: the least of the stores' answers, ``None`` when one has none.
        """
        until = QUIET_FOR_EVER
        for aggregate in self.stores():
            quiet = aggregate.alert_quiet_until(window, as_of_bucket)
            if quiet is None:
                return None
            until = min(until, quiet)
        return until


class StoreShard:
    """One store's (or ``*``'s) aggregate: a fold of the deltas topic, applied at most once per message part.

    The deltas topic is the shard's log: a worker that gets a deltas partition
    restores its shards from their latest checkpoint (:meth:`to_bytes`) and reads
    the partition on from there (:mod:`streams.worker.agents.aggregate`). ``hwm`` keeps,
    per source partition of the facts stage, the latest (offset, part) applied,
    so a part that the facts stage sent again after a crash, or that the agent
    reads again after the rebuild, is skipped: parts of one source partition
    arrive in order.
    """

    def __init__(self, store_id: str) -> None:
        self.store_id = store_id
        self.aggregate = StoreAggregate()
        #: source partition -> [offset, part] of the latest part applied
        self.hwm: dict[int, list[int]] = {}
        #: currencies by store (one for a store; all stores' for ``*``)
        self.currencies: dict[str, str] = {}
        #: the latest event time of the applied deltas
        self.latest_event_ms: int | None = None
        self.floor: int | None = None
        #: set by every apply, cleared by a publication
        self.changed = True
        #: incremented by every apply: a checkpoint knows whether the shard changed since the last one
        self.version = 0
        #: alerts (SPEC 7): the earliest bucket of any delta applied before the first sample (where
        #: sampling starts; no longer read, nor kept up to date, once it has started)
        self.first_bucket: int | None = None
        #: the last step boundary sampled, and the detectors' states after it
        self.sampled_ms: int | None = None
        self.detectors: dict[str, DetectorState] = {}
        #: alert events not yet sent (checkpointed with the shard: a crash sends them again, same ids);
        #: for a partial ``*``, its samples' read points not yet sent to the ``*`` owner instead
        self.outbox: list[dict[str, object]] = []
        #: on the partial ``*`` of the ``*`` store's own partition: the detectors of ``*`` (see StarSampler)
        self.star_sampled_ms: int | None = None
        self.star_detectors: dict[str, DetectorState] = {}
        self.star_outbox: list[dict[str, object]] = []
        #: where the owner reads the star-samples topic from after a restore (every sample of a boundary after
        #: ``star_sampled_ms`` is at or after it), and how far each partition had sampled then
        self.star_samples_offset: int | None = None
        self.star_upto: dict[int, int] = {}
        #: a partial ``*``: its partition's stores, read in place of :attr:`aggregate` (which stays empty)
        self.summed: PartitionSum | None = PartitionSum() if store_id == ALL_STORES else None
        #: :attr:`sampled_ms` as of the shard's latest checkpoint that Kafka holds (a restored shard's is its
        #: own): a partial's stores fold no further than this lets it read, since a restore may bring a store
        #: checkpointed after the partial (each shard's record is its latest)
        self.durable_sampled_ms: int | None = None

    def apply(self, message_source: tuple[int, int, int], entry: dict[str, Any], max_time_ms: int | None) -> bool:
        """Apply one store entry of a delta message part, unless applied already; returns whether it was."""
        return self.apply_entries(message_source, [entry], max_time_ms)

    def apply_entries(
        self, message_source: tuple[int, int, int], entries: list[dict[str, Any]], max_time_ms: int | None
    ) -> bool:
        """Apply store entries of one part (several for a partial ``*``), unless applied already.

        A partial ``*`` takes only what is not read from its stores: where sampling starts, the
        currencies, the latest event time, and that it changed.
        """
        partition, position = message_source[0], [message_source[1], message_source[2]]
        seen = self.hwm.get(partition)
        if seen is not None and seen >= position:
            return False
        self.hwm[partition] = position
        # the earliest bucket matters until the first sample only: a min over every pair is a
        # share of the aggregation's time
        track_first = self.sampled_ms is None
        summed = self.summed is not None
        for entry in entries:
            groups = entry["g"]
            if not summed:
                self.aggregate.add_groups(groups)
            for index in range(1, len(groups) if track_first else 0, 2):
                pairs = groups[index]
                if pairs:
                    earliest = min(pairs[0::2])
                    if self.first_bucket is None or earliest < self.first_bucket:
                        self.first_bucket = earliest
            for store_id, currency in (entry.get("cur") or {}).items():
                self.currencies[store_id] = currency
        if max_time_ms is not None and (self.latest_event_ms is None or max_time_ms > self.latest_event_ms):
            self.latest_event_ms = max_time_ms
        self.changed = True
        self.version += 1
        return True

    def to_bytes(self) -> bytes:
        """The shard as bytes: a JSON head (store, hwm, currencies, latest event time), then the aggregate.

        >>> shard = StoreShard("s1"); shard.apply((0, 7, 0), {"g": ["orders", [10, 2]], "cur": {"s1": "EUR"}}, 5)
        True
        >>> restored = StoreShard.from_bytes(shard.to_bytes())
        >>> restored.store_id, restored.hwm, restored.currencies, restored.aggregate.series["orders"].prefix(10)
        ('s1', {0: [7, 0]}, {'s1': 'EUR'}, 2)
        >>> restored.apply((0, 7, 0), {"g": ["orders", [10, 2]]}, 5)  # applied before the checkpoint
        False
        """
        head = orjson.dumps(
            {
                "store": self.store_id,
                "hwm": [[partition, position] for partition, position in self.hwm.items()],
                "cur": self.currencies,
                "latest": self.latest_event_ms,
                "alerts": {
                    "first": self.first_bucket,
                    "sampled": self.sampled_ms,
                    "detectors": [state.to_record() for state in self.detectors.values()],
                    "outbox": self.outbox,
                    "star": {
                        "sampled": self.star_sampled_ms,
                        "detectors": [state.to_record() for state in self.star_detectors.values()],
                        "outbox": self.star_outbox,
                        "offset": self.star_samples_offset,
                        "upto": [[partition, upto] for partition, upto in self.star_upto.items()],
                    },
                },
            }
        )
        return len(head).to_bytes(4, "big") + head + self.aggregate.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> StoreShard:
        """The shard of :meth:`to_bytes` (published again at the next emit)."""
        size = int.from_bytes(data[:4], "big")
        head = orjson.loads(data[4:4 + size])
        shard = cls(head["store"])
        shard.hwm = {int(partition): list(position) for partition, position in head["hwm"]}
        shard.currencies = dict(head["cur"])
        shard.latest_event_ms = head["latest"]
        alerts = head.get("alerts")  # absent from checkpoints written before alerts
        if alerts is not None:
            shard.first_bucket = alerts["first"]
            shard.sampled_ms = shard.durable_sampled_ms = alerts["sampled"]
            for record in alerts["detectors"]:
                state = DetectorState.from_record(record)
                shard.detectors[state.kind] = state
            shard.outbox = list(alerts["outbox"])
            star = alerts.get("star") or {}
            shard.star_sampled_ms = star.get("sampled")
            for record in star.get("detectors", []):
                state = DetectorState.from_record(record)
                shard.star_detectors[state.kind] = state
            shard.star_outbox = list(star.get("outbox", []))
            shard.star_samples_offset = star.get("offset")
            shard.star_upto = {int(partition): upto for partition, upto in star.get("upto", [])}
        if shard.summed is None:
            shard.aggregate = StoreAggregate.from_bytes(data[4 + size:])
        # a partial ``*`` is read from its stores (:class:`PartitionSum`): the aggregate a checkpoint of an
        # earlier release holds for it is their sum again, and is dropped
        return shard

    def fold(self, as_of_bucket: int, longest: int, cohort_reach: int) -> None:
        """Fold what no read as of ``as_of_bucket`` or later needs into each series' base.

        Memory stays bounded, and the sums exact. A fold that drops whole blocks counts as a
        change for the checkpoints: the next one writes the smaller shard, so neither the
        checkpoint topic nor a restart carries blocks that memory no longer has.
        """
        if self.floor is not None and as_of_bucket <= self.floor:
            return
        self.floor = as_of_bucket
        if self.aggregate.fold_read(as_of_bucket, longest, cohort_reach):
            self.version += 1

    def next_durable_sample_bucket(self, config: AlertConfig) -> int | None:
        """:meth:`next_sample_bucket` as of the latest checkpoint Kafka holds: the sample a restore takes next."""
        return _bucket_after(self.durable_sampled_ms, config)

    def next_sample_bucket(self, config: AlertConfig) -> int | None:
        """The bucket the next sample reads; no fold may pass it. ``None`` before the first sample: no fold at all.

        Until the first sample, where sampling starts is not settled (an event that arrives late
        may still move the store's earliest bucket back), so nothing is folded.
        """
        return _bucket_after(self.sampled_ms, config)

    def _sampled_after(self, config: AlertConfig, low_watermark_ms: int | None) -> int | None:
        if self.sampled_ms is not None:
            return self.sampled_ms
        if self.first_bucket is not None:
            # the first sample is the first boundary at or after the store's earliest data
            return self.first_bucket * config.bucket_ms - 1
        if low_watermark_ms is not None:
            # a shard restored from a checkpoint older than alerts: sampling starts at the watermark
            return low_watermark_ms - config.grace_ms - config.step_ms
        return None

    def sampling_behind_ms(self, low_watermark_ms: int, config: AlertConfig) -> int:
        """How far the last boundary sampled is behind the last one due (0: caught up, or nothing to sample).

        >>> config = AlertConfig(grace_ms=0, step_ms=60_000, bucket_ms=60_000)
        >>> shard = StoreShard("s1"); shard.first_bucket = 10
        >>> shard.sampling_behind_ms(15 * 60_000, config), StoreShard("s2").sampling_behind_ms(15 * 60_000, config)
        (300001, 0)
        """
        after = self._sampled_after(config, None)
        if after is None:
            return 0
        last_due = (low_watermark_ms - config.grace_ms) // config.step_ms * config.step_ms
        return max(0, last_due - after)

    def sample(self, low_watermark_ms: int, config: AlertConfig, limit: int | None = None) -> int:
        """Sample every boundary the low watermark made due, in order, as of each; returns how many.

        Each sample reads the alert window as of its boundary (:func:`metrics.alerts.sample_bucket`)
        and goes through both detectors; their alert events go to :attr:`outbox`. The shard's
        memory is never folded past the next boundary to sample (see :meth:`next_sample_bucket`).

        After an empty sample (no customer active at the window's start, no NPS answer in it) the
        boundaries whose samples are empty too are skipped
        (:meth:`metrics.store.StoreAggregate.alert_quiet_until`): the detectors skip an empty sample
        anyway, so nothing changes but the time, and a store with one event of year 0001 does not
        sample every boundary since. The count includes them; with ``limit``, at most ``limit``
        samples are taken, and ``limit`` is returned when more may be due.
        """
        after = self._sampled_after(config, low_watermark_ms)
        if after is None:
            return 0
        reader = self.aggregate if self.summed is None else self.summed
        window = config.window_ms // config.bucket_ms
        bucket_ms, step = config.bucket_ms, config.step_ms
        last_due = (low_watermark_ms - config.grace_ms) // step * step
        done = covered = 0
        while limit is None or done < limit:
            boundaries = due_boundaries(after, low_watermark_ms, config, None if limit is None else limit - done)
            if not boundaries:
                break
            for boundary in boundaries:
                bucket = sample_bucket(boundary, bucket_ms)
                if self.store_id == ALL_STORES:
                    # a partial ``*``: its read points go to the ``*`` owner, who sums every partition's
                    points = reader.alert_points(window, bucket)
                    self.outbox.append({"b": boundary, "points": points.to_record()})
                else:
                    metrics = self.aggregate.alert_metrics(window, bucket)
                    for kind in KINDS:
                        state = self.detectors.get(kind) or initial_state(kind, self.store_id, config)
                        state, events = evaluate(state, boundary, metrics, config)
                        self.detectors[kind] = state
                        self.outbox.extend(events)
                self.sampled_ms = after = boundary
                done += 1
                covered += 1
                quiet = reader.alert_quiet_until(window, bucket)
                if quiet is not None:
                    # the samples up to the bucket ``quiet`` are empty too: the detectors would skip them,
                    # and a partial's would add nothing at the owner. Jump to the last of them that is due.
                    skip_to = min(((quiet + 1) * bucket_ms - 1) // step * step, last_due)
                    if skip_to > boundary:
                        covered += (skip_to - boundary) // step
                        self.sampled_ms = after = skip_to
                        break
        if done:
            self.version += 1
        return limit if limit is not None and done >= limit else covered

    def read_points(self, grid: Grid, as_of_bucket: int) -> ReadPoints:
        """What :meth:`metrics` reads as of a bucket, as values that add up over shards (a partial: its stores')."""
        reader = self.aggregate if self.summed is None else self.summed
        return reader.read_points(grid, as_of_bucket)

    def metrics(self, grid: Grid, window: int, as_of_bucket: int) -> dict[str, object]:
        """Every metric of the store for a window as of a bucket."""
        monetary = True
        if self.store_id == ALL_STORES:
            monetary = len(set(self.currencies.values())) <= 1
        return self.aggregate.metrics(grid, window, as_of_bucket, monetary)

    def cohorts(self, grid: Grid, as_of_bucket: int) -> dict[str, object]:
        """The store's cohort matrix as of a bucket."""
        return self.aggregate.cohorts(grid, as_of_bucket)

    def currency(self) -> str | None:
        """The store's currency (``*``: the common one), ``None`` when unknown or mixed."""
        distinct = set(self.currencies.values())
        return next(iter(distinct)) if len(distinct) == 1 else None


def _bucket_after(sampled_ms: int | None, config: AlertConfig) -> int | None:
    """The bucket that the sample of the step boundary after ``sampled_ms`` reads (``None``: none sampled)."""
    if sampled_ms is None:
        return None
    return sample_bucket((sampled_ms // config.step_ms + 1) * config.step_ms, config.bucket_ms)


def join_partials(shards: Iterable[tuple[str, StoreShard]], partial_of: Callable[[str], StoreShard]) -> None:
    """Make each store a member of its partition's partial ``*`` (``partial_of``), which reads it in place.

    For shards that did not come through :func:`apply_message`: those a restore read from checkpoints.
    """
    for store_id, shard in shards:
        summed = partial_of(store_id).summed
        assert summed is not None, "a partial ``*`` reads its stores"
        summed.members[store_id] = shard


def apply_message(shards: dict[str, StoreShard], partial: StoreShard, message: list[dict[str, Any]]) -> None:
    """Apply a deltas message's parts to the shards of their stores and to the partition's partial ``*``.

    ``*`` is the sum of every store. Each deltas partition keeps its own partial ``*``, the sum
    of its stores read in place (:class:`PartitionSum`: a new store of the message joins it), and
    ``*`` is published from the partials' read points summed
    (:meth:`metrics.store.StoreAggregate.read_points`), so no partition carries every store's
    rows. The partial skips a part it has noted (its own high-water marks), as stores do.
    """
    for part in message:
        source = (part["src"][0], part["src"][1], part["src"][2])
        latest = part.get("t")
        entries = part["stores"]
        for store_id, entry in entries.items():
            shard = shards.get(store_id)
            if shard is None:
                shard = shards[store_id] = StoreShard(store_id)
            if partial.summed is not None and store_id not in partial.summed.members:
                partial.summed.members[store_id] = shard
            shard.apply(source, entry, latest)
        partial.apply_entries(source, list(entries.values()), latest)


class StarSampler:
    """The ``*`` detectors, on the worker that owns the ``*`` store's partition: the partitions' samples summed.

    Each deltas partition samples its partial ``*`` at every boundary its watermark makes due
    (the read points of the watched metrics, :meth:`metrics.store.StoreAggregate.alert_points`)
    and sends them, with how far it has sampled (``upto``), to the ``star-samples`` topic. A
    boundary of ``*`` is evaluated once every partition has sampled it: the sum of their points
    (a partition without a sample at B had no data before B: it adds nothing). The state lives
    in the partial ``*`` of the ``*`` store's partition (``star_*`` fields), so it is
    checkpointed with it, and so is where to read the topic from after a restore
    (``star_samples_offset``, with each partition's ``upto`` then): a restart reads the samples
    not evaluated yet, not the whole topic.
    """

    def __init__(self, partitions: int, upto: dict[int, int] | None = None) -> None:
        self.partitions = partitions
        #: deltas partition -> how far it has sampled
        self.upto: dict[int, int] = dict(upto or {})
        #: deltas partition -> boundary -> its read points
        self.samples: dict[int, dict[int, ReadPoints]] = {}
        #: (offset, latest boundary) of the messages read with samples, oldest first, until evaluated
        self.unevaluated: deque[tuple[int, int]] = deque()
        #: the offset after the last message read
        self.next_offset: int | None = None

    def receive(self, message: dict[str, Any], offset: int | None = None) -> None:
        """A partition's samples (the first one of a boundary is kept: a resend after a crash is the same),
        read at ``offset`` of the topic."""
        partition = int(message["p"])
        samples = self.samples.setdefault(partition, {})
        latest = None
        for sample in message["samples"]:
            boundary = int(sample["b"])
            if boundary not in samples:
                samples[boundary] = ReadPoints.from_record(sample["points"])
            latest = boundary if latest is None else max(latest, boundary)
        upto = message.get("upto")
        if upto is not None and upto > self.upto.get(partition, upto - 1):
            self.upto[partition] = upto
        if offset is not None:
            if latest is not None:
                self.unevaluated.append((offset, latest))
            self.next_offset = offset + 1

    def due(self, star: StoreShard, config: AlertConfig) -> list[int]:
        """The boundaries of ``*`` every partition has sampled and ``*`` has not, in order, that some partition
        has a sample of: at the others every partition's points were empty (or it had no data yet), so the
        sum is empty and the detectors would skip it (a partition skips its empty stretches, see
        :meth:`StoreShard.sample`)."""
        if len(self.upto) < self.partitions:
            return []
        after = star.star_sampled_ms
        if after is None and not any(self.samples.values()):
            return []
        upto = min(self.upto.values())
        known = {b for samples in self.samples.values() for b in samples
                 if (after is None or b > after) and b <= upto}
        return sorted(known)

    def evaluate(self, star: StoreShard, config: AlertConfig) -> int:
        """Evaluate the due boundaries of ``*``; its alert events go to ``star.star_outbox``. Returns how many."""
        boundaries = self.due(star, config)
        window = config.window_ms // config.bucket_ms
        for boundary in boundaries:
            total = ReadPoints()
            for samples in self.samples.values():
                points = samples.get(boundary)
                if points is not None:
                    total.merge(points)
            metrics = total.alert_metrics(window, sample_bucket(boundary, config.bucket_ms))
            for kind in KINDS:
                state = star.star_detectors.get(kind) or initial_state(kind, ALL_STORES, config)
                state, events = evaluate(state, boundary, metrics, config)
                star.star_detectors[kind] = state
                star.star_outbox.extend(events)
            star.star_sampled_ms = boundary
        upto = min(self.upto.values()) if len(self.upto) == self.partitions else None
        if upto is not None and star.star_sampled_ms is not None and upto > star.star_sampled_ms:
            star.star_sampled_ms = upto  # the boundaries since were all empty
            boundaries.append(upto)
        if boundaries:
            star.version += 1
            self.prune(boundaries[-1])
            while self.unevaluated and self.unevaluated[0][1] <= boundaries[-1]:
                self.unevaluated.popleft()
            # no await since the evaluation: the checkpoint reads these with the detectors they go with
            if self.unevaluated:
                star.star_samples_offset = self.unevaluated[0][0]
            elif self.next_offset is not None:
                star.star_samples_offset = self.next_offset
            star.star_upto = dict(self.upto)
        return len(boundaries)

    def behind_ms(self, star: StoreShard, config: AlertConfig) -> int:
        """How far the evaluation of ``*`` lags the partition that has sampled furthest (0: none ahead).

        The samples in between are held here and kept in the topic until evaluated: while one
        partition lags the others (a replay, a partition moving), they pile up.

        >>> sampler = StarSampler(2, {0: 900_000, 1: 2_700_000}); star = StoreShard(ALL_STORES)
        >>> config = AlertConfig(step_ms=900_000)
        >>> star.star_sampled_ms = 900_000; sampler.behind_ms(star, config)
        1800000
        >>> StarSampler(2).behind_ms(star, config)
        0
        """
        if not self.upto:
            return 0
        furthest = max(self.upto.values())
        evaluated = star.star_sampled_ms
        if evaluated is None:
            # nothing evaluated yet: behind by every boundary held, the first one included
            held = [boundary for samples in self.samples.values() for boundary in samples]
            return furthest - min(held) + config.step_ms if held else 0
        return max(0, furthest - evaluated)

    def prune(self, upto: int) -> None:
        """Forget the samples of boundaries ``*`` has evaluated."""
        for samples in self.samples.values():
            for boundary in [b for b in samples if b <= upto]:
                del samples[boundary]

