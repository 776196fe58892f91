"""``loyalty dashboard`` on the real Redis: the page in a real browser (chromium), the API, ``/metrics``, reconnects.

Redis databases 10 (the browser test) and 15 (the API and ``/metrics``) of the session's Redis are used
by no other test; the reconnect test runs its own redis-server. Snapshots are written the way the worker
writes them (``RedisSink``), alerts as SPEC section 7 says (XADD to the stream, PUBLISH on the channel).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from infra import local
from metrics.catalog import METRIC_NAMES
from streams.dashboard.data import ALERTS_KEY
from streams.dashboard.hub import Hub
from streams.dashboard.server import HUB, create_app
from streams.settings import Settings
from streams.sinks.redis_sink import HEALTH_KEY, UPDATES_CHANNEL, RedisSink
from streams.sinks.snapshots import cohorts_payload, dumps, snapshot_payload
from support import async_wait_for

pytestmark = pytest.mark.slow

BROWSER_DB = 10
API_DB = 15
HOUR_MS = 3_600_000
T0 = 1_796_000_000_000  # a fixed "now" of the snapshots (2026-11-30T...)


def db_url(services: Any, database: int) -> str:
    return services.redis_url.rsplit("/", 1)[0] + f"/{database}"


def metrics(**values: object) -> dict[str, object]:
    """A full metric set (every name of the catalogue, null unless given)."""
    out: dict[str, object] = dict.fromkeys(METRIC_NAMES)
    out.update(values)
    return out


def realistic(nps: float, **more: object) -> dict[str, object]:
    values: dict[str, object] = dict(
        nps=nps, nps_ci_low=nps - 7.25, nps_ci_high=nps + 6.5, nps_responses=412, csat=81.25, csat_responses=300,
        ces=5.4, cli=71.2, customers_end=2_410, customers_start=2_300, new_customers=120, retention_rate=91.5,
        churn_rate=6.0, churned_customers=138, repeat_purchase_rate=38.2, clv=Decimal("412.37"), cac=Decimal("38.90"),
        revenue_churn_rate=7.4, net_revenue_retention=104.2, participation_rate=44.0, redemption_rate=61.5,
        net_revenue=Decimal("51234.50"), orders=950, cac_by_channel={"ads": 12.5, "email": None},
        churn_rate_by_nps_segment={"promoter": 2.5, "passive": 5.0, "detractor": 11.25, "none": None},
        repeat_purchase_rate_by_nps_segment={"promoter": 52.0, "passive": 40.0, "detractor": 21.5, "none": 30.0},
        net_revenue_by_nps_segment={"promoter": Decimal("30000.25"), "passive": Decimal("12000"),
                                    "detractor": Decimal("4234.25"), "none": Decimal("5000")},
    )  # fmt: skip
    values.update(more)
    return metrics(**values)


async def write(sink: RedisSink, store: str, window: str, as_of_ms: int, values: dict[str, object],
                currency: str | None = "EUR") -> dict[str, Any]:
    """One snapshot through the worker's sink (hash, history entry, store set, ``loyalty:updates``)."""
    payload = snapshot_payload(store, window, as_of_ms, currency, values)
    assert await sink.write(payload, dumps(payload))
    return payload


def cohort_matrix(sizes: list[int]) -> dict[str, Any]:
    """Twelve monthly cohorts (2025-12 .. 2026-11) of the given sizes, each keeping (12 - p) / 12 active at p."""
    rows = []
    for index, size in enumerate(sizes):
        known = 12 - index
        active = [size * (12 - period) // 12 for period in range(known)] + [None] * index
        buyers = [size // 4 for _ in range(known)] + [None] * index
        rows.append({
            "cohort": f"{2025 + (index + 11) // 12}-{(index + 11) % 12 + 1:02d}", "customers": size,
            "active_customers": active, "purchasers": buyers,
            "active_rate": [None if a is None else (100 * a / size if size else None) for a in active],
            "purchase_rate": [None if b is None else (100 * b / size if size else None) for b in buyers],
        })
    return {"period": "month", "cohorts": rows}


async def write_cohorts(sink: RedisSink, store: str, as_of_ms: int, sizes: list[int]) -> None:
    """A store's cohort matrix through the worker's sink (hash and ``loyalty:updates``)."""
    payload = cohorts_payload(store, as_of_ms, cohort_matrix(sizes))
    assert await sink.write_cohorts(payload, dumps(payload))


def alert(store: str, state: str = "firing") -> dict[str, Any]:
    return {
        "schema": "loyalty.alert.v1", "alert_id": f"{store}|24h|churn_spike|{T0}", "kind": "churn_spike",
        "state": state, "store_id": store, "window": "24h", "as_of": "2026-11-30T00:53:20.000Z", "as_of_ms": T0,
        "observed": 14.2, "baseline": 3.1, "threshold": 6.4,
        "message": "Churn 14.2% is above its usual 3.1% (threshold 6.4%)",
    }  # fmt: skip


async def send_alert(client: aioredis.Redis, body: dict[str, Any]) -> None:
    encoded = orjson.dumps(body)
    await client.xadd(ALERTS_KEY, {"json": encoded}, maxlen=1000, approximate=True)
    await client.publish(ALERTS_KEY, encoded)


@contextlib.asynccontextmanager
async def dashboard(redis_url: str, windows: str = "1h,24h") -> AsyncIterator[tuple[str, web.Application]]:
    """The dashboard application served on a free loopback port, its hub subscribed."""
    port = local.free_port()
    settings = Settings(redis_url=redis_url, windows=windows, dashboard_port=port)  # type: ignore[call-arg]
    app = create_app(settings, hub=Hub(redis_url, first_backoff=0.1, max_backoff=0.5, health_check_interval=1.0))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        await asyncio.wait_for(app[HUB].connected.wait(), timeout=10)
        yield f"http://127.0.0.1:{port}", app
    finally:
        await runner.cleanup()


@pytest.fixture
async def browser_redis(services: Any) -> AsyncIterator[tuple[str, aioredis.Redis]]:
    url = db_url(services, BROWSER_DB)
    client = aioredis.Redis.from_url(url)
    await client.flushdb()
    yield url, client
    await client.aclose()


@pytest.fixture
async def api_redis(services: Any) -> AsyncIterator[tuple[str, aioredis.Redis]]:
    url = db_url(services, API_DB)
    client = aioredis.Redis.from_url(url)
    await client.flushdb()
    yield url, client
    await client.aclose()


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is not installed: run `make bootstrap`", pytrace=False)
    return path


async def test_page_shows_redis_values_updates_live_shows_alerts_and_stays_on_its_origin(browser_redis):  # type: ignore[no-untyped-def]
    """The page shows the hash, the change against a window earlier, live updates and alerts; text only; one origin."""
    from playwright.async_api import async_playwright, expect

    url, client = browser_redis
    sink = RedisSink(url)
    html_store = "<b>x</b>"
    try:
        await write(sink, "store-1", "24h", T0 - 25 * HOUR_MS, realistic(10.0))
        await write(sink, "store-1", "24h", T0 - HOUR_MS, realistic(30.0))
        await write(sink, "store-1", "24h", T0, realistic(42.5))
        await write(sink, html_store, "24h", T0, realistic(-5.0), currency="USD")
        await write_cohorts(sink, "store-1", T0, [120] * 12)
        await write_cohorts(sink, html_store, T0, [0] * 12)
        async with dashboard(url) as (base, app), async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
            context = await browser.new_context(
                locale="en-US", timezone_id="UTC", viewport={"width": 1920, "height": 1080}
            )
            page = await context.new_page()
            problems: list[str] = []
            requests: list[str] = []
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            # leaving a page aborts its open event stream: that one is not a failure
            page.on("requestfailed", lambda r: None if "/events?" in r.url and r.failure == "net::ERR_ABORTED"
                    else problems.append(f"failed: {r.url} {r.failure}"))
            page.on("request", lambda r: requests.append(r.url))

            await page.goto(f"{base}/?store=store-1&window=24h")
            nps = page.locator("[data-metric=nps]")
            await expect(nps.locator(".value")).to_have_text("42.5", timeout=10_000)
            # against the snapshot at or before as_of - 24h (the one 25 h earlier, NPS 10)
            await expect(nps.locator(".change")).to_have_text("▲ +32.5 vs 24h ago")
            await expect(nps.locator(".sub")).to_have_text("95% CI 35 to 49 · n = 412")
            await expect(page.locator("[data-metric=csat] .value")).to_have_text("81.3%")
            await expect(page.locator("[data-metric=clv] .value")).to_have_text("€412.37")
            await expect(page.locator("[data-metric=churn_rate] .value")).to_have_text("6.0%")
            await expect(page.locator("[data-metric=customers_end] .value")).to_have_text("2,410")
            await expect(page.locator("#store")).to_have_value("store-1")
            await expect(page.locator("#window")).to_have_value("24h")
            await async_wait_for(lambda: len(app[HUB].clients) == 1, timeout=10)

            # live: a new snapshot through the sink (PUBLISH on loyalty:updates) shows without a reload
            await write(sink, "store-1", "24h", T0 + 60_000, realistic(50.0, csat=90.0))
            await expect(nps.locator(".value")).to_have_text("50.0", timeout=2_000)
            await expect(page.locator("[data-metric=csat] .value")).to_have_text("90.0%", timeout=2_000)
            await expect(page.locator("#alerts")).to_have_class("alerts calm")

            # churn by NPS segment: bars scaled to the largest churn, the ratio said in words
            segments = page.locator("#segment-bars .segment-row")
            await expect(segments).to_have_count(4)
            ratio = page.locator("#segment-ratio")
            await expect(ratio).to_have_text("Detractors churn 4.5\u00d7 as often as promoters")
            await expect(segments.nth(2).locator(".value")).to_have_text("11.3%")
            await expect(segments.nth(2).locator(".more")).to_have_text("repeat 21.5% · €4,234 net")
            await expect(segments.nth(3).locator(".value")).to_have_text("\u2013")
            widths = await segments.locator(".bar").evaluate_all("bars => bars.map(b => b.style.width)")
            assert [float(w.rstrip("%")) for w in widths] == pytest.approx([2.5 / 11.25 * 100, 5 / 11.25 * 100, 100, 0])
            churn = {"promoter": 8.0, "passive": 4.0, "detractor": 4.0, "none": 1.0}
            await write(sink, "store-1", "24h", T0 + 120_000,
                        realistic(50.0, csat=90.0, churn_rate_by_nps_segment=churn))
            await expect(ratio).to_have_text("Detractors churn 0.5\u00d7 as often as promoters", timeout=2_000)

            # cohort retention: a heatmap of 12 cohorts by 12 months, shaded and labelled by the share
            cells = page.locator("#cohort-grid .cell")
            await expect(cells).to_have_count(144)
            await expect(page.locator("#cohort-grid .name").first).to_have_text("Dec 25")
            await expect(cells.nth(0)).to_have_text("100")
            await expect(cells.nth(3)).to_have_text("75")  # 90 of 120 still active three months on
            await expect(cells.nth(12 * 11 + 1)).to_have_class("cell empty")  # the newest cohort has one month
            await expect(page.locator("#cohort-empty")).to_be_hidden()
            # live: a new matrix shows without a reload; the other measure on a click
            await write_cohorts(sink, "store-1", T0 + 60_000, [40] * 12)
            await expect(cells.nth(3)).to_have_text("75", timeout=2_000)
            await expect(page.locator("#cohort-grid .size").first).to_have_text("40", timeout=2_000)
            await page.locator("#cohort-view button[data-view=ordered]").click()
            await expect(cells.nth(3)).to_have_text("25")
            assert "3 months: 10 of 40 customers ordered" in (await cells.nth(3).get_attribute("title") or "")

            await send_alert(client, alert("store-1"))
            banner = page.locator("#alerts")
            await expect(banner).to_have_class("alerts firing", timeout=2_000)
            await expect(banner).to_contain_text("Churn 14.2% is above its usual 3.1% (threshold 6.4%)")
            await expect(banner).to_contain_text("Churn spike · store-1 · 24h")
            await send_alert(client, alert("store-1", "resolved"))
            await expect(banner).to_have_class("alerts calm", timeout=2_000)

            # a store id with HTML in it is text everywhere
            await page.goto(f"{base}/?store=%3Cb%3Ex%3C%2Fb%3E&window=24h")
            await expect(page.locator("[data-metric=nps] .value")).to_have_text("-5.0", timeout=10_000)
            await expect(page.locator("#scope strong")).to_have_text(html_store)
            await expect(page.locator("#store option:checked")).to_have_text(html_store)
            assert await page.locator("#scope b, #store b, header b").count() == 0
            await expect(page.locator("[data-metric=clv] .value")).to_have_text("$412.37")
            await expect(page.locator("#cohort-empty")).to_be_visible()  # a store without new customers

            await browser.close()
        assert problems == []
        foreign = [r for r in requests if not r.startswith(base + "/")]
        assert requests and not foreign, foreign
    finally:
        await sink.close()


async def test_metrics_endpoint_equals_redis(api_redis):  # type: ignore[no-untyped-def]
    """/metrics parses as Prometheus text and every sample equals its Redis field."""
    url, client = api_redis
    sink = RedisSink(url)
    try:
        await write(sink, "store-1", "1h", T0, realistic(12.5))
        await write(sink, "*", "24h", T0, realistic(-3.0, gross_revenue=None))
        await client.hset(HEALTH_KEY, mapping={
            "events_applied": 123_456, "events_received": 130_000, "dead_letters": 7, "dead_letters:invalid_json": 4,
            "dead_letters:currency_mismatch": 3, "consumer_lag:orders:0": 17, "consumer_lag:t-x.signups:11": 0,
            "alerts:churn_spike:firing": 2, "alerts:churn_spike:resolved": 1, "alerts:nps_drop:firing": 1,
            "alert_sampling_behind_ms:0": 0, "alert_sampling_behind_ms:3": 5_400_000,
            "alert_sampling_behind_ms:*": 900_000,
        })  # fmt: skip
        async with (
            dashboard(url) as (base, _app),
            aiohttp.ClientSession() as http,
            http.get(f"{base}/metrics") as response,
        ):
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = await response.text()
        families = {family.name: family for family in text_string_to_metric_families(text)}
        samples: dict[tuple[str, str, str], float] = {}
        for sample in families["loyalty_metric"].samples:
            key = (sample.labels["store"], sample.labels["window"], sample.labels["name"])
            assert key not in samples
            samples[key] = sample.value
        expected: dict[tuple[str, str, str], float] = {}
        for store, window in (("store-1", "1h"), ("*", "24h")):
            fields = await client.hgetall(f"loyalty:{store}:{window}")
            for name, raw in fields.items():
                name = name.decode()
                if name in ("as_of_ms", "currency") or name.endswith(("_by_channel", "_by_nps_segment")) or raw == b"":
                    continue
                expected[(store, window, name)] = float(raw)
        assert samples == expected
        assert samples[("store-1", "1h", "nps")] == 12.5 and ("*", "24h", "gross_revenue") not in samples
        assert samples[("store-1", "1h", "clv")] == 412.37

        def values(name: str, *labels: str) -> dict[tuple[str, ...], float]:
            return {tuple(s.labels[label] for label in labels): s.value for s in families[name].samples
                    if s.name == name or s.name == name + "_total"}

        assert values("loyalty_events_processed") == {(): 123_456.0}
        assert "loyalty_events_processed_total 123456.0" in text
        assert values("loyalty_dead_letters", "reason") == {("invalid_json",): 4.0, ("currency_mismatch",): 3.0}
        assert values("loyalty_consumer_lag", "topic", "partition") == {
            ("orders", "0"): 17.0, ("t-x.signups", "11"): 0.0,
        }
        assert values("loyalty_alerts", "kind", "state") == {
            ("churn_spike", "firing"): 2.0, ("churn_spike", "resolved"): 1.0, ("nps_drop", "firing"): 1.0,
        }
        assert values("loyalty_alert_sampling_behind_seconds", "partition") == {
            ("0",): 0.0, ("3",): 5400.0, ("*",): 900.0,
        }
        assert values("loyalty_snapshot_as_of_seconds", "store", "window") == {
            ("store-1", "1h"): T0 / 1000, ("*", "24h"): T0 / 1000,
        }
        assert values("loyalty_redis_up") == {(): 1.0}
        by_segment = values("loyalty_segment_metric", "store", "window", "name", "segment")
        expected_segments: dict[tuple[str, ...], float] = {}
        for store, window in (("store-1", "1h"), ("*", "24h")):
            for name in ("churn_rate", "repeat_purchase_rate", "net_revenue"):
                raw = await client.hget(f"loyalty:{store}:{window}", name + "_by_nps_segment")
                for segment, value in orjson.loads(raw).items():
                    if value is not None:
                        expected_segments[(store, window, name, segment)] = float(value)
        assert by_segment == expected_segments
        assert by_segment[("store-1", "1h", "churn_rate", "detractor")] == 11.25
        assert ("store-1", "1h", "churn_rate", "none") not in by_segment  # null: no sample
    finally:
        await sink.close()


async def test_api_snapshot_history_and_bad_parameters(api_redis):  # type: ignore[no-untyped-def]
    """/api/snapshot is the output topic's JSON, /api/history the stream's values; bad queries get 400/404."""
    url, client = api_redis
    sink = RedisSink(url)
    try:
        await write(sink, "store-2", "24h", T0 - 2 * HOUR_MS, realistic(20.0))
        await write(sink, "store-2", "24h", T0 - HOUR_MS, realistic(25.0, nps_ci_low=None))
        last = await write(sink, "store-2", "24h", T0, realistic(-12.75))
        async with dashboard(url) as (base, _app), aiohttp.ClientSession() as http:

            async def get(path: str) -> tuple[int, Any]:
                async with http.get(base + path) as response:
                    return response.status, orjson.loads(await response.read())

            status, body = await get("/api/snapshot?store=store-2&window=24h")
            assert status == 200
            assert body == orjson.loads(dumps(last))
            assert body["schema"] == "loyalty.metrics.v1" and body["as_of"] == "2026-11-30T00:53:20.000Z"
            assert body["metrics"]["clv"] == 412.37
            assert body["metrics"]["cac_by_channel"] == {"ads": 12.5, "email": None}

            status, body = await get("/api/history?store=store-2&window=24h&metric=nps")
            assert (status, body) == (200, [
                {"as_of_ms": T0 - 2 * HOUR_MS, "value": 20.0}, {"as_of_ms": T0 - HOUR_MS, "value": 25.0},
                {"as_of_ms": T0, "value": -12.75},
            ])  # fmt: skip
            status, body = await get("/api/history?store=store-2&window=24h&metric=nps_ci_low")
            assert [point["value"] for point in body] == [12.75, None, -20.0]

            status, body = await get("/api/meta")
            assert body["stores"] == ["*", "store-2"] and body["windows"] == ["1h", "24h"]

            await write_cohorts(sink, "store-2", T0, [30] * 12)
            status, body = await get("/api/cohorts?store=store-2")
            assert status == 200 and body["schema"] == "loyalty.cohorts.v1" and body["as_of_ms"] == T0
            assert body["cohorts"] == cohort_matrix([30] * 12)["cohorts"]
            assert not await sink.write_cohorts(cohorts_payload("store-2", T0 - 1, cohort_matrix([1] * 12)), b"{}")

            for path, expected in [
                ("/api/snapshot?window=24h", 400),
                ("/api/snapshot?store=store-2&window=2h", 400),
                ("/api/snapshot?store=store-2", 400),
                ("/api/history?store=store-2&window=24h", 400),
                ("/api/history?store=store-2&window=24h&metric=bogus", 400),
                ("/api/history?store=store-2&window=24h&metric=cac_by_channel", 400),
                ("/api/snapshot?store=nope&window=24h", 404),
                ("/api/snapshot?store=store-2&window=1h", 404),
                ("/api/history?store=nope&window=24h&metric=nps", 404),
                ("/api/cohorts?store=nope", 404),
                ("/api/cohorts", 400),
                ("/api/alerts?limit=0", 400),
                ("/events?store=store-2&window=5m", 400),
            ]:
                status, body = await get(path)
                assert (path, status) == (path, expected)
                assert isinstance(body["error"], str) and body["error"]

            await send_alert(client, alert("store-2"))
            status, body = await get("/api/alerts")
            assert (status, body) == (200, [alert("store-2")])
            status, body = await get("/healthz")
            assert status == 200 and body["status"] == "ok"
    finally:
        await sink.close()


async def read_events(response: aiohttp.ClientResponse, into: list[tuple[str, Any]]) -> None:
    """Parse a server-sent-events stream into ``(event, data)`` pairs until it ends."""
    event, data = "message", b""
    async for line in response.content:
        line = line.rstrip(b"\r\n")
        if not line:
            if data:
                into.append((event, orjson.loads(data)))
            event, data = "message", b""
        elif line.startswith(b"event: "):
            event = line[7:].decode()
        elif line.startswith(b"data: "):
            data = line[6:]


async def test_one_subscription_for_all_clients_and_reconnect_after_redis_restart(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Five browsers share one Redis subscription; after Redis restarts the hub resubscribes and streams resume."""
    port = local.free_port()
    redis_server = local.LocalRedis(tmp_path / "own-redis")
    redis_server.start(port, die_with_parent=True)
    url = f"redis://{local.LOOPBACK}:{port}/0"
    client = aioredis.Redis.from_url(url)
    sink = RedisSink(url)
    tasks: list[asyncio.Task[None]] = []
    try:
        async with dashboard(url) as (base, app), aiohttp.ClientSession() as http:
            streams: list[list[tuple[str, Any]]] = [[] for _ in range(5)]
            responses = []
            for events in streams:
                response = await http.get(f"{base}/events?store=s&window=1h")
                assert response.headers["Content-Type"] == "text/event-stream"
                responses.append(response)
                tasks.append(asyncio.create_task(read_events(response, events)))
            await async_wait_for(lambda: len(app[HUB].clients) == 5, timeout=10)
            assert (await client.pubsub_numsub(UPDATES_CHANNEL)) == [(UPDATES_CHANNEL.encode(), 1)]
            assert (await client.pubsub_numsub(ALERTS_KEY)) == [(ALERTS_KEY.encode(), 1)]

            await write(sink, "s", "1h", T0, realistic(1.0))
            await write(sink, "other", "1h", T0, realistic(2.0))  # not for these clients
            await async_wait_for(lambda: all(any(e == "snapshot" for e, _ in s) for s in streams), timeout=5)

            redis_server.stop()
            await async_wait_for(lambda: all(("status", {"redis": "down"}) in s for s in streams), timeout=15)
            async with http.get(f"{base}/healthz") as response:
                assert response.status == 503

            redis_server.start(port, die_with_parent=True)
            await async_wait_for(lambda: all(("resync", {}) in s for s in streams), timeout=15)
            assert app[HUB].connections == 2
            async with http.get(f"{base}/healthz") as response:
                assert response.status == 200
            await sink.close()
            sink = RedisSink(url)  # the old connection died with the server (the worker retries the same way)
            await write(sink, "s", "1h", T0 + 1_000, realistic(3.0))
            await async_wait_for(lambda: all(sum(e == "snapshot" for e, _ in s) == 2 for s in streams), timeout=5)
            for events in streams:
                snapshots = [data for event, data in events if event == "snapshot"]
                assert [(d["store_id"], d["metrics"]["nps"]) for d in snapshots] == [("s", 1.0), ("s", 3.0)]
                assert [e for e, _ in events if e != "snapshot"] == ["status", "status", "status", "resync"]
            for response in responses:
                response.close()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await sink.close()
        await client.aclose()
        redis_server.stop()


async def test_a_client_that_falls_behind_is_dropped_and_the_others_still_get_everything() -> None:
    """A stuck browser's queue fills up: its stream is ended (it reconnects), the others miss nothing."""
    from streams.dashboard import hub as hub_module

    hub = Hub("redis://127.0.0.1:1/0")
    stuck, reading = hub.add("s", "1h"), hub.add("s", "1h")
    other_window = hub.add("s", "24h")
    for seq in range(hub_module.CLIENT_QUEUE + 5):
        hub.dispatch(UPDATES_CHANNEL, orjson.dumps({"store_id": "s", "window": "1h", "as_of_ms": seq}))
        if seq < hub_module.CLIENT_QUEUE + 4:
            frame = reading.queue.get_nowait()
            assert frame is not None and f'"as_of_ms":{seq}}}'.encode() in frame
    assert stuck.dropped and stuck not in hub.clients
    frames = [stuck.queue.get_nowait() for _ in range(stuck.queue.qsize())]
    assert frames[-1] is None and len(frames) == hub_module.CLIENT_QUEUE
    assert reading in hub.clients and reading.queue.qsize() == 1
    assert other_window.queue.empty()
    hub.dispatch(ALERTS_KEY, b'{"kind":"nps_drop",\n"state":"firing"}')  # alerts go to everyone, on one line
    assert reading.queue.qsize() == 2 and other_window.queue.get_nowait() == (
        b'event: alert\ndata: {"kind":"nps_drop","state":"firing"}\n\n'
    )
