"""`loyalty replay` (JSON lines to batch messages on the real Kafka) and `loyalty snapshot` (metrics from Redis)."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from aiokafka import AIOKafkaConsumer, TopicPartition
from rich.console import Console

from infra.local import free_port
from metrics.events import INPUT_TOPICS, TYPE_TOPIC
from streams.sinks.redis_sink import STORES_KEY, metric_key
from streams.tools.history import generate_history, wire_body
from streams.tools.replay import MAX_MESSAGE_BYTES, plan_messages
from streams.tools.snapshot import read_snapshots, render_table
from support import async_wait_for, clean_env, run_loyalty


def order(event_id: str, **extra: Any) -> str:
    """One order line (replay needs only a type; the rest is the worker's business)."""
    return json.dumps({"event_id": event_id, "type": "order.placed", **extra})


def spend(event_id: str) -> str:
    """One marketing-spend line."""
    return json.dumps({"event_id": event_id, "type": "spend.recorded"})


def ids(value: bytes) -> list[str]:
    """The event ids of one batch message."""
    return [element["event_id"] for element in orjson.loads(value)]


# -- plan_messages ---------------------------------------------------------------------------------------------


def test_plan_groups_consecutive_events_of_a_topic_into_batches_of_at_most_n() -> None:
    """Runs of one topic become arrays of at most `batch` events; a topic change starts a new message."""
    lines = [order(f"o{i}") for i in range(5)] + [spend("s0")] + [order("o5")]
    messages, invalid, events = plan_messages(lines, batch=2)
    assert [(topic, ids(value)) for topic, value in messages] == [
        ("orders", ["o0", "o1"]),
        ("orders", ["o2", "o3"]),
        ("orders", ["o4"]),
        ("marketing-spend", ["s0"]),
        ("orders", ["o5"]),
    ]
    assert invalid == [] and events == 7


def test_plan_routes_every_type_to_its_topic() -> None:
    """Each known event type goes to the input topic TYPE_TOPIC names, always as a JSON array."""
    lines = [json.dumps({"event_id": kind, "type": kind}) for kind in sorted(TYPE_TOPIC)]
    messages, invalid, events = plan_messages(lines, batch=500)
    routed = {element["type"]: topic for topic, value in messages for element in orjson.loads(value)}
    assert routed == TYPE_TOPIC and invalid == [] and events == len(TYPE_TOPIC)
    assert all(value.startswith(b"[") for _, value in messages)


def test_plan_splits_batches_by_size() -> None:
    """No message exceeds the byte budget even when the event count allows more."""
    lines = [order(f"big{i}", padding="x" * 60_000) for i in range(40)]
    messages, invalid, events = plan_messages(lines, batch=10_000)
    assert len(messages) > 1 and invalid == [] and events == 40
    assert all(len(value) <= MAX_MESSAGE_BYTES for _, value in messages)
    assert [i for _, value in messages for i in ids(value)] == [f"big{i}" for i in range(40)]


def test_plan_reports_invalid_lines_with_numbers_and_keeps_order() -> None:
    """Bad lines are reported by 1-based number (blank lines count, are skipped) and the good ones keep their order."""
    lines = [
        order("a"),
        "",
        "this is not json",
        "[1, 2, 3]",
        json.dumps({"event_id": "x", "type": "order.teleported"}),
        json.dumps({"event_id": "y"}),
        "   ",
        order("b"),
        spend("c"),
        order("d"),
    ]
    messages, invalid, events = plan_messages(lines, batch=500)
    assert [(topic, ids(value)) for topic, value in messages] == [
        ("orders", ["a", "b"]),
        ("marketing-spend", ["c"]),
        ("orders", ["d"]),
    ]
    assert events == 4
    assert [line_no for line_no, _ in invalid] == [3, 4, 5, 6]
    reasons = dict(invalid)
    assert reasons[3].startswith("invalid JSON")
    assert "not a JSON object" in reasons[4]
    assert "order.teleported" in reasons[5]
    assert "type" in reasons[6]


def test_plan_sends_each_line_exactly_as_written() -> None:
    """The elements are the lines' own bytes: amounts and spacing reach the worker untouched."""
    line = '{"event_id": "e1", "type": "order.placed", "amount": 19.990000000000000001, "currency": "EUR"}'
    messages, _, _ = plan_messages([line + "\r\n", b'{"type":"order.refunded","amount":"0.10"}\n'], batch=500)
    assert messages == [("orders", b"[" + line.encode() + b',{"type":"order.refunded","amount":"0.10"}]')]


def test_plan_with_a_forced_topic_sends_every_object_there() -> None:
    """`--topic` routes every object to one topic, unknown types included (the worker dead-letters them)."""
    lines = [spend("s0"), json.dumps({"event_id": "u", "type": "no.such"}), "nope"]
    messages, invalid, events = plan_messages(lines, batch=500, topic="orders")
    assert [(topic, ids(value)) for topic, value in messages] == [("orders", ["s0", "u"])]
    assert [line_no for line_no, _ in invalid] == [3] and events == 2


def test_plan_rejects_a_bad_batch_size() -> None:
    """The batch size must be 1..10,000 (the SPEC's batch limit)."""
    with pytest.raises(ValueError):
        plan_messages([order("a")], batch=0)
    with pytest.raises(ValueError):
        plan_messages([order("a")], batch=10_001)


# -- loyalty replay on the real Kafka ---------------------------------------------------------------------------


async def read_all(bootstrap: str, topics: list[str], expected: int, timeout: float = 60.0) -> list[Any]:
    """Every record of ``topics`` from the beginning, once ``expected`` have arrived and nothing is beyond them."""
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        group_id=f"replay-reader-{uuid.uuid4().hex}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    records: list[Any] = []
    try:
        async def arrived() -> bool:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
            return len(records) >= expected

        await async_wait_for(arrived, timeout=timeout, message=lambda: f"{len(records)} of {expected} messages")
        partitions = [TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()]
        end = await consumer.end_offsets(partitions)
        assert sum(end.values()) == len(records), "the topics hold more messages than the replay planned"
    finally:
        await consumer.stop()
    return records


@pytest.mark.timeout(180)
async def test_replay_publishes_exactly_the_valid_events_in_batches(services, topic_prefix, tmp_path: Path) -> None:
    """~1,000 history events plus 3 invalid lines: exit 0, the 3 reported, every valid event on its topic once."""
    history = generate_history(stores=2, customers_per_store=150, days=20)
    lines = [orjson.dumps(wire_body(event)).decode() for event in history]
    bad = {
        10: "{not json",
        200: '["an", "array"]',
        600: json.dumps({"event_id": "bad-type", "type": "order.teleported", "store_id": "store-1"}),
    }
    for line_no in sorted(bad):  # ascending: each insert lands on its final line number
        lines.insert(line_no - 1, bad[line_no])
    lines.insert(400, "")  # a blank line (line 401) is skipped silently
    bad = {(n + 1 if n > 401 else n): text for n, text in bad.items()}
    path = tmp_path / "history.jsonl"
    path.write_text("\n".join(lines) + "\n")
    batch = 25

    env = clean_env(
        KAFKA_BOOTSTRAP_SERVERS=services.kafka_bootstrap,
        REDIS_URL=services.redis_url,
        LOYALTY_TOPIC_PREFIX=topic_prefix,
        LOYALTY_PARTITIONS="3",
        LOYALTY_STATE_DIR=str(tmp_path / "state"),
    )
    result = run_loyalty("replay", str(path), "--batch", str(batch), env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    out = result.stdout
    assert "3 invalid lines" in out
    for line_no in bad:
        assert f"line {line_no}:" in out
    assert "line 401:" not in out
    assert f"{len(history)} events sent" in out

    planned, invalid, events = plan_messages(path.read_bytes().splitlines(), batch)
    assert [line_no for line_no, _ in invalid] == sorted(bad)
    assert events == len(history) and f"in {len(planned)} messages" in out

    topics = [topic_prefix + name for name in INPUT_TOPICS]
    records = await read_all(services.kafka_bootstrap, topics, len(planned))
    sent_ids: Counter[str] = Counter()
    for record in records:
        elements = orjson.loads(record.value)
        assert isinstance(elements, list) and 1 <= len(elements) <= batch
        for element in elements:
            assert record.topic == topic_prefix + TYPE_TOPIC[element["type"]]
            sent_ids[element["event_id"]] += 1
    assert sent_ids == Counter(event.body["event_id"] for event in history)
    assert Counter((r.topic, r.value) for r in records) == Counter((topic_prefix + t, v) for t, v in planned)
    partitions = {(r.topic, r.partition) for r in records}
    assert {p for _, p in partitions} <= {0, 1, 2}  # the topics were created with LOYALTY_PARTITIONS


def test_replay_fails_clearly_without_kafka_or_file(tmp_path: Path) -> None:
    """An unreachable Kafka and a missing file end with a message and a non-zero exit, never a traceback."""
    path = tmp_path / "one.jsonl"
    path.write_text(order("a") + "\n")
    env = clean_env(KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}", LOYALTY_STATE_DIR=str(tmp_path / "state"))
    result = run_loyalty("replay", str(path), env=env, cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert "cannot reach Kafka" in result.stderr and "Traceback" not in result.stderr

    result = run_loyalty("replay", str(tmp_path / "missing.jsonl"), env=env, cwd=tmp_path, timeout=60)
    assert result.returncode != 0
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


# -- loyalty snapshot on the real Redis -------------------------------------------------------------------------

AS_OF_MS = 1_700_000_000_000
STORE_FIELDS = {
    "as_of_ms": str(AS_OF_MS),
    "currency": "EUR",
    "orders": "12",
    "customers_end": "40",
    "gross_revenue": "1234.50",
    "nps": "",
    "churn_rate": "12.345",
    "clv": "555.5555555555556",
    "cac_by_channel": '{"search":12.5,"social":null}',
}
ALL_FIELDS = {
    "as_of_ms": str(AS_OF_MS + 60_000),
    "currency": "",
    "orders": "30",
    "customers_end": "95",
    "gross_revenue": "",
    "nps": "25",
    "churn_rate": "7.5",
    "clv": "",
    "cac_by_channel": "{}",
}


@pytest.fixture
def snapshot_redis(services) -> str:
    """Redis DB 9, flushed: the snapshot tests own it (the keys are fixed by the SPEC)."""
    url = services.redis_url.rsplit("/", 1)[0] + "/9"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


def write_metrics(url: str) -> None:
    """Two hashes in the SPEC layout: store-a and `*`, window 24h."""
    client = redis.Redis.from_url(url)
    client.hset(metric_key("store-a", "24h"), mapping=STORE_FIELDS)
    client.hset(metric_key("*", "24h"), mapping=ALL_FIELDS)
    client.sadd(STORES_KEY, "store-a")
    client.close()


def snapshot_env(url: str, tmp_path: Path) -> dict[str, str]:
    """The environment of a `loyalty snapshot` run against ``url`` (windows 1h and 24h; only 24h has data)."""
    return clean_env(REDIS_URL=url, LOYALTY_WINDOWS="1h,24h", LOYALTY_STATE_DIR=str(tmp_path / "state"), COLUMNS="160")


def test_snapshot_json_is_exact(snapshot_redis: str, tmp_path: Path) -> None:
    """`--json` gives every stored value exactly: ints as ints, decimals with their digits, nulls, the channel map."""
    write_metrics(snapshot_redis)
    result = run_loyalty("snapshot", "--json", env=snapshot_env(snapshot_redis, tmp_path), cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(result.stdout, parse_float=Decimal)
    assert data == {
        "*": {"24h": {"as_of_ms": AS_OF_MS + 60_000, "currency": None, "metrics": {
            "nps": 25, "customers_end": 95, "churn_rate": Decimal("7.5"), "orders": 30,
            "gross_revenue": None, "clv": None, "cac_by_channel": {},
        }}},
        "store-a": {"24h": {"as_of_ms": AS_OF_MS, "currency": "EUR", "metrics": {
            "nps": None, "customers_end": 40, "churn_rate": Decimal("12.345"), "orders": 12,
            "gross_revenue": Decimal("1234.50"), "clv": Decimal("555.5555555555556"),
            "cac_by_channel": {"search": Decimal("12.5"), "social": None},
        }}},
    }
    metrics = data["store-a"]["24h"]["metrics"]
    assert type(metrics["orders"]) is int and type(metrics["customers_end"]) is int
    assert list(data) == ["*", "store-a"]

    only = run_loyalty("snapshot", "--json", "--store", "store-a", "--window", "24h",
                       env=snapshot_env(snapshot_redis, tmp_path), cwd=tmp_path, timeout=60)
    assert only.returncode == 0, only.stderr
    assert list(json.loads(only.stdout)) == ["store-a"]


def test_snapshot_table_shows_stores_and_formatted_values(snapshot_redis: str, tmp_path: Path) -> None:
    """The table names stores and windows; money and ratios have 2 decimals, counts are ints, null is -."""
    write_metrics(snapshot_redis)
    result = run_loyalty("snapshot", env=snapshot_env(snapshot_redis, tmp_path), cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for text in ("store-a", "* (all stores)", "24h", "1,234.50", "12.35", "555.56", "7.50",
                 "search 12.50, social -", "EUR", "2023-11-14 22:13:20Z"):
        assert text in out, f"{text!r} missing from:\n{out}"
    rows = {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[2:-1]]
            for line in out.splitlines() if line.count("│") >= 3}
    assert rows["orders"] == ["30", "12"]
    assert rows["nps"] == ["25.00", "-"]
    assert rows["gross_revenue"] == ["-", "1,234.50"]


def test_snapshot_compact_layout_when_many_columns(snapshot_redis: str) -> None:
    """Many store/window combinations become one row each, with the headline metrics as columns."""
    client = redis.Redis.from_url(snapshot_redis)
    for number in range(1, 7):
        for window in ("1h", "24h"):
            client.hset(metric_key(f"store-{number}", window), mapping={**STORE_FIELDS, "orders": str(number)})
        client.sadd(STORES_KEY, f"store-{number}")
    client.close()
    snapshots = read_snapshots(snapshot_redis, None, ["1h", "24h"])
    assert list(snapshots) == [f"store-{n}" for n in range(1, 7)]
    console = Console(width=100, record=True)
    console.print(render_table(snapshots, width=100))
    text = console.export_text()
    assert "compact view" in text and "store-6" in text and "nps" in text
    assert max(len(line) for line in text.splitlines()) <= 100


def test_snapshot_table_shows_store_ids_as_text(snapshot_redis: str) -> None:
    """Store ids that look like rich markup ("[/]", "[bold]x") are printed literally, in both layouts."""
    client = redis.Redis.from_url(snapshot_redis)
    odd = ["[/]", "[bold]x"]
    for store in odd:
        client.hset(metric_key(store, "1h"), mapping=STORE_FIELDS)
        client.sadd(STORES_KEY, store)
    client.close()
    snapshots = read_snapshots(snapshot_redis, odd, ["1h"])
    for width in (200, 40):  # wide, then compact
        console = Console(width=width, record=True)
        console.print(render_table(snapshots, width=width))
        text = console.export_text()
        assert "[/]" in text and "[bold]x" in text


def test_snapshot_without_metrics_exits_1(snapshot_redis: str, tmp_path: Path) -> None:
    """An empty Redis, or a store that has no metrics, is a clear message and exit code 1."""
    env = snapshot_env(snapshot_redis, tmp_path)
    result = run_loyalty("snapshot", env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 1
    assert "no metrics in Redis" in result.stderr and "Traceback" not in result.stderr

    write_metrics(snapshot_redis)
    result = run_loyalty("snapshot", "--json", "--store", "store-zz", env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 1 and "store-zz" in result.stderr


def test_snapshot_without_redis_exits_2(tmp_path: Path) -> None:
    """An unreachable Redis is a clear message and exit code 2."""
    env = snapshot_env(f"redis://127.0.0.1:{free_port()}/0", tmp_path)
    result = run_loyalty("snapshot", env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "cannot read Redis" in result.stderr and "Traceback" not in result.stderr
