"""Alert sampling skips a store's empty stretches exactly: a year-0001 event must not make the worker sample every
15 minutes since (issue 14), and the detectors must end as if every boundary had been sampled."""

from __future__ import annotations

import time
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metrics.alerts import KINDS, AlertConfig, due_boundaries, evaluate, initial_state, sample_bucket
from metrics.catalog import ALL_STORES
from metrics.store import ReadPoints
from streams.stages.aggregate import StarSampler, StoreShard

BUCKET_MS = 60_000
STEP_MS = 15 * BUCKET_MS
CONFIG = AlertConfig(window="1h", step_ms=STEP_MS, warmup_ms=4 * STEP_MS, half_life_ms=8 * STEP_MS,
                     cooldown_ms=4 * STEP_MS, grace_ms=STEP_MS, min_churned=1, min_responses=1)
WINDOW = CONFIG.window_ms // BUCKET_MS
HORIZON = 6 * WINDOW  # buckets a customer stays active (the facts stage sends A's +1 and -1 this far apart)


def groups_of(deltas: list[tuple[str, int, int]]) -> list[object]:
    """Deltas as the facts stage groups them: ``[series, [bucket, delta, ...], ...]``."""
    flat: list[object] = []
    for series, bucket, delta in deltas:
        flat.extend([series, [bucket, delta]])
    return flat


def activity(bucket: int, churned_at: int | None = None) -> list[tuple[str, int, int]]:
    """A customer active from ``bucket`` for the horizon (or until ``churned_at``), and an NPS answer then."""
    end = bucket + HORIZON if churned_at is None else churned_at
    return [("A", bucket, 1), ("A", end, -1), (f"both:{WINDOW}", bucket + WINDOW, 1),
            (f"both:{WINDOW}", max(end, bucket + WINDOW), -1), ("nps_n", bucket, 1), ("nps_d", bucket, 1)]


def plain(shard: StoreShard, watermark_ms: int, store_id: str | None = None) -> dict[str, object]:
    """The detectors (of ``store_id``, else the shard's store) sampled at every due boundary, as before the
    skipping: the oracle."""
    states = {kind: initial_state(kind, store_id or shard.store_id, CONFIG) for kind in KINDS}
    events: list[dict[str, object]] = []
    assert shard.first_bucket is not None
    for boundary in due_boundaries(shard.first_bucket * BUCKET_MS - 1, watermark_ms, CONFIG):
        metrics = shard.aggregate.alert_metrics(WINDOW, sample_bucket(boundary, BUCKET_MS))
        for kind in KINDS:
            states[kind], fired = evaluate(states[kind], boundary, metrics, CONFIG)
            events.extend(fired)
    return {"states": {k: replace(s, last_ms=None) for k, s in states.items()}, "events": events}


def shard_with(deltas: list[tuple[str, int, int]], store: str = "s") -> StoreShard:
    shard = StoreShard(store)
    first = min(bucket for _, bucket, _ in deltas)
    shard.apply((0, 0, 0), {"g": groups_of(deltas)}, None)
    shard.first_bucket = first
    return shard


def customers_of(stretches: list[tuple[int, int, bool]]) -> list[list[tuple[str, int, int]]]:
    """Each customer's deltas: ``customers`` customers from ``start`` on, churned a window later or not."""
    return [activity(start + customer, start + customer + WINDOW if churn else None)
            for start, customers, churn in stretches for customer in range(customers)]


def partial_with(customers: list[list[tuple[str, int, int]]], stores: int = 2) -> StoreShard:
    """A partition's partial ``*`` as the worker keeps it: its customers dealt over ``stores`` stores (a customer
    is one store's), which it reads in place."""
    partial = StoreShard(ALL_STORES)
    assert partial.summed is not None
    by_store: dict[str, list[tuple[str, int, int]]] = {}
    for number, deltas in enumerate(customers):
        by_store.setdefault(f"s{number % stores}", []).extend(deltas)
    for store, deltas in by_store.items():
        partial.summed.members[store] = shard_with(deltas, store)
    partial.first_bucket = min(bucket for deltas in customers for _, bucket, _ in deltas)
    return partial


STRETCHES = st.lists(st.tuples(st.integers(0, 3000), st.integers(1, 4), st.booleans()), min_size=1, max_size=6)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(STRETCHES, st.integers(0, 400))
def test_skipping_empty_samples_gives_the_detectors_of_sampling_every_boundary(
    stretches: list[tuple[int, int, bool]], tail: int
) -> None:
    """Bursts of activity and NPS answers with gaps of any length: the skipping sampler ends as the plain one."""
    deltas: list[tuple[str, int, int]] = []
    for start, customers, churn in stretches:
        for customer in range(customers):
            deltas.extend(activity(start + customer, start + customer + WINDOW if churn else None))
    shard = shard_with(deltas)
    last = max(bucket for _, bucket, _ in deltas)
    watermark = (last + tail) * BUCKET_MS + CONFIG.grace_ms
    expected = plain(shard, watermark)
    while shard.sample(watermark, CONFIG, 64) == 64:
        pass
    assert {k: replace(s, last_ms=None) for k, s in shard.detectors.items()} == expected["states"]
    assert shard.outbox == expected["events"]
    assert shard.sampled_ms == due_boundaries(0, watermark, CONFIG)[-1]


def test_a_year_0001_event_does_not_make_the_store_sample_every_boundary_since() -> None:
    """A customer active in year 1 and one in 2024: a few hundred samples, not 70 million, in well under a second."""
    ancient = -62_135_596_800_000 // BUCKET_MS
    recent = 1_709_294_400_000 // BUCKET_MS
    shard = shard_with(activity(ancient) + activity(recent))
    started = time.monotonic()
    slices = 1  # of at most 64 samples each: the horizon of each customer, then the skip between them
    while shard.sample(recent * BUCKET_MS + 10 * STEP_MS, CONFIG, 64) == 64:
        slices += 1
    assert slices <= 2 * ((HORIZON + WINDOW) * BUCKET_MS // STEP_MS // 64 + 2)
    assert time.monotonic() - started < 5
    assert shard.next_sample_bucket(CONFIG) is not None and shard.next_sample_bucket(CONFIG) > recent


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(STRETCHES, min_size=2, max_size=3))
def test_star_owner_sums_partials_that_skip_their_empty_stretches(
    partitions: list[list[tuple[int, int, bool]]],
) -> None:
    """Partial ``*`` shards that skip, summed by the owner, give the detectors of sampling their sum everywhere."""
    partials = []
    merged: list[tuple[str, int, int]] = []
    for stretches in partitions:
        customers = customers_of(stretches)
        merged.extend(d for deltas in customers for d in deltas)
        partials.append(partial_with(customers))
    last = max(bucket for _, bucket, _ in merged)
    watermark = (last + 50) * BUCKET_MS + CONFIG.grace_ms
    expected = plain(shard_with(merged), watermark, ALL_STORES)  # one aggregate of every delta
    sampler = StarSampler(len(partials))
    star = StoreShard(ALL_STORES)
    for number, partial in enumerate(partials):
        while partial.sample(watermark, CONFIG, 64) == 64:
            pass
        samples = [{"b": s["b"], "points": ReadPoints.from_record(s["points"]).to_record()} for s in partial.outbox]
        sampler.receive({"p": number, "samples": samples, "upto": partial.sampled_ms})
    sampler.evaluate(star, CONFIG)
    assert {k: replace(s, last_ms=None) for k, s in star.star_detectors.items()} == expected["states"]
    assert star.star_outbox == expected["events"]


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(STRETCHES, min_size=2, max_size=3), st.integers(1, 6), st.data())
def test_star_owner_restored_reads_the_samples_topic_from_its_checkpointed_offset(
    partitions: list[list[tuple[int, int, bool]]], per_read: int, data: st.DataObject,
) -> None:
    """An owner restored from a checkpoint, reading the samples topic from its offset, ends as one never stopped."""
    customers = [customers_of(stretches) for stretches in partitions]
    partials = [partial_with(part) for part in customers]
    last = max(bucket for part in customers for deltas in part for _, bucket, _ in deltas) + 50
    topic: list[dict[str, object]] = []  # the star-samples topic: each partition's slices, interleaved
    watermark = last * BUCKET_MS + CONFIG.grace_ms
    progressing = list(enumerate(partials))
    while progressing:
        number, partial = progressing.pop(data.draw(st.integers(0, len(progressing) - 1)))
        more = partial.sample(watermark, CONFIG, 8) == 8
        topic.append({"p": number, "samples": [{"b": s["b"], "points": s["points"]} for s in partial.outbox],
                      "upto": partial.sampled_ms})
        partial.outbox.clear()
        if more:
            progressing.append((number, partial))

    def run(star: StoreShard, sampler: StarSampler, start: int, stop: int | None = None) -> StoreShard:
        for offset in range(start, len(topic) if stop is None else stop):
            sampler.receive(topic[offset], offset)
            if (offset + 1) % per_read == 0:
                sampler.evaluate(star, CONFIG)
        sampler.evaluate(star, CONFIG)
        return star

    never_stopped = run(StoreShard(ALL_STORES), StarSampler(len(partials)), 0)
    checkpoint_at = data.draw(st.integers(0, len(topic)))
    star = run(StoreShard(ALL_STORES), StarSampler(len(partials)), 0, checkpoint_at)
    restored = StoreShard.from_bytes(star.to_bytes())
    start = restored.star_samples_offset or 0
    assert start <= checkpoint_at
    run(restored, StarSampler(len(partials), restored.star_upto), start)
    assert never_stopped.star_detectors
    assert restored.star_detectors == never_stopped.star_detectors
    assert restored.star_outbox == never_stopped.star_outbox


def test_a_fold_that_drops_blocks_makes_the_next_checkpoint_smaller() -> None:
    """Folding away whole blocks counts as a change (the checkpoint is rewritten, smaller); folding nothing does not."""
    shard = shard_with([("orders", bucket, 1) for bucket in range(0, 5 * 1024, 7)])
    before = len(shard.to_bytes())
    version = shard.version
    shard.fold(1000, longest=10, cohort_reach=10)  # inside the first block: no whole block goes
    assert shard.version == version
    shard.fold(4 * 1024, longest=10, cohort_reach=10)  # orders are read a window back: blocks 0 to 2 go
    assert shard.version == version + 1
    assert len(shard.to_bytes()) < before
    shard.fold(4 * 1024 + 5, longest=10, cohort_reach=10)
    assert shard.version == version + 1
    assert shard.aggregate.series["orders"].prefix(5 * 1024) == len(range(0, 5 * 1024, 7))  # exact after folds
