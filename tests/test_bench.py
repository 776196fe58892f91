"""`loyalty bench` at a small scale on the session's Kafka and Redis: every part runs and its numbers hold together.

The bench itself fails when the final snapshots of its sample stores differ
from the batch reference, or when the memory run's customers are not all
counted, so a pass here also means those checks held.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import orjson
import pytest

from bench.latency_hops import HOPS, hop_breakdown
from bench.run import QUIET_SPAN_S, topic_names
from support import clean_env, run_loyalty

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)
def test_bench_runs_every_part_and_checks_its_numbers(services, tmp_path: Path) -> None:
    """Ceilings and the peer, both shapes (checked against the reference), latency runs, memory, restart and
    scale-out in one JSON, and its PNG."""
    env = clean_env(
        KAFKA_BOOTSTRAP_SERVERS=services.kafka_bootstrap,
        REDIS_URL=services.redis_url,
        LOYALTY_STATE_DIR=str(services.state_dir),
        LOYALTY_PARTITIONS="4",
    )
    out = tmp_path / "results"
    topics_before = asyncio.run(topic_names(services.kafka_bootstrap))
    started_utc = dt.datetime.now(dt.UTC)
    result = run_loyalty(
        "bench", "--events", "3000", "--batch", "100", "--stores", "3", "--customers", "1500",
        "--sample-stores", "2", "--duration", "5s", "--rate", "200", "--memory-customers", "3000",
        "--small-stores", "200", "--restart-events", "1500,3000", "--scale-events", "3000",
        "--latency-runs", "2", "--output-dir", str(out), "--timeout", "300",
        env=env, cwd=ROOT, timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (written,) = out.glob("*.json")
    results = orjson.loads(written.read_bytes())
    (picture,) = out.glob("*.png")
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000
    assert results["machine"]["cores"] >= 1 and results["machine"]["kafka"].startswith("4.")
    assert set(results["shapes"]) == {"1", "100"}
    for batch, shape in results["shapes"].items():
        messages = 3000 if batch == "1" else None
        for ceiling in ("raw_aiokafka", "empty_faust_agent"):
            assert shape[ceiling]["events"] == 3000
            if messages is not None:
                assert shape[ceiling]["messages"] == messages
            assert shape[ceiling]["events_per_s"] > 0
        worker = shape["worker"]
        assert worker["events"] == 3000 and worker["checked_stores"] == ["store-2", "store-3"]
        assert worker["checked_snapshots"] == 2 * 4  # two stores, four default windows
        assert worker["ratio_to_empty_agent"] == pytest.approx(
            worker["events_per_s"] / shape["empty_faust_agent"]["events_per_s"])
        peer = shape["quix_streams_peer"]  # the bench refuses a peer whose counts by store are not the workload's
        assert peer["events"] == 3000 and sum(peer["stores"].values()) == 3000 and len(peer["stores"]) == 3
        assert worker["ratio_to_peer"] == pytest.approx(worker["events_per_s"] / peer["events_per_s"])
    assert results["shapes"]["100"]["raw_aiokafka"]["messages"] < 3000 / 50  # batches of 100 (per topic)
    runs = results["latency"]["runs"]
    assert len(runs) == 2
    for run in runs:
        assert run["orders_measured"] > 100
        # prompt bursts for a whole QUIET_SPAN_S before the worker started; at most the wait's bound
        assert QUIET_SPAN_S <= run["broker_quiet_after_s"] <= 125
        assert 0 < run["p50_s"] <= run["p99_s"] <= run["max_s"]
        assert dt.datetime.fromisoformat(run["sending_from_utc"]) > started_utc
        assert sum(point["orders"] for point in run["over_time"]) == run["orders_measured"]
        assert max(point["max_s"] for point in run["over_time"]) == run["max_s"]
        # every send of the measured seconds was acknowledged, orders and the other events alike
        assert sum(point["sends"] for point in run["ack_over_time"]) > run["orders_measured"]
        # a short run ends before the worker's first purge of its repartition topics: its orders are there
        hops = run["hops"]
        assert run["orders_measured"] // 2 < hops["orders"] <= run["orders_measured"]
        for hop in HOPS:
            assert 0 <= hops[hop]["p50_s"] <= hops[hop]["p99_s"] <= hops[hop]["max_s"] <= run["max_s"]
        assert hops["ingest"]["p50_s"] > 0 and hops["aggregate_emit"]["p50_s"] > 0
    assert results["latency"]["p99_s_worst"] == max(run["p99_s"] for run in runs)
    # the throughput parts dropped their topics before it: it waited for the broker to remove their files
    assert 0 < results["latency"]["waited_for_dropped_topics_s"] <= 60 + 5
    # every part deleted the topics it made, its ceilings' and peer's too
    # (a fresh broker makes its own offsets topic on the first group: not the bench's)
    left = asyncio.run(topic_names(services.kafka_bootstrap)) - topics_before - {"__consumer_offsets"}
    assert sorted(left) == []
    memory = results["memory"]  # a signup, an NPS answer and 1 to 3 orders (2 on average) per customer
    assert (memory["customers"], memory["events"]) == (3000, 4 * 3000) and memory["peak_rss_bytes"] > 50 * 2**20
    small = results["small_stores"]  # the part checked * counted all 1,000 customers before measuring
    assert (small["stores"], small["customers"]) == (200, 1000) and small["peak_rss_bytes"] > 50 * 2**20
    restart = results["restart"]
    for events, days in (("1500", 1), ("3000", 2)):
        run = restart[events]
        assert (run["events"], run["days"], run["keys"]) == (int(events), days, (3 + 1) * 4)
        assert 0 < run["restart_seconds"] < 300
        assert run["internal_bytes"]["customer-facts-changelog"] > 0 and run["deltas_bytes_per_event"] > 0
    assert restart["ratio_longest_to_shortest"] == pytest.approx(
        restart["3000"]["restart_seconds"] / restart["1500"]["restart_seconds"])
    scale = results["scale_out"]
    assert scale["events"] == 3000 and scale["partitions"] == 4
    assert scale["ratio"] == pytest.approx(scale["2_workers"]["events_per_s"] / scale["1_workers"]["events_per_s"])
    shares = scale["2_workers"]["partition_bytes"]
    assert {"events-by-customer", "deltas", "customer-facts-changelog", "all three", "all internal"} <= set(shares)
    for part in shares.values():
        assert 0.25 <= part["largest_partition_share"] <= 1.0  # four partitions: at least an even share
    assert shares["all internal"]["bytes"] == sum(
        part["bytes"] for label, part in shares.items() if label not in ("all three", "all internal"))
    for run in (scale["1_workers"], scale["2_workers"]):
        seconds, done = zip(*run["progress"], strict=True)
        assert list(seconds) == sorted(seconds) and list(done) == sorted(done) and done[-1] >= 3000
        assert seconds[-1] == pytest.approx(run["seconds"], abs=0.5)  # the last note is the end of the run
        # 3,000 events may all be done by the first note: then the half has no time
        if len(done) >= 2 and done[0] < 1500:
            assert run["second_half_events_per_s"] > 0
        else:
            assert run["second_half_events_per_s"] is None
    halves = [scale[f"{count}_workers"]["second_half_events_per_s"] for count in (1, 2)]
    if None in halves:
        assert scale["second_half_ratio"] is None
    else:
        assert scale["second_half_ratio"] == pytest.approx(halves[1] / halves[0])
    assert "loyalty bench" in result.stdout


def _segments(folder: Path, sizes: dict[int, int]) -> None:
    folder.mkdir(parents=True)
    for base, size in sizes.items():
        (folder / f"{base:020d}.log").write_bytes(b"x" * size)


@pytest.mark.parametrize(("cleaned_upto", "settled"), [
    (None, False),  # never cleaned: both closed segments are dirty
    (100, False),   # the second closed segment (200 of 300 closed bytes) is still dirty
    (300, True),    # cleaned up to the active segment
    (250, False),   # inside the second closed segment: like Kafka, all of it counts as dirty
])
def test_compaction_settled_follows_the_cleaners_dirty_ratio(tmp_path: Path, cleaned_upto: int | None,
                                                             settled: bool) -> None:
    """The bench waits for compaction by the cleaner's rule: closed bytes from the cleaned offset on, over 10 %."""
    from bench.recovery import compaction_settled

    _segments(tmp_path / "app-facts-changelog-0", {0: 100, 100: 200, 300: 5_000})  # the last one is active
    _segments(tmp_path / "app-facts-changelog-1", {0: 50})  # only an active segment: nothing to compact
    if cleaned_upto is not None:
        (tmp_path / "cleaner-offset-checkpoint").write_text(
            f"0\n2\napp-facts-changelog 0 {cleaned_upto}\nother-topic 1 7\n")
    assert compaction_settled(tmp_path, ["app-facts-changelog"]) is settled
    assert compaction_settled(None, ["app-facts-changelog"]) is True


def test_compaction_settled_leaves_dirt_under_the_ratio(tmp_path: Path) -> None:
    """Dirty bytes at most 10 % of the closed ones are what the cleaner leaves: settled."""
    from bench.recovery import compaction_settled

    _segments(tmp_path / "app-checkpoints-0", {0: 950, 1000: 50, 2000: 10})
    (tmp_path / "cleaner-offset-checkpoint").write_text("0\n1\napp-checkpoints 0 1000\n")
    assert compaction_settled(tmp_path, ["app-checkpoints"]) is True
    (tmp_path / "app-checkpoints-0" / f"{1000:020d}.log").write_bytes(b"x" * 200)  # now 200 of 1150
    assert compaction_settled(tmp_path, ["app-checkpoints"]) is False


def test_the_peer_gets_the_products_kafka_security(tmp_path: Path) -> None:
    """SASL over TLS settings become the librdkafka properties the Quix Streams peer connects with."""
    from quixstreams.kafka.configuration import ConnectionConfig

    from bench.quix_peer import librdkafka_security
    from streams.settings import Settings

    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here")
    settings = Settings(_env_file=None, KAFKA_SECURITY_PROTOCOL="SASL_SSL",  # type: ignore[call-arg]
                        KAFKA_SASL_MECHANISM="scram-sha-512", KAFKA_SASL_USERNAME="loyalty",
                        KAFKA_SASL_PASSWORD="s3cret", KAFKA_SSL_CAFILE=str(ca))
    config = librdkafka_security(settings)
    assert config == {"security.protocol": "SASL_SSL", "ssl.ca.location": str(ca), "sasl.mechanism": "SCRAM-SHA-512",
                      "sasl.username": "loyalty", "sasl.password": "s3cret"}
    connection = ConnectionConfig.from_librdkafka_dict({"bootstrap.servers": "k:9093", **config})
    assert connection.as_librdkafka_dict()["sasl.mechanism"] == "SCRAM-SHA-512"


_RESIDENT_GROWTH = """
import sys
from bench.run import customer_bodies, small_store_bodies
from bench.recovery import storefront_bodies

def resident_kib():
    with open("/proc/self/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0])

make = {"customers": lambda: customer_bodies(25_000, 5), "small": lambda: small_store_bodies(25_000),
        "storefront": lambda: storefront_bodies(100_000, 5, 20_000, 1)}[sys.argv[1]]
list(make())  # the generator's own caches and first allocations, then measured
before = resident_kib()
bodies = list(make())
print(len(bodies), sum(len(body) for _, body in bodies), resident_kib() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident size from /proc")
@pytest.mark.parametrize("generator", ["customers", "small", "storefront"])
def test_the_bench_keeps_its_generated_events_at_their_size(generator: str) -> None:
    """The bench's pre-generated events hold little more memory than their bytes (not orjson's 4 KiB buffers)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _RESIDENT_GROWTH, generator], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parent.parent)
    count, payload_bytes, grown_kib = map(int, done.stdout.split())
    assert count > 90_000
    # each body kept: its bytes, the bytes object's header and a (topic, body) tuple, about 100 bytes more
    assert grown_kib * 1024 < payload_bytes + 200 * count, (count, payload_bytes, grown_kib)


def test_hop_breakdown_joins_each_order_to_the_records_that_carried_it() -> None:
    """An order's hops come from its own by-customer record and that record's earliest deltas part;
    orders purged from either topic, non-orders, marks and the clock are left out."""
    sent = {"o1": 1_000, "o2": 1_010, "o3": 1_050, "o4": 900, "signup": 1_005}
    by_customer = [
        (3, 7, 1_030, orjson.dumps([["o1", "order.placed"], ["signup", "customer.signed_up"], ["o2", "order.placed"]])),
        (1, 2, 1_100, orjson.dumps([["o3", "order.placed"]])),  # its deltas were purged
        (3, 8, 1_200, orjson.dumps({"marks": {}, "from": 3})),
    ]
    deltas = [
        (0, 5, 1_060, orjson.dumps([{"src": [3, 7, 1], "t": 1, "stores": {}}])),
        (1, 9, 1_045, orjson.dumps([{"src": [3, 7, 0], "t": 1, "stores": {}}])),
        (1, 10, 1_300, orjson.dumps({"wm": 1_000})),
    ]
    result = hop_breakdown(sent, {"o1": 0.3, "o2": 0.25, "o3": 0.2, "o4": 0.1}, by_customer, deltas)
    assert result["orders"] == 2
    # percentiles as the bench's others (nearest rank): the lower of two is their p50, the upper their p99
    assert result["ingest"] == {"p50_s": 0.02, "p99_s": 0.03, "max_s": 0.03}
    assert result["facts"] == {"p50_s": 0.015, "p99_s": 0.015, "max_s": 0.015}
    # o1: 0.3 - 0.03 - 0.015, above o2's 0.25 - 0.02 - 0.015
    assert result["aggregate_emit"] == pytest.approx({"p50_s": 0.215, "p99_s": 0.255, "max_s": 0.255})


def test_hop_breakdown_without_any_order_left_has_no_hops() -> None:
    """A run whose orders were all purged reports no orders and no hop figures rather than made-up ones."""
    result = hop_breakdown({"o1": 1_000}, {"o1": 0.2}, [], [])
    assert result == {"orders": 0, "ingest": None, "facts": None, "aggregate_emit": None}
