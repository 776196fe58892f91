"""Load check of ``loyalty dashboard``: many server-sent-event clients on one dashboard process.

    uv run --frozen python -m bench.dashboard_load [--clients 200] [--snapshots 300] [--rate 10]

It starts its own redis-server on a free loopback port (or uses ``REDIS_URL`` when set) and one
``loyalty dashboard`` subprocess, opens ``--clients`` concurrent SSE streams (aiohttp) for one
store and window, then writes ``--snapshots`` snapshots through the worker's ``RedisSink`` (the
same MULTI/EXEC with PUBLISH on ``loyalty:updates``) at ``--rate`` per second, and measures for
every snapshot and every client the delay from the write call to the event's arrival. It reports
the delay percentiles, lost events, the dashboard's CPU (user + system over the publishing phase)
and its RSS, prints them and writes ``bench/results/dashboard-<date>-<clients>clients-<rate>per-s.json``.
Target: p99 < 250 ms.

The clients and the publisher run in this one process, on the same machine as the dashboard, so
the delays include this process's own scheduling (its CPU is reported too).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from infra import local
from metrics.catalog import METRIC_NAMES
from streams.settings import load_settings
from streams.sinks.redis_sink import RedisSink
from streams.sinks.snapshots import dumps, snapshot_payload
from streams.tools.demo import stop_worker

STORE, WINDOW = "bench-store", "24h"
BASE_MS = 1_800_000_000_000
TICKS = os.sysconf("SC_CLK_TCK")


def _metrics(seq: int) -> dict[str, object]:
    """A full metric set like the worker's (so events have the real size, about 1.5 KB of JSON)."""
    values: dict[str, object] = {}
    for index, name in enumerate(METRIC_NAMES):
        values[name] = {"ads": 12.5, "email": 40.25} if name == "cac_by_channel" else (seq * 7 + index) % 1000 / 7
    values["gross_revenue"] = Decimal("123456.78")
    return values


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def _memory(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile.

    >>> percentile([1.0, 2.0, 3.0, 4.0], 0.5), percentile([1.0, 2.0, 3.0, 4.0], 0.99)
    (2.0, 4.0)
    """
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 1))))
    return ordered[rank - 1]


async def _client(http: aiohttp.ClientSession, url: str, received: dict[int, float], ready: asyncio.Event) -> None:
    async with http.get(url) as response:
        response.raise_for_status()
        ready.set()
        event = b""
        async for line in response.content:
            if line.startswith(b"event: "):
                event = line[7:].strip()
            elif line.startswith(b"data: ") and event == b"snapshot":
                arrived = time.perf_counter()
                received[orjson.loads(line[6:])["as_of_ms"] - BASE_MS] = arrived


async def _wait_healthy(http: aiohttp.ClientSession, base: str, proc: subprocess.Popen[bytes], limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the dashboard exited with code {proc.returncode}")
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(base + "/healthz") as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise RuntimeError("the dashboard did not become healthy")


async def run(clients: int, snapshots: int, rate: float, redis_url: str, log_path: Path) -> dict[str, Any]:
    port = local.free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "LOYALTY_DASHBOARD_PORT": str(port), "LOYALTY_LOG_LEVEL": "warning",
           "LOYALTY_WINDOWS": "1h,24h"}
    base = f"http://127.0.0.1:{port}"
    with log_path.open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "dashboard"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    sink = RedisSink(load_settings(redis_url=redis_url))  # with REDIS_SSL_CA_FILE when set
    tasks: list[asyncio.Task[None]] = []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            await _wait_healthy(http, base, proc, 30)
            rss_idle = _memory(proc.pid)["VmRSS"]
            received: list[dict[int, float]] = [{} for _ in range(clients)]
            readies = [asyncio.Event() for _ in range(clients)]
            url = f"{base}/events?store={STORE}&window={WINDOW}"
            tasks = [asyncio.create_task(_client(http, url, r, e)) for r, e in zip(received, readies, strict=True)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in readies)), 60)
            while True:  # every stream registered with the hub before the first snapshot
                async with http.get(base + "/healthz") as response:
                    if (await response.json())["sse_clients"] >= clients:
                        break
                await asyncio.sleep(0.05)
            rss_connected = _memory(proc.pid)["VmRSS"]
            sent: dict[int, float] = {}
            cpu0, wall0, own0 = _cpu_seconds(proc.pid), time.perf_counter(), time.process_time()
            for seq in range(snapshots):
                due = wall0 + seq / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                payload = snapshot_payload(STORE, WINDOW, BASE_MS + seq, "EUR", _metrics(seq))
                encoded = dumps(payload)
                sent[seq] = time.perf_counter()
                await sink.write(payload, encoded)
            deadline = time.perf_counter() + 10
            # polls what the client tasks fill in; what never arrives within 10 s counts as lost
            while time.perf_counter() < deadline and any(len(r) < snapshots for r in received):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            wall = time.perf_counter() - wall0
            cpu = _cpu_seconds(proc.pid) - cpu0
            own_cpu = time.process_time() - own0
            memory = _memory(proc.pid)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await sink.close()
        stop_worker(proc, 10)
    delays = [(r[seq] - sent[seq]) * 1000 for r in received for seq in sent if seq in r]
    lost = clients * snapshots - len(delays)
    size = len(dumps(snapshot_payload(STORE, WINDOW, BASE_MS, "EUR", _metrics(0))))
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "system": platform.platform(), "python": platform.python_version()},
        "options": {"clients": clients, "snapshots": snapshots, "rate_per_s": rate, "event_bytes": size},
        "deliveries": len(delays),
        "lost": lost,
        "delay_ms": {
            "p50": round(percentile(delays, 0.50), 2),
            "p95": round(percentile(delays, 0.95), 2),
            "p99": round(percentile(delays, 0.99), 2),
            "max": round(max(delays), 2),
        } if delays else None,
        "target_p99_ms": 250,
        "dashboard": {
            "cpu_seconds": round(cpu, 2),
            "cpu_percent_of_one_core": round(100 * cpu / wall, 1),
            "rss_idle_bytes": rss_idle,
            "rss_with_clients_bytes": rss_connected,
            "rss_end_bytes": memory["VmRSS"],
            "rss_peak_bytes": memory["VmHWM"],
        },
        "load_process_cpu_percent": round(100 * own_cpu / wall, 1),
        "seconds": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--snapshots", type=int, default=300)
    parser.add_argument("--rate", type=float, default=10.0, help="snapshots per second")
    parser.add_argument("--output-dir", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dashboard-load-") as tmp:
        own_redis = None
        redis_url = os.environ.get("REDIS_URL")
        if not redis_url:
            own_redis = local.LocalRedis(Path(tmp) / "redis")
            port = local.free_port()
            own_redis.start(port, die_with_parent=True)
            redis_url = f"redis://{local.LOOPBACK}:{port}/0"
        try:
            results = asyncio.run(run(args.clients, args.snapshots, args.rate, redis_url, Path(tmp) / "dashboard.log"))
        finally:
            if own_redis is not None:
                own_redis.stop()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / f"dashboard-{results['date'][:10]}-{args.clients}clients-{args.rate:g}per-s.json"
    path.write_text(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode() + "\n")
    delay, dash = results["delay_ms"] or {}, results["dashboard"]
    print(f"{args.clients} SSE clients, {args.snapshots} snapshots at {args.rate:g}/s "
          f"({results['options']['event_bytes']} bytes each): {results['deliveries']:,} deliveries, "
          f"{results['lost']} lost")
    print(f"publish -> delivery delay ms: p50 {delay.get('p50')}  p95 {delay.get('p95')}  p99 {delay.get('p99')}  "
          f"max {delay.get('max')}  (target p99 < {results['target_p99_ms']})")
    print(f"dashboard: CPU {dash['cpu_percent_of_one_core']}% of one core, RSS {dash['rss_end_bytes'] / 2**20:.1f} MiB "
          f"(idle {dash['rss_idle_bytes'] / 2**20:.1f}, peak {dash['rss_peak_bytes'] / 2**20:.1f}); "
          f"load process CPU {results['load_process_cpu_percent']}%")
    print(f"written: {path}")
    ok = results["lost"] == 0 and bool(delay) and delay["p99"] < results["target_p99_ms"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
