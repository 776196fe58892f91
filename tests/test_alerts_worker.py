"""Alerts in the worker (SPEC 7) on the real Kafka and Redis: sampling on the low watermark, sinks and the webhook."""

from __future__ import annotations

import asyncio
import random
import subprocess
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from hypothesis import given, settings
from hypothesis import strategies as st

from infra import local
from infra.local import exit_with_parent, free_port
from metrics.alerts import KINDS, AlertConfig, alert_id, evaluate, initial_state
from metrics.catalog import ALL_STORES
from metrics.engine import LoyaltyEngine
from metrics.events import Event
from metrics.reference import ReferenceConfig, accepted_events, reference_all
from metrics.timegrid import DAY_MS, Grid, parse_duration
from metrics.validation import parse_message
from streams.sinks.health import HealthCounters
from streams.sinks.webhook import Webhook
from streams.stages.aggregate import StoreShard
from streams.stages.watermarks import MarkMerger, combine, low_watermark
from streams.worker.topics import ensure_topics
from support import async_wait_for, clean_env, log_offsets, loyalty_command, run_loyalty, stop_process, tail

PARTITIONS = 2
#: Redis databases of the session's redis-server used here (taken elsewhere: 2, 3, 5-15)
DATABASE = 4
KILL_DATABASE = 1
HOUR_MS = 3_600_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, on the step grid
WINDOW = "1h"
HORIZON = "90d"
SPIKE_HOUR = 30
ALERT_SETTINGS = {
    "LOYALTY_WINDOWS": "1h,24h",
    "LOYALTY_ALERT_WINDOW": WINDOW,
    "LOYALTY_ALERT_STEP": "1h",
    "LOYALTY_ALERT_WARMUP": "12h",
    "LOYALTY_ALERT_HALF_LIFE": "1d",
    "LOYALTY_ALERT_COOLDOWN": "2h",
    "LOYALTY_ALERT_GRACE": "10m",
    "LOYALTY_ALERT_IDLE": "2s",
}
CONFIG = AlertConfig(window=WINDOW, step_ms=HOUR_MS, warmup_ms=12 * HOUR_MS, half_life_ms=DAY_MS,
                     cooldown_ms=2 * HOUR_MS, grace_ms=600_000, idle_ms=2_000)


def history() -> list[tuple[str, dict[str, Any]]]:
    """(topic, body): two stores of 400 customers who sign up in the first hour; a few close every hour,
    and in hour ``SPIKE_HOUR`` 40 of store-a's close at once (a churn spike after a calm baseline)."""
    rng = random.Random(7)
    messages: list[tuple[str, dict[str, Any]]] = []
    for store in ("store-a", "store-b"):
        customers = [f"{store}-c{i}" for i in range(400)]
        for index, customer in enumerate(customers):
            messages.append(("signups", {"event_id": f"s-{customer}", "type": "customer.signed_up",
                                         "occurred_at": T0 + index * 9_000, "store_id": store,
                                         "customer_id": customer, "channel": "search"}))
        open_customers = customers[:]
        rng.shuffle(open_customers)
        for hour in range(1, 40):
            closing = 40 if store == "store-a" and hour == SPIKE_HOUR else rng.randint(1, 4)
            for _ in range(closing):
                customer = open_customers.pop()
                at = T0 + hour * HOUR_MS + rng.randrange(HOUR_MS)
                messages.append(("signups", {"event_id": f"x-{customer}", "type": "customer.closed",
                                             "occurred_at": at, "store_id": store, "customer_id": customer}))
            for _ in range(rng.randint(3, 8)):  # orders keep the stores' other metrics alive
                customer = rng.choice(open_customers)
                messages.append(("orders", {"event_id": f"o-{hour}-{customer}", "type": "order.placed",
                                            "occurred_at": T0 + hour * HOUR_MS + rng.randrange(HOUR_MS),
                                            "store_id": store, "customer_id": customer,
                                            "order_id": f"{hour}-{customer}", "amount": "10.00",
                                            "currency": "EUR"}))
    # arrival is not event-time order: the watermark must make that irrelevant within the grace
    rng.shuffle(messages)
    return messages


def expected_alerts(messages: list[tuple[str, dict[str, Any]]]) -> list[dict[str, object]]:
    """A plain replay of the detectors over the batch reference's metrics as of every step boundary."""
    accepted = accepted_events(history_events(messages))
    latest = max(event.occurred_at_ms for event in accepted)
    window_ms = parse_duration(WINDOW)
    config = ReferenceConfig(bucket_ms=60_000, horizon_ms=parse_duration(HORIZON))
    states = {(store, kind): initial_state(kind, store, CONFIG) for store in ("store-a", "store-b", "*")
              for kind in KINDS}
    alerts: list[dict[str, object]] = []
    boundary = T0  # the first boundary at or after the first event's bucket
    while boundary + CONFIG.grace_ms <= latest:  # all idle at the end: the watermark is the latest event time
        metrics = reference_all(accepted, windows_ms=(window_ms,), as_of_ms=boundary - 1, config=config)
        for (store, kind), state in states.items():
            sample = metrics.get((store, window_ms))
            if sample is None:
                continue
            states[(store, kind)], fired = evaluate(state, boundary, sample, CONFIG)
            alerts.extend(fired)
        boundary += CONFIG.step_ms
    return sorted(alerts, key=alert_order)


def alert_order(alert: dict[str, Any]) -> tuple[Any, ...]:
    """Stores and ``*`` are sampled on different paths: their alerts interleave in any order, each in time order."""
    return alert["store_id"], alert["as_of_ms"]


def history_events(messages: list[tuple[str, dict[str, Any]]]) -> list[Event]:
    """The valid events of the messages, in arrival order."""
    return [item for topic, body in messages
            for item in parse_message(orjson.dumps(body), topic, now_ms=T0 + 90 * DAY_MS, max_future_skew_ms=300_000)
            if isinstance(item, Event)]


def test_alert_metrics_are_the_published_ones() -> None:
    """What a sample reads (the watched metrics only) equals those of the full metrics, at every boundary."""
    grid = Grid(60_000, parse_duration(HORIZON), (HOUR_MS, DAY_MS), 30 * DAY_MS)
    engine = LoyaltyEngine(grid)
    events = sorted(history_events(history()), key=lambda event: event.occurred_at_ms)
    for hour in range(1, 41):
        boundary = T0 + hour * HOUR_MS
        while events and events[0].occurred_at_ms < boundary:  # the engine folds as of its clock
            engine.ingest(events.pop(0))
        aggregate = engine.stores["store-a"]
        bucket = boundary // 60_000 - 1
        full = aggregate.metrics(grid, 60, bucket)
        sample = aggregate.alert_metrics(60, bucket)
        assert sample == {name: full[name] for name in sample}, hour
    assert set(sample) == {"churn_rate", "churned_customers", "nps", "nps_responses", "nps_ci_high"}


def test_marks_hold_the_watermark_until_every_path_reported() -> None:
    """An input partition's watermark is the smallest over upstream partitions, unknown until each has sent one."""
    merger = MarkMerger(upstream_partitions=2)
    merger.receive(0, 0, {"orders|0": [5_000, False], "orders|1": [9_000, False]})
    assert low_watermark(merger.merged(0)) is None
    merger.receive(0, 1, {"orders|0": [4_000, False], "orders|1": [9_500, False]})
    assert low_watermark(merger.merged(0)) == 4_000
    merger.receive(0, 1, {"orders|0": [7_000, True]})  # idle on one path only: still busy
    assert low_watermark(merger.merged(0)) == 5_000
    merger.receive(0, 0, {"orders|2": None})  # data not routed yet holds everything back
    assert low_watermark(merger.merged(0)) is None


#: a mark: mostly known, so that every upstream partition has one for a key often enough
_MARK = st.one_of(st.tuples(st.integers(-5, 5), st.booleans()).map(list), st.none())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 2), st.dictionaries(st.sampled_from("ab"), _MARK)),
                max_size=12))
def test_merged_marks_combine_every_path(received: list[tuple[int, int, dict[str, Any]]]) -> None:
    """Merged marks are, per input partition, :func:`combine` of the latest mark of each upstream partition."""
    merger = MarkMerger(upstream_partitions=3)
    latest: dict[int, dict[int, dict[str, Any]]] = {}
    for partition, upstream, marks in received:
        merger.receive(partition, upstream, marks)
        latest.setdefault(partition, {}).setdefault(upstream, {}).update(marks)
    for partition in range(2):
        paths = latest.get(partition, {})
        keys = sorted({key for marks in paths.values() for key in marks})
        expected = {key: combine([paths.get(upstream, {}).get(key) for upstream in range(3)]) for key in keys}
        assert merger.merged(partition) == expected


def test_shard_head_keeps_detectors_and_loads_older_heads() -> None:
    """Detector states, the last boundary and unsent alerts survive a checkpoint; a head without them still loads."""
    shard = StoreShard("s1")
    shard.apply((0, 1, 0), {"g": ["A", [T0 // 60_000, 3]]}, T0)
    assert shard.first_bucket == T0 // 60_000 and shard.next_sample_bucket(CONFIG) is None
    assert shard.sample(T0 + 5 * HOUR_MS, CONFIG) == 5  # T0 .. T0+4h are due (grace 10 min)
    shard.outbox.append({"alert_id": "x"})
    restored = StoreShard.from_bytes(shard.to_bytes())
    assert (restored.sampled_ms, restored.detectors, restored.outbox) == (shard.sampled_ms, shard.detectors,
                                                                          shard.outbox)
    assert restored.next_sample_bucket(CONFIG) == (T0 + 5 * HOUR_MS) // 60_000 - 1
    data = shard.to_bytes()
    size = int.from_bytes(data[:4], "big")
    head = orjson.loads(data[4:4 + size])
    del head["alerts"]
    old = orjson.dumps(head)
    legacy = StoreShard.from_bytes(len(old).to_bytes(4, "big") + old + data[4 + size:])
    assert (legacy.sampled_ms, legacy.detectors, legacy.outbox) == (None, {}, [])


async def test_webhook_queue_drops_the_oldest_and_posts_slack_text() -> None:
    """A full webhook queue drops (and counts) the oldest alerts; the Slack format posts escaped text."""
    receiver = Receiver(failures=0)
    server = web.Application()
    server.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(server)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    health = HealthCounters()
    webhook = Webhook(f"http://127.0.0.1:{port}/hook", "slack", health, queue_size=2)
    alerts = [{"kind": "churn_spike", "state": "firing", "store_id": f"<s{i}>", "message": "m"} for i in range(5)]
    for alert in alerts:  # nothing posts yet: submitting never waits
        webhook.submit(alert)
    task = asyncio.ensure_future(webhook.run())
    try:
        await async_wait_for(lambda: len(receiver.delivered) >= 2, timeout=30, interval=0.05,
                             message=lambda: f"posts: {receiver.posts}")
        assert receiver.delivered == [{"text": "churn_spike firing for store &lt;s3&gt;: m"},
                                      {"text": "churn_spike firing for store &lt;s4&gt;: m"}]
        await async_wait_for(lambda: health.pending.get("webhook_sent") == 2, timeout=10, interval=0.05)
        assert health.pending["webhook_dropped"] == 3
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await runner.cleanup()


class Receiver:
    """A local webhook receiver that answers 500 to the first ``failures`` POSTs."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.posts: list[bytes] = []
        self.delivered: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.posts.append(body)
        if len(self.posts) <= self.failures:
            return web.Response(status=500)
        self.delivered.append(orjson.loads(body))
        return web.Response(status=204)


async def read_alerts_topic(bootstrap: str, topic: str) -> list[Any]:
    """What the alerts topic holds now (from the start)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"reader-{uuid.uuid4().hex}",
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        records: list[Any] = []
        while True:
            batches = await consumer.getmany(timeout_ms=1000)
            if not batches:
                return records
            for batch in batches.values():
                records.extend(batch)
    finally:
        await consumer.stop()


@pytest.mark.timeout(400)
async def test_churn_spike_alert_reaches_stream_topic_and_webhook(services, topic_prefix, app_id,
                                                                  tmp_path: Path) -> None:
    """A replayed churn spike fires for its store and ``*`` with the ids of a plain replay: Redis, Kafka, webhook."""
    messages = history()
    expected = expected_alerts(messages)
    assert [(a["store_id"], a["kind"], a["state"]) for a in expected] == [
        ("*", "churn_spike", "firing"), ("*", "churn_spike", "resolved"),
        ("store-a", "churn_spike", "firing"), ("store-a", "churn_spike", "resolved")]
    firing = expected[2]
    assert firing["alert_id"] == alert_id("store-a", WINDOW, "churn_spike", T0 + (SPIKE_HOUR + 1) * HOUR_MS)

    receiver = Receiver(failures=2)
    server = web.Application()
    server.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(server)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()

    bootstrap = services.kafka_bootstrap
    redis_url = services.redis_url.rsplit("/", 1)[0] + f"/{DATABASE}"
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    await redis.flushdb()
    inputs = ["orders", "signups", "survey-responses", "marketing-spend", "loyalty-activity"]
    await ensure_topics(bootstrap, [topic_prefix + name for name in inputs], PARTITIONS)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        for topic, body in messages:
            await producer.send(topic_prefix + topic, orjson.dumps(body), key=body["customer_id"].encode())
        await producer.flush()
    finally:
        await producer.stop()

    env = clean_env(
        KAFKA_BOOTSTRAP_SERVERS=bootstrap, REDIS_URL=redis_url, LOYALTY_APP_ID=app_id,
        LOYALTY_TOPIC_PREFIX=topic_prefix, LOYALTY_STORE="memory", LOYALTY_PARTITIONS=str(PARTITIONS),
        LOYALTY_CLOCK="event", LOYALTY_ACTIVE_HORIZON=HORIZON, LOYALTY_EMIT_INTERVAL="200ms",
        LOYALTY_STATE_DIR=str(tmp_path / "state"), LOYALTY_LOG_LEVEL="info", LOYALTY_WEB_PORT=str(free_port()),
        LOYALTY_ALERT_WEBHOOK=f"http://127.0.0.1:{port}/hook", **ALERT_SETTINGS,
    )
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([*loyalty_command(), "worker"], env=env, cwd=tmp_path, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   preexec_fn=exit_with_parent)
    try:
        async def stream_has_all() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"the worker exited with {process.returncode}:\n{tail(log_path)}")
            return len(await redis.xrange("loyalty:alerts")) >= len(expected)

        await async_wait_for(stream_has_all, timeout=240, interval=0.5,
                             message=lambda: f"alerts missing from Redis\n{tail(log_path, 40)}")
        stored = [orjson.loads(fields["json"]) for _, fields in await redis.xrange("loyalty:alerts")]
        assert sorted(stored, key=alert_order) == expected

        records = await read_alerts_topic(bootstrap, topic_prefix + "loyalty-alerts")
        assert sorted((orjson.loads(record.value) for record in records), key=alert_order) == expected
        assert sorted(record.key.decode() for record in records) == ["*|churn_spike"] * 2 + ["store-a|churn_spike"] * 2

        await async_wait_for(lambda: len(receiver.delivered) >= len(expected), timeout=60, interval=0.2,
                             message=lambda: f"webhook got {len(receiver.posts)} posts\n{tail(log_path, 40)}")
        assert sorted(receiver.delivered, key=alert_order) == expected
        assert len(receiver.posts) == len(expected) + 2  # the first alert on its third try

        async def counted() -> bool:
            health = await redis.hgetall("loyalty:health")
            return (health.get("alerts:churn_spike:firing"), health.get("webhook_failures")) == ("2", "2")

        await async_wait_for(counted, timeout=30, interval=0.2, message=lambda: "health counters")

        async def sampling_caught_up() -> bool:
            health = await redis.hgetall("loyalty:health")
            behind = [int(v) for k, v in health.items() if k.startswith("alert_sampling_behind_ms:")]
            return f"alert_sampling_behind_ms:{ALL_STORES}" in health and not any(behind)

        # every boundary of the history is due (idle partitions let the watermark through): none left
        # behind, neither in a partition nor in the evaluation of ``*``
        await async_wait_for(sampling_caught_up, timeout=60, interval=0.2, message=lambda: "alert sampling gauges")
    finally:
        stop_process(process, timeout=60)
        await redis.aclose()
        await runner.cleanup()


def ordered_history() -> list[tuple[str, dict[str, Any]]]:
    """Like :func:`history`, bigger, and arriving in event-time order up to 5 minutes late (within the grace)."""
    rng = random.Random(11)
    timed: list[tuple[int, str, dict[str, Any]]] = []
    for store in ("store-a", "store-b"):
        customers = [f"{store}-c{i}" for i in range(1500)]
        for index, customer in enumerate(customers):
            timed.append((T0 + index * 2_000, "signups", {
                "event_id": f"s-{customer}", "type": "customer.signed_up", "occurred_at": T0 + index * 2_000,
                "store_id": store, "customer_id": customer}))
        open_customers = customers[:]
        rng.shuffle(open_customers)
        for hour in range(1, 40):
            closing = 150 if store == "store-a" and hour == SPIKE_HOUR else rng.randint(5, 15)
            for _ in range(closing):
                customer = open_customers.pop()
                at = T0 + hour * HOUR_MS + rng.randrange(HOUR_MS)
                timed.append((at, "signups", {"event_id": f"x-{customer}", "type": "customer.closed",
                                              "occurred_at": at, "store_id": store, "customer_id": customer}))
            for number in range(rng.randint(20, 40)):
                customer = rng.choice(open_customers)
                at = T0 + hour * HOUR_MS + rng.randrange(HOUR_MS)
                timed.append((at, "orders", {"event_id": f"o-{hour}-{number}", "type": "order.placed",
                                             "occurred_at": at, "store_id": store, "customer_id": customer,
                                             "order_id": f"{hour}-{number}", "amount": "10.00", "currency": "EUR"}))
    arrival = sorted(timed, key=lambda item: item[0] + rng.randrange(300_000))
    return [(topic, body) for _, topic, body in arrival]


def start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen([*loyalty_command(), "worker"], env={**env, "LOYALTY_WEB_PORT": str(free_port())},
                                cwd=log_path.parent, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=exit_with_parent)


async def produce(bootstrap: str, prefix: str, messages: list[tuple[str, dict[str, Any]]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        for topic, body in messages:
            await producer.send(prefix + topic, orjson.dumps(body), key=body["customer_id"].encode())
        await producer.flush()
    finally:
        await producer.stop()


@pytest.mark.timeout(500)
async def test_sigkilled_worker_sends_the_same_alert_ids(services, topic_prefix, app_id, tmp_path: Path) -> None:
    """A worker SIGKILLed twice (right after a firing, then mid-replay) sends only the ids of a plain replay."""
    messages = ordered_history()
    expected = expected_alerts(messages)
    fired_at, resolved_at = T0 + (SPIKE_HOUR + 1) * HOUR_MS, T0 + (SPIKE_HOUR + 2) * HOUR_MS
    assert [(a["store_id"], a["state"], a["as_of_ms"]) for a in expected] == [
        ("*", "firing", fired_at), ("*", "resolved", resolved_at),
        ("store-a", "firing", fired_at), ("store-a", "resolved", resolved_at)]
    # the first part ends before the resolving sample can be taken: the kill comes between the two
    split = next(index for index, (_, body) in enumerate(messages)
                 if body["occurred_at"] >= T0 + (SPIKE_HOUR + 1) * HOUR_MS + 20 * 60_000)
    bootstrap = services.kafka_bootstrap
    redis_url = services.redis_url.rsplit("/", 1)[0] + f"/{KILL_DATABASE}"
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    await redis.flushdb()
    inputs = ["orders", "signups", "survey-responses", "marketing-spend", "loyalty-activity"]
    await ensure_topics(bootstrap, [topic_prefix + name for name in inputs], PARTITIONS)
    await produce(bootstrap, topic_prefix, messages[:split])
    env = clean_env(
        KAFKA_BOOTSTRAP_SERVERS=bootstrap, REDIS_URL=redis_url, LOYALTY_APP_ID=app_id,
        LOYALTY_TOPIC_PREFIX=topic_prefix, LOYALTY_STORE="memory", LOYALTY_PARTITIONS=str(PARTITIONS),
        LOYALTY_CLOCK="event", LOYALTY_ACTIVE_HORIZON=HORIZON, LOYALTY_EMIT_INTERVAL="200ms",
        LOYALTY_CHECKPOINT_INTERVAL="1s", LOYALTY_STATE_DIR=str(tmp_path / "state"), LOYALTY_LOG_LEVEL="info",
        **ALERT_SETTINGS,
    )
    log_path = tmp_path / "worker.log"
    process = start_worker(env, log_path)

    async def stored() -> list[dict[str, Any]]:
        return [orjson.loads(fields["json"]) for _, fields in await redis.xrange("loyalty:alerts")]

    def alive() -> None:
        if process.poll() is not None and process.returncode != -9:
            raise AssertionError(f"the worker exited with {process.returncode}:\n{tail(log_path)}")

    try:
        async def fired() -> bool:
            alive()
            return bool(await stored())

        await async_wait_for(fired, timeout=240, interval=0.05,
                             message=lambda: f"no firing alert\n{tail(log_path, 40)}")

        async def star_samples_cut() -> bool:
            alive()
            samples = TopicPartition(f"{topic_prefix}{app_id}-star-samples", 0)
            return (await log_offsets(bootstrap, [samples], beginning=True))[samples] > 0

        # the samples `*` evaluated are deleted below its checkpoint: the restart reads only the rest
        await async_wait_for(star_samples_cut, timeout=60, interval=0.1,
                             message=lambda: f"the star samples were never cut\n{tail(log_path, 40)}")
        process.kill()
        process.wait(timeout=30)
        applied_at_kill = int((await redis.hget("loyalty:health", "events_applied")) or 0)
        process = start_worker(env, log_path)
        await produce(bootstrap, topic_prefix, messages[split:])

        async def replaying() -> bool:
            alive()
            return int((await redis.hget("loyalty:health", "events_applied")) or 0) > applied_at_kill + 200

        # the second kill lands mid-replay of the rest, before the resolving sample is certain
        await async_wait_for(replaying, timeout=240, interval=0.05,
                             message=lambda: f"the restarted worker applies nothing\n{tail(log_path, 40)}")
        process.kill()
        process.wait(timeout=30)
        process = start_worker(env, log_path)

        async def resolved() -> bool:
            alive()
            # two distinct resolutions (store-a's and `*`'s): a restart sends an unsent one again, same id
            return len({alert["alert_id"] for alert in await stored() if alert["state"] == "resolved"}) >= 2

        await async_wait_for(resolved, timeout=240, interval=0.2,
                             message=lambda: f"no resolution\n{tail(log_path, 40)}")
        alerts = await stored()
        assert all(alert in expected for alert in alerts), alerts
        distinct = []
        for alert in alerts:
            if alert not in distinct:
                distinct.append(alert)
        assert sorted(distinct, key=alert_order) == expected

        # `loyalty alerts` reads the same stream
        cli_env = clean_env(REDIS_URL=redis_url, COLUMNS="200")
        as_json = run_loyalty("alerts", "--json", "--store", "store-a", "--count", "50", env=cli_env, cwd=tmp_path)
        assert as_json.returncode == 0, as_json.stderr
        assert [orjson.loads(line) for line in as_json.stdout.splitlines()] == [
            alert for alert in alerts if alert["store_id"] == "store-a"]
        table = run_loyalty("alerts", "--count", "1", "--store", "store-a", env=cli_env, cwd=tmp_path)
        assert table.returncode == 0, table.stderr
        assert "store-a" in table.stdout and "resolved" in table.stdout and expected[2]["alert_id"] in table.stdout
        none = run_loyalty("alerts", "--store", "elsewhere", env=cli_env, cwd=tmp_path)
        assert none.returncode == 0 and "no alerts" in none.stderr
    finally:
        stop_process(process, timeout=60)
        await redis.aclose()


async def input_consumed(bootstrap: str, group: str, topics: list[str]) -> bool:
    """Whether the group has committed every input partition up to its end."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        partitions = [tp for tp in committed if tp.topic in topics]
        if not partitions:
            return False
        ends = await consumer.end_offsets(partitions)
        return all(committed[tp].offset >= ends[tp] for tp in partitions)
    finally:
        await consumer.stop()
        await admin.close()


@pytest.mark.timeout(500)
async def test_alerts_made_while_redis_is_down_arrive_when_it_is_back(services, topic_prefix, app_id,
                                                                      tmp_path: Path) -> None:
    """Redis stopped before the spike is read: the worker stays up, and every alert is in Redis once it is back."""
    messages = ordered_history()
    expected = expected_alerts(messages)
    split = next(index for index, (_, body) in enumerate(messages) if body["occurred_at"] >= T0 + 20 * HOUR_MS)
    service = local.LocalRedis(tmp_path / "own-redis")
    port = local.free_port()
    service.start(port, die_with_parent=True)
    redis_url = f"redis://{local.LOOPBACK}:{port}/0"
    bootstrap = services.kafka_bootstrap
    inputs = ["orders", "signups", "survey-responses", "marketing-spend", "loyalty-activity"]
    await ensure_topics(bootstrap, [topic_prefix + name for name in inputs], PARTITIONS)
    await produce(bootstrap, topic_prefix, messages[:split])
    env = clean_env(
        KAFKA_BOOTSTRAP_SERVERS=bootstrap, REDIS_URL=redis_url, LOYALTY_APP_ID=app_id,
        LOYALTY_TOPIC_PREFIX=topic_prefix, LOYALTY_STORE="memory", LOYALTY_PARTITIONS=str(PARTITIONS),
        LOYALTY_CLOCK="event", LOYALTY_ACTIVE_HORIZON=HORIZON, LOYALTY_EMIT_INTERVAL="200ms",
        LOYALTY_STATE_DIR=str(tmp_path / "state"), LOYALTY_LOG_LEVEL="info", **ALERT_SETTINGS,
    )
    log_path = tmp_path / "worker.log"
    process = start_worker(env, log_path)
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        async def published() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"the worker exited with {process.returncode}:\n{tail(log_path)}")
            return bool(await redis.exists("loyalty:store-a:1h"))

        await async_wait_for(published, timeout=240, interval=0.2, message=lambda: tail(log_path, 40))
        assert await redis.xlen("loyalty:alerts") == 0  # the calm part fires nothing
        await redis.aclose()
        service.stop()
        await produce(bootstrap, topic_prefix, messages[split:])
        await async_wait_for(lambda: input_consumed(bootstrap, app_id + "-ingest",
                                                    [topic_prefix + name for name in inputs]),
                             timeout=120, interval=0.5, message=lambda: f"input not read\n{tail(log_path, 40)}")
        service.start(port, die_with_parent=True)
        redis = aioredis.Redis.from_url(redis_url, decode_responses=True)

        async def all_alerts() -> bool:
            assert process.poll() is None, f"the worker exited:\n{tail(log_path)}"
            return await redis.xlen("loyalty:alerts") >= len(expected)

        await async_wait_for(all_alerts, timeout=120, interval=0.5, message=lambda: tail(log_path, 40))
        stored = [orjson.loads(fields["json"]) for _, fields in await redis.xrange("loyalty:alerts")]
        assert sorted(stored, key=alert_order) == expected
    finally:
        stop_process(process, timeout=60)
        await redis.aclose()
        service.stop()
